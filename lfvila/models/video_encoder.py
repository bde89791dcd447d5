"""LF-VILA's video encoder: a 3D Swin transformer with Hierarchical Temporal Window Attention (HTWA).

Layout everywhere inside the encoder: channels-last tokens ``(B, T, H, W, C)``, as Video-Swin.

Structure (``lfvila-base-video``, the official numbers; ``docs/design.md``, "The model"):

    video (B, 3, 32, 192, 320) --PatchEmbed3D (Conv3d k=s=(1,8,8) + LN)--> (B, 32, 24, 40, 128)
    layer 0: 2 blocks, 4 heads,  window (2, 3, 5)   (B, 32, 24, 40, 128) --PatchMerging--> (B, 32, 12, 20, 256)
    layer 1: 2 blocks, 8 heads,  window (4, 3, 5)   (B, 32, 12, 20, 256) --PatchMerging--> (B, 32, 6, 10, 512)
    layer 2: 14 blocks, 16 heads, window (8, 3, 5)  (B, 32, 6, 10, 512)  -> local branch (see below)
    layer 3: 2 blocks, 16 heads, window (16, 3, 5)  (B, 32, 6, 10, 512)
    layer 4: 2 blocks, 16 heads, window (16, 3, 5)  (B, 32, 6, 10, 512) --PatchMerging--> (B, 32, 3, 5, 1024)
    layer 5: 2 blocks, 32 heads, window (32, 3, 5) -> clipped to the grid, no shift   (B, 32, 3, 5, 1024) --norm-->

Odd blocks shift their windows by ``(0, wh // 2, ww // 2)`` (never in time); ``lfvila_kernels.WindowAttention3D``
applies Video-Swin's clipping rule per call (an axis whose window covers the grid takes that size and shift 0).

The local (intra-clip) branch: the output of the last layer whose temporal window is ``<= local_window`` (8 frames,
one clip; layer 2 in ``lfvila-base-video``) goes through ``local_feat_proj`` (a spatial PatchMerging) and
``norm_local``: ``(B, 32, 6, 10, 512) -> (B, 32, 3, 5, 1024)``. The official loop resets that feature inside the loop,
so it returns the final grid as "local" instead; ``compat_official=True`` reproduces that.

Module names follow the official checkpoint keys (``patch_embed.proj``, ``layers.{i}.blocks.{j}.attn.qkv``,
``layers.{i}.downsample.reduction``, ``norm``, ``norm_local``, ``local_feat_proj.{norm,reduction}``, ...), so an
official ``video_encoder.*`` state dict loads with ``strict=True`` after stripping the prefix.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint as torch_checkpoint

from lfvila_kernels import WindowAttention3D
from lfvila_kernels.modules import clip_window

# ImageNet statistics for uint8 input, the same values as ``lfvila.data.loader`` (kept here so the model does not
# import the data stack).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class VideoEncoderConfig:
    """Hyper-parameters of the video encoder; defaults are the official LF-VILA numbers (``lfvila-base-video``).

    ``window_size`` is per layer, ``(T, H, W)`` in tokens. ``stages[i]`` sets layer ``i``'s width
    ``embed_dim * 2 ** stages[i]``; ``downsample_stages`` are the layers followed by a spatial PatchMerging.
    ``local_window``: frames per clip; the local branch reads the last layer whose temporal window fits in a clip.
    ``attn_impl``: ``"auto" | "triton" | "torch"``, passed to every ``WindowAttention3D``.
    """

    patch_size: tuple[int, int, int] = (1, 8, 8)
    in_chans: int = 3
    embed_dim: int = 128
    depths: tuple[int, ...] = (2, 2, 14, 2, 2, 2)
    stages: tuple[int, ...] = (0, 1, 2, 2, 2, 3)
    downsample_stages: tuple[int, ...] = (0, 1, 4)
    num_heads: tuple[int, ...] = (4, 8, 16, 16, 16, 32)
    window_size: tuple[tuple[int, int, int], ...] = ((2, 3, 5), (4, 3, 5), (8, 3, 5), (16, 3, 5), (16, 3, 5),
                                                     (32, 3, 5))
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    drop_rate: float = 0.0
    drop_path_rate: float = 0.2
    patch_norm: bool = True
    temporal_no_shifting: bool = True
    local_window: int = 8
    attn_impl: str = "auto"
    grad_checkpointing: bool = False
    compat_official: bool = False
    extra: dict = field(default_factory=dict)  # free-form notes (e.g. the intended input size); not used by the model

    def __post_init__(self):
        n = len(self.depths)
        for name in ("stages", "num_heads", "window_size"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"{name} has {len(getattr(self, name))} entries, depths has {n}")
        self.window_size = tuple(tuple(int(v) for v in w) for w in self.window_size)

    def dim(self, i: int) -> int:
        """Channel width of layer ``i``."""
        return self.embed_dim * 2 ** self.stages[i]

    @property
    def local_layer(self) -> int | None:
        """Index of the last layer whose temporal window is ``<= local_window`` (``lfvila-base-video``: 2), or None."""
        fits = [i for i, w in enumerate(self.window_size) if w[0] <= self.local_window]
        return fits[-1] if fits else None


@dataclass
class VideoEncoderOutput:
    """``grid``: final features ``(B, T, H/64, W/64, C_last)`` after ``norm`` (base: ``(B, 32, 3, 5, 1024)``).

    ``local``: intra-clip features ``(B, T, H/64, W/64, 2 * C_local)`` from ``local_feat_proj`` + ``norm_local``
    (base: ``(B, 32, 3, 5, 1024)``); with ``compat_official=True`` it is ``grid`` itself (the official behaviour).
    """

    grid: torch.Tensor
    local: torch.Tensor


class DropPath(nn.Module):
    """Stochastic depth: in training, zero a sample's residual branch with probability ``p`` and scale the rest by
    ``1 / (1 - p)``. ``x (B, ...) -> (B, ...)``."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"p={self.p:.3f}"


