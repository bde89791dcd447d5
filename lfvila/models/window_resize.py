"""Resizing the 3-D relative-position bias tables of the Swin blocks to another window size.

A ``(wt, wh, ww)`` window's table ``relative_position_bias_table`` has ``(2wt-1)(2wh-1)(2ww-1)`` rows, one per
relative offset ``(dt, dh, dw)``, row-major over ``(t, h, w)`` (the layout of ``relative_position_index``), and one
column per head. Loading a checkpoint into a model with other windows (evaluating a 32-frame checkpoint at 64 frames,
whose layers then use windows twice as long in time) needs each table resampled on that offset grid.

The official rule (``LF-VILA/src/utils/load.py``, ``load_model_weights_with_mismatch(change_window=True)``): the
table as ``(1, heads, 2wt-1, (2wh-1)(2ww-1))`` in fp32, ``F.interpolate(mode="bicubic")`` (``align_corners`` left at
its default, False) to ``(2wt'-1, (2wh-1)(2ww-1))``: the temporal axis only, the spatial window assumed unchanged; the
result stored in fp16, the dtype of its checkpoints. Ours follows that rule on the temporal axis; a spatial axis that
changes too is resampled the same way, bicubic with ``align_corners=False`` on the ``(2wh-1, 2ww-1)`` grid, which is
the official rule for the 2-D Swin tables (``process_swin_weights``). Bicubic is separable, so the two steps together
are the tensor-product (tricubic) resampling of the 3-D grid. An axis that keeps its size is not touched; the same
window returns the table unchanged. Computed in fp32 (fp64 stays fp64), returned in the table's dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lfvila_kernels import relative_position_index
from lfvila_kernels.reference import bias_table_rows

__all__ = ["resize_bias_table", "window_from_index", "source_window"]


def _check_window(window, name: str) -> tuple[int, int, int]:
    window = tuple(int(w) for w in window)
    if len(window) != 3 or min(window) < 1:
        raise ValueError(f"{name} must be three positive sizes (wt, wh, ww), got {window}")
    return window


def resize_bias_table(table: torch.Tensor, old_window, new_window) -> torch.Tensor:
    """Resample a bias table from window ``old_window`` to ``new_window`` (module docstring for the rule).

    ``table``: ``((2wt-1)(2wh-1)(2ww-1), heads)`` for ``old_window = (wt, wh, ww)``. Returns
    ``((2wt'-1)(2wh'-1)(2ww'-1), heads)`` for ``new_window = (wt', wh', ww')``, contiguous, in ``table``'s dtype.
    """
    old_window, new_window = _check_window(old_window, "old_window"), _check_window(new_window, "new_window")
    if table.ndim != 2 or table.shape[0] != bias_table_rows(old_window):
        raise ValueError(f"table must be ({bias_table_rows(old_window)}, heads) for window {old_window}, "
                         f"got {tuple(table.shape)}")
    heads = table.shape[1]
    t1, h1, w1 = (2 * w - 1 for w in old_window)
    t2, h2, w2 = (2 * w - 1 for w in new_window)
    x = table.detach().t().to(torch.float64 if table.dtype == torch.float64 else torch.float32)  # (heads, rows)
    x = x.reshape(1, heads, t1, h1 * w1)
    if t2 != t1:  # the official rule: bicubic over (time, flattened space), space unchanged
        x = F.interpolate(x, size=(t2, h1 * w1), mode="bicubic", align_corners=False)
    if (h2, w2) != (h1, w1):  # the same rule over (h, w), each time offset a channel
        x = F.interpolate(x.reshape(1, heads * t2, h1, w1), size=(h2, w2), mode="bicubic", align_corners=False)
    return x.reshape(heads, t2 * h2 * w2).t().contiguous().to(table.dtype)


def _triples(n: int):
    """Every ``(a, b, c)`` of positive integers with ``a * b * c = n``."""
    for a in range(1, n + 1):
        if n % a:
            continue
        for b in range(1, n // a + 1):
            if (n // a) % b == 0:
                yield a, b, n // a // b


def window_from_index(index: torch.Tensor, rows: int) -> tuple[int, int, int] | None:
    """The window whose ``relative_position_index`` is ``index`` ``(N, N)`` and whose table has ``rows`` rows; None if
    no window fits (a corrupt index)."""
    if index.ndim != 2 or index.shape[0] != index.shape[1]:
        return None
    for window in _triples(int(index.shape[0])):
        if bias_table_rows(window) == rows and torch.equal(relative_position_index(window), index.cpu().long()):
            return window
    return None


def source_window(rows: int, target_window, index: torch.Tensor | None = None) -> tuple[int, int, int]:
    """The window of a checkpoint's bias table with ``rows`` rows: read from its ``relative_position_index`` where the
    checkpoint has one, else the official rule's assumption (the spatial window of ``target_window``, the temporal
    size from the rows). Raises ValueError when neither gives a window."""
    if index is not None:
        window = window_from_index(index, rows)
        if window is None:
            raise ValueError(f"relative_position_index {tuple(index.shape)} fits no window with a {rows}-row table")
        return window
    _, wh, ww = _check_window(target_window, "target_window")
    spatial = (2 * wh - 1) * (2 * ww - 1)
    if rows % spatial or (rows // spatial) % 2 == 0:
        raise ValueError(f"a {rows}-row bias table has no temporal window with the spatial window ({wh}, {ww}) "
                         f"(rows must be (2wt-1) x {spatial})")
    return (rows // spatial + 1) // 2, wh, ww
