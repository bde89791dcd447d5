"""Triton kernels of the split window-attention backward: windows longer than the fused backward takes (``P > 128``
padded tokens in half precision, L3-L5 of lfvila-base; ``P > 32`` in fp32). Three kernels, no atomics, every
gradient bitwise repeatable (the design of the whole op: ``_window_attention_kernels.py``'s module docstring):

* ``_window_attention_bwd_dkdv_kernel``: one program per (window, key block, batch x head) sweeps the window's
  query blocks: S, P, dP, dS of its keys, dk and dv (4 GEMMs).
* ``_window_attention_bwd_dq_kernel``: one program per (window, query block, batch x head) sweeps the key blocks:
  S, P, dP, dS of its queries, dq (3 GEMMs).
* ``_window_attention_bwd_db_kernel``: the bias-gradient partial. One program per (group of items, (query block,
  key block) tile, head) walks the group's (window, batch) items (``_groups``: one mask class, so one tile) and
  accumulates the tile's dS over them in registers (S and dP recomputed: 2 GEMMs), then writes it once:
  ``(groups, heads, P, P)`` fp32, summed over the groups by ``_window_attention_bias_grad_kernel`` in a fixed order.
  The dense ``(heads, P, P)`` partial of a query block does not fit registers at P >= 256, so the dq kernel, which
  sweeps all keys, cannot hold it; a program per tile can.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._window_attention_kernels import _rows


@triton.jit
def _window_attention_bwd_dkdv_kernel(
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
    """One program per (window, key block of BLOCK_N keys, batch * head) loops over the window's query blocks, in
    the (keys x queries) orientation: TILE is the transposed tile ``(class, head, key, query)``, so P^T and dS^T are
    the A operands of the dv and dk products straight from registers (queries as rows needs both transposed through
    shared memory: 12.6 against 12.1 instructions per score element at P = 256)."""
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
        # keys x queries: P^T and dS^T are the A operands of dv and dk straight from registers (no transpose)
        st = tl.dot(k, tl.trans(q), input_precision=DOT_PREC)
        if HAS_TILE:  # the transposed tile: (class, head, key, query)
            st += tl.load(tile_base + offs_n[:, None] * P + offs_m[None, :]).to(tl.float32)
        pt = tl.math.exp2(st * qk_scale - lse[None, :])
        dv += tl.dot(pt.to(do.dtype), do, input_precision=DOT_PREC)
        dpt = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
        dst = pt * (dpt - delta[None, :])
        dk += tl.dot(dst.to(q.dtype), q, input_precision=DOT_PREC)
    out_off = b * s_ob + head * s_on + tk[:, None] * s_ox + offs_d[None, :]
    tl.store(DK + out_off, (dk * sm_scale).to(DK.dtype.element_ty), mask=kmask)
    tl.store(DV + out_off, dv.to(DV.dtype.element_ty), mask=kmask)


@triton.jit
def _window_attention_bwd_dq_kernel(
    Q, K, V, TILE, TOK, CLS, DO, LSE, DELTA, DQ,
    s_qb, s_qx, s_qn,
    s_kb, s_kx, s_kn,
    s_vb, s_vx, s_vn,
    s_ob, s_ox, s_on,  # strides shared by DO, DQ
    s_tc, s_th,
    NH, n_tok, n_qblk, qk_scale, sm_scale,
    HD: tl.constexpr, BLOCK_D: tl.constexpr, P: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_TILE: tl.constexpr, DOT_PREC: tl.constexpr, I64: tl.constexpr,
):
    """One program per (window, query block of BLOCK_M queries, batch * head) loops over the window's key blocks."""
    pid = tl.program_id(0)
    win = pid // n_qblk
    offs_m = (pid % n_qblk) * BLOCK_M + tl.arange(0, BLOCK_M)
    b = tl.program_id(1) // NH
    if I64:
        b = b.to(tl.int64)
    head = tl.program_id(1) % NH
    tile_base = TILE + tl.load(CLS + win) * s_tc + head * s_th
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < HD
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
    tl.store(DQ + o_off, (dq * sm_scale).to(DQ.dtype.element_ty), mask=qmask)


