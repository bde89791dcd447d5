"""``nn.Module`` wrappers around the fused ops."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from .contrastive import contrastive_loss
from .reference import bias_table_rows, relative_position_index
from .window_attention import window_attention


def clip_window(grid, window, shift) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """Video-Swin's rule (``get_window_size``): a window axis at least as large as the grid axis is clipped to the
    grid and takes shift 0. ``grid``, ``window``, ``shift``: ``(T, H, W)``-ordered triples."""
    w_out, s_out = list(window), list(shift)
    for i, n in enumerate(grid):
        if n <= window[i]:
            w_out[i], s_out[i] = n, 0
    return tuple(w_out), tuple(s_out)


def crop_bias_table(table: torch.Tensor, window, clipped) -> torch.Tensor:
    """The rows of a ``window`` bias table that a smaller ``clipped`` window uses, as a table for ``clipped``.

    ``(R, heads) -> (R', heads)``: the centre of the ``(2wt-1, 2wh-1, 2ww-1)`` offset grid, differentiable.
    """
    if tuple(window) == tuple(clipped):
        return table
    dims = [2 * w - 1 for w in window]
    grid = table.view(*dims, table.shape[-1])
    for axis, (w, c) in enumerate(zip(window, clipped)):
        grid = grid.narrow(axis, w - c, 2 * c - 1)
    return grid.reshape(bias_table_rows(clipped), table.shape[-1])


class WindowAttention3D(nn.Module):
    """Shifted-window multi-head self-attention over a video token grid, state-dict compatible with Video-Swin.

    ``forward(x)``: ``x (B, T, H, W, C)`` channels-last -> ``(B, T, H, W, C)``. One fused ``qkv`` projection, the fused
    window attention reading q, k, v in place from its output, then ``proj``. Parameters and buffers carry
    Video-Swin's ``WindowAttention3D`` names and shapes (``qkv``, ``proj``, ``relative_position_bias_table``
    ``((2wt-1)(2wh-1)(2ww-1), heads)``, ``relative_position_index`` ``(N, N)``), so its checkpoints load with
    ``strict=True``.

    Video-Swin's rule applies per call: a window axis at least as large as the grid axis is clipped to the grid and
    takes shift 0. A clipped window reads the centre of the bias table (the offsets it can express). Video-Swin reads
    ``index[:N, :N]`` instead, which agrees when only the time axis is clipped and is geometrically wrong otherwise.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window=(2, 7, 7),
        shift=(0, 0, 0),
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        impl: str = "auto",
    ):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        if attn_drop:
            raise ValueError("attn_drop > 0 is not supported by the fused window attention (LF-VILA uses 0)")
        self.dim, self.num_heads = dim, num_heads
        self.window_size, self.shift_size = tuple(window), tuple(shift)
        self.scale = qk_scale or (dim // num_heads) ** -0.5
        self.impl = impl
        self.relative_position_bias_table = nn.Parameter(torch.zeros(bias_table_rows(self.window_size), num_heads))
        self.register_buffer("relative_position_index", relative_position_index(self.window_size).clone())
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, H, W, C = x.shape
        window, shift = clip_window((T, H, W), self.window_size, self.shift_size)
        nh = self.num_heads
        qkv = self.qkv(x).view(B, T, H, W, 3, nh, C // nh)  # (B, T, H, W, 3, heads, head_dim)
        q, k, v = qkv.unbind(4)  # strided views, contiguous last dim
        table = crop_bias_table(self.relative_position_bias_table, self.window_size, window)
        out = window_attention(q, k, v, window, shift, table, self.scale, impl=self.impl)  # (B, T, H, W, nh, hd)
        return self.proj_drop(self.proj(out.reshape(B, T, H, W, C)))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}, window={self.window_size}, shift={self.shift_size}"


class ContrastiveLoss(nn.Module):
    """Symmetric InfoNCE over ``(N, d)`` x ``(M, d)`` features, fused (see ``contrastive_loss``).

    ``learnable=False``: fixed temperature (LF-VILA: 0.05). ``learnable=True``: CLIP's parameterisation, a parameter
    ``log_logit_scale`` initialised to ``log(1 / temperature)``; the scale ``exp(log_logit_scale)`` is clamped to
    ``max_logit_scale`` (CLIP: 100). ``forward(a, b, labels=None) -> loss`` (see ``contrastive_loss`` for labels and
    reductions).
    """

    def __init__(self, temperature: float = 0.05, learnable: bool = False, max_logit_scale: float = 100.0,
                 reduction: str = "mean", impl: str = "auto"):
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"temperature must be positive, got {temperature!r}")
        self.temperature, self.max_logit_scale = temperature, max_logit_scale
        self.reduction, self.impl = reduction, impl
        self.log_logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / temperature))) if learnable else None

    def forward(self, a: torch.Tensor, b: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        scale = None
        if self.log_logit_scale is not None:
            scale = self.log_logit_scale.exp().clamp(max=self.max_logit_scale)
        return contrastive_loss(a, b, temperature=self.temperature, logit_scale=scale, labels=labels,
                                reduction=self.reduction, impl=self.impl)

    def extra_repr(self) -> str:
        learn = self.log_logit_scale is not None
        return f"temperature={self.temperature}, learnable={learn}, reduction={self.reduction!r}"
