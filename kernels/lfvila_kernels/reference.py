"""Pure-torch reference of every ``lfvila_kernels`` op: the CPU path, the test oracle, the benchmark baseline.

Nothing here launches a Triton kernel. Every function takes the same arguments and layouts as its fused twin and
computes the same function with plain tensor ops (autograd gives the gradients).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_INDEX_CACHE: dict[tuple[int, int, int], torch.Tensor] = {}
_DEVICE_INDEX_CACHE: dict[tuple[tuple[int, int, int], str], torch.Tensor] = {}


def _relative_position_index_cpu(window: tuple[int, int, int]) -> torch.Tensor:
    if window in _INDEX_CACHE:
        return _INDEX_CACHE[window]
    wt, wh, ww = window
    cpu = torch.device("cpu")  # explicit: a default-device context (e.g. meta) must not leak into the cache
    coords = torch.stack(torch.meshgrid(torch.arange(wt, device=cpu), torch.arange(wh, device=cpu),
                                        torch.arange(ww, device=cpu), indexing="ij"))
    flat = coords.flatten(1)  # (3, N): the (t, h, w) of each window token, row-major
    rel = flat[:, :, None] - flat[:, None, :]  # (3, N, N): query minus key
    strides = torch.tensor([(2 * wh - 1) * (2 * ww - 1), 2 * ww - 1, 1], device=cpu)
    offsets = torch.tensor([wt - 1, wh - 1, ww - 1], device=cpu)
    index = ((rel + offsets[:, None, None]) * strides[:, None, None]).sum(0)
    _INDEX_CACHE[window] = index
    return index


def relative_position_index(window, device=None) -> torch.Tensor:
    """Video-Swin's relative-position index for a ``(wt, wh, ww)`` window.

    Returns a long tensor ``(N, N)``, ``N = wt * wh * ww``: entry ``(i, j)`` is the row of the bias table
    ``((2wt-1)(2wh-1)(2ww-1), heads)`` holding the bias of query token ``i`` attending to key token ``j``, tokens
    numbered row-major over ``(t, h, w)`` inside the window.
    """
    window = tuple(int(w) for w in window)
    index = _relative_position_index_cpu(window)
    if device is None or torch.device(device).type == "cpu":
        return index
    key = (window, str(torch.device(device)))  # one copy per device, not a host-to-device copy per call
    if key not in _DEVICE_INDEX_CACHE:
        _DEVICE_INDEX_CACHE[key] = index.to(device)
    return _DEVICE_INDEX_CACHE[key]


def relative_position_bias(table: torch.Tensor, window) -> torch.Tensor:
    """The bias of every (query, key) pair of a ``(wt, wh, ww)`` window: ``(heads, N, N)`` read from the table
    ``((2wt-1)(2wh-1)(2ww-1), heads)`` through :func:`relative_position_index` (differentiable in ``table``)."""
    N = window[0] * window[1] * window[2]
    index = relative_position_index(window, table.device)
    return table[index.reshape(-1)].reshape(N, N, table.shape[1]).permute(2, 0, 1)


def bias_table_rows(window) -> int:
    """Rows of the relative-position bias table of a ``(wt, wh, ww)`` window: ``(2wt-1)(2wh-1)(2ww-1)``."""
    wt, wh, ww = window
    return (2 * wt - 1) * (2 * wh - 1) * (2 * ww - 1)


def _shift_regions(size: int, padded: int, shift: int, device) -> torch.Tensor:
    """Per position of the rolled, padded axis: 1 where the cyclic shift wrapped the token around, else 0."""
    pos = torch.arange(padded, device=device)
    return ((pos >= size - shift) & (pos < size)).long() if shift else torch.zeros_like(pos)


def window_attention_reference(q, k, v, window, shift=(0, 0, 0), rel_pos_bias=None, scale=None):
    """Shifted-window 3D attention in plain torch (same contract as ``lfvila_kernels.window_attention``).

    Args:
        q, k, v: ``(B, T, H, W, heads, head_dim)``, any strides.
        window: ``(wt, wh, ww)``, each axis ``1 <= w <= grid axis``.
        shift: ``(st, sh, sw)``, ``0 <= s < w``: the cyclic roll applied before partitioning.
        rel_pos_bias: optional table ``((2wt-1)(2wh-1)(2ww-1), heads)``, Video-Swin indexing.
        scale: softmax scale, default ``head_dim ** -0.5``.

    Returns ``(B, T, H, W, heads, head_dim)`` in the original token order, dtype of q. Scores and softmax are
    computed in the input dtype for half types (as eager Video-Swin does) with the softmax accumulated in fp32.
    """
    B, T, H, W, nh, hd = q.shape
    window, shift = tuple(window), tuple(shift)
    wt, wh, ww = window
    N = wt * wh * ww
    scale = hd**-0.5 if scale is None else scale
    pads = [(-n) % w for n, w in zip((T, H, W), window)]
    Tp, Hp, Wp = T + pads[0], H + pads[1], W + pads[2]
    nT, nH, nW = Tp // wt, Hp // wh, Wp // ww

    def to_windows(x):  # (B, T, H, W, nh, hd) -> (B, nWin, nh, N, hd)
        if any(shift):
            x = torch.roll(x, shifts=tuple(-s for s in shift), dims=(1, 2, 3))
        x = F.pad(x, (0, 0, 0, 0, 0, pads[2], 0, pads[1], 0, pads[0]))  # pad W, H, T at the end
        x = x.reshape(B, nT, wt, nH, wh, nW, ww, nh, hd).permute(0, 1, 3, 5, 7, 2, 4, 6, 8)
        return x.reshape(B, nT * nH * nW, nh, N, hd)

    qw, kw, vw = to_windows(q), to_windows(k), to_windows(v)
    scores = torch.matmul(qw * scale, kw.transpose(-1, -2))  # (B, nWin, nh, N, N)
    if rel_pos_bias is not None:
        bias = relative_position_bias(rel_pos_bias, window)  # (nh, N, N)
        scores = scores + bias.to(scores.dtype)

    if any(shift) or any(pads):
        # Region code of each padded-grid position: wrapped-or-not per axis; padded positions are invalid keys.
        rt, rh, rw = (_shift_regions(n, p, s, q.device) for n, p, s in zip((T, H, W), (Tp, Hp, Wp), shift))
        code = rt[:, None, None] * 4 + rh[None, :, None] * 2 + rw[None, None, :]  # (Tp, Hp, Wp)
        valid = torch.zeros(Tp, Hp, Wp, dtype=torch.bool, device=q.device)
        valid[:T, :H, :W] = True

        def part(x):  # (Tp, Hp, Wp) -> (nWin, N)
            return x.reshape(nT, wt, nH, wh, nW, ww).permute(0, 2, 4, 1, 3, 5).reshape(-1, N)

        code_w, valid_w = part(code), part(valid)
        # Padded query rows (discarded below) may attend to any valid key, so no row is ever fully masked.
        allowed = valid_w[:, None, :] & ((code_w[:, :, None] == code_w[:, None, :]) | ~valid_w[:, :, None])
        scores = scores.masked_fill(~allowed[None, :, None], float("-inf"))

    acc = torch.float32 if scores.dtype in (torch.float16, torch.bfloat16) else scores.dtype
    attn = torch.softmax(scores, dim=-1, dtype=acc).to(vw.dtype)
    out = torch.matmul(attn, vw)  # (B, nWin, nh, N, hd)
    out = out.reshape(B, nT, nH, nW, nh, wt, wh, ww, hd).permute(0, 1, 5, 2, 6, 3, 7, 4, 8)
    out = out.reshape(B, Tp, Hp, Wp, nh, hd)[:, :T, :H, :W]
    if any(shift):
        out = torch.roll(out, shifts=shift, dims=(1, 2, 3))
    return out


# ----------------------------------------------------------------------------------------------------------------------
# Contrastive loss (symmetric InfoNCE)
# ----------------------------------------------------------------------------------------------------------------------


def contrastive_loss_naive(a, b, scale, labels=None):
    """Materialised logits ``(N, M) = a @ b.T * scale`` and ``F.cross_entropy``: the textbook loss, O(N*M) memory.

    Returns ``(row_ce (N,), col_ce (M,) or None)``: per-row cross-entropies a->b (target ``labels`` or the diagonal)
    and, without labels, per-column b->a (target the diagonal). ``scale``: float or 0-dim tensor.
    """
    logits = (a @ b.t()) * scale
    targets = torch.arange(a.shape[0], device=a.device) if labels is None else labels
    row_ce = F.cross_entropy(logits, targets, reduction="none")
    col_ce = None if labels is not None else F.cross_entropy(logits.t(), targets, reduction="none")
    return row_ce, col_ce


def _lse_rows(a, b, scale, chunk):
    """Row log-sum-exps of ``a @ b.T * scale`` in row chunks: ``(N,)``, O(chunk * M) memory."""
    return torch.cat([torch.logsumexp((a[i : i + chunk] @ b.t()) * scale, dim=1) for i in range(0, a.shape[0], chunk)])


class _ChunkedContrastive(torch.autograd.Function):
    """Per-row (and per-column) cross-entropies of ``a @ b.T * scale`` with O((N + M) * chunk) extra memory.

    Forward keeps only the row / column log-sum-exps; backward recomputes the logits chunk by chunk.
    """

    @staticmethod
    def forward(ctx, a, b, scale, labels, chunk):
        symmetric = labels is None
        targets = torch.arange(a.shape[0], device=a.device) if symmetric else labels
        lse_r = _lse_rows(a, b, scale, chunk)
        pos = (a * b[targets]).sum(-1) * scale  # logit of each row's positive
        lse_c = _lse_rows(b, a, scale, chunk) if symmetric else None
        ctx.save_for_backward(a, b, scale, targets, lse_r, lse_c if symmetric else lse_r)
        ctx.symmetric, ctx.chunk = symmetric, chunk
        row_ce = lse_r - pos
        col_ce = lse_c - pos if symmetric else a.new_empty(0)
        return row_ce, col_ce

    @staticmethod
    def backward(ctx, g_row, g_col):
        a, b, scale, targets, lse_r, lse_c = ctx.saved_tensors
        chunk = ctx.chunk
        da, db = torch.zeros_like(a), torch.zeros_like(b)
        dscale = torch.zeros((), dtype=torch.float64 if a.dtype == torch.float64 else torch.float32, device=a.device)
        cols = torch.arange(b.shape[0], device=a.device)
        for i in range(0, a.shape[0], chunk):
            rows = slice(i, i + chunk)
            raw = a[rows] @ b.t()  # (chunk, M)
            logits = raw * scale
            # d loss / d logits: row term g_row * (softmax over columns - onehot(target)), column term likewise.
            ds = torch.exp(logits - lse_r[rows, None]) * g_row[rows, None]
            ds -= (cols[None, :] == targets[rows, None]) * g_row[rows, None]
            if ctx.symmetric:
                ds += torch.exp(logits - lse_c[None, :]) * g_col[None, :]
                ds -= (cols[None, :] == torch.arange(i, i + raw.shape[0], device=a.device)[:, None]) * g_col[None, :]
            da[rows] = (ds @ b) * scale
            db += (ds.t() @ a[rows]) * scale
            dscale += (ds * raw).sum()
        return da, db, dscale.to(scale.dtype), None, None


def contrastive_ce_chunked(a, b, scale, labels=None, chunk: int = 1024):
    """Per-row (and, without labels, per-column) cross-entropies like :func:`contrastive_loss_naive`, computed in
    chunks of ``chunk`` rows so that nothing of size N x M is kept: the CPU path of ``contrastive_loss``.

    ``scale``: 0-dim tensor (it gets a gradient when it requires one). Returns ``(row_ce (N,), col_ce (M,) or None)``.
    """
    row_ce, col_ce = _ChunkedContrastive.apply(a, b, scale, labels, chunk)
    return row_ce, (col_ce if labels is None else None)
