"""Triton kernels of the fused contrastive loss (``contrastive.py`` holds the public op), launchers, torch.library op.

The loss over ``logits = a @ b.T * scale`` is computed tile by tile, never materialising the N x M logits:

- forward, one pass over the tiles: a grid of G row groups x S column splits (at least one program per SM where the
  problem has that many tiles). Program (g, s) takes row blocks g, g + G, ... against the column blocks of split s;
  for each row block it keeps the online row max and sum-exp in registers and folds each tile's column max / sum-exp
  into its row group's private ``(M,)`` column partials (read-modify-write by that program alone: no atomics). The
  row partials of the S splits and the column partials of the G groups are merged by fixed-order torch reductions.
- backward, from the saved log-sum-exps: ``dlogits = w_row * (softmax_row - onehot) + w_col * (softmax_col - onehot)``
  recomputed per tile; one launch per side (rows of a -> da, rows of b -> db, same kernel with the roles swapped),
  each program owning its output rows, so the gradients (and the scale's, from per-program partials) are
  deterministic.

For d <= 512 (half precision; 256 in fp32) a program's row tile of a is loaded once and stays in shared memory for the
whole column loop, each b tile is loaded once per logit tile and, in the backward, serves both the logit product and
``dlogits @ b``, and a backward program writes all d gradient columns: 5 N^2 d multiply-add passes per
forward+backward (forward 1, each backward side 2). Wider rows take 64-wide feature chunks reloaded per tile.

Extra memory: O(N + M) log-sum-exps plus ``G * M`` column partials (G bounded by the device and the feature size),
never O(N * M). Logits are handled in the log2 domain with a running max, so |logits| up to 100 and beyond
(tau = 0.01 with unit vectors) cannot overflow.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import triton
import triton.language as tl

from .dispatch import interpreting

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


@triton.jit
def _load_rows(P, idx, imask, s_p, k0, D, BLOCK_K: tl.constexpr):
    """``P[idx, k0 : k0 + BLOCK_K]`` gathered row by row (64-bit offsets), zero where ``imask`` is off or the feature
    index reaches ``D``: the per-row gathers outside the column loop (positives, one-hot terms)."""
    ks = k0 + tl.arange(0, BLOCK_K)
    ptrs = P + idx[:, None].to(tl.int64) * s_p + ks[None, :]
    return tl.load(ptrs, mask=imask[:, None] & (ks < D)[None, :], other=0.0)


@triton.jit
def _load_tile(P, n_valid, k0, D, S: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
               MASKED: tl.constexpr):
    """``P[0:BLOCK_R, k0 : k0 + BLOCK_K]`` of a row-major matrix whose rows start ``S`` elements apart, ``P`` already
    advanced to the tile's first row: one 64-bit base per tile and constant in-tile offsets, which the compiler folds
    into the loads' immediates. With MASKED, zero for rows >= n_valid or features >= D."""
    r = tl.arange(0, BLOCK_R)
    ks = k0 + tl.arange(0, BLOCK_K)
    ptrs = P + (r[:, None] * S + ks[None, :])
    if MASKED:
        tile = tl.load(ptrs, mask=(r < n_valid)[:, None] & (ks < D)[None, :], other=0.0)
    else:
        tile = tl.load(ptrs)
    return tile


@triton.jit
def _raw_tile(Ab, Bb, n_rows, n_cols, D, S_A: tl.constexpr, S_B: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PREC: tl.constexpr):
    """``a[rows] @ b[cols].T`` for one tile (``Ab``, ``Bb``: the tiles' first rows), fp32, looping over the feature
    dim in BLOCK_K chunks, both operands reloaded per chunk: the path for rows too wide to keep resident."""
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k in range(0, D, BLOCK_K):
        a = _load_tile(Ab, n_rows, k, D, S_A, BLOCK_M, BLOCK_K, True)
        b = _load_tile(Bb, n_cols, k, D, S_B, BLOCK_N, BLOCK_K, True)
        acc += tl.dot(a, tl.trans(b), input_precision=DOT_PREC)
    return acc


