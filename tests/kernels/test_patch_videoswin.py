"""``apply_window_attention`` on a Video-Swin layer written here from the published algorithm (moved from
``test_patch.py``; the rule and helpers are that file's): grids that the window divides, pads, and clips in time, the
Triton kernel through the interpreter, a spatially clipped window on the original path, state dict and refusals.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from lfvila_kernels.patch import PatchHandle, apply_window_attention
from tests.kernels.test_patch import _assert_patched_within_tolerance, _assert_same_state, _fused_calls, _state


# --------------------------------------------------------------------------------------------------- Video-Swin
# A Video-Swin block written here from the published algorithm (Liu et al., "Video Swin Transformer"): the block
# layer-norms, zero-pads the grid to multiples of the window, rolls the padded grid by -shift, partitions it, attends
# with the 3D relative-position bias and the -100 shift mask of the padded grid, reverses, rolls back and crops.
def _vs_window_size(grid, window, shift):
    w, s = list(window), list(shift)
    for i, n in enumerate(grid):
        if n <= window[i]:
            w[i], s[i] = n, 0
    return tuple(w), tuple(s)


def _vs_partition(x, window):  # (B, D, H, W, C) -> (B * nW, N, C)
    B, D, H, W, C = x.shape
    x = x.view(B, D // window[0], window[0], H // window[1], window[1], W // window[2], window[2], C)
    return x.permute(0, 1, 3, 5, 2, 4, 6, 7).reshape(-1, window[0] * window[1] * window[2], C)


def _vs_reverse(windows, window, B, D, H, W):  # (B * nW, N, C) -> (B, D, H, W, C)
    x = windows.view(B, D // window[0], H // window[1], W // window[2], *window, -1)
    return x.permute(0, 1, 4, 2, 5, 3, 6, 7).reshape(B, D, H, W, -1)


def _vs_mask(padded, window, shift):  # (nW, N, N): 0 within a shift region, -100 across
    img = torch.zeros(1, *padded, 1)
    cnt = 0
    for d in (slice(-window[0]), slice(-window[0], -shift[0]), slice(-shift[0], None)):
        for h in (slice(-window[1]), slice(-window[1], -shift[1]), slice(-shift[1], None)):
            for w in (slice(-window[2]), slice(-window[2], -shift[2]), slice(-shift[2], None)):
                img[:, d, h, w, :] = cnt
                cnt += 1
    ids = _vs_partition(img, window).squeeze(-1)
    diff = ids[:, None, :] - ids[:, :, None]
    return diff.masked_fill(diff != 0, -100.0).masked_fill(diff == 0, 0.0)


class _VSAttention(nn.Module):
    def __init__(self, dim, window, num_heads, attn_drop=0.0):
        super().__init__()
        self.dim, self.window_size, self.num_heads = dim, window, num_heads
        self.scale = (dim // num_heads) ** -0.5
        rows = (2 * window[0] - 1) * (2 * window[1] - 1) * (2 * window[2] - 1)
        self.relative_position_bias_table = nn.Parameter(torch.randn(rows, num_heads) * 0.5)
        coords = torch.stack(torch.meshgrid(*[torch.arange(w) for w in window], indexing="ij")).flatten(1)
        rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)  # (N, N, 3), query minus key
        rel = rel + torch.tensor([w - 1 for w in window])
        strides = torch.tensor([(2 * window[1] - 1) * (2 * window[2] - 1), 2 * window[2] - 1, 1])
        self.register_buffer("relative_position_index", (rel * strides).sum(-1))
        self.qkv = nn.Linear(dim, 3 * dim)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(0.0)

    def forward(self, x, mask=None):  # (B * nW, N, C)
        B_, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B_, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        bias = self.relative_position_bias_table[self.relative_position_index[:N, :N].reshape(-1)].reshape(N, N, -1)
        attn = attn + bias.permute(2, 0, 1)
        if mask is not None:
            nW = mask.shape[0]
            attn = (attn.view(B_ // nW, nW, self.num_heads, N, N) + mask[None, :, None]).view(-1, self.num_heads, N, N)
        attn = self.attn_drop(attn.softmax(-1))
        return self.proj_drop(self.proj((attn @ v).transpose(1, 2).reshape(B_, N, C)))


class _VSBlock(nn.Module):
    def __init__(self, dim, num_heads, window, shift, attn_drop=0.0):
        super().__init__()
        self.window_size, self.shift_size = window, shift
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = _VSAttention(dim, window, num_heads, attn_drop)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward_part1(self, x, mask_matrix):
        B, D, H, W, C = x.shape
        window, shift = _vs_window_size((D, H, W), self.window_size, self.shift_size)
        x = self.norm1(x)
        pads = [(-n) % w for n, w in zip((D, H, W), window)]
        x = F.pad(x, (0, 0, 0, pads[2], 0, pads[1], 0, pads[0]))
        Dp, Hp, Wp = x.shape[1:4]
        if any(shift):
            x = torch.roll(x, shifts=tuple(-s for s in shift), dims=(1, 2, 3))
        out = self.attn(_vs_partition(x, window), mask=mask_matrix if any(shift) else None)
        x = _vs_reverse(out, window, B, Dp, Hp, Wp)
        if any(shift):
            x = torch.roll(x, shifts=shift, dims=(1, 2, 3))
        return x[:, :D, :H, :W].contiguous()

    def forward(self, x, mask_matrix):
        x = x + self.forward_part1(x, mask_matrix)
        return x + self.mlp(self.norm2(x))


class _VSLayer(nn.Module):
    """Two blocks (the second shifted by half a window in H and W) sharing the shift mask of the padded grid."""

    def __init__(self, dim=16, num_heads=2, window=(2, 3, 4), attn_drop=0.0):
        super().__init__()
        shift = (0, window[1] // 2, window[2] // 2)
        self.window_size, self.shift_size = window, shift
        self.blocks = nn.ModuleList([_VSBlock(dim, num_heads, window, (0, 0, 0), attn_drop),
                                     _VSBlock(dim, num_heads, window, shift, attn_drop)])  # fmt: skip

    def forward(self, x):  # (B, D, H, W, C)
        window, shift = _vs_window_size(x.shape[1:4], self.window_size, self.shift_size)
        padded = [-(-n // w) * w for n, w in zip(x.shape[1:4], window)]
        mask = _vs_mask(padded, window, shift).to(device=x.device, dtype=x.dtype) if any(shift) else None
        for block in self.blocks:
            x = block(x, mask)
        return x


def _vs_run(model, x):
    return model(x)


@pytest.mark.parametrize("grid, impl", [((4, 6, 8), "auto"), ((5, 7, 9), "auto"), ((1, 7, 9), "auto"),
                                        ((3, 4, 5), "triton")], ids=["divisible", "odd", "one-frame", "odd-triton"])
def test_video_swin_block_forward_and_backward_agree(grid, impl):
    from lfvila_kernels.dispatch import interpreting

    if impl == "triton" and not (torch.cuda.is_available() or interpreting()):
        pytest.skip("needs CUDA or TRITON_INTERPRET=1")
    device = "cuda" if impl == "triton" and torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    model = _VSLayer().to(device)
    x = torch.randn(2, *grid, 16).to(device)
    handle = _assert_patched_within_tolerance(model, x, _vs_run, impl=impl)
    assert handle.patched == ["blocks.0", "blocks.1"]


def test_video_swin_spatially_clipped_window_runs_the_original_path():
    torch.manual_seed(0)
    model = _VSLayer(window=(2, 8, 4))
    x = torch.randn(1, 4, 5, 9, 16)  # H = 5 <= 8: Video-Swin clips the window to 5 and reads index[:N, :N]
    with torch.no_grad():
        ref = model(x)
        with apply_window_attention(model), _fused_calls() as spy:
            assert torch.equal(model(x), ref)
        assert spy.call_count == 0


def test_video_swin_state_dict_and_refusals():
    torch.manual_seed(0)
    model = _VSLayer()
    before = _state(model)
    with apply_window_attention(model) as handle:
        assert isinstance(handle, PatchHandle)
        _assert_same_state(before, _state(model))
        model.load_state_dict(before, strict=True)
    with pytest.raises(ValueError, match=r"blocks\.0: attn_drop=0\.2 > 0"):
        apply_window_attention(_VSLayer(attn_drop=0.2))
    odd_index = _VSLayer()
    odd_index.blocks[1].attn.relative_position_index.fill_(0)
    with pytest.raises(ValueError, match=r"blocks\.1: its relative_position_index is not the standard Swin index"):
        apply_window_attention(odd_index)
    block = _VSLayer().blocks[1]  # a block by itself: the root module
    with apply_window_attention(block) as handle:
        assert handle.patched == ["<root>"] and handle.skipped == []
        assert "forward_part1" in block.__dict__
    assert "forward_part1" not in block.__dict__
    orphan = nn.Sequential(_VSAttention(16, (2, 3, 4), 2))
    handle = apply_window_attention(orphan, strict=False)
    assert handle.skipped == [("0", "a window-attention module (_VSAttention) outside a supported Swin block: the "
                                    "fused op replaces the block's shift/pad/partition path")]  # fmt: skip