@triton.jit
def _window_attention_bwd_db_kernel(
    Q, K, V, TILE, TOK, WIN, GRP, DO, LSE, DELTA, DBP,  # DBP (groups, heads, P, P) fp32: rows queries, cols keys
    s_qb, s_qx, s_qn,
    s_kb, s_kx, s_kn,
    s_vb, s_vx, s_vn,
    s_ob, s_ox, s_on,  # strides of DO
    s_tc, s_th,
    NH, n_tok, n_kblk, qk_scale,
    HD: tl.constexpr, BLOCK_D: tl.constexpr, P: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PREC: tl.constexpr, I64: tl.constexpr,
):
    """One program: a group of (window, batch) items of one class (``GRP`` rows ``(j0, nj, b0, nb, class)``, see
    ``_groups``), one (BLOCK_M queries x BLOCK_N keys) tile of the window, one head. The tile of bias + mask is
    loaded once (one class) and is the QK^T accumulator input; dS = P * (dP - delta) of every item is summed in
    registers and written once: ``DBP[g, head, query, key]``."""
    g = tl.program_id(0)
    offs_m = (tl.program_id(1) // n_kblk) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = (tl.program_id(1) % n_kblk) * BLOCK_N + tl.arange(0, BLOCK_N)
    head = tl.program_id(2)
    j0 = tl.load(GRP + g * 5)
    nj = tl.load(GRP + g * 5 + 1)
    b0 = tl.load(GRP + g * 5 + 2)
    nb = tl.load(GRP + g * 5 + 3)
    tile_base = TILE + tl.load(GRP + g * 5 + 4) * s_tc + head * s_th
    resident = tl.load(tile_base + offs_m[:, None] * P + offs_n[None, :]).to(tl.float32)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < HD
    db = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for jj in range(j0, j0 + nj):
        # token offsets of this window, once for its nb batch items (per row: full offset tiles cost registers)
        win = tl.load(WIN + jj)
        tq = _rows(TOK, win, offs_m, P, I64)
        tk = _rows(TOK, win, offs_n, P, I64)
        vq = tq >= 0
        qmask = vq[:, None] & dmask[None, :]
        kmask = (tk >= 0)[:, None] & dmask[None, :]
        q_row = head * s_qn + tq * s_qx
        o_row = head * s_on + tq * s_ox
        k_row = head * s_kn + tk * s_kx
        v_row = head * s_vn + tk * s_vx
        lse_row = tq * NH + head
        for bb in range(b0, b0 + nb):
            b = tl.cast(bb, tl.int64) if I64 else bb
            q = tl.load(Q + (b * s_qb + q_row)[:, None] + offs_d[None, :], mask=qmask, other=0.0)
            do = tl.load(DO + (b * s_ob + o_row)[:, None] + offs_d[None, :], mask=qmask, other=0.0)
            k = tl.load(K + (b * s_kb + k_row)[:, None] + offs_d[None, :], mask=kmask, other=0.0)
            v = tl.load(V + (b * s_vb + v_row)[:, None] + offs_d[None, :], mask=kmask, other=0.0)
            lse = tl.load(LSE + b * (n_tok * NH) + lse_row, mask=vq, other=0.0)
            delta = tl.load(DELTA + b * (n_tok * NH) + lse_row, mask=vq, other=0.0)
            s = tl.dot(q, tl.trans(k), resident, input_precision=DOT_PREC)
            p = tl.math.exp2(s * qk_scale - lse[:, None])
            dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
            db += p * (dp - delta[:, None])
    tl.store(DBP + (g * NH + head).to(tl.int64) * (P * P) + offs_m[:, None] * P + offs_n[None, :], db)