@triton.jit
def _row_dots(A, B, rows, idx, rmask, s_a, s_b, D, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """``sum_k a[rows, k] * b[idx, k]`` per row, fp32 (the logit of each row's positive, up to the scale)."""
    acc = tl.zeros([BLOCK_M], dtype=tl.float32)
    for k in range(0, D, BLOCK_K):
        a = _load_rows(A, rows, rmask, s_a, k, D, BLOCK_K).to(tl.float32)
        b = _load_rows(B, idx, rmask, s_b, k, D, BLOCK_K).to(tl.float32)
        acc += tl.sum(a * b, 1)
    return acc


@triton.jit
def _fwd_tile(a, Ab, B, cb, n_rows, rbias, M, D, scale2, m_i, l_i, pcol_m, pcol_l,
              S_A: tl.constexpr, S_B: tl.constexpr, HAS_COL: tl.constexpr, MASK_N: tl.constexpr,
              HOIST: tl.constexpr, MASK_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              BLOCK_K: tl.constexpr, DOT_PREC: tl.constexpr):
    """One (BLOCK_M, BLOCK_N) logit tile of the forward: online row max / sum-exp, and (HAS_COL) the tile's column
    max / sum-exp folded into the program's private partials ``pcol_m/pcol_l[cols]``. ``MASK_N``: the tile holds
    columns >= M (the last, partial one); ``rbias`` is 0 for rows < N and -inf beyond, so padded rows drop out of
    the column statistics at the cost of the FFMA that applies the scale anyway."""
    cols = cb * BLOCK_N + tl.arange(0, BLOCK_N)
    Bb = B + tl.cast(cb * BLOCK_N, tl.int64) * S_B
    n_cols = M - cb * BLOCK_N
    if HOIST:  # the row tile ``a`` is resident: stream one (BLOCK_N, BLOCK_K >= D) tile of b
        b = _load_tile(Bb, n_cols, 0, D, S_B, BLOCK_N, BLOCK_K, MASK_N or MASK_K)
        raw = tl.dot(a, tl.trans(b), input_precision=DOT_PREC)
    else:
        raw = _raw_tile(Ab, Bb, n_rows, n_cols, D, S_A, S_B, BLOCK_M, BLOCK_N, BLOCK_K, DOT_PREC)
    s = raw * scale2 + rbias[:, None]
    if MASK_N:
        cmask = cols < M
        s_row = tl.where(cmask[None, :], s, float("-inf"))
    else:
        s_row = s
    m_new = tl.maximum(m_i, tl.max(s_row, 1))
    l_i = l_i * tl.math.exp2(m_i - m_new) + tl.sum(tl.math.exp2(s_row - m_new[:, None]), 1)
    if HAS_COL:  # fold this tile's column statistics into the program's private partials
        mc = tl.max(s, 0)
        lc = tl.sum(tl.math.exp2(s - mc[None, :]), 0)
        if MASK_N:
            old_m = tl.load(pcol_m + cols, mask=cmask, other=-1.0e30)
            old_l = tl.load(pcol_l + cols, mask=cmask, other=0.0)
        else:
            old_m = tl.load(pcol_m + cols)
            old_l = tl.load(pcol_l + cols)
        new_m = tl.maximum(old_m, mc)
        new_l = old_l * tl.math.exp2(old_m - new_m) + lc * tl.math.exp2(mc - new_m)
        if MASK_N:
            tl.store(pcol_l + cols, new_l, mask=cmask)
            tl.store(pcol_m + cols, new_m, mask=cmask)
        else:
            tl.store(pcol_l + cols, new_l)
            tl.store(pcol_m + cols, new_m)
    return m_new, l_i


@triton.jit
def _cl_fwd_kernel(
    A, B, Y, SCALE,  # a (N, D), b (M, D), rows S_A / S_B elements apart; Y (N,) int64 positive column of each row
    POS, ROW_M, ROW_L, COL_M, COL_L,  # out: positive logit (N,); row partials (S, N), column partials (G, M), log2
    N, M, D, n_row_blocks, G, CB_PER_SPLIT,
    S_A: tl.constexpr, S_B: tl.constexpr, HAS_COL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, HOIST: tl.constexpr, MASK_K: tl.constexpr, POS_K: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """Program (g, sp): row blocks g, g + G, ... against column blocks [sp * CB_PER_SPLIT, (sp + 1) * CB_PER_SPLIT).
    Row statistics go to the split's row partials, column statistics to the row group's column partials: every
    partial is written by one program only, and merged in a fixed order by the launcher. SCALE: 0-dim fp32."""
    g = tl.program_id(0)
    sp = tl.program_id(1)
    scale = tl.load(SCALE).to(tl.float32)
    scale2 = scale * 1.4426950408889634  # the backward computes log2-domain logits exactly the same way
    n_cb = tl.cdiv(M, BLOCK_N)
    n_full = M // BLOCK_N
    cb0 = sp * CB_PER_SPLIT
    cb1 = tl.minimum(cb0 + CB_PER_SPLIT, n_cb)
    full_end = tl.minimum(cb1, n_full)
    pcol_m = COL_M + g.to(tl.int64) * M
    pcol_l = COL_L + g.to(tl.int64) * M
    for rb in range(g, n_row_blocks, G):
        rows = rb * BLOCK_M + tl.arange(0, BLOCK_M)
        rmask = rows < N
        rbias = tl.where(rmask, 0.0, float("-inf"))
        Ab = A + tl.cast(rb * BLOCK_M, tl.int64) * S_A
        n_rows = N - rb * BLOCK_M
        if HOIST:  # the row tile, loaded once per row block and kept (shared memory) for every column block
            a = _load_tile(Ab, n_rows, 0, D, S_A, BLOCK_M, BLOCK_K, True)
        else:
            a = rbias  # unused
        if sp == 0:
            y = tl.load(Y + rows, mask=rmask, other=0)
            tl.store(POS + rows, _row_dots(A, B, rows, y, rmask, S_A, S_B, D, BLOCK_M, POS_K) * scale, mask=rmask)
        m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        for cb in range(cb0, full_end):  # full column blocks: no column masks
            m_i, l_i = _fwd_tile(a, Ab, B, cb, n_rows, rbias, M, D, scale2, m_i, l_i, pcol_m, pcol_l, S_A, S_B,
                                 HAS_COL, False, HOIST, MASK_K, BLOCK_M, BLOCK_N, BLOCK_K, DOT_PREC)
        if full_end < cb1:  # this split holds the last, partial column block
            m_i, l_i = _fwd_tile(a, Ab, B, n_full, n_rows, rbias, M, D, scale2, m_i, l_i, pcol_m, pcol_l, S_A, S_B,
                                 HAS_COL, True, HOIST, MASK_K, BLOCK_M, BLOCK_N, BLOCK_K, DOT_PREC)
        tl.store(ROW_M + sp.to(tl.int64) * N + rows, m_i, mask=rmask)
        tl.store(ROW_L + sp.to(tl.int64) * N + rows, l_i, mask=rmask)
        tl.debug_barrier()  # this row block's column-partial stores before the next one's loads of the same columns


@triton.jit
def _dlogits(a, b, Ab, Bb, n_rows, n_cols, D, scale2, lse_r, wr, lse_c, wc, rows, cols, M, YC,
             S_A: tl.constexpr, S_B: tl.constexpr, HAS_R: tl.constexpr, HAS_C: tl.constexpr, C_HIT: tl.constexpr,
             HOIST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
             DOT_PREC: tl.constexpr):
    """The logit tile, recomputed, and its dlogits without the gathered one-hot terms (fp32)."""
    if HOIST:
        raw = tl.dot(a, tl.trans(b), input_precision=DOT_PREC)
    else:
        raw = _raw_tile(Ab, Bb, n_rows, n_cols, D, S_A, S_B, BLOCK_M, BLOCK_N, BLOCK_K, DOT_PREC)
    x = raw * scale2
    if HAS_R:
        ds = wr[:, None] * tl.math.exp2(x - lse_r[:, None])
        if HAS_C:
            ds += wc[None, :] * tl.math.exp2(x - lse_c[None, :])
    else:
        ds = wc[None, :] * tl.math.exp2(x - lse_c[None, :])
    if C_HIT:  # the column term's positives are arbitrary rows (rectangular labels): its one-hot in the loop
        yc = tl.load(YC + cols, mask=cols < M, other=-1)
        ds -= tl.where(rows[:, None] == yc[None, :], wc[None, :], 0.0)
    return ds


@triton.jit
def _bwd_tile(a, Ab, B, cb, n_rows, dk0, M, D, scale2, acc, lse_r, wr, rows, YC, LSE_C, WC,
              S_A: tl.constexpr, S_B: tl.constexpr, HAS_R: tl.constexpr, HAS_C: tl.constexpr, C_HIT: tl.constexpr,
              MASK_N: tl.constexpr, HOIST: tl.constexpr, SHARE_B: tl.constexpr, MASK_K: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_DO: tl.constexpr,
              DOT_PREC: tl.constexpr):
    """One column block of the backward: recompute the logit tile, form ``dlogits`` (without the one-hot terms the
    kernel gathers after the loop), accumulate ``dlogits @ b[cols, dk0 : dk0 + BLOCK_DO]``. Padded rows and columns
    need no masks here: their features load as zeros, so their logits are 0 and ``dlogits * b`` vanishes (the stores
    mask the padded rows)."""
    cols = cb * BLOCK_N + tl.arange(0, BLOCK_N)
    Bb = B + tl.cast(cb * BLOCK_N, tl.int64) * S_B
    n_cols = M - cb * BLOCK_N
    if HOIST:
        b = _load_tile(Bb, n_cols, 0, D, S_B, BLOCK_N, BLOCK_K, MASK_N or MASK_K)
        if SHARE_B:  # the b tile of the logits is also the right operand of dlogits @ b (BLOCK_DO == BLOCK_K >= D)
            bo = b
        else:
            bo = _load_tile(Bb, n_cols, dk0, D, S_B, BLOCK_N, BLOCK_DO, True)
    else:
        bo = _load_tile(Bb, n_cols, dk0, D, S_B, BLOCK_N, BLOCK_DO, True)
        b = bo  # unused
    if HAS_C:
        if MASK_N:
            lse_c = tl.load(LSE_C + cols, mask=cols < M, other=0.0)
            wc = tl.load(WC + cols, mask=cols < M, other=0.0)
        else:
            lse_c = tl.load(LSE_C + cols)
            wc = tl.load(WC + cols)
    else:
        lse_c = lse_r  # unused
        wc = lse_r
    # Half precision (wgmma): the logits and dlogits are computed inside a branch that is always taken at run time
    # (D >= 1), so the logit product's forward slice ends at the branch's yield. Triton's "chained dot" rule (every
    # warp along M, which at BLOCK_M = 64 with 8 warps has both warpgroups compute the same logit tile, twice the
    # tensor work) then does not fire, and the logit tile is split between the two warpgroups (warpsPerCTA [4, 2]).
    # fp32 (FFMA: no warp layout to protect) takes the straight line. tests/benchmarks/test_kernel_resources.py
    # (test_no_warpgroup_repeats_another) fails if the branch stops working.
    if DOT_PREC == "ieee":
        p = _dlogits(a, b, Ab, Bb, n_rows, n_cols, D, scale2, lse_r, wr, lse_c, wc, rows, cols, M, YC, S_A, S_B,
                     HAS_R, HAS_C, C_HIT, HOIST, BLOCK_M, BLOCK_N, BLOCK_K, DOT_PREC).to(bo.dtype)
    elif D > 0:
        p = _dlogits(a, b, Ab, Bb, n_rows, n_cols, D, scale2, lse_r, wr, lse_c, wc, rows, cols, M, YC, S_A, S_B,
                     HAS_R, HAS_C, C_HIT, HOIST, BLOCK_M, BLOCK_N, BLOCK_K, DOT_PREC).to(bo.dtype)
    else:
        p = tl.zeros([BLOCK_M, BLOCK_N], dtype=bo.dtype)
    acc += tl.dot(p, bo, input_precision=DOT_PREC)
    return acc


@triton.jit
def _cl_bwd_kernel(
    A, B, SCALE, DA, DSCALE,  # grad rows of A from columns B; DSCALE: fp32 d scale partial per program
    YR, LSE_R, WR,  # row term: positive column of each row, row lse (log2 units), weight (upstream grad) per row
    YC, LSE_C, WC,  # column term: positive row of each column, column lse (log2 units), weight per column
    N, M, D, s_da,
    S_A: tl.constexpr, S_B: tl.constexpr,
    HAS_R: tl.constexpr, HAS_C: tl.constexpr, C_HIT: tl.constexpr, WITH_DSCALE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_DO: tl.constexpr,
    HOIST: tl.constexpr, SHARE_B: tl.constexpr, MASK_K: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """``da[rows, chunk] = scale * dlogits[rows, :] @ b[:, chunk]``. ``dlogits = w_row * (softmax_row - onehot_row)
    + w_col * (softmax_col - onehot_col)``; the one-hot terms whose positive is gathered per row (the row term's
    ``b[yr[i]]``, and without C_HIT the column term's diagonal ``b[i]``) are applied after the column loop, from one
    gathered tile, instead of a compare per logit."""
    rb = tl.program_id(0)
    chunk = tl.program_id(1)  # which BLOCK_DO slice of the feature dim this program writes
    rows = rb * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < N
    dk0 = chunk * BLOCK_DO
    dcols = dk0 + tl.arange(0, BLOCK_DO)
    dmask = dcols < D
    scale = tl.load(SCALE).to(tl.float32)
    scale2 = scale * 1.4426950408889634
    if HAS_R:
        yr = tl.load(YR + rows, mask=rmask, other=0)
        lse_r = tl.load(LSE_R + rows, mask=rmask, other=0.0)
        wr = tl.load(WR + rows, mask=rmask, other=0.0)
    else:
        yr = rows
        lse_r = tl.zeros([BLOCK_M], dtype=tl.float32)
        wr = lse_r
    Ab = A + tl.cast(rb * BLOCK_M, tl.int64) * S_A
    n_rows = N - rb * BLOCK_M
    if HOIST:  # the row tile, loaded once and kept (shared memory) for every column block
        a = _load_tile(Ab, n_rows, 0, D, S_A, BLOCK_M, BLOCK_K, True)
    else:
        a = lse_r  # unused
    acc = tl.zeros([BLOCK_M, BLOCK_DO], dtype=tl.float32)
    n_full = M // BLOCK_N
    for cb in range(0, n_full):  # full column blocks: no column masks
        acc = _bwd_tile(a, Ab, B, cb, n_rows, dk0, M, D, scale2, acc, lse_r, wr, rows, YC, LSE_C, WC, S_A, S_B,
                        HAS_R, HAS_C, C_HIT, False, HOIST, SHARE_B, MASK_K, BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_DO,
                        DOT_PREC)
    if n_full * BLOCK_N < M:
        acc = _bwd_tile(a, Ab, B, n_full, n_rows, dk0, M, D, scale2, acc, lse_r, wr, rows, YC, LSE_C, WC, S_A, S_B,
                        HAS_R, HAS_C, C_HIT, True, HOIST, SHARE_B, MASK_K, BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_DO,
                        DOT_PREC)
    # the one-hot terms gathered per row: weight hw[i] at column yr[i] (the square loss: yr = rows, both terms)
    if HAS_R or (HAS_C and not C_HIT):
        hw = wr
        if HAS_C and not C_HIT:
            hw += tl.load(WC + rows, mask=rmask, other=0.0)
        g = _load_rows(B, yr, rmask, S_B, dk0, D, BLOCK_DO)
        acc -= hw[:, None] * g.to(tl.float32)
    tl.store(DA + rows[:, None].to(tl.int64) * s_da + dcols[None, :], (acc * scale).to(DA.dtype.element_ty),
             mask=rmask[:, None] & dmask[None, :])
    if WITH_DSCALE:
        # d scale = sum_ij dlogits_ij * raw_ij = sum_i a_i . (sum_j dlogits_ij b_j): this chunk's share, from the
        # finished accumulator (one-hot terms included) and the row tile, instead of a product per logit
        if HOIST and BLOCK_DO == BLOCK_K:
            ad = a
        else:
            ad = _load_tile(Ab, n_rows, dk0, D, S_A, BLOCK_M, BLOCK_DO, True)
        tl.store(DSCALE + rb * tl.num_programs(1) + chunk, tl.sum(tl.sum(ad.to(tl.float32) * acc, 1), 0))


# ----------------------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------------------

_config_override: dict | None = None

# Resident row tiles: a (BLOCK_M, BLOCK_D) tile of a stays in shared memory for the whole column loop when a feature
# row fits in HOIST_ROW_BYTES (512 fp16/bf16 features, 256 fp32). SMEM_BUDGET is what the resident tile and the
# pipeline stages may fill (sm_90 gives a block 227 KB; the rest is the reductions' and layout conversions' scratch).
HOIST_ROW_BYTES = 1024
SMEM_BUDGET = 200 * 1024


@contextlib.contextmanager
def override_config(**cfg):
    """Force tiles (``block_m``, ``block_n``, ``block_k``, ``block_do``), warps (``fwd_warps``, ``bwd_warps``),
    pipeline stages (``fwd_stages``, ``bwd_stages``) or the forward's target program count ``programs`` in a scope:
    for tests (multi-tile, multi-program, column-split and feature-chunked paths at small sizes) and tuning runs."""
    global _config_override
    previous, _config_override = _config_override, dict(cfg)
    try:
        yield
    finally:
        _config_override = previous


def _config(n: int, m: int, d: int) -> dict:
    """Default tiles for half-precision features (fp32: :func:`_for_dtype`), sized from sm_90 compiles, not timed.

    d <= 512: 64 x 64 logit tiles whose feature chunk is the whole padded row (``block_k = block_do =
    next_power_of_2(d)``): the row tile of a is loaded once per row block and kept, each b tile serves the logits and
    ``dlogits @ b``, and a backward program writes all d gradient columns (one logit recompute per side: 5 N^2 d
    passes per forward+backward). The backward's 64 x d fp32 accumulator takes 8 warps from d = 256 on (at most
    128 registers a thread; 4 warps spill at d = 256).
    d > 512: 64-wide feature chunks reloaded per tile, and backward programs of 512 gradient columns
    (c = d / 512 recomputes per side: (3 + 2c) N^2 d passes)."""
    bd = max(16, triton.next_power_of_2(d))
    if bd * 2 <= HOIST_ROW_BYTES:
        cfg = dict(block_m=64, block_n=64, block_k=bd, block_do=bd, fwd_warps=4, bwd_warps=8 if bd >= 256 else 4)
    else:
        cfg = dict(block_m=64, block_n=64, block_k=64, block_do=512, fwd_warps=4, bwd_warps=8)
    if _config_override:
        cfg.update(_config_override)
    return cfg


def _for_dtype(cfg: dict, d: int, itemsize: int) -> dict:
    """fp32 features: IEEE fp32 has no tensor-core path, and Triton's FFMA dot holds both operand chunks in
    registers, so a resident row wider than 64 features spills (sm_90: 32 registers and 11-25 KB of stack a thread
    at d = 128 / 256). fp32 keeps the previous tiling: 64-wide chunks, backward programs of up to 256 gradient
    columns on 8 warps, and an unpipelined backward (at 2 stages ptxas falls back to 32 registers and an 11 KB stack
    a thread; at 1: 255 registers, 56 bytes of stack, sm_90, d = 512). Overridden keys are kept."""
    if itemsize <= 2:
        return cfg
    forced = _config_override or {}
    bd = max(16, triton.next_power_of_2(d))
    defaults = dict(block_k=min(64, bd), block_do=min(256, bd), bwd_warps=8, bwd_stages=1)
    return {**cfg, **{k: v for k, v in defaults.items() if k not in forced}}


def _tiles(n: int, m: int, d: int, dtype: torch.dtype) -> dict:
    cfg = _for_dtype(_config(n, m, d), d, torch.empty((), dtype=dtype).element_size())
    cfg["hoist"] = cfg["block_k"] >= d  # one feature chunk covers the row: the row tile is resident
    cfg["mask_k"] = cfg["block_k"] != d
    cfg["pos_k"] = min(cfg["block_k"], 64)
    return cfg


def _stages(cfg: dict, itemsize: int, which: str) -> int:
    """Software-pipeline depth: as many b tiles in flight as fit next to the resident row tile (at most 3)."""
    forced = cfg.get(f"{which}_stages")
    if forced:
        return int(forced)
    if cfg["hoist"]:
        resident = cfg["block_m"] * cfg["block_k"] * itemsize
        per_stage = cfg["block_n"] * cfg["block_k"] * itemsize
    else:
        resident = 0
        per_stage = (cfg["block_m"] + cfg["block_n"]) * cfg["block_k"] * itemsize
    if which == "bwd" and not (cfg["hoist"] and cfg["block_do"] >= cfg["block_k"]):
        per_stage += cfg["block_n"] * cfg["block_do"] * itemsize  # the separate b chunk of dlogits @ b
    return int(max(1, min(3, (SMEM_BUDGET - resident) // per_stage)))


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _device_programs(device: torch.device) -> int:
    """Programs that fill the device: one per SM on CUDA (at d = 512 a program's tiles take most of an SM's shared
    memory); 3 under the CPU interpreter (several programs and splits at test sizes)."""
    if _config_override and "programs" in _config_override:
        return max(1, int(_config_override["programs"]))
    if device.type != "cuda":
        return 3
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def _fwd_grid(n_row_blocks: int, n_col_blocks: int, m: int, feature_bytes: int, has_col: bool,
              device: torch.device) -> tuple[int, int, int]:
    """``(G, S, column blocks per split)`` of the forward: G row groups (program g takes row blocks g, g + G, ...)
    times S column splits, at least as many programs as the device has SMs where there are that many tiles. With a
    column term the G x M column partials (8 bytes a column each) stay within max(64 MB, the features' bytes).
    A function of the shapes and the device only, so the merge order, and so the result, is the same on every run."""
    want = _device_programs(device)
    g = min(n_row_blocks, want)
    if has_col:
        g = min(g, max(64 << 20, feature_bytes) // (8 * m))
    g = max(1, g)
    splits = max(1, min(n_col_blocks, triton.cdiv(want, g)))
    per_split = max(1, n_col_blocks // splits)  # rounded down: at least ``splits`` splits, the last one may be short
    return g, triton.cdiv(n_col_blocks, per_split), per_split


def forward_programs(n: int, m: int, d: int, dtype: torch.dtype, device, symmetric: bool = True) -> int:
    """How many programs the forward launches for these shapes on ``device`` (tests, the notes)."""
    cfg = _tiles(n, m, d, dtype)
    g, s, _ = _fwd_grid(triton.cdiv(n, cfg["block_m"]), triton.cdiv(m, cfg["block_n"]), m,
                        (n + m) * d * torch.empty((), dtype=dtype).element_size(), symmetric, torch.device(device))
    return g * s


def _dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def _arange(n: int, device) -> torch.Tensor:
    return torch.arange(n, device=device, dtype=torch.int64)


def _merge_lse(part_m: torch.Tensor, part_l: torch.Tensor) -> torch.Tensor:
    """Log2-sum-exp of partials ``(P, K)`` (running max, sum of exp2 below it) over P, in a fixed order."""
    peak = part_m.max(0).values
    return peak + torch.log2((part_l * torch.exp2(part_m - peak)).sum(0))


def _row_strided(t: torch.Tensor) -> torch.Tensor:
    """``t``, or a contiguous copy where its row stride is too large for the kernels' 32-bit in-tile offsets."""
    return t if t.stride(0) < (1 << 24) else t.contiguous()


def check_labels_range(labels: torch.Tensor, m: int) -> None:
    """Raise ValueError if a label is outside ``[0, m)`` (one device sync)."""
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= m):
        raise ValueError(f"labels must lie in [0, {m}) (the rows of b), got values in "
                         f"[{int(labels.min())}, {int(labels.max())}]")


def _launch_fwd(a, b, scale, labels):
    a, b = _row_strided(a), _row_strided(b)
    n, d = a.shape
    m = b.shape[0]
    symmetric = labels is None
    y = _arange(n, a.device) if symmetric else labels.to(torch.int64)
    cfg = _tiles(n, m, d, a.dtype)
    n_row_blocks, n_col_blocks = triton.cdiv(n, cfg["block_m"]), triton.cdiv(m, cfg["block_n"])
    g, splits, per_split = _fwd_grid(n_row_blocks, n_col_blocks, m, (a.numel() + b.numel()) * a.element_size(),
                                     symmetric, a.device)
    pos = torch.empty(n, dtype=torch.float32, device=a.device)
    row_m = torch.empty((splits, n), dtype=torch.float32, device=a.device)
    row_l = torch.empty((splits, n), dtype=torch.float32, device=a.device)
    if symmetric:
        col_m = torch.full((g, m), -1.0e30, dtype=torch.float32, device=a.device)
        col_l = torch.zeros((g, m), dtype=torch.float32, device=a.device)
    else:
        col_m = col_l = pos  # never touched (HAS_COL=False)
    _cl_fwd_kernel[(g, splits)](
        a, b, y, scale, pos, row_m, row_l, col_m, col_l, n, m, d, n_row_blocks, g, per_split,
        S_A=a.stride(0), S_B=b.stride(0), HAS_COL=symmetric, BLOCK_M=cfg["block_m"], BLOCK_N=cfg["block_n"],
        BLOCK_K=cfg["block_k"], HOIST=cfg["hoist"], MASK_K=cfg["mask_k"], POS_K=cfg["pos_k"],
        DOT_PREC=_dot_precision(a.dtype), num_warps=cfg["fwd_warps"], num_stages=_stages(cfg, a.element_size(), "fwd"),
    )
    lse_r = _merge_lse(row_m, row_l)  # fixed-order merge of the S column splits' row partials
    row_ce = lse_r * LN2 - pos
    if not symmetric:
        return row_ce, a.new_empty(0, dtype=torch.float32), lse_r, a.new_empty(0, dtype=torch.float32)
    lse_c = _merge_lse(col_m, col_l)  # and of the G row groups' column partials
    return row_ce, lse_c * LN2 - pos, lse_r, lse_c  # square: column j's positive is row j, whose logit is pos[j]


def _bwd_tiles(n: int, m: int, d: int, dtype: torch.dtype) -> tuple[dict, int]:
    """Tiles of one backward side and its feature-chunk width (the resident row width when that covers d)."""
    cfg = _tiles(n, m, d, dtype)
    return cfg, (cfg["block_k"] if cfg["hoist"] and cfg["block_do"] >= d else cfg["block_do"])


def _bwd_grid(n: int, m: int, d: int, dtype: torch.dtype) -> tuple[int, int]:
    cfg, block_do = _bwd_tiles(n, m, d, dtype)
    return triton.cdiv(n, cfg["block_m"]), triton.cdiv(d, block_do)


def _launch_bwd_side(a, b, scale, da, dscale, yr, lse_r, wr, yc, lse_c, wc, with_dscale, c_hit):
    a, b = _row_strided(a), _row_strided(b)
    n, d = a.shape
    m = b.shape[0]
    cfg, block_do = _bwd_tiles(n, m, d, a.dtype)
    grid = _bwd_grid(n, m, d, a.dtype)
    dummy = lse_r if lse_r is not None else lse_c
    _cl_bwd_kernel[grid](
        a, b, scale, da, dscale if with_dscale else dummy,
        yr if yr is not None else dummy, lse_r if lse_r is not None else dummy, wr if wr is not None else dummy,
        yc if yc is not None else dummy, lse_c if lse_c is not None else dummy, wc if wc is not None else dummy,
        n, m, d, da.stride(0), S_A=a.stride(0), S_B=b.stride(0),
        HAS_R=lse_r is not None, HAS_C=lse_c is not None, C_HIT=c_hit, WITH_DSCALE=with_dscale,
        BLOCK_M=cfg["block_m"], BLOCK_N=cfg["block_n"], BLOCK_K=cfg["block_k"], BLOCK_DO=block_do,
        HOIST=cfg["hoist"], SHARE_B=cfg["hoist"] and block_do == cfg["block_k"], MASK_K=cfg["mask_k"],
        DOT_PREC=_dot_precision(a.dtype), num_warps=cfg["bwd_warps"], num_stages=_stages(cfg, a.element_size(), "bwd"),
    )
    return grid


def _launch_bwd(g_row, g_col, a, b, scale, labels, lse_r, lse_c, with_dscale=True):
    n, m = a.shape[0], b.shape[0]
    symmetric = labels is None
    y = _arange(n, a.device) if symmetric else labels.to(torch.int64)
    g_row = g_row.float().contiguous()
    g_col = g_col.float().contiguous() if symmetric else None
    da, db = torch.empty_like(a), torch.empty_like(b)
    rb, chunks = _bwd_grid(n, m, a.shape[1], a.dtype)
    dscale = torch.empty(rb * chunks, dtype=torch.float32, device=a.device)
    lse_c = lse_c if symmetric else None
    # rows of a against columns of b: the row term (a's positives y) and, square, the column term (b_j's is row j:
    # the diagonal, gathered after the loop with the row term's)
    _launch_bwd_side(a, b, scale, da, dscale, y, lse_r, g_row, _arange(m, a.device) if symmetric else None,
                     lse_c, g_col, with_dscale, c_hit=False)
    # rows of b against columns of a: the same terms with the roles swapped; with labels only the column term, whose
    # positives (row labels[i] of b for column i) are compared per logit
    _launch_bwd_side(b, a, scale, db, None, _arange(m, a.device) if symmetric else None, lse_c, g_col,
                     y, lse_r, g_row, False, c_hit=not symmetric)
    return da, db, (dscale.sum() if with_dscale else dscale.new_zeros(()))


# ----------------------------------------------------------------------------------------------------------------------
# torch.library op
# ----------------------------------------------------------------------------------------------------------------------


@torch.library.custom_op("lfvila_kernels::contrastive_fwd", mutates_args=())
def _contrastive_fwd(
    a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor, labels: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _launch_fwd(a, b, scale.detach().float().reshape(()), labels)


@_contrastive_fwd.register_fake
def _(a, b, scale, labels):
    n, m = a.shape[0], b.shape[0]
    cols = 0 if labels is not None else m
    f32 = dict(dtype=torch.float32)
    return a.new_empty(n, **f32), a.new_empty(cols, **f32), a.new_empty(n, **f32), a.new_empty(cols, **f32)


@torch.library.custom_op("lfvila_kernels::contrastive_bwd", mutates_args=())
def _contrastive_bwd(
    g_row: torch.Tensor, g_col: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor,
    labels: torch.Tensor | None, lse_r: torch.Tensor, lse_c: torch.Tensor, with_dscale: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    da, db, dscale = _launch_bwd(g_row, g_col, a, b, scale.detach().float().reshape(()), labels, lse_r, lse_c,
                                 with_dscale)
    return da, db, dscale.to(scale.dtype).reshape(scale.shape)


@_contrastive_bwd.register_fake
def _(g_row, g_col, a, b, scale, labels, lse_r, lse_c, with_dscale):
    return torch.empty_like(a), torch.empty_like(b), torch.empty_like(scale)


def _setup_context(ctx, inputs, output):
    a, b, scale, labels = inputs
    _, _, lse_r, lse_c = output
    ctx.mark_non_differentiable(lse_r, lse_c)
    ctx.save_for_backward(a, b, scale, labels, lse_r, lse_c)


def _backward(ctx, g_row, g_col, _g_lse_r, _g_lse_c):
    a, b, scale, labels, lse_r, lse_c = ctx.saved_tensors
    g_row = torch.zeros_like(lse_r) if g_row is None else g_row
    g_col = torch.zeros_like(lse_c) if g_col is None else g_col
    da, db, dscale = _contrastive_bwd(g_row, g_col, a, b, scale, labels, lse_r, lse_c, ctx.needs_input_grad[2])
    return da, db, (dscale if ctx.needs_input_grad[2] else None), None


torch.library.register_autograd("lfvila_kernels::contrastive_fwd", _backward, setup_context=_setup_context)


def contrastive_ce_fused(a, b, scale: torch.Tensor, labels=None):
    """Per-row (and, without labels, per-column) cross-entropies through the Triton kernels.

    a ``(N, d)``, b ``(M, d)`` with a contiguous last dim; ``scale`` 0-dim tensor. Returns
    ``(row_ce (N,) fp32, col_ce (M,) fp32 or None)``.
    """
    if a.device.type == "cpu" and not interpreting():
        raise RuntimeError("the Triton contrastive loss needs CUDA tensors (or TRITON_INTERPRET=1 on the CPU)")
    row_ce, col_ce, _, _ = _contrastive_fwd(a, b, scale, labels)
    return row_ce, (col_ce if labels is None else None)
