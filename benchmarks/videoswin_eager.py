"""Eager Video-Swin shifted-window attention: roll, pad, partition, explicit softmax, reverse.

This is how Video-Swin's ``SwinTransformerBlock3D`` + ``WindowAttention3D`` compute attention, written out step by
step with its own helpers (``window_partition``, ``compute_mask``, the relative-position index). It serves twice:
as the benchmarks' *eager* baseline and as the tests' independent oracle for ``lfvila_kernels.window_attention``.
It shares no code with ``lfvila_kernels``.

Layouts: q, k, v ``(B, T, H, W, heads, head_dim)``; bias table ``((2wt-1)(2wh-1)(2ww-1), heads)``.

Grids not divisible by the window follow ``lfvila_kernels``' documented rule (roll on the unpadded grid, then pad;
padded keys are masked out) rather than Video-Swin's (pad with zeros, then roll the padded grid, padded keys
attended). On divisible grids both rules are Video-Swin's exactly.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def window_partition(x: torch.Tensor, window: tuple[int, int, int]) -> torch.Tensor:
    """``(B, T, H, W, C)`` with T, H, W multiples of the window -> ``(B * nW, wt * wh * ww, C)``."""
    B, T, H, W, C = x.shape
    wt, wh, ww = window
    x = x.view(B, T // wt, wt, H // wh, wh, W // ww, ww, C)
    return x.permute(0, 1, 3, 5, 2, 4, 6, 7).reshape(-1, wt * wh * ww, C)


def window_reverse(windows: torch.Tensor, window: tuple[int, int, int], B: int, T: int, H: int, W: int) -> torch.Tensor:
    """Inverse of :func:`window_partition`: ``(B * nW, N, C)`` -> ``(B, T, H, W, C)``."""
    wt, wh, ww = window
    x = windows.view(B, T // wt, H // wh, W // ww, wt, wh, ww, -1)
    return x.permute(0, 1, 4, 2, 5, 3, 6, 7).reshape(B, T, H, W, -1)


def relative_position_index(window: tuple[int, int, int]) -> torch.Tensor:
    """Video-Swin's ``(N, N)`` index into the ``((2wt-1)(2wh-1)(2ww-1), heads)`` bias table."""
    wt, wh, ww = window
    coords = torch.stack(torch.meshgrid(torch.arange(wt), torch.arange(wh), torch.arange(ww), indexing="ij"))
    flat = coords.flatten(1)  # (3, N)
    rel = (flat[:, :, None] - flat[:, None, :]).permute(1, 2, 0).contiguous()  # (N, N, 3)
    rel[:, :, 0] += wt - 1
    rel[:, :, 1] += wh - 1
    rel[:, :, 2] += ww - 1
    rel[:, :, 0] *= (2 * wh - 1) * (2 * ww - 1)
    rel[:, :, 1] *= 2 * ww - 1
    return rel.sum(-1)


def _axis_slices(size: int, padded: int, w: int, s: int) -> list[slice]:
    if s == 0:
        return [slice(0, padded)]
    if size == padded:  # Video-Swin's three regions
        return [slice(0, -w), slice(-w, -s), slice(-s, None)]
    return [slice(0, size - s), slice(size - s, size), slice(size, padded)]  # wrapped or not; padding apart


def compute_mask(dims, padded, window, shift, device) -> torch.Tensor:
    """Shift-region ids per window, Video-Swin style: ``(nW, N, N)`` with 0 (allowed) or -100 (other region)."""
    img_mask = torch.zeros((1, *padded, 1), device=device)
    cnt = 0
    for d in _axis_slices(dims[0], padded[0], window[0], shift[0]):
        for h in _axis_slices(dims[1], padded[1], window[1], shift[1]):
            for w in _axis_slices(dims[2], padded[2], window[2], shift[2]):
                img_mask[:, d, h, w, :] = cnt
                cnt += 1
    mask_windows = window_partition(img_mask, window).squeeze(-1)  # (nW, N)
    attn_mask = mask_windows.unsqueeze(1) - mask_windows.unsqueeze(2)
    return attn_mask.masked_fill(attn_mask != 0, -100.0).masked_fill(attn_mask == 0, 0.0)


