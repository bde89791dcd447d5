"""Triton kernels for HTWA window attention, forward, fused backward, tile and bias-gradient fold (``@triton.jit``
only: the split backward of long windows is in ``_window_attention_split_kernels.py``; the geometry-dependent configs,
the launchers and the ``torch.library`` op in ``_window_attention_launch.py``).

Design (v2): nothing is decoded per score element. Everything that depends only on the geometry (grid, window, shift)
is computed once per call in torch, on tensors of a few KB to a few MB, and read by the kernels:

* ``tok`` ``(n_win, P)`` int32: the flat original token index ``(t*H + h)*W + w`` of window position ``n`` (row-major
  over ``(t, h, w)`` inside the window, after the roll by ``-shift``), ``-1`` outside the grid or beyond ``N``.
  ``P`` is the window's token count ``N`` rounded up to a power of two (at least 16). A kernel maps a window to
  addresses with one load per row of a tile.
* Mask classes: windows whose positions have the same pattern of (valid, wrapped-by-the-shift on each axis) share a
  class. LF-VILA's spatial-only shifts give at most 4 classes, a 3-D shift 8 (27 at most, with partial windows).
* ``tile`` ``(classes, heads, P, P)`` in the compute dtype: ``bias / scale`` (the bias in units of raw scores
  ``q . k``) where the pair is allowed, ``-inf`` where it is not (cross-region pairs, keys outside the grid, padded
  keys). One add per score element replaces the region compare, the validity masks and the bias gather; where a
  window is one tile (P <= 128, half types) the tile is the accumulator input of the QK^T MMA, so the add is free.
  Rows of query positions outside the grid allow every valid key, so no row is all ``-inf`` (those rows are never
  stored).
* Work items are (window, batch) pairs ordered by class; a program takes a *group* of one class and one head: whole
  windows with every batch item, or one window and a batch range (``_groups``). It computes a window's token offsets
  once and steps through its batch items by the batch stride; it reads the tile once (and, when a window fits one
  tile, keeps it in registers across the group).

Scores stay raw until the exponent, where the scale and the row max meet in one FMA, ``exp2(s * scale * log2(e) -
m * scale * log2(e))``, as FlashAttention-2 does; compiled, the row sum's reciprocal and log2 are one MUFU each. The
forward saves the per-row log-sum-exp ``lse`` (log2 units) ``(B, T, H, W, heads)`` fp32. Backward:

* windows of at most ``_FUSED_MAX`` (128) padded tokens, 18 of lfvila-base's 24 blocks: one fused kernel. A program
  owns all keys of its window (keys are the tile's rows, so warps split keys and no warpgroup repeats another's work),
  walks the queries in one or two sub-blocks and gets dq, dk, dv and the bias-gradient partial from one pass: one
  read of q, k, v, dO, one exp, five GEMMs. The bias-gradient partial of the group stays in registers across the
  group's items and is written once: ``(groups, heads, P, P)`` fp32, then summed over groups in a fixed order.
* longer windows (``_window_attention_split_kernels.py``): one kernel per key block for dk, dv (keys as the rows, the
  transposed tile), one per query block for dq, and one per (group of items, query block x key block tile) for the
  bias-gradient partial: the tile's dS summed over the group's items in registers and written once, ``(groups,
  heads, P, P)`` fp32 (no read-modify-write of a partial slab).

Two small kernels do the rest on the GPU: ``_window_attention_tile_kernel`` builds the tile (forward, and transposed
for the fused backward and the dk/dv kernel) in one pass, and ``_window_attention_bias_grad_kernel`` sums the partials
over groups and folds them onto the table rows in one pass, in a fixed order (each table row owns the list of its
pairs).
No atomics anywhere: every gradient is bitwise repeatable.
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton.language.extra import libdevice

# ----------------------------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------------------------


@triton.jit
def _rows(TOK, win, offs, P: tl.constexpr, I64: tl.constexpr):
    """Flat token indices (-1 outside the grid) of window positions ``offs`` of window ``win``; int64 when an
    offset may not fit int32 (``I64``)."""
    tok = tl.load(TOK + win * P + offs)
    return tok.to(tl.int64) if I64 else tok


@triton.jit
def _rcp(x, FAST: tl.constexpr):
    """1 / x for x >= 1 (a softmax row sum): one MUFU.RCP compiled, the exact quotient in the interpreter."""
    if FAST:
        return libdevice.fast_dividef(1.0, x)
    return 1.0 / x


@triton.jit
def _log2(x, FAST: tl.constexpr):
    """log2(x) for x >= 1: one MUFU.LG2 compiled (``lg2.approx``, error ~2^-22), libm's in the interpreter."""
    if FAST:
        return libdevice.fast_log2f(x)
    return tl.math.log2(x)


