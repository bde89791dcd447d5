"""Triton kernels of the fused contrastive loss (``@triton.jit`` only: tiles, launchers and the ``torch.library``
op are in ``_contrastive_launch.py``, the public op in ``contrastive.py``).

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

import triton
import triton.language as tl


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

