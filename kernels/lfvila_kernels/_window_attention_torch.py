"""HTWA window attention on the torch path (CPU, or any device without Triton): the precomputed geometry, one gather
per input, ``scaled_dot_product_attention`` per mask class with the bias + mask tile, one gather back.

The reference (``reference.window_attention_reference``) follows Video-Swin step by step: roll, pad and partition
each of q, k and v (two copies each), materialise the scores, add the bias, mask, softmax in a separate pass, and
roll the output back. This path computes the same function with the Triton kernels' geometry
(``_window_geometry.geometry``):

* The windows are taken class by class (windows of one mask class share their allowed pairs), batch item by batch
  item inside a class. One ``index_select`` per input gathers every window position's token in that order, rolled
  and partitioned in one copy; positions outside the grid read token 0, which no valid query sees and whose rows
  are never stored.
* Per class, one ``F.scaled_dot_product_attention`` call with ``attn_mask`` = the class's tile ``(1, heads, N, N)``:
  the relative-position bias where the pair is allowed and ``-inf`` where it is not (the Triton tile, in score units
  rather than raw ``q . k`` units). On the CPU, torch runs a fused flash kernel there, so the ``(N, N)`` scores of a
  window live in cache, not in memory. The tile is built from the table by differentiable ops, so the table gets its
  gradient through autograd.
* One ``index_select`` writes every token's output back in the original order.

Returns what the reference returns, up to floating-point order (the tests compare both at the usual tolerances).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._window_geometry import geometry
from .reference import relative_position_bias


def _plan(geo: dict, B: int, n_tok: int) -> dict:
    """Per geometry and batch size, cached in ``geo``: ``gather (R,)`` long, the source row in ``(B * n_tok)`` of
    every window position, windows ordered by class then batch item; ``inverse (B * n_tok,)`` long, the row in that
    order of every token; ``spans``: per class, ``(start, windows)`` of its rows (``windows`` counts batch items)."""
    key = ("torch_plan", B)
    if key in geo:
        return geo[key]
    N = geo["N"]
    tok = geo["tok"][:, :N].long()
    order = geo["order"].long()
    bounds = geo["class_start"]
    base = torch.arange(B, device=tok.device)[:, None, None] * n_tok
    gathers, spans, start = [], [], 0
    inverse = torch.empty(B * n_tok, dtype=torch.long, device=tok.device)
    for c in range(len(bounds) - 1):
        t = tok[order[bounds[c] : bounds[c + 1]]]  # (n_c, N)
        n_c = t.shape[0]
        src = base + t[None]  # (B, n_c, N) rows of (B * n_tok), invalid where t < 0
        valid = (t >= 0)[None].expand_as(src)
        rows = start + torch.arange(B * n_c * N, device=tok.device).view(B, n_c, N)
        inverse[src[valid]] = rows[valid]
        gathers.append(torch.where(valid, src, 0).reshape(-1))
        spans.append((start, B * n_c))
        start += B * n_c * N
    plan = dict(gather=torch.cat(gathers), inverse=inverse, spans=spans)
    geo[key] = plan
    return plan


def _class_masks(geo: dict, table: torch.Tensor | None, window, dtype: torch.dtype) -> list:
    """Per class, the additive ``attn_mask`` ``(1, heads, N, N)`` (``(1, 1, N, N)`` without a table) in ``dtype``:
    the bias where allowed, ``-inf`` elsewhere; ``None`` for a class with neither bias nor mask. Differentiable in
    ``table``."""
    N = geo["N"]
    allowed = geo["allowed"][:, :N, :N]
    bias = None if table is None else relative_position_bias(table, window).to(dtype)[None]  # (1, nh, N, N)
    masks = []
    for c, masked in enumerate(_class_masked(geo)):
        if not masked:
            masks.append(bias)
        else:
            fill = torch.zeros((1, 1, N, N), dtype=dtype, device=allowed.device).masked_fill(~allowed[c], float("-inf"))
            masks.append(fill if bias is None else bias + fill)
    return masks


def _class_masked(geo: dict) -> list[bool]:
    """Per class, whether it masks a pair of real window positions; cached in ``geo`` (one host sync a geometry)."""
    if "class_masked" not in geo:
        N = geo["N"]
        geo["class_masked"] = (~geo["allowed"][:, :N, :N]).flatten(1).any(1).tolist()
    return geo["class_masked"]


def takes_masked_path(grid, window, shift, device) -> bool:
    """Whether ``window_attention`` takes this path: where the geometry masks some pair (a shift or partial
    windows). Measured on 2 AMD EPYC cores at the lfvila-base shapes (B = 1, fp32), this path against the
    reference, ms: shifted L0 43 vs 112, L1 17 vs 30, L2 17 vs 24, L3 19 vs 31; unshifted (one class) L0 98 vs 33,
    L1-L5 within noise: torch's CPU flash kernel is slow on many 30-token windows, and without a mask the reference
    has no extra pass to save. The mask is per class of windows, so one class can still hold one."""
    return any(_class_masked(geometry(tuple(grid), tuple(window), tuple(shift), device)))


def window_attention_torch(q, k, v, window, shift, rel_pos_bias, scale: float) -> torch.Tensor:
    """Same contract as ``window_attention`` (arguments already checked): ``(B, T, H, W, heads, head_dim)`` in,
    the same shape out, contiguous, q's dtype."""
    B, T, H, W, nh, hd = q.shape
    n_tok = T * H * W
    geo = geometry((T, H, W), tuple(window), tuple(shift), q.device)
    plan = _plan(geo, B, n_tok)
    N = geo["N"]
    gather = plan["gather"]
    # 2-D rows (one row = a token's heads x head_dim, a view for the qkv projection's output): index_select copies
    # whole rows there, ~20x faster than on a 3-D strided source
    qw, kw, vw = (x.reshape(B * n_tok, nh * hd).index_select(0, gather) for x in (q, k, v))  # (R, nh * hd)
    masks = _class_masks(geo, rel_pos_bias, window, q.dtype)
    outs = []
    for (start, n), mask in zip(plan["spans"], masks):
        qc, kc, vc = (x[start : start + n * N].view(n, N, nh, hd).transpose(1, 2) for x in (qw, kw, vw))
        o = F.scaled_dot_product_attention(qc, kc, vc, attn_mask=mask, scale=scale)  # (n, nh, N, hd)
        outs.append(o.transpose(1, 2).reshape(n * N, nh * hd))
    out = outs[0] if len(outs) == 1 else torch.cat(outs)
    return out.index_select(0, plan["inverse"]).view(B, T, H, W, nh, hd)
