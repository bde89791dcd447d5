"""Triton kernels for HTWA window attention: forward, backward, launchers and the ``torch.library`` op.

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
* longer windows: one kernel per key block for dk, dv and one per query block for dq and the bias gradient (a
  program-private fp32 partial of the dense ``(heads, P, P)`` gradient, summed over a fixed set of items in a fixed
  order).

Two small kernels do the rest on the GPU: ``_htwa_tile_kernel`` builds the tile (forward, and transposed for the fused
backward) in one pass, and ``_htwa_bias_grad_kernel`` sums the partials over groups or splits and folds them onto the
table rows in one pass, in a fixed order (each table row owns the list of its pairs). No atomics anywhere: every
gradient is bitwise repeatable.
"""

from __future__ import annotations

import contextlib
import math

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from ._window_geometry import geometry as _geometry
from ._window_geometry import pow2 as _pow2
from .dispatch import interpreting
from .reference import bias_table_rows, relative_position_bias, relative_position_index

LOG2E = 1.4426950408889634
_MAX_GRID_YZ = 65535
_FOLD_MAX_SPLITS = 16  # _bias_grad: more partials than this (the fused backward's groups) are summed first
_FUSED_MAX = 128  # the fused backward holds a window's keys in one tile: P <= 128 keeps it in registers


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
def _htwa_fwd_kernel(
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
def _htwa_bwd_delta_kernel(O, DO, DELTA, n_rows, HD: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
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
    """One sub-block of QB queries (flat tokens ``tq``, -1 outside the grid) against all P keys of the window, in
    the transposed (keys x queries) orientation: accumulates dv / scale, dk, and the bias-gradient partial ``db``
    (keys x queries) times the scale, writes dq of these queries. Scores in raw units until the exponent (see
    ``_htwa_fwd_kernel``); the softmax scale rides in the exponent, ``exp2(s * qk_scale - lse + log2(scale))`` =
    ``scale * p``, so dq and dk need no multiply (dv and db, once per window or group, divide it out).
    ``DELTA_HERE``: delta = rowsum(o * do) is computed here, from the o and do rows this sub-block reads anyway
    (windows of one sub-block; with two or more the registers it takes make ptxas spill), else read from DELTA."""
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
def _htwa_bwd_fused_kernel(
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
def _htwa_bwd_dkdv_kernel(
    Q, K, V, TILE, TOK, CLS, DO, LSE, DELTA, DK, DV,  # DO, DK, DV contiguous like O; LSE, DELTA fp32
    s_qb, s_qx, s_qn,
    s_kb, s_kx, s_kn,
    s_vb, s_vx, s_vn,
    s_ob, s_ox, s_on,  # strides shared by DO, DK, DV
    s_tc, s_th,
    NH, n_tok, n_kblk, qk_scale, sm_scale,
    HD: tl.constexpr, BLOCK_D: tl.constexpr, P: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_TILE: tl.constexpr, DOT_PREC: tl.constexpr, I64: tl.constexpr,
):
    """Long windows: one program per (window, key block, batch * head) loops over the window's query blocks."""
    pid = tl.program_id(0)
    win = pid // n_kblk
    offs_n = (pid % n_kblk) * BLOCK_N + tl.arange(0, BLOCK_N)
    b = tl.program_id(1) // NH
    if I64:
        b = b.to(tl.int64)
    head = tl.program_id(1) % NH
    tile_base = TILE + tl.load(CLS + win) * s_tc + head * s_th
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < HD
    tk = _rows(TOK, win, offs_n, P, I64)
    kmask = (tk >= 0)[:, None] & dmask[None, :]
    k = tl.load(K + b * s_kb + head * s_kn + tk[:, None] * s_kx + offs_d[None, :], mask=kmask, other=0.0)
    v = tl.load(V + b * s_vb + head * s_vn + tk[:, None] * s_vx + offs_d[None, :], mask=kmask, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for start_m in range(0, P, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        tq = _rows(TOK, win, offs_m, P, I64)
        vq = tq >= 0
        qmask = vq[:, None] & dmask[None, :]
        q = tl.load(Q + b * s_qb + head * s_qn + tq[:, None] * s_qx + offs_d[None, :], mask=qmask, other=0.0)
        do = tl.load(DO + b * s_ob + head * s_on + tq[:, None] * s_ox + offs_d[None, :], mask=qmask, other=0.0)
        row = (b * n_tok + tq) * NH + head
        lse = tl.load(LSE + row, mask=vq, other=0.0)
        delta = tl.load(DELTA + row, mask=vq, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)
        if HAS_TILE:
            s += tl.load(tile_base + offs_m[:, None] * P + offs_n[None, :]).to(tl.float32)
        p = tl.math.exp2(s * qk_scale - lse[:, None])
        dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=DOT_PREC)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
        ds = p * (dp - delta[:, None])
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=DOT_PREC)
    out_off = b * s_ob + head * s_on + tk[:, None] * s_ox + offs_d[None, :]
    tl.store(DK + out_off, (dk * sm_scale).to(DK.dtype.element_ty), mask=kmask)
    tl.store(DV + out_off, dv.to(DV.dtype.element_ty), mask=kmask)


@triton.jit
def _htwa_bwd_dq_kernel(
    Q, K, V, TILE, TOK, CLS, DO, LSE, DELTA, DQ, DBP,  # DBP: bias-gradient partials (SPLIT, heads, P, P) fp32
    s_qb, s_qx, s_qn,
    s_kb, s_kx, s_kn,
    s_vb, s_vx, s_vn,
    s_ob, s_ox, s_on,  # strides shared by DO, DQ
    s_tc, s_th,
    B, NH, n_tok, n_win, n_split, qk_scale, sm_scale,  # items = (window, batch) pairs, n_win * B of them
    HD: tl.constexpr, BLOCK_D: tl.constexpr, P: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_TILE: tl.constexpr, BIAS_GRAD: tl.constexpr, DOT_PREC: tl.constexpr, I64: tl.constexpr,
):
    """Long windows: one program per (split, query block, head) walks a fixed set of items in a fixed order."""
    split = tl.program_id(0)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    head = tl.program_id(2)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < HD
    db_ptr = DBP + (split * NH + head).to(tl.int64) * (P * P) + offs_m[:, None] * P
    db_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)  # one key block covers the window: in registers

    for item in range(split, n_win * B, n_split):  # a fixed set of items in a fixed order: deterministic partials
        b = item % B
        if I64:
            b = b.to(tl.int64)
        win = item // B
        tile_base = TILE + tl.load(CLS + win) * s_tc + head * s_th
        tq = _rows(TOK, win, offs_m, P, I64)
        vq = tq >= 0
        qmask = vq[:, None] & dmask[None, :]
        q = tl.load(Q + b * s_qb + head * s_qn + tq[:, None] * s_qx + offs_d[None, :], mask=qmask, other=0.0)
        o_off = b * s_ob + head * s_on + tq[:, None] * s_ox + offs_d[None, :]
        do = tl.load(DO + o_off, mask=qmask, other=0.0)
        row = (b * n_tok + tq) * NH + head
        lse = tl.load(LSE + row, mask=vq, other=0.0)
        delta = tl.load(DELTA + row, mask=vq, other=0.0)
        dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        for start_n in range(0, P, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            tk = _rows(TOK, win, offs_n, P, I64)
            kmask = (tk >= 0)[:, None] & dmask[None, :]
            k = tl.load(K + b * s_kb + head * s_kn + tk[:, None] * s_kx + offs_d[None, :], mask=kmask, other=0.0)
            v = tl.load(V + b * s_vb + head * s_vn + tk[:, None] * s_vx + offs_d[None, :], mask=kmask, other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)
            if HAS_TILE:
                s += tl.load(tile_base + offs_m[:, None] * P + offs_n[None, :]).to(tl.float32)
            p = tl.math.exp2(s * qk_scale - lse[:, None])
            dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
            ds = p * (dp - delta[:, None])
            dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PREC)
            if BIAS_GRAD:
                if BLOCK_N == P:
                    db_acc += ds
                else:  # this program alone owns these partial rows, and each thread rereads what it wrote
                    ptrs = db_ptr + offs_n[None, :]
                    tl.store(ptrs, tl.load(ptrs) + ds)
        tl.store(DQ + o_off, (dq * sm_scale).to(DQ.dtype.element_ty), mask=qmask)

    if BIAS_GRAD:
        if BLOCK_N == P:
            tl.store(db_ptr + tl.arange(0, BLOCK_N)[None, :], db_acc)


@triton.jit
def _htwa_tile_kernel(
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
def _htwa_bias_grad_kernel(
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


# ----------------------------------------------------------------------------------------------------------------------
# Geometry, tiles and configs (torch, once per call; the geometry is cached per (grid, window, shift, device))
# ----------------------------------------------------------------------------------------------------------------------

_config_override: dict | None = None


@contextlib.contextmanager
def override_config(**cfg):
    """Force tiles and work split in a scope, for tests (the multi-block, multi-group and split paths at small
    shapes) and tuning runs. Keys: ``fwd_m``, ``fwd_n`` (forward tiles), ``group`` (items per program),
    ``bwd`` (``"fused"`` or ``"split"``), ``fused_qb`` (the fused backward's query sub-block), ``dkdv_m``,
    ``dkdv_n``, ``dq_m``, ``dq_n`` (the split backward's tiles), ``split`` (its item splits), ``i64`` (int64
    offsets, which only tensors of 2**31 elements need)."""
    global _config_override
    previous, _config_override = _config_override, dict(cfg)
    try:
        yield
    finally:
        _config_override = previous


def _chained_warps(rows: int) -> int:
    """Warps for a tile whose scores feed a second GEMM: Triton then puts every warp on the rows (16 each on both
    mma.sync and wgmma), so more than rows / 16 warps would repeat each other's work."""
    return max(1, min(8, rows // 16))


def _blocks(P: int, head_dim: int, dtype: torch.dtype = torch.bfloat16) -> dict:
    """Default tiles for a window of ``P`` padded tokens; ``override_config`` sets others.

    LF-VILA's windows hold 30, 60, 120, 240, 480 tokens: P = 32, 64, 128, 256, 512. Half precision (tensor cores):
    up to 128 the forward takes the whole window as one tile (its bias + mask tile then stays in registers) and the
    backward is the fused kernel; beyond, 128 x 128 forward tiles and the split backward, 2 pipeline stages.

    fp32 (IEEE products on FFMA: both operands of every dot live in registers) has its own table, chosen with the
    compiled-code yardstick (``benchmarks.kernel_resources --issue-floor --dtype fp32``; sm_90): the half tiles make
    ptxas fall back to 32 registers and spill 8-11 KB a thread from P = 128 on. One pipeline stage, 64 x 32 forward
    tiles (64 x 16 at head_dim 64: the forward keeps a window's q and o offsets in registers across its batch
    items) and 32 x 32 split-backward tiles (32 x 16 at head_dim 64) spill at most 16 bytes; the fused backward is
    kept for P <= 32 only (at P = 64 it spills 1.6 KB). Summed issue floor of lfvila-base's 24 blocks at B = 16,
    T = 32, head_dim 32: 42 ms with the half tiles, 25 ms with these (benchmarks/NOTES-window-attention.md)."""
    if dtype == torch.float32:
        fwd_m = min(P, 64 if head_dim <= 64 else 32)
        cfg = dict(fwd_m=fwd_m, fwd_n=min(P, 32 if head_dim <= 32 else 16),
                   bwd="fused" if P <= 32 else "split", fused_qb=P if P <= 32 else 32,
                   dkdv_m=min(P, 32), dkdv_n=min(P, 32 if head_dim <= 32 else 16), dq_m=min(P, 32),
                   dq_n=P if P <= 32 else (32 if head_dim <= 32 else 16), stages=1)
    elif P <= _FUSED_MAX:
        cfg = dict(fwd_m=P, fwd_n=P, bwd="fused", fused_qb=min(P, 64), dkdv_m=min(P, 64), dkdv_n=min(P, 64),
                   dq_m=min(P, 64), dq_n=P, stages=2)
    else:
        wide = head_dim <= 64
        cfg = dict(fwd_m=128 if wide else 64, fwd_n=128 if wide else 64, bwd="split", fused_qb=64, dkdv_m=64,
                   dkdv_n=64, dq_m=64, dq_n=64, stages=2)
    if _config_override:
        cfg.update({k: v for k, v in _config_override.items() if k not in ("split", "group", "i64")})
    if cfg["bwd"] == "fused" and (P > _FUSED_MAX or P not in (cfg["fused_qb"] * n for n in (1, 2, 4))):
        raise ValueError(f"the fused backward needs P <= {_FUSED_MAX} and P = 1, 2 or 4 query sub-blocks; got "
                         f"P={P}, fused_qb={cfg['fused_qb']}")
    return cfg


def _sm_count(device: torch.device) -> int | None:
    """Streaming multiprocessors of a CUDA device (None elsewhere): the work split depends on it alone."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else None


def _tiles(geo: dict, table: torch.Tensor | None, window, dtype: torch.dtype, scale: float):
    """``(classes, heads, P, P)`` in ``dtype``: ``bias / scale`` (the bias in units of raw scores ``q . k``) where
    allowed, ``-inf`` elsewhere; ``None`` when there is neither a bias nor a mask. A function of the table, so its
    gradient flows through the kernels' dtable output, not through this tensor (built from ``table.detach()``)."""
    allowed, N, P = geo["allowed"], geo["N"], geo["P"]
    if table is None and bool(allowed.all()):
        return None
    heads = 1 if table is None else table.shape[1]
    bias = torch.zeros((heads, P, P), dtype=torch.float32, device=allowed.device)
    if table is not None:
        bias[:, :N, :N] = relative_position_bias(table.detach().float(), window) * (1.0 / scale)
    tile = torch.where(allowed[:, None], bias[None], float("-inf"))
    return tile.to(dtype).contiguous()


def _rel_tables(geo: dict, window) -> dict:
    """Per geometry, cached in ``geo``: the relative-position index ``(N, N)`` int32 and its pairs grouped by table
    row (``pairs``: flat ``i * P + j`` sorted by row, stable; ``rptr``: rows + 1 offsets), on the geometry's device."""
    if "rel_index" not in geo:
        N, P = geo["N"], geo["P"]
        index = relative_position_index(window).reshape(-1)  # CPU, (N * N,)
        order = torch.sort(index, stable=True).indices
        counts = torch.bincount(index, minlength=bias_table_rows(window))
        device = geo["tok"].device
        geo["rel_index"] = index.to(torch.int32).to(device)
        geo["pairs"] = ((order // N) * P + order % N).to(torch.int32).to(device)
        geo["rptr"] = torch.cat([counts.new_zeros(1), counts.cumsum(0)]).to(torch.int32).to(device)
    return geo


def _tile(geo: dict, table: torch.Tensor | None, window, dtype: torch.dtype, scale: float, transpose: bool = False):
    """:func:`_tiles` computed by ``_htwa_tile_kernel`` (one read of the table, one write of the tile; equal bit for
    bit), or its ``(classes, heads, key, query)`` transpose for the fused backward; None without bias or mask."""
    allowed, P = geo["allowed"], geo["P"]
    if table is None:  # a mask alone: none without a shift or padding (one device sync per geometry, not per call)
        if "all_allowed" not in geo:
            geo["all_allowed"] = bool(allowed.all())
        if geo["all_allowed"]:
            return None
    heads = 1 if table is None else table.shape[1]
    out = torch.empty((allowed.shape[0], heads, P, P), dtype=dtype, device=allowed.device)
    rel = _rel_tables(geo, window)
    block_r = max(1, min(P, 4096 // P))
    t = table.detach() if table is not None else out
    _htwa_tile_kernel[(allowed.shape[0], heads, P // block_r)](
        t, rel["rel_index"], allowed.view(torch.uint8), out,
        t.stride(0) if table is not None else 0, t.stride(1) if table is not None else 0, geo["N"], 1.0 / scale,
        P=P, BLOCK_R=block_r, HAS_TABLE=table is not None, TRANSPOSE=transpose, num_warps=4,
    )
    return out


def _bias_grad(partials: torch.Tensor, geo: dict, window) -> torch.Tensor:
    """The table gradient ``(rows, heads)`` fp32 from the dense partials ``(splits, heads, P, P)``: one pass of
    ``_htwa_bias_grad_kernel`` (fixed order; no atomics)."""
    rel = _rel_tables(geo, window)
    if partials.shape[0] > _FOLD_MAX_SPLITS:  # many small partials (the fused backward's groups): one contiguous
        partials = partials.sum(0, keepdim=True)  # fixed-order sum first, not a gather per group and pair
    splits, nh = partials.shape[:2]
    rows = rel["rptr"].numel() - 1
    out = torch.empty((rows, nh), dtype=torch.float32, device=partials.device)
    block_h = min(32, triton.next_power_of_2(nh))
    block_f = min(64, triton.next_power_of_2(-(-rel["pairs"].numel() // rows)))  # about a row's mean pair count
    _htwa_bias_grad_kernel[(rows, triton.cdiv(nh, block_h))](
        partials, rel["pairs"], rel["rptr"], out, splits, partials.stride(0), partials.stride(1), nh,
        BLOCK_F=block_f, BLOCK_H=block_h, num_warps=max(1, min(4, block_f * block_h // 256)),
    )
    return out


def _groups(geo: dict, B: int, heads: int, device: torch.device) -> tuple[torch.Tensor, int]:
    """Split the (window, batch) items into groups of one class: whole windows (``order[j0:j0 + nj]``, every batch)
    when a group holds at least ``B`` items, else one window and a batch range ``b0:b0 + nb``. A program walks its
    group's windows and, inside, the batches, so a window's token offsets are computed once for its batch items.

    Group size: enough programs (groups x heads) for about 4 per SM, a function of shapes and the device only, so
    the bias-gradient summation order is the same on every run. Returns ``grp (groups, 5)`` int32 on ``device``,
    rows ``(j0, nj, b0, nb, class)``, and the groups' largest item count."""
    n_items = geo["n_win"] * B
    sms = _sm_count(device)
    if _config_override and "group" in _config_override:
        size = max(1, int(_config_override["group"]))
    elif sms is None:
        size = 2  # the interpreter: several items per program and several programs, at test sizes
    else:
        size = max(1, math.ceil(n_items * heads / (4 * sms)))
    rows = []
    bounds = geo["class_start"]
    for c in range(len(bounds) - 1):
        if size >= B:
            per = size // B
            rows += [(j, min(per, bounds[c + 1] - j), 0, B, c) for j in range(bounds[c], bounds[c + 1], per)]
        else:
            rows += [(j, 1, b, min(size, B - b), c) for j in range(bounds[c], bounds[c + 1]) for b in range(0, B, size)]
    grp = torch.tensor(rows, dtype=torch.int32, device=device).reshape(-1, 5)
    return grp, max(nj * nb for _, nj, _, nb, _ in rows)


def _token_strided(x: torch.Tensor) -> torch.Tensor:
    """``x`` itself when its t and h strides are multiples of its w stride by the grid (a token is one stride
    apart from the next in row-major (t, h, w) order: true of contiguous tensors and of views of one fused qkv
    projection); else a contiguous copy."""
    _, T, H, W = x.shape[:4]
    s = x.stride()
    return x if s[2] == W * s[3] and s[1] == H * W * s[3] else x.contiguous()


def _strides(x: torch.Tensor) -> tuple[int, int, int]:
    return x.stride(0), x.stride(3), x.stride(4)  # batch, token, head


def _needs_i64(*tensors: torch.Tensor) -> bool:
    """Whether an element offset into one of ``tensors`` may exceed int32 (the kernels then compute in int64)."""
    if _config_override and "i64" in _config_override:
        return bool(_config_override["i64"])
    return any(sum((n - 1) * st for n, st in zip(x.shape, x.stride())) >= 2**31 - 1 or x.numel() >= 2**31 - 1
               for x in tensors)


def _dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # fp32 inputs get fp32 products, not tf32


def _launch_fwd(q, k, v, table, window, shift, scale):
    B, T, H, W, nh, hd = q.shape
    if B * nh > _MAX_GRID_YZ:
        raise ValueError(f"batch * heads = {B * nh} exceeds the kernel's grid limit {_MAX_GRID_YZ}")
    q, k, v = (_token_strided(x) for x in (q, k, v))
    geo = _geometry((T, H, W), window, shift, q.device)
    P = geo["P"]
    cfg = _blocks(P, hd, q.dtype)
    tile = _tile(geo, table, window, q.dtype, scale)
    grp, _ = _groups(geo, B, nh, q.device)
    o = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((B, T, H, W, nh), dtype=torch.float32, device=q.device)
    tile_arg = q if tile is None else tile
    s_tc, s_th = (0, 0) if tile is None else (tile.stride(0), tile.stride(1) if tile.shape[1] > 1 else 0)
    grid = (grp.shape[0], nh, P // cfg["fwd_m"])
    _htwa_fwd_kernel[grid](
        q, k, v, tile_arg, geo["tok"], geo["order"], grp, o, lse,
        *_strides(q), *_strides(k), *_strides(v), *_strides(o), s_tc, s_th,
        nh, T * H * W, scale * LOG2E,
        HD=hd, BLOCK_D=_pow2(hd), P=P, BLOCK_M=cfg["fwd_m"], BLOCK_N=cfg["fwd_n"], HAS_TILE=tile is not None,
        DOT_PREC=_dot_precision(q.dtype), I64=_needs_i64(q, k, v, o, lse), FAST=not interpreting(),
        num_warps=_chained_warps(cfg["fwd_m"]), num_stages=cfg["stages"],
    )
    return o, lse


def _num_splits(n_items: int, programs_per_split: int, warps: int, partial_bytes: int, input_bytes: int,
                device: torch.device) -> int:
    """How many programs share the (batch, window) items of one (query tile, head) in the split backward's dq kernel.

    Enough programs for ~32 warps per SM, as long as the fp32 partials stay within twice the size of q (at least
    32 MB, at most 256 MB). A function of shapes and the device only, so the bias-gradient summation order is the
    same on every run."""
    if _config_override and "split" in _config_override:
        return max(1, min(n_items, int(_config_override["split"])))
    sms = _sm_count(device)
    if sms is None:
        return min(n_items, 2)
    want = math.ceil(32 * sms / (programs_per_split * warps))
    budget = min(256 << 20, max(32 << 20, 2 * input_bytes))
    return max(1, min(n_items, want, budget // max(1, partial_bytes)))


def _launch_bwd(do, q, k, v, o, lse, table, window, shift, scale, bias_grad=True):
    """dq, dk, dv and the table gradient (an empty tensor without a table, or with ``bias_grad=False``)."""
    B, T, H, W, nh, hd = q.shape
    q, k, v = (_token_strided(x) for x in (q, k, v))
    geo = _geometry((T, H, W), window, shift, q.device)
    P = geo["P"]
    cfg = _blocks(P, hd, q.dtype)
    do, o = do.contiguous(), o.contiguous()
    BLOCK_D = _pow2(hd)
    fused = cfg["bwd"] == "fused"
    delta = None
    if not fused or cfg["fused_qb"] < P:  # else the fused kernel computes delta itself
        n_rows = o.numel() // hd
        delta = torch.empty(lse.shape, dtype=torch.float32, device=q.device)
        _htwa_bwd_delta_kernel[(triton.cdiv(n_rows, 64),)](o, do, delta, n_rows, HD=hd, BLOCK_R=64, BLOCK_D=BLOCK_D)

    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dv = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    bias_grad = bias_grad and table is not None
    tile = _tile(geo, table, window, q.dtype, scale, transpose=fused)  # fused: (class, head, key, query)
    common = dict(HD=hd, BLOCK_D=BLOCK_D, P=P, HAS_TILE=tile is not None, DOT_PREC=_dot_precision(q.dtype),
                  I64=_needs_i64(q, k, v, o, do, lse), num_stages=cfg["stages"])
    in_strides = (*_strides(q), *_strides(k), *_strides(v), *_strides(do))
    n_tok = T * H * W

    if fused:
        tile_arg = q if tile is None else tile
        s_tile = (0, 0) if tile is None else (tile.stride(0), tile.stride(1) if tile.shape[1] > 1 else 0)
        grp, _ = _groups(geo, B, nh, q.device)
        n_groups = grp.shape[0]
        partials = (torch.empty((n_groups, nh, P, P), dtype=torch.float32, device=q.device) if bias_grad else q)
        _htwa_bwd_fused_kernel[(n_groups, nh)](  # o shares do's strides (both contiguous)
            q, k, v, o, do, lse, lse if delta is None else delta, tile_arg, geo["tok"], geo["order"], grp,
            dq, dk, dv, partials,
            *in_strides, *s_tile, nh, n_tok, scale * LOG2E, scale,
            QB=cfg["fused_qb"], BIAS_GRAD=bias_grad, num_warps=_chained_warps(P), **common,
        )
    else:
        tile_arg = q if tile is None else tile
        s_tile = (0, 0) if tile is None else (tile.stride(0), tile.stride(1) if tile.shape[1] > 1 else 0)
        n_kblk = P // cfg["dkdv_n"]
        _htwa_bwd_dkdv_kernel[(geo["n_win"] * n_kblk, B * nh)](
            q, k, v, tile_arg, geo["tok"], geo["cls"], do, lse, delta, dk, dv, *in_strides, *s_tile,
            nh, n_tok, n_kblk, scale * LOG2E, scale,
            BLOCK_M=cfg["dkdv_m"], BLOCK_N=cfg["dkdv_n"], num_warps=_chained_warps(cfg["dkdv_m"]), **common,
        )
        n_qblk = P // cfg["dq_m"]
        n_items = B * geo["n_win"]
        warps = _chained_warps(cfg["dq_m"])
        if not bias_grad:
            n_split, partials = n_items, q  # one program per item; no partials
        else:
            n_split = _num_splits(n_items, n_qblk * nh, warps, nh * P * P * 4, q.numel() * q.element_size(),
                                  q.device)
            alloc = torch.empty if cfg["dq_n"] == P else torch.zeros  # the register path overwrites; RMW adds
            partials = alloc((n_split, nh, P, P), dtype=torch.float32, device=q.device)
        _htwa_bwd_dq_kernel[(n_split, n_qblk, nh)](
            q, k, v, tile_arg, geo["tok"], geo["cls"], do, lse, delta, dq, partials, *in_strides, *s_tile,
            B, nh, n_tok, geo["n_win"], n_split, scale * LOG2E, scale,
            BLOCK_M=cfg["dq_m"], BLOCK_N=cfg["dq_n"], BIAS_GRAD=bias_grad, num_warps=warps, **common,
        )
    if not bias_grad:
        dtable = q.new_empty(0)
    else:
        dtable = _bias_grad(partials, geo, window).to(table.dtype)  # over groups / splits and pairs, fixed order
    return dq, dk, dv, dtable


# ----------------------------------------------------------------------------------------------------------------------
# torch.library op: opaque to torch.compile, with a fake implementation and an autograd formula
# ----------------------------------------------------------------------------------------------------------------------


@torch.library.custom_op("lfvila_kernels::window_attention_fwd", mutates_args=())
def _window_attention_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, table: torch.Tensor | None,
    window: list[int], shift: list[int], scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _launch_fwd(q, k, v, table, tuple(window), tuple(shift), scale)


@_window_attention_fwd.register_fake
def _(q, k, v, table, window, shift, scale):
    return q.new_empty(q.shape), q.new_empty(q.shape[:5], dtype=torch.float32)


@torch.library.custom_op("lfvila_kernels::window_attention_bwd", mutates_args=())
def _window_attention_bwd(
    do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor,
    table: torch.Tensor | None, window: list[int], shift: list[int], scale: float, bias_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _launch_bwd(do, q, k, v, o, lse, table, tuple(window), tuple(shift), scale, bias_grad)


@_window_attention_bwd.register_fake
def _(do, q, k, v, o, lse, table, window, shift, scale, bias_grad):
    dtable = table.new_empty(table.shape) if table is not None and bias_grad else q.new_empty(0)
    return q.new_empty(q.shape), q.new_empty(q.shape), q.new_empty(q.shape), dtable


def _setup_context(ctx, inputs, output):
    q, k, v, table, window, shift, scale = inputs
    o, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, table, o, lse)
    ctx.window, ctx.shift, ctx.scale = window, shift, scale


def _backward(ctx, do, _dlse):
    q, k, v, table, o, lse = ctx.saved_tensors
    bias_grad = table is not None and ctx.needs_input_grad[3]
    dq, dk, dv, dtable = _window_attention_bwd(
        do, q, k, v, o, lse, table, ctx.window, ctx.shift, ctx.scale, bias_grad
    )
    return dq, dk, dv, (dtable if bias_grad else None), None, None, None


torch.library.register_autograd("lfvila_kernels::window_attention_fwd", _backward, setup_context=_setup_context)


def window_attention_op(q, k, v, table, window: list[int], shift: list[int], scale: float) -> torch.Tensor:
    """The fused op on validated arguments (see ``window_attention``). Returns o ``(B, T, H, W, heads, head_dim)``."""
    if q.device.type == "cpu" and not interpreting():
        raise RuntimeError("the Triton window attention needs CUDA tensors (or TRITON_INTERPRET=1 on the CPU)")
    return _window_attention_fwd(q, k, v, table, window, shift, scale)[0]