class Mlp(nn.Module):
    """``fc1 -> GELU -> fc2`` on the last dim: ``(..., C) -> (..., C)``."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class SwinBlock3D(nn.Module):
    """Pre-norm Swin block: ``x + drop_path(attn(norm1(x)))``, then ``x + drop_path(mlp(norm2(x)))``.

    ``x (B, T, H, W, C) -> (B, T, H, W, C)``; the window shift is the attention's (clipped per call).
    """

    def __init__(self, dim: int, num_heads: int, window, shift, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 drop: float = 0.0, drop_path: float = 0.0, attn_impl: str = "auto"):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention3D(dim, num_heads, window, shift, qkv_bias=qkv_bias, proj_drop=drop,
                                      impl=attn_impl)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchMerging(nn.Module):
    """Spatial 2x2 merging: ``(B, T, H, W, C) -> (B, T, ceil(H/2), ceil(W/2), 2C)``; never temporal.

    The four neighbours are concatenated in Video-Swin's order (``[0::2, 0::2]``, ``[1::2, 0::2]``, ``[0::2, 1::2]``,
    ``[1::2, 1::2]`` over H, W), then ``norm`` (LayerNorm 4C) and ``reduction`` (Linear 4C -> 2C, no bias). Odd H or W
    is zero-padded at the end first, as the official code does.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        H, W = x.shape[2], x.shape[3]
        if H % 2 or W % 2:
            x = F.pad(x, (0, 0, 0, W % 2, 0, H % 2))  # pads C, then W, then H (from the last dim)
        x0 = x[:, :, 0::2, 0::2]
        x1 = x[:, :, 1::2, 0::2]
        x2 = x[:, :, 0::2, 1::2]
        x3 = x[:, :, 1::2, 1::2]
        x = torch.cat([x0, x1, x2, x3], dim=-1)  # (B, T, H/2, W/2, 4C)
        return self.reduction(self.norm(x))

    def extra_repr(self) -> str:
        return f"dim={self.dim}"