def videoswin_window_attention(q, k, v, window, shift=(0, 0, 0), rel_pos_bias=None, scale=None, bias_index=None):
    """Eager shifted-window attention. q, k, v ``(B, T, H, W, heads, head_dim)`` -> same shape, original order.

    ``bias_index`` ``(N, N)`` overrides the index into ``rel_pos_bias`` (Video-Swin reads ``index[:N, :N]`` of its
    configured window's index when a window is clipped to a small grid).
    """
    B, T, H, W, nh, hd = q.shape
    window, shift = tuple(window), tuple(shift)
    scale = hd**-0.5 if scale is None else scale
    pads = [(-n) % w for n, w in zip((T, H, W), window)]
    padded = (T + pads[0], H + pads[1], W + pads[2])
    N = window[0] * window[1] * window[2]

    def to_windows(x):  # (B, T, H, W, nh, hd) -> (B*nW, nh, N, hd)
        if any(shift):
            x = torch.roll(x, shifts=tuple(-s for s in shift), dims=(1, 2, 3))
        x = F.pad(x.reshape(B, T, H, W, nh * hd), (0, 0, 0, pads[2], 0, pads[1], 0, pads[0]))
        return window_partition(x, window).view(-1, N, nh, hd).transpose(1, 2)

    qw, kw, vw = to_windows(q), to_windows(k), to_windows(v)
    attn = (qw * scale) @ kw.transpose(-2, -1)  # (B*nW, nh, N, N)
    if rel_pos_bias is not None:
        index = relative_position_index(window).to(q.device) if bias_index is None else bias_index
        bias = rel_pos_bias[index[:N, :N].reshape(-1)].reshape(N, N, -1).permute(2, 0, 1)
        attn = attn + bias.to(attn.dtype).unsqueeze(0)
    nW = attn.shape[0] // B
    if any(shift) or any(pads):
        mask = compute_mask((T, H, W), padded, window, shift, q.device).to(attn.dtype)  # (nW, N, N)
        if any(pads):
            valid = torch.zeros((1, *padded, 1), device=q.device)
            valid[:, :T, :H, :W] = 1
            key_ok = window_partition(valid, window).squeeze(-1).bool()  # (nW, N)
            mask = mask.masked_fill(~key_ok[:, None, :], float("-inf"))
        attn = attn.view(B, nW, nh, N, N) + mask[None, :, None]
        attn = attn.view(-1, nh, N, N)
    attn = attn.softmax(dim=-1)
    out = (attn @ vw).transpose(1, 2).reshape(-1, N, nh * hd)  # (B*nW, N, C)
    out = window_reverse(out, window, B, *padded)[:, :T, :H, :W]
    if any(shift):
        out = torch.roll(out, shifts=shift, dims=(1, 2, 3))
    return out.reshape(B, T, H, W, nh, hd)


class VideoSwinWindowAttention3D(nn.Module):
    """Video-Swin's ``WindowAttention3D`` parameters (qkv, proj, bias table, index) with the block's shift logic.

    ``forward`` takes the token grid ``(B, T, H, W, C)`` and applies Video-Swin's rule: a window axis at least as
    large as the grid axis is clipped to it and takes shift 0, the bias index then read as ``index[:N, :N]``.
    """

    def __init__(self, dim, num_heads, window, shift=(0, 0, 0), qkv_bias=True):
        super().__init__()
        self.dim, self.num_heads = dim, num_heads
        self.window_size, self.shift_size = tuple(window), tuple(shift)
        wt, wh, ww = self.window_size
        self.relative_position_bias_table = nn.Parameter(
            torch.randn((2 * wt - 1) * (2 * wh - 1) * (2 * ww - 1), num_heads) * 0.02
        )
        self.register_buffer("relative_position_index", relative_position_index(self.window_size))
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, H, W, C = x.shape
        window, shift = list(self.window_size), list(self.shift_size)
        for i, n in enumerate((T, H, W)):
            if n <= window[i]:
                window[i], shift[i] = n, 0
        nh = self.num_heads
        qkv = self.qkv(x).view(B, T, H, W, 3, nh, C // nh)
        N = window[0] * window[1] * window[2]
        q, k, v = qkv.unbind(4)
        out = videoswin_window_attention(
            q, k, v, window, shift, self.relative_position_bias_table, bias_index=self.relative_position_index[:N, :N]
        )
        return self.proj(out.reshape(B, T, H, W, C))