@triton.jit
def _window_attention_fwd_kernel(
    Q, K, V, TILE, TOK, WIN, GRP, O, LSE,
    s_qb, s_qx, s_qn,  # q strides (elements): batch, token (w; t and h are multiples of it), head
    s_kb, s_kx, s_kn,
    s_vb, s_vx, s_vn,
    s_ob, s_ox, s_on,
    s_tc, s_th,  # tile strides: class, head (rows of P)
    NH, n_tok,  # n_tok = T * H * W
    qk_scale,  # softmax scale * log2(e)
    HD: tl.constexpr, BLOCK_D: tl.constexpr, P: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_TILE: tl.constexpr, DOT_PREC: tl.constexpr, I64: tl.constexpr, FAST: tl.constexpr,
):
    """One program: a group of (window, batch) items of one class (see ``_groups``), one head, one block of BLOCK_M
    query rows. Scores stay in raw units (q.k + tile, the tile holding bias / scale) until the exponent, where the
    scale and the row max meet in one FMA: ``exp2(s * qk_scale - m * qk_scale)``, as FlashAttention-2 does."""
    g = tl.program_id(0)
    head = tl.program_id(1)
    offs_m = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
    j0 = tl.load(GRP + g * 5)
    nj = tl.load(GRP + g * 5 + 1)
    b0 = tl.load(GRP + g * 5 + 2)
    nb = tl.load(GRP + g * 5 + 3)
    tile_base = TILE + tl.load(GRP + g * 5 + 4) * s_tc + head * s_th
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < HD
    if HAS_TILE:
        if BLOCK_N == P:  # the whole key range is one tile: keep the bias + mask in registers across the group
            resident = tl.load(tile_base + offs_m[:, None] * P + tl.arange(0, BLOCK_N)[None, :]).to(tl.float32)

    for jj in range(j0, j0 + nj):
        # token offsets of this window, computed once for its nb batch items
        win = tl.load(WIN + jj)
        tq = _rows(TOK, win, offs_m, P, I64)
        vq = tq >= 0
        qmask = vq[:, None] & dmask[None, :]
        q_off = head * s_qn + tq[:, None] * s_qx + offs_d[None, :]
        o_off = head * s_on + tq[:, None] * s_ox + offs_d[None, :]
        lse_off = tq * NH + head
        if BLOCK_N == P:
            tk = tq if BLOCK_M == P else _rows(TOK, win, tl.arange(0, BLOCK_N), P, I64)
            kmask = (tk >= 0)[:, None] & dmask[None, :]
            k_off = head * s_kn + tk[:, None] * s_kx + offs_d[None, :]
            v_off = head * s_vn + tk[:, None] * s_vx + offs_d[None, :]
        for bb in range(b0, b0 + nb):
            b = tl.cast(bb, tl.int64) if I64 else bb
            q = tl.load(Q + b * s_qb + q_off, mask=qmask, other=0.0)
            if BLOCK_N == P:  # the whole window in one tile: a plain softmax, no running max or rescaling
                k = tl.load(K + b * s_kb + k_off, mask=kmask, other=0.0)
                v = tl.load(V + b * s_vb + v_off, mask=kmask, other=0.0)
                if HAS_TILE:
                    s = tl.dot(q, tl.trans(k), resident, input_precision=DOT_PREC)
                else:
                    s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)
                m_i = tl.max(s, 1)  # finite: every row allows at least one key (see _geometry)
                p = tl.math.exp2(s * qk_scale - (m_i * qk_scale)[:, None])
                l_i = tl.sum(p, 1)
                acc = tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
            else:
                m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)  # finite: a fully masked tile must not give NaN
                l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
                acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
                for start_n in range(0, P, BLOCK_N):
                    offs_n = start_n + tl.arange(0, BLOCK_N)
                    tk = _rows(TOK, win, offs_n, P, I64)
                    kmask = (tk >= 0)[:, None] & dmask[None, :]
                    k = tl.load(K + b * s_kb + head * s_kn + tk[:, None] * s_kx + offs_d[None, :], mask=kmask,
                                other=0.0)
                    v = tl.load(V + b * s_vb + head * s_vn + tk[:, None] * s_vx + offs_d[None, :], mask=kmask,
                                other=0.0)
                    s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)
                    if HAS_TILE:
                        s += tl.load(tile_base + offs_m[:, None] * P + offs_n[None, :]).to(tl.float32)
                    m_new = tl.maximum(m_i, tl.max(s, 1))
                    alpha = tl.math.exp2((m_i - m_new) * qk_scale)
                    p = tl.math.exp2(s * qk_scale - (m_new * qk_scale)[:, None])
                    l_i = l_i * alpha + tl.sum(p, 1)
                    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
                    m_i = m_new
            # l_i >= 1: the row max contributes exp2(0)
            tl.store(O + b * s_ob + o_off, (acc * _rcp(l_i, FAST)[:, None]).to(O.dtype.element_ty), mask=qmask)
            tl.store(LSE + b * (n_tok * NH) + lse_off, m_i * qk_scale + _log2(l_i, FAST), mask=vq)


