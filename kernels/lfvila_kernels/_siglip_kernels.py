"""Triton kernels of the fused SigLIP loss (``@triton.jit`` only: tiles, launchers and the ``torch.library`` ops are
in ``_siglip_launch.py``, the public op in ``siglip.py``).

The pairwise sigmoid loss ``sum_ij softplus(-y_ij z_ij) / N`` over ``z = scale * a @ b.T + bias`` (``y = +1`` on the
diagonal, -1 elsewhere; -1 everywhere with NEG_ONLY) is computed tile by tile, never materialising the N x M logits:

- forward, one pass over the tiles: a grid of row blocks x S column splits. Program (rb, sp) recomputes its logit
  tiles, sums ``softplus(-t)`` per row and writes one ``(BLOCK_M,)`` partial row sum to row ``sp`` of an ``(S, N)``
  buffer; the launcher adds the partials in a fixed order. No online statistics: the loss is elementwise.
- backward, one launch per side (rows of a -> da, rows of b -> db: the same kernel with a and b swapped, since
  ``z^T`` has the same labels), grid row blocks x feature chunks x S column splits. Each program recomputes its logit
  tiles, forms ``dz = -y * sigmoid(-y z) * w`` (``w`` = upstream gradient / N) and accumulates ``dz @ b[:, chunk]``
  in fp32; it writes its own slice of an ``(S, N, d)`` fp32 partial (summed over S in a fixed order by the
  launcher), and on the a side its shares of ``d scale = sum_i a_i . (dz b)_i`` and ``d bias = sum dz``. No atomics,
  so every output is the same bits on every run.

Work: 5 N M d multiply-add passes per forward+backward (forward 1, each backward side 2: the logits and ``dz @ b``),
the contrastive kernels' count. The row tile of a stays resident (loaded once per program) where a feature row fits
(``_contrastive_launch.HOIST_ROW_BYTES``); wider rows take BLOCK_K-wide chunks reloaded per tile.

``softplus(x) = max(x, 0) + log1p(exp(-|x|))`` with log1p computed as ``log(u) * e / (u - 1)``, ``u = 1 + e`` (exact
to a few ulps where ``1 + e`` rounds; ``e`` where it rounds to 1): SigLIP's negatives sit near ``z = -10`` at its
initial scale and bias, where ``log(1 + e)`` alone would lose three digits of every term.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._contrastive_kernels import _load_tile, _raw_tile


@triton.jit
def _softplus(x):
    """``log(1 + exp(x))`` in fp32 without overflow, with an accurate log1p."""
    e = tl.exp(-tl.abs(x))
    u = 1.0 + e
    d = u - 1.0
    lp = tl.where(d == 0.0, e, tl.log(u) * (e / tl.where(d == 0.0, 1.0, d)))
    return tl.maximum(x, 0.0) + lp


@triton.jit
def _signed_logits(a, Ab, Bb, b, rows, cols, n_rows, n_cols, D, scale, bias, S_A: tl.constexpr, S_B: tl.constexpr,
                   NEG_ONLY: tl.constexpr, HOIST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_K: tl.constexpr, DOT_PREC: tl.constexpr):
    """``(t, positive)`` of one tile: ``t = y * z`` (fp32) and the mask of its diagonal (label +1) entries."""
    if HOIST:
        raw = tl.dot(a, tl.trans(b), input_precision=DOT_PREC)
    else:
        raw = _raw_tile(Ab, Bb, n_rows, n_cols, D, S_A, S_B, BLOCK_M, BLOCK_N, BLOCK_K, DOT_PREC)
    z = raw * scale + bias
    if NEG_ONLY:
        positive = rows[:, None] < 0  # all False
    else:
        positive = rows[:, None] == cols[None, :]
    return tl.where(positive, z, -z), positive


@triton.jit
def _sl_fwd_kernel(
    A, B, SCALE, BIAS, ROW,  # a (N, D), b (M, D), rows S_A / S_B elements apart; SCALE, BIAS 0-dim fp32; ROW (S, N)
    N, M, D, CB_PER_SPLIT,
    S_A: tl.constexpr, S_B: tl.constexpr, NEG_ONLY: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, HOIST: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """Program (rb, sp): ``ROW[sp, rows] = sum_j softplus(-t_ij)`` over the column blocks of split sp."""
    rb = tl.program_id(0)
    sp = tl.program_id(1)
    scale = tl.load(SCALE).to(tl.float32)
    bias = tl.load(BIAS).to(tl.float32)
    rows = rb * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < N
    Ab = A + tl.cast(rb * BLOCK_M, tl.int64) * S_A
    n_rows = N - rb * BLOCK_M
    if HOIST:  # the row tile, loaded once and kept for every column block
        a = _load_tile(Ab, n_rows, 0, D, S_A, BLOCK_M, BLOCK_K, True)
    else:
        a = rows  # unused
    acc = tl.zeros([BLOCK_M], dtype=tl.float32)
    cb0 = sp * CB_PER_SPLIT
    cb1 = tl.minimum(cb0 + CB_PER_SPLIT, tl.cdiv(M, BLOCK_N))
    for cb in range(cb0, cb1):
        cols = cb * BLOCK_N + tl.arange(0, BLOCK_N)
        Bb = B + tl.cast(cb * BLOCK_N, tl.int64) * S_B
        n_cols = M - cb * BLOCK_N
        if HOIST:
            b = _load_tile(Bb, n_cols, 0, D, S_B, BLOCK_N, BLOCK_K, True)
        else:
            b = cols  # unused
        t, _ = _signed_logits(a, Ab, Bb, b, rows, cols, n_rows, n_cols, D, scale, bias, S_A, S_B, NEG_ONLY, HOIST,
                              BLOCK_M, BLOCK_N, BLOCK_K, DOT_PREC)
        loss = tl.where(rmask[:, None] & (cols < M)[None, :], _softplus(-t), 0.0)
        acc += tl.sum(loss, 1)
    tl.store(ROW + sp.to(tl.int64) * N + rows, acc, mask=rmask)


@triton.jit
def _sl_bwd_kernel(
    A, B, SCALE, BIAS, W, DA, DSCALE, DBIAS,  # W: 0-dim fp32 upstream grad / N; DA (S, N, D) fp32 partials
    N, M, D, CB_PER_SPLIT,
    S_A: tl.constexpr, S_B: tl.constexpr, NEG_ONLY: tl.constexpr, WITH_DPARAMS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_DO: tl.constexpr,
    HOIST: tl.constexpr, SHARE_B: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """Program (rb, chunk, sp): ``DA[sp, rows, chunk] = scale * dz[rows, split cols] @ b[split cols, chunk]`` and,
    with WITH_DPARAMS, this program's ``d scale`` and ``d bias`` shares at ``DSCALE/DBIAS[(rb, chunk, sp)]``."""
    rb = tl.program_id(0)
    chunk = tl.program_id(1)
    sp = tl.program_id(2)
    scale = tl.load(SCALE).to(tl.float32)
    bias = tl.load(BIAS).to(tl.float32)
    w = tl.load(W).to(tl.float32)
    rows = rb * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < N
    dk0 = chunk * BLOCK_DO
    dcols = dk0 + tl.arange(0, BLOCK_DO)
    Ab = A + tl.cast(rb * BLOCK_M, tl.int64) * S_A
    n_rows = N - rb * BLOCK_M
    if HOIST:
        a = _load_tile(Ab, n_rows, 0, D, S_A, BLOCK_M, BLOCK_K, True)
    else:
        a = rows  # unused
    acc = tl.zeros([BLOCK_M, BLOCK_DO], dtype=tl.float32)
    dbias = tl.zeros([BLOCK_M], dtype=tl.float32)
    cb0 = sp * CB_PER_SPLIT
    cb1 = tl.minimum(cb0 + CB_PER_SPLIT, tl.cdiv(M, BLOCK_N))
    for cb in range(cb0, cb1):
        cols = cb * BLOCK_N + tl.arange(0, BLOCK_N)
        Bb = B + tl.cast(cb * BLOCK_N, tl.int64) * S_B
        n_cols = M - cb * BLOCK_N
        if HOIST:
            b = _load_tile(Bb, n_cols, 0, D, S_B, BLOCK_N, BLOCK_K, True)
            if SHARE_B:  # the logits' b tile is also the right operand of dz @ b (BLOCK_DO == BLOCK_K >= D)
                bo = b
            else:
                bo = _load_tile(Bb, n_cols, dk0, D, S_B, BLOCK_N, BLOCK_DO, True)
        else:
            bo = _load_tile(Bb, n_cols, dk0, D, S_B, BLOCK_N, BLOCK_DO, True)
            b = bo  # unused
        t, positive = _signed_logits(a, Ab, Bb, b, rows, cols, n_rows, n_cols, D, scale, bias, S_A, S_B, NEG_ONLY,
                                     HOIST, BLOCK_M, BLOCK_N, BLOCK_K, DOT_PREC)
        # sigmoid(-t), stable on both sides; d loss / d z = -y sigmoid(-t) w. Padded rows and columns (zero features
        # give z = bias there, not 0) are masked out.
        e = tl.exp(-tl.abs(t))
        r = 1.0 / (1.0 + e)
        sig = tl.where(t >= 0, e * r, r)
        dz = tl.where(positive, -sig, sig) * w
        dz = tl.where(rmask[:, None] & (cols < M)[None, :], dz, 0.0)
        dbias += tl.sum(dz, 1)
        acc += tl.dot(dz.to(bo.dtype), bo, input_precision=DOT_PREC)
    base = DA + (sp.to(tl.int64) * N + rows[:, None].to(tl.int64)) * D + dcols[None, :]
    tl.store(base, acc * scale, mask=rmask[:, None] & (dcols < D)[None, :])
    if WITH_DPARAMS:
        # d scale = sum_ij dz_ij (a_i . b_j) = sum_i a_i . (sum_j dz_ij b_j): this chunk's share from the accumulator
        if HOIST and BLOCK_DO == BLOCK_K:
            ad = a
        else:
            ad = _load_tile(Ab, n_rows, dk0, D, S_A, BLOCK_M, BLOCK_DO, True)
        slot = (rb * tl.num_programs(1) + chunk) * tl.num_programs(2) + sp
        tl.store(DSCALE + slot, tl.sum(tl.sum(ad.to(tl.float32) * acc, 1), 0))
        tl.store(DBIAS + slot, tl.sum(dbias, 0))
