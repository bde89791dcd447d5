"""The official augmentation on uint8 frames ``(T, H, W, C)``: training RandomResizedCrop to ``size`` (area 0.8-1,
aspect 3/4-4/3, one box for every frame of a video) and a horizontal flip; evaluation resize 240x428, centre crop
216x385, resize to ``size``. Every draw comes from the caller's generator (the loader's ``(seed, epoch, index)``).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["augment", "resize"]


def resize(video: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """uint8 ``(T, H, W, C)`` -> uint8 ``(T, h, w, C)``, bilinear with antialiasing."""
    x = video.permute(0, 3, 1, 2).float()  # (T, C, H, W)
    x = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
    return x.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1)


def _center_crop(video: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    h, w = video.shape[1:3]
    top, left = max(0, (h - size[0]) // 2), max(0, (w - size[1]) // 2)
    return video[:, top : top + size[0], left : left + size[1]]


def _random_resized_crop_box(h: int, w: int, rng: np.random.Generator, scale=(0.8, 1.0), ratio=(3 / 4, 4 / 3)):
    """torchvision's RandomResizedCrop box rule (area fraction in ``scale``, log-uniform aspect ratio in ``ratio``,
    10 tries, then a centre crop clamped to the ratio range): ``(top, left, height, width)``."""
    area = h * w
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = float(np.exp(rng.uniform(np.log(ratio[0]), np.log(ratio[1]))))
        cw, ch = int(round((target * aspect) ** 0.5)), int(round((target / aspect) ** 0.5))
        if 0 < cw <= w and 0 < ch <= h:
            return int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1)), ch, cw
    in_ratio = w / h
    if in_ratio < ratio[0]:
        cw, ch = w, int(round(w / ratio[0]))
    elif in_ratio > ratio[1]:
        ch, cw = h, int(round(h * ratio[1]))
    else:
        cw, ch = w, h
    return (h - ch) // 2, (w - cw) // 2, ch, cw


def augment(video: torch.Tensor, size: tuple[int, int], train: bool, rng: np.random.Generator,
            flip: bool = True) -> torch.Tensor:
    """The official transforms on uint8 ``(T, H, W, C)`` frames, one draw per video (all frames alike).

    train: RandomResizedCrop to ``size`` (scale 0.8-1), horizontal flip with p = 0.5 (when ``flip``; the draw is
    made either way, so switching it off leaves the crops unchanged). eval: resize to 240x428, centre
    crop 216x385, resize to ``size`` (the official ``Resize(240, 428)``, ``CenterCrop(216, 385)``,
    ``Resize(192, 320)``). Normalisation happens in the model, on the device (``VideoEncoder.normalize``).
    """
    if train:
        top, left, ch, cw = _random_resized_crop_box(video.shape[1], video.shape[2], rng)
        video = resize(video[:, top : top + ch, left : left + cw], size)
        if rng.random() < 0.5 and flip:
            video = video.flip(2)
        return video.contiguous()
    video = _center_crop(resize(video, (240, 428)), (216, 385))
    return resize(video, size).contiguous()
