"""Frames from the loader to the encoder's tokens: normalised once (``VideoEncoder.normalize``), never transposed in
memory (channels-last all the way)."""

from __future__ import annotations

import torch

from lfvila.models import create_model
from lfvila.models.video_encoder import IMAGENET_MEAN, IMAGENET_STD


def test_normalize_is_the_formula_and_keeps_channels_last():
    enc = create_model("lfvila-tiny-video").eval()
    video = torch.randint(0, 256, (2, 8, 64, 96, 3), dtype=torch.uint8)
    x = enc.normalize(video)
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1, 1)
    torch.testing.assert_close(x, (video.permute(0, 4, 1, 2, 3).float() / 255.0 - mean) / std, rtol=0, atol=1e-6)
    assert x.shape == (2, 3, 8, 64, 96) and x.is_contiguous(memory_format=torch.channels_last_3d)
    tokens = enc.patch_embed.proj(x).permute(0, 2, 3, 4, 1)
    assert tokens.is_contiguous()  # the convolution ran channels-last: no transpose back to tokens


def test_uint8_and_float_inputs_give_the_same_encoding():
    enc = create_model("lfvila-tiny-video").eval()
    video = torch.randint(0, 256, (1, 8, 64, 96, 3), dtype=torch.uint8)
    with torch.no_grad():
        a = enc(video).grid
        b = enc(enc.normalize(video).contiguous()).grid  # a channels-first float batch, normalised elsewhere
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