@triton.jit
def _window_attention_bwd_delta_kernel(
    O, DO, DELTA, n_rows, HD: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr
):
    """DELTA[r] = sum_d O[r, d] * DO[r, d] in fp32; O and DO contiguous ``(rows, HD)``."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (rows < n_rows)[:, None] & (offs_d < HD)[None, :]
    o = tl.load(O + rows[:, None] * HD + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + rows[:, None] * HD + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(DELTA + rows, tl.sum(o * do, 1), mask=rows < n_rows)


@triton.jit
def _fused_bwd_queries(
    k, v, dk, dv, db, resident, tq, Q, O, DO, LSE, DELTA, DQ, tile_base, b, head, q_start,
    s_qb, s_qx, s_qn, s_ob, s_ox, s_on, NH, n_tok, qk_scale, log2_sm_scale,
    HD: tl.constexpr, BLOCK_D: tl.constexpr, P: tl.constexpr, QB: tl.constexpr,
    HAS_TILE: tl.constexpr, DOT_PREC: tl.constexpr, DELTA_HERE: tl.constexpr,
):
    """One sub-block of QB queries (flat tokens ``tq``, -1 outside the grid) against all P keys of the window, in the
    transposed (keys x queries) orientation: accumulates dv / scale, dk, and the bias-gradient partial ``db`` (keys x
    queries) times the scale, writes dq of these queries. Scores in raw units until the exponent (see
    ``_window_attention_fwd_kernel``); the softmax scale rides in the exponent:
    ``exp2(s * qk_scale - lse + log2(scale))`` = ``scale * p``, so dq and dk need no multiply (dv and db, once per
    window or group, divide it out).
    ``DELTA_HERE``: delta = rowsum(o * do) is computed here, from the o and do rows this sub-block reads anyway (windows
    of one sub-block; with two or more the registers it takes make ptxas spill), else read from DELTA."""
    offs_k = tl.arange(0, P)
    offs_d = tl.arange(0, BLOCK_D)
    vq = tq >= 0
    qmask = vq[:, None] & (offs_d < HD)[None, :]
    q = tl.load(Q + b * s_qb + head * s_qn + tq[:, None] * s_qx + offs_d[None, :], mask=qmask, other=0.0)
    o_off = b * s_ob + head * s_on + tq[:, None] * s_ox + offs_d[None, :]
    do = tl.load(DO + o_off, mask=qmask, other=0.0)
    row = b * (n_tok * NH) + tq * NH + head
    if DELTA_HERE:
        o = tl.load(O + o_off, mask=qmask, other=0.0)
        delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    else:
        delta = tl.load(DELTA + row, mask=vq, other=0.0)
    lse = tl.load(LSE + row, mask=vq, other=0.0) - log2_sm_scale

    if HAS_TILE:  # the backward's tile is stored transposed: (class, head, key, query)
        if QB == P:  # loaded once per group by the caller: the MMA's accumulator input
            st = tl.dot(k, tl.trans(q), resident, input_precision=DOT_PREC)  # (P, QB): scores transposed
        else:
            st = tl.dot(k, tl.trans(q), input_precision=DOT_PREC)
            st += tl.load(tile_base + offs_k[:, None] * P + (q_start + tl.arange(0, QB))[None, :]).to(tl.float32)
    else:
        st = tl.dot(k, tl.trans(q), input_precision=DOT_PREC)
    pt = tl.math.exp2(st * qk_scale - lse[None, :])  # scale * p
    dv += tl.dot(pt.to(do.dtype), do, input_precision=DOT_PREC)
    dpt = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
    dst = pt * (dpt - delta[None, :])  # scale * dS
    dk += tl.dot(dst.to(q.dtype), q, input_precision=DOT_PREC)
    dq = tl.dot(tl.trans(dst.to(k.dtype)), k, input_precision=DOT_PREC)
    tl.store(DQ + o_off, dq.to(DQ.dtype.element_ty), mask=qmask)
    return dk, dv, db + dst


@triton.jit
def _window_attention_bwd_fused_kernel(
    Q, K, V, O, DO, LSE, DELTA, TILE_T, TOK, WIN, GRP, DQ, DK, DV, DBP,  # DBP (groups, heads, P, P) fp32
    s_qb, s_qx, s_qn,
    s_kb, s_kx, s_kn,
    s_vb, s_vx, s_vn,
    s_ob, s_ox, s_on,  # strides shared by O, DO, DQ, DK, DV (contiguous)
    s_tc, s_th,
    NH, n_tok, qk_scale, sm_scale,
    HD: tl.constexpr, BLOCK_D: tl.constexpr, P: tl.constexpr, QB: tl.constexpr,
    HAS_TILE: tl.constexpr, BIAS_GRAD: tl.constexpr, DOT_PREC: tl.constexpr, I64: tl.constexpr,
):
    """One program: a group of (window, batch) items of one class (see ``_groups``) and one head; all P keys of a
    window at once."""
    g = tl.program_id(0)
    head = tl.program_id(1)
    j0 = tl.load(GRP + g * 5)
    nj = tl.load(GRP + g * 5 + 1)
    b0 = tl.load(GRP + g * 5 + 2)
    nb = tl.load(GRP + g * 5 + 3)
    tile_base = TILE_T + tl.load(GRP + g * 5 + 4) * s_tc + head * s_th
    offs_k = tl.arange(0, P)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < HD
    resident = tl.zeros([P, QB], dtype=tl.float32)
    if HAS_TILE:
        if QB == P:  # one query sub-block: the window's whole tile stays in registers across the group
            resident = tl.load(tile_base + offs_k[:, None] * P + tl.arange(0, QB)[None, :]).to(tl.float32)
    # the bias-gradient partial (keys x queries), one accumulator per query sub-block (P // QB of them, at most 4)
    db0 = tl.zeros([P, QB], dtype=tl.float32)
    db1 = tl.zeros([P, QB], dtype=tl.float32)
    db2 = tl.zeros([P, QB], dtype=tl.float32)
    db3 = tl.zeros([P, QB], dtype=tl.float32)
    log2_sm_scale = tl.math.log2(sm_scale)
    inv_scale = 1.0 / sm_scale

    for jj in range(j0, j0 + nj):
        # key offsets of this window, computed once for its nb batch items
        win = tl.load(WIN + jj)
        tk = _rows(TOK, win, offs_k, P, I64)
        kmask = (tk >= 0)[:, None] & dmask[None, :]
        # per-row offsets only: full (P, BLOCK_D) offset tiles held across the batch loop cost registers that the
        # five GEMMs' operands need (ptxas spills at P = 128)
        k_row = head * s_kn + tk * s_kx
        v_row = head * s_vn + tk * s_vx
        out_row = head * s_on + tk * s_ox
        for bb in range(b0, b0 + nb):
            b = tl.cast(bb, tl.int64) if I64 else bb
            k = tl.load(K + (b * s_kb + k_row)[:, None] + offs_d[None, :], mask=kmask, other=0.0)
            v = tl.load(V + (b * s_vb + v_row)[:, None] + offs_d[None, :], mask=kmask, other=0.0)
            out_off = (b * s_ob + out_row)[:, None] + offs_d[None, :]
            dk = tl.zeros([P, BLOCK_D], dtype=tl.float32)
            dv = tl.zeros([P, BLOCK_D], dtype=tl.float32)
            tq = tk if QB == P else _rows(TOK, win, tl.arange(0, QB), P, I64)
            dk, dv, db0 = _fused_bwd_queries(
                k, v, dk, dv, db0, resident, tq, Q, O, DO, LSE, DELTA, DQ, tile_base, b, head, 0,
                s_qb, s_qx, s_qn, s_ob, s_ox, s_on, NH, n_tok, qk_scale, log2_sm_scale,
                HD, BLOCK_D, P, QB, HAS_TILE, DOT_PREC, QB == P)
            if P >= 2 * QB:
                dk, dv, db1 = _fused_bwd_queries(
                    k, v, dk, dv, db1, resident, _rows(TOK, win, QB + tl.arange(0, QB), P, I64), Q, O, DO, LSE,
                    DELTA, DQ, tile_base, b, head, QB, s_qb, s_qx, s_qn, s_ob, s_ox, s_on, NH, n_tok, qk_scale,
                    log2_sm_scale, HD, BLOCK_D, P, QB, HAS_TILE, DOT_PREC, QB == P)
            if P == 4 * QB:
                dk, dv, db2 = _fused_bwd_queries(
                    k, v, dk, dv, db2, resident, _rows(TOK, win, 2 * QB + tl.arange(0, QB), P, I64), Q, O, DO,
                    LSE, DELTA, DQ, tile_base, b, head, 2 * QB, s_qb, s_qx, s_qn, s_ob, s_ox, s_on, NH, n_tok, qk_scale,
                    log2_sm_scale, HD, BLOCK_D, P, QB, HAS_TILE, DOT_PREC, QB == P)
                dk, dv, db3 = _fused_bwd_queries(
                    k, v, dk, dv, db3, resident, _rows(TOK, win, 3 * QB + tl.arange(0, QB), P, I64), Q, O, DO,
                    LSE, DELTA, DQ, tile_base, b, head, 3 * QB, s_qb, s_qx, s_qn, s_ob, s_ox, s_on, NH, n_tok, qk_scale,
                    log2_sm_scale, HD, BLOCK_D, P, QB, HAS_TILE, DOT_PREC, QB == P)
            tl.store(DK + out_off, dk.to(DK.dtype.element_ty), mask=kmask)
            tl.store(DV + out_off, (dv * inv_scale).to(DV.dtype.element_ty), mask=kmask)

    if BIAS_GRAD:  # the group's partial, written once: DBP[g, head, query, key]
        base = DBP + (g * NH + head).to(tl.int64) * (P * P) + offs_k[:, None] + tl.arange(0, QB)[None, :] * P
        tl.store(base, db0 * inv_scale)
        if P >= 2 * QB:
            tl.store(base + QB * P, db1 * inv_scale)
        if P == 4 * QB:
            tl.store(base + 2 * QB * P, db2 * inv_scale)
            tl.store(base + 3 * QB * P, db3 * inv_scale)


@triton.jit
def _window_attention_tile_kernel(
    TABLE, IDX, ALLOWED, OUT, s_tr, s_th, N, factor,
    P: tl.constexpr, BLOCK_R: tl.constexpr, HAS_TABLE: tl.constexpr, TRANSPOSE: tl.constexpr,
):
    """The bias + mask tile of one (class, head) and BLOCK_R rows: ``table[IDX[i, j], head] * factor`` where
    ``ALLOWED[class, i, j]``, ``-inf`` where not, 0 where allowed outside the N x N window (or without a table).
    OUT ``(classes, heads, P, P)``, rows i (queries) or, with TRANSPOSE, rows j (keys: the fused backward's tile);
    stores are row-contiguous either way. IDX ``(N, N)`` int32, ALLOWED ``(classes, P, P)`` uint8."""
    c = tl.program_id(0)
    head = tl.program_id(1)
    rows = tl.program_id(2) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, P)
    if TRANSPOSE:
        qi, kj = cols[None, :], rows[:, None]
    else:
        qi, kj = rows[:, None], cols[None, :]
    ok = tl.load(ALLOWED + c * P * P + qi * P + kj) != 0
    if HAS_TABLE:
        inside = (qi < N) & (kj < N)
        idx = tl.load(IDX + qi * N + kj, mask=inside, other=0)
        bias = tl.load(TABLE + idx * s_tr + head * s_th, mask=inside, other=0.0).to(tl.float32) * factor
    else:
        bias = tl.zeros([BLOCK_R, P], dtype=tl.float32)
    out = tl.where(ok, bias, float("-inf"))
    base = OUT + (c * tl.num_programs(1) + head) * P * P
    tl.store(base + rows[:, None] * P + cols[None, :], out.to(OUT.dtype.element_ty))


@triton.jit
def _window_attention_bias_grad_kernel(
    PART, PAIRS, RPTR, DTABLE, n_split, s_split, s_head, NH,
    BLOCK_F: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """``DTABLE[r, h] = sum over splits s and pairs f of row r: PART[s, h, f]`` in a fixed order (per lane: splits,
    then the pairs in order; then one tree sum), so the table gradient is bitwise repeatable. PART ``(splits, heads,
    P, P)`` fp32 partials of the dense gradient; PAIRS: the flat ``i * P + j`` of the pairs with relative-position
    row r, at ``RPTR[r]:RPTR[r + 1]``."""
    r = tl.program_id(0)
    hs = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    hmask = hs < NH
    lo = tl.load(RPTR + r)
    hi = tl.load(RPTR + r + 1)
    acc = tl.zeros([BLOCK_F, BLOCK_H], dtype=tl.float32)
    for sp in range(0, n_split):
        base = PART + tl.cast(sp, tl.int64) * s_split + hs[None, :].to(tl.int64) * s_head
        for f0 in range(lo, hi, BLOCK_F):
            offs = f0 + tl.arange(0, BLOCK_F)
            fmask = offs < hi
            f = tl.load(PAIRS + offs, mask=fmask, other=0)
            acc += tl.load(base + f[:, None], mask=fmask[:, None] & hmask[None, :], other=0.0)
    tl.store(DTABLE + r * NH + hs, tl.sum(acc, 0), mask=hmask)
