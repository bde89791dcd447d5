"""The geometry of a shifted-window attention call, shared by the Triton kernels and the torch path.

Everything here depends on ``(grid, window, shift)`` only, is computed once per geometry and device (cached), and is
a few KB to a few MB: the token of every window position, the mask class of every window and, per class, which
(query, key) pairs are allowed. Pure torch: importing it does not import triton.
"""

from __future__ import annotations

import torch

_GEOMETRY_CACHE: dict = {}


def pow2(n: int) -> int:
    """``n`` rounded up to a power of two, at least 16 (the Triton tiles' padded window length ``P``)."""
    return max(16, 1 << (int(n) - 1).bit_length())


def geometry(grid, window, shift, device) -> dict:
    """Tokens, mask classes and allowed pairs of a ``(T, H, W)`` grid cut into ``(wt, wh, ww)`` windows after a roll
    by ``-shift`` (windows past the grid's end are partial: their missing positions are invalid).

    Returns a dict, cached per ``(grid, window, shift, device)``:

    * ``tok (n_win, P) int32``: the flat original token ``(t*H + h)*W + w`` of window position ``n`` (row-major over
      ``(t, h, w)`` inside the window, windows row-major over the grid), ``-1`` outside the grid or at ``n >= N``;
    * ``cls (n_win,) int32``: each window's mask class (windows whose positions share one pattern of (valid, wrapped
      by the shift on each axis)); ``order (n_win,) int32``: the windows sorted by class, stable; ``class_start``: a
      list of ``classes + 1`` offsets into ``order``;
    * ``allowed (classes, P, P) bool``: a valid query sees the valid keys of its own region; a position outside the
      grid (never stored) sees every valid key, so that no row is empty;
    * ``N`` (tokens per full window), ``P = pow2(N)``, ``n_win``.
    """
    key = (tuple(grid), tuple(window), tuple(shift), str(device))
    if key in _GEOMETRY_CACHE:
        return _GEOMETRY_CACHE[key]
    T, H, W = grid
    wt, wh, ww = window
    N = wt * wh * ww
    P = pow2(N)
    cpu = torch.device("cpu")
    n_t, n_h, n_w = -(-T // wt), -(-H // wh), -(-W // ww)
    win = torch.arange(n_t * n_h * n_w, device=cpu)
    pos = torch.arange(P, device=cpu)
    lt, lh, lw = pos // (wh * ww), (pos // ww) % wh, pos % ww
    it = (win // (n_h * n_w))[:, None] * wt + lt[None, :]  # rolled coordinates (n_win, P)
    ih = ((win // n_w) % n_h)[:, None] * wh + lh[None, :]
    iw = (win % n_w)[:, None] * ww + lw[None, :]
    valid = (pos < N)[None, :] & (it < T) & (ih < H) & (iw < W)
    st, sh, sw = shift
    tok = (((it + st) % T) * H + (ih + sh) % H) * W + (iw + sw) % W
    tok = torch.where(valid, tok, -1).to(torch.int32)
    region = (it >= T - st).long() * 4 + (ih >= H - sh).long() * 2 + (iw >= W - sw).long()
    region = torch.where(valid, region, -1)
    patterns, cls = torch.unique(region, dim=0, return_inverse=True)  # (classes, P), (n_win,)
    pv = patterns >= 0
    allowed = pv[:, None, :] & ((patterns[:, :, None] == patterns[:, None, :]) | ~pv[:, :, None])
    order = torch.sort(cls, stable=True).indices
    counts = torch.bincount(cls, minlength=patterns.shape[0])
    class_start = [0] + torch.cumsum(counts, 0).tolist()
    geo = dict(tok=tok.to(device), cls=cls.to(torch.int32).to(device), order=order.to(torch.int32).to(device),
               class_start=class_start, allowed=allowed.to(device), N=N, P=P, n_win=win.numel())
    _GEOMETRY_CACHE[key] = geo
    return geo
