"""Pieces shared by the drop-in families of :mod:`lfvila_kernels.patch`: the checks of a module's bias table and
index, zero-padding in a library's order, the one call of the fused op, and the fused ``forward_part1`` of the
pad-then-roll N-D blocks (Video-Swin, MONAI). Torch only; no model library is imported.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from .modules import clip_window, crop_bias_table
from .reference import bias_table_rows, relative_position_index
from .window_attention import window_attention

MARK = "_lfvila_fused"  # attribute of an installed override (a functools.partial): which handle installed it


def library_class(module_name: str, class_name: str):
    """The class if its library is already imported (a model built from it must have imported it), else None."""
    mod = sys.modules.get(module_name)
    return getattr(mod, class_name, None) if mod is not None else None


def overrides(module, cls, method: str) -> bool:
    """Whether ``type(module)`` replaces ``cls.method``."""
    return getattr(type(module), method) is not getattr(cls, method)


def triple(window) -> tuple[int, int, int]:
    """A 2-D ``(h, w)`` window or shift as the 3-D ``(1, h, w)`` / ``(0, h, w)`` the fused op takes; 3-D as it is."""
    window = tuple(int(w) for w in window)
    return window if len(window) == 3 else (1, *window)


def index_reason(index, window) -> str | None:
    """None if a module's relative-position index buffer is the standard one for ``window`` (t, h, w), else why."""
    if index is None or index.device.type == "meta":
        return None
    n = window[0] * window[1] * window[2]
    if index.numel() != n * n or not torch.equal(index.detach().cpu().reshape(n, n), relative_position_index(window)):
        return f"its relative_position_index is not the standard Swin index for window {window}"
    return None


def table_reason(table, window, heads) -> str | None:
    """None if ``table`` is a ``(bias_table_rows(window), heads)`` tensor, else why."""
    expected = (bias_table_rows(window), heads)
    if not isinstance(table, torch.Tensor) or tuple(table.shape) != expected:
        got = tuple(table.shape) if isinstance(table, torch.Tensor) else type(table).__name__
        return f"its relative_position_bias_table has shape {got}, expected {expected} for window {window}"
    return None


def pad_end(x: torch.Tensor, window, dims) -> tuple[torch.Tensor, bool]:
    """Zero-pad channels-last ``x`` at the end of ``dims`` (consecutive, ending before the channel dim) to multiples
    of ``window`` (one entry per dim). Returns ``(x or the padded copy, whether anything was padded)``."""
    pads = {d: (-x.shape[d]) % w for d, w in zip(dims, window)}
    if not any(pads.values()):
        return x, False
    spec = [0, 0]  # F.pad lists (before, after) pairs from the last dim backwards: channels first
    for d in range(x.dim() - 2, min(dims) - 1, -1):
        spec += [0, pads.get(d, 0)]
    return F.pad(x, spec), True


def fused_heads(q, k, v, window, shift, table, scale, impl) -> torch.Tensor:
    """q, k, v ``(B, T, H, W, heads, hd)`` on a grid the window divides -> ``(B, T, H, W, heads * hd)``."""
    out = window_attention(q, k, v, window, shift, table, scale, impl=impl)
    return out.flatten(-2)


def reads_sub_window(full, window) -> bool:
    """Whether ``index[:N, :N]`` of the ``full`` window's index (``N = prod(window)``), which Video-Swin and MONAI
    read for a clipped ``window``, is the index of the ``window`` box itself. The first N tokens of the full window in
    row-major order form that box iff every axis after the first one longer than 1 is whole."""
    long_axes = [i for i, c in enumerate(window) if c > 1]
    return not long_axes or all(window[i] == full[i] for i in range(long_axes[0] + 1, len(full)))


def pad_then_roll_part1(block, impl, x: torch.Tensor, mask_matrix=None) -> torch.Tensor:
    """``forward_part1`` of a Video-Swin-style block (Video-Swin, MONAI), fused: ``x (B, D, H, W, C)`` or, 2-D,
    ``(B, H, W, C)`` -> the same shape (``norm1`` included, as there).

    The library clips a window axis that is at least the grid to the grid (shift 0 there), zero-pads the grid to
    multiples of the window, then rolls the padded grid: the fused op runs on ``pad(x)`` with the clipped shift.
    ``mask_matrix`` (the library's -100 shift mask over the padded grid) is implied by the shift and not read. A
    clipped window whose ``index[:N, :N]`` is not its own box (:func:`reads_sub_window`) runs the library's path.
    """
    attn = block.attn
    two_d = x.dim() == 4
    full = triple(attn.window_size)
    grid = (1, *x.shape[1:3]) if two_d else tuple(x.shape[1:4])
    window, shift = clip_window(grid, triple(block.window_size), (0,) * two_d + tuple(block.shift_size))
    if not reads_sub_window(full, window):
        return type(block).forward_part1(block, x, mask_matrix)
    B, C = x.shape[0], x.shape[-1]
    x = block.norm1(x).view(B, *grid, C)
    x, _ = pad_end(x, window, (1, 2, 3))  # (B, Dp, Hp, Wp, C)
    Dp, Hp, Wp = x.shape[1:4]
    qkv = attn.qkv(x).view(B, Dp, Hp, Wp, 3, attn.num_heads, -1)  # (B, Dp, Hp, Wp, 3, heads, hd)
    q, k, v = qkv.unbind(4)
    table = crop_bias_table(attn.relative_position_bias_table, full, window)  # a clipped window's rows
    out = fused_heads(q, k, v, window, shift, table, float(attn.scale), impl).view(B, Dp, Hp, Wp, -1)
    out = out[:, : grid[0], : grid[1], : grid[2]]
    out = attn.proj_drop(attn.proj(out))
    return out.squeeze(1) if two_d else out