class PatchEmbed3D(nn.Module):
    """``Conv3d(in_chans, embed_dim, kernel=stride=patch_size)`` + LayerNorm.

    ``(B, C, T, H, W)`` float -> ``(B, T', H', W', embed_dim)`` channels-last, ``X' = ceil(X / patch)``: T, H and W
    are zero-padded at the end to multiples of the patch (the official code pads with mixed-up axes; at 192x320 with
    (1, 8, 8) patches no padding happens, so both agree there).
    """

    def __init__(self, patch_size=(1, 8, 8), in_chans: int = 3, embed_dim: int = 128, norm: bool = True):
        super().__init__()
        self.patch_size = tuple(patch_size)
        self.proj = nn.Conv3d(in_chans, embed_dim, kernel_size=self.patch_size, stride=self.patch_size)
        self.norm = nn.LayerNorm(embed_dim) if norm else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pt, ph, pw = self.patch_size
        T, H, W = x.shape[2:]
        pad = (0, -W % pw, 0, -H % ph, 0, -T % pt)
        if any(pad):
            x = F.pad(x, pad)
        x = self.proj(x).permute(0, 2, 3, 4, 1)  # (B, T', H', W', C)
        return self.norm(x) if self.norm is not None else x


class BasicLayer(nn.Module):
    """One HTWA layer: ``depth`` Swin blocks sharing a window size, then an optional spatial PatchMerging.

    ``(B, T, H, W, C) -> (B, T, H, W, C)`` or ``(B, T, ceil(H/2), ceil(W/2), 2C)`` with ``downsample``. Block ``j``
    shifts by ``(0, wh // 2, ww // 2)`` when ``j`` is odd (``(wt // 2, ...)`` if ``temporal_no_shifting=False``).
    """

    def __init__(self, dim: int, depth: int, num_heads: int, window, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 drop: float = 0.0, drop_path=(), downsample: bool = False, temporal_no_shifting: bool = True,
                 attn_impl: str = "auto"):
        super().__init__()
        self.window_size = tuple(window)
        shift = tuple(w // 2 for w in self.window_size)
        if temporal_no_shifting:
            shift = (0,) + shift[1:]
        self.shift_size = shift
        self.grad_checkpointing = False
        self.blocks = nn.ModuleList(
            SwinBlock3D(dim, num_heads, self.window_size, (0, 0, 0) if j % 2 == 0 else shift, mlp_ratio, qkv_bias,
                        drop, drop_path[j], attn_impl)
            for j in range(depth)
        )
        self.downsample = PatchMerging(dim) if downsample else None

    def forward_blocks(self, x: torch.Tensor) -> torch.Tensor:
        """The blocks only (no downsampling): ``(B, T, H, W, C) -> (B, T, H, W, C)``."""
        for blk in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = torch_checkpoint.checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_blocks(x)
        return self.downsample(x) if self.downsample is not None else x


class VideoEncoder(nn.Module):
    """LF-VILA's 3D Swin video encoder with HTWA (official ``SwinTransformer3D``'s names and parameters).

    ``forward(video)`` takes either
      * float ``(B, C, T, H, W)``, already normalised (``lfvila.data.loader.to_model_input``), or
      * uint8 ``(B, T, H, W, C)`` as decoded (DALI's FHWC), normalised here on the tensor's device
        (``/255``, ImageNet mean/std, to the patch embedding's dtype),
    and returns ``VideoEncoderOutput(grid, local)`` (shapes there). Any T, H, W work; the official input is
    32 x 192 x 320.
    """

    def __init__(self, cfg: VideoEncoderConfig | None = None, **overrides):
        super().__init__()
        cfg = cfg or VideoEncoderConfig()
        if overrides:
            cfg = VideoEncoderConfig(**{**cfg.__dict__, **overrides})
        self.cfg = cfg
        self.compat_official = cfg.compat_official
        n = len(cfg.depths)
        self.patch_embed = PatchEmbed3D(cfg.patch_size, cfg.in_chans, cfg.embed_dim, cfg.patch_norm)
        self.pos_drop = nn.Dropout(cfg.drop_rate)
        total = sum(cfg.depths)
        dpr = [cfg.drop_path_rate * k / (total - 1) if total > 1 else 0.0 for k in range(total)]  # linear 0 -> rate
        self.layers = nn.ModuleList()
        start = 0
        for i in range(n):
            self.layers.append(BasicLayer(
                cfg.dim(i), cfg.depths[i], cfg.num_heads[i], cfg.window_size[i], cfg.mlp_ratio, cfg.qkv_bias,
                cfg.drop_rate, dpr[start:start + cfg.depths[i]], i in cfg.downsample_stages,
                cfg.temporal_no_shifting, cfg.attn_impl))
            start += cfg.depths[i]
        self.num_features = cfg.dim(n - 1) * (2 if (n - 1) in cfg.downsample_stages else 1)
        self.norm = nn.LayerNorm(self.num_features)
        self.local_layer = cfg.local_layer
        # The official model always holds local_feat_proj = PatchMerging(dim of layer 2) and norm_local (its 89.23 M
        # parameters count them); the local feature is the *output* of the local layer (after its downsampling, if any).
        local_in = self._layer_out_dim(self.local_layer if self.local_layer is not None else n - 1)
        self.local_feat_proj = PatchMerging(local_in)
        self.norm_local = nn.LayerNorm(2 * local_in)
        self.apply(_init_weights)
        self.set_grad_checkpointing(cfg.grad_checkpointing)

    def _layer_out_dim(self, i: int) -> int:
        return self.cfg.dim(i) * (2 if i in self.cfg.downsample_stages else 1)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in backward (``torch.utils.checkpoint``, ``use_reentrant=False``)."""
        for layer in self.layers:
            layer.grad_checkpointing = enable

    def window_schedule(self, grid) -> list[list[tuple[tuple[int, int, int], tuple[int, int, int]]]]:
        """The ``(window, shift)`` each block really uses on a patch grid ``(T, H, W)`` (after clipping), per layer.

        ``grid`` is the patch-embedding output size, e.g. ``(32, 24, 40)`` for 32 x 192 x 320 input.
        """
        t, h, w = grid
        out = []
        for layer in self.layers:
            out.append([clip_window((t, h, w), blk.attn.window_size, blk.attn.shift_size) for blk in layer.blocks])
            if layer.downsample is not None:
                h, w = (h + 1) // 2, (w + 1) // 2
        return out

    def normalize(self, video: torch.Tensor) -> torch.Tensor:
        """uint8 ``(B, T, H, W, C)`` -> float ``(B, C, T, H, W)`` ImageNet-normalised, on ``video``'s device; float
        input ``(B, C, T, H, W)`` is returned cast to the model dtype (assumed normalised already).

        The one place where frames are normalised (the loaders, DALI's included, deliver uint8 frames). The frames
        are never transposed in memory: the channels-first view of the channels-last uint8 batch keeps its
        ``channels_last_3d`` strides through the cast and the normalisation, so the patch embedding's convolution
        runs channels-last and its output, permuted back to ``(B, T, H, W, C)`` tokens, is contiguous as it is."""
        dtype = self.patch_embed.proj.weight.dtype
        if video.dtype != torch.uint8:
            if video.ndim != 5 or video.shape[1] != self.cfg.in_chans:
                raise ValueError(f"float video must be (B, {self.cfg.in_chans}, T, H, W), got {tuple(video.shape)}")
            return video.to(dtype)
        if video.ndim != 5 or video.shape[-1] != self.cfg.in_chans:
            raise ValueError(f"uint8 video must be (B, T, H, W, {self.cfg.in_chans}), got {tuple(video.shape)}")
        mean = torch.tensor(IMAGENET_MEAN, device=video.device, dtype=dtype).view(1, 3, 1, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=video.device, dtype=dtype).view(1, 3, 1, 1, 1)
        x = video.permute(0, 4, 1, 2, 3).to(dtype) / 255.0  # (B, C, T, H, W)
        return (x - mean) / std

    def forward(self, video: torch.Tensor) -> VideoEncoderOutput:
        x = self.pos_drop(self.patch_embed(self.normalize(video)))  # (B, T, H/8, W/8, C0)
        local = None
        for i, layer in enumerate(self.layers):
            x = layer(x)  # (B, T, H_i, W_i, C_i)
            if i == self.local_layer and not self.compat_official:
                local = self.norm_local(self.local_feat_proj(x))  # (B, T, ceil(H_i/2), ceil(W_i/2), 2 C_i)
        x = self.norm(x)
        # Official loop: the local feature is reset every iteration, so "local" ends up as the final grid.
        return VideoEncoderOutput(grid=x, local=x if local is None else local)


def _init_weights(m: nn.Module) -> None:
    """Video-Swin's init: Linear weights truncated-normal std 0.02, zero biases; LayerNorm weight 1, bias 0."""
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
