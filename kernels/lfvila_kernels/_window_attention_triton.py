"""Triton kernels for HTWA window attention: forward, backward, launchers and the ``torch.library`` op.

Every program maps its window to token coordinates with index arithmetic, so q, k, v and dO are read, and o, dq, dk,
dv written, in the original ``(B, T, H, W, heads, head_dim)`` order: no roll, pad, partition or reverse copies.

Inside a program, window token ``n`` (row-major over ``(t, h, w)`` in the window) of window ``(i, j, l)`` sits at
rolled coordinate ``(i*wt + t, j*wh + h, l*ww + w)``; the original coordinate is that plus the shift, modulo the grid.
A token is *wrapped* on an axis when its rolled coordinate is ``>= size - shift`` (the roll moved it from the start to
the end); query and key must agree on all three wrapped flags (Swin's shift mask). Tokens beyond the grid (partial
windows) are masked. The relative-position bias row is ``code(query) - code(key) + C`` with
``code = t*(2wh-1)(2ww-1) + h*(2ww-1) + w``: linear, so it is gathered from the small table in-kernel.

Scores are kept in the log2 domain (``exp2``), the forward saves the per-row log-sum-exp ``lse`` ``(B, T, H, W,
heads)`` fp32. The backward recomputes scores: one kernel per key block produces dk, dv; one kernel per query block
produces dq and the bias-table gradient, deterministically: each program owns a private fp32 partial of the dense
``(heads, N, N)`` bias gradient, summed over a fixed set of (batch, window) items in a fixed order; the partials are
then reduced by ``torch.sum`` and folded onto the table by a fixed-order diagonal reduction. No atomics anywhere.
"""

from __future__ import annotations

import contextlib
import math

import torch
import triton
import triton.language as tl

from .dispatch import interpreting

LOG2E = 1.4426950408889634
_MAX_GRID_YZ = 65535


@triton.jit
def _window_tokens(n, win, n_win_h, n_win_w, T, H, W, st, sh, sw,
                   WT: tl.constexpr, WH: tl.constexpr, WW: tl.constexpr, N: tl.constexpr):
    """Local token indices ``n`` of window ``win`` -> original coords, validity, shift region, bias code."""
    wi_t = win // (n_win_h * n_win_w)
    wi_h = (win // n_win_w) % n_win_h
    wi_w = win % n_win_w
    lt = n // (WH * WW)
    lh = (n // WW) % WH
    lw = n % WW
    it = wi_t * WT + lt  # rolled coordinates
    ih = wi_h * WH + lh
    iw = wi_w * WW + lw
    valid = (n < N) & (it < T) & (ih < H) & (iw < W)
    ot = it + st
    ot = tl.where(ot >= T, ot - T, ot)
    oh = ih + sh
    oh = tl.where(oh >= H, oh - H, oh)
    ow = iw + sw
    ow = tl.where(ow >= W, ow - W, ow)
    region = (it >= T - st).to(tl.int32) * 4 + (ih >= H - sh).to(tl.int32) * 2 + (iw >= W - sw).to(tl.int32)
    code = lt * ((2 * WH - 1) * (2 * WW - 1)) + lh * (2 * WW - 1) + lw
    return ot, oh, ow, valid, region, code


@triton.jit
def _scores(q, k, TAB, head, s_tab_h, cq, ck, rq, rk, vq, vk, inq, ink, qk_scale,
            HAS_BIAS: tl.constexpr, BIAS_C: tl.constexpr, DOT_PREC: tl.constexpr):
    """log2-domain scores ``(q k^T * scale + bias) * log2(e)`` and the allowed-pair mask of one tile."""
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
    allowed = vq[:, None] & vk[None, :] & (rq[:, None] == rk[None, :])
    if HAS_BIAS:
        idx = cq[:, None] - ck[None, :] + BIAS_C
        bias = tl.load(TAB + head * s_tab_h + idx, mask=inq[:, None] & ink[None, :], other=0.0)
        s += bias.to(tl.float32) * 1.4426950408889634
    return s, allowed


@triton.jit
def _htwa_fwd_kernel(
    Q, K, V, TAB, O, LSE,  # q/k/v/o (B, T, H, W, heads, D); TAB (heads, R) contiguous; LSE (B, T, H, W, heads) fp32
    s_qb, s_qt, s_qh, s_qw, s_qn,  # q strides (elements): batch, t, h, w, head (head_dim stride is 1)
    s_kb, s_kt, s_kh, s_kw, s_kn,
    s_vb, s_vt, s_vh, s_vw, s_vn,
    s_ob, s_ot, s_oh, s_ow, s_on,
    s_tab_h,  # TAB head stride (= R)
    T, H, W, NH, st, sh, sw, n_win_h, n_win_w, n_qblk,
    qk_scale,  # softmax scale * log2(e)
    HD: tl.constexpr, BLOCK_D: tl.constexpr, WT: tl.constexpr, WH: tl.constexpr, WW: tl.constexpr,
    N: tl.constexpr, BIAS_C: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_BIAS: tl.constexpr, DOT_PREC: tl.constexpr,
):
    pid = tl.program_id(0)
    win = pid // n_qblk
    offs_m = (pid % n_qblk) * BLOCK_M + tl.arange(0, BLOCK_M)
    b = tl.program_id(1) // NH
    head = tl.program_id(1) % NH
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < HD

    qt, qh, qw, vq, rq, cq = _window_tokens(offs_m, win, n_win_h, n_win_w, T, H, W, st, sh, sw, WT, WH, WW, N)
    q_base = Q + b.to(tl.int64) * s_qb + head * s_qn
    q = tl.load(q_base + (qt * s_qt + qh * s_qh + qw * s_qw)[:, None] + offs_d[None, :],
                mask=vq[:, None] & dmask[None, :], other=0.0)
    k_base = K + b.to(tl.int64) * s_kb + head * s_kn
    v_base = V + b.to(tl.int64) * s_vb + head * s_vn
    inq = offs_m < N

    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)  # finite: a fully masked tile must not give NaN
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(0, N, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kt, kh, kw, vk, rk, ck = _window_tokens(offs_n, win, n_win_h, n_win_w, T, H, W, st, sh, sw, WT, WH, WW, N)
        kmask = vk[:, None] & dmask[None, :]
        k = tl.load(k_base + (kt * s_kt + kh * s_kh + kw * s_kw)[:, None] + offs_d[None, :], mask=kmask, other=0.0)
        v = tl.load(v_base + (kt * s_vt + kh * s_vh + kw * s_vw)[:, None] + offs_d[None, :], mask=kmask, other=0.0)
        s, allowed = _scores(q, k, TAB, head, s_tab_h, cq, ck, rq, rk, vq, vk, inq, offs_n < N, qk_scale,
                             HAS_BIAS, BIAS_C, DOT_PREC)
        s = tl.where(allowed, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
        m_i = m_new

    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    out = acc / l_safe[:, None]
    o_base = O + b.to(tl.int64) * s_ob + head * s_on
    tl.store(o_base + (qt * s_ot + qh * s_oh + qw * s_ow)[:, None] + offs_d[None, :], out.to(O.dtype.element_ty),
             mask=vq[:, None] & dmask[None, :])
    row = ((b.to(tl.int64) * T + qt) * H + qh) * W + qw
    tl.store(LSE + row * NH + head, m_i + tl.math.log2(l_safe), mask=vq)


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
def _htwa_bwd_dkdv_kernel(
    Q, K, V, TAB, DO, LSE, DELTA, DK, DV,  # DO, DK, DV contiguous like O; LSE, DELTA (B, T, H, W, heads) fp32
    s_qb, s_qt, s_qh, s_qw, s_qn,
    s_kb, s_kt, s_kh, s_kw, s_kn,
    s_vb, s_vt, s_vh, s_vw, s_vn,
    s_ob, s_ot, s_oh, s_ow, s_on,  # strides shared by DO, DK, DV
    s_tab_h,
    T, H, W, NH, st, sh, sw, n_win_h, n_win_w, n_kblk,
    qk_scale, sm_scale,
    HD: tl.constexpr, BLOCK_D: tl.constexpr, WT: tl.constexpr, WH: tl.constexpr, WW: tl.constexpr,
    N: tl.constexpr, BIAS_C: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_BIAS: tl.constexpr, DOT_PREC: tl.constexpr,
):
    pid = tl.program_id(0)
    win = pid // n_kblk
    offs_n = (pid % n_kblk) * BLOCK_N + tl.arange(0, BLOCK_N)
    b = tl.program_id(1) // NH
    head = tl.program_id(1) % NH
    b64 = b.to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < HD

    kt, kh, kw, vk, rk, ck = _window_tokens(offs_n, win, n_win_h, n_win_w, T, H, W, st, sh, sw, WT, WH, WW, N)
    kmask = vk[:, None] & dmask[None, :]
    k = tl.load(K + b64 * s_kb + head * s_kn + (kt * s_kt + kh * s_kh + kw * s_kw)[:, None] + offs_d[None, :],
                mask=kmask, other=0.0)
    v = tl.load(V + b64 * s_vb + head * s_vn + (kt * s_vt + kh * s_vh + kw * s_vw)[:, None] + offs_d[None, :],
                mask=kmask, other=0.0)
    ink = offs_n < N
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    q_base = Q + b64 * s_qb + head * s_qn
    do_base = DO + b64 * s_ob + head * s_on
    for start_m in range(0, N, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        qt, qh, qw, vq, rq, cq = _window_tokens(offs_m, win, n_win_h, n_win_w, T, H, W, st, sh, sw, WT, WH, WW, N)
        qmask = vq[:, None] & dmask[None, :]
        q = tl.load(q_base + (qt * s_qt + qh * s_qh + qw * s_qw)[:, None] + offs_d[None, :], mask=qmask, other=0.0)
        do = tl.load(do_base + (qt * s_ot + qh * s_oh + qw * s_ow)[:, None] + offs_d[None, :], mask=qmask, other=0.0)
        row = (((b64 * T + qt) * H + qh) * W + qw) * NH + head
        lse = tl.load(LSE + row, mask=vq, other=0.0)
        delta = tl.load(DELTA + row, mask=vq, other=0.0)
        s, allowed = _scores(q, k, TAB, head, s_tab_h, cq, ck, rq, rk, vq, vk, offs_m < N, ink, qk_scale,
                             HAS_BIAS, BIAS_C, DOT_PREC)
        p = tl.where(allowed, tl.math.exp2(s - lse[:, None]), 0.0)
        dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=DOT_PREC)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
        ds = p * (dp - delta[:, None])
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=DOT_PREC)

    out_off = b64 * s_ob + head * s_on + (kt * s_ot + kh * s_oh + kw * s_ow)[:, None] + offs_d[None, :]
    tl.store(DK + out_off, (dk * sm_scale).to(DK.dtype.element_ty), mask=kmask)
    tl.store(DV + out_off, dv.to(DV.dtype.element_ty), mask=kmask)


@triton.jit
def _htwa_bwd_dq_kernel(
    Q, K, V, TAB, DO, LSE, DELTA, DQ, DBP,  # DBP: bias-gradient partials (SPLIT, heads, NQ_PAD, NK_PAD) fp32
    s_qb, s_qt, s_qh, s_qw, s_qn,
    s_kb, s_kt, s_kh, s_kw, s_kn,
    s_vb, s_vt, s_vh, s_vw, s_vn,
    s_ob, s_ot, s_oh, s_ow, s_on,  # strides shared by DO, DQ
    s_tab_h,
    T, H, W, NH, st, sh, sw, n_win_h, n_win_w, n_items, n_split,  # items = (batch, window) pairs
    qk_scale, sm_scale,
    HD: tl.constexpr, BLOCK_D: tl.constexpr, WT: tl.constexpr, WH: tl.constexpr, WW: tl.constexpr,
    N: tl.constexpr, BIAS_C: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    NQ_PAD: tl.constexpr, NK_PAD: tl.constexpr, SINGLE_KBLK: tl.constexpr,  # SINGLE_KBLK: NK_PAD == BLOCK_N
    HAS_BIAS: tl.constexpr, BIAS_GRAD: tl.constexpr, DOT_PREC: tl.constexpr,
):
    split = tl.program_id(0)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    head = tl.program_id(2)
    n_win = n_win_h * n_win_w * ((T + WT - 1) // WT)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < HD
    inq = offs_m < N
    db_ptr = DBP + (split * NH + head).to(tl.int64) * (NQ_PAD * NK_PAD) + offs_m[:, None] * NK_PAD
    db_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)

    for item in range(split, n_items, n_split):  # a fixed set of items in a fixed order: deterministic partials
        b64 = (item // n_win).to(tl.int64)
        win = item % n_win
        qt, qh, qw, vq, rq, cq = _window_tokens(offs_m, win, n_win_h, n_win_w, T, H, W, st, sh, sw, WT, WH, WW, N)
        qmask = vq[:, None] & dmask[None, :]
        q = tl.load(Q + b64 * s_qb + head * s_qn + (qt * s_qt + qh * s_qh + qw * s_qw)[:, None] + offs_d[None, :],
                    mask=qmask, other=0.0)
        o_off = b64 * s_ob + head * s_on + (qt * s_ot + qh * s_oh + qw * s_ow)[:, None] + offs_d[None, :]
        do = tl.load(DO + o_off, mask=qmask, other=0.0)
        row = (((b64 * T + qt) * H + qh) * W + qw) * NH + head
        lse = tl.load(LSE + row, mask=vq, other=0.0)
        delta = tl.load(DELTA + row, mask=vq, other=0.0)
        dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        for start_n in range(0, N, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            kt, kh, kw, vk, rk, ck = _window_tokens(offs_n, win, n_win_h, n_win_w, T, H, W, st, sh, sw,
                                                    WT, WH, WW, N)
            kmask = vk[:, None] & dmask[None, :]
            k = tl.load(K + b64 * s_kb + head * s_kn + (kt * s_kt + kh * s_kh + kw * s_kw)[:, None]
                        + offs_d[None, :], mask=kmask, other=0.0)
            v = tl.load(V + b64 * s_vb + head * s_vn + (kt * s_vt + kh * s_vh + kw * s_vw)[:, None]
                        + offs_d[None, :], mask=kmask, other=0.0)
            s, allowed = _scores(q, k, TAB, head, s_tab_h, cq, ck, rq, rk, vq, vk, inq, offs_n < N, qk_scale,
                                 HAS_BIAS, BIAS_C, DOT_PREC)
            p = tl.where(allowed, tl.math.exp2(s - lse[:, None]), 0.0)
            dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
            ds = p * (dp - delta[:, None])
            dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PREC)
            if BIAS_GRAD:
                if SINGLE_KBLK:
                    db_acc += ds
                else:  # this program alone owns these partial rows: read-modify-write without atomics
                    ptrs = db_ptr + (start_n + tl.arange(0, BLOCK_N))[None, :]
                    tl.store(ptrs, tl.load(ptrs) + ds)
                    tl.debug_barrier()
        tl.store(DQ + o_off, (dq * sm_scale).to(DQ.dtype.element_ty), mask=qmask)

    if BIAS_GRAD:
        if SINGLE_KBLK:
            tl.store(db_ptr + tl.arange(0, BLOCK_N)[None, :], db_acc)


# ----------------------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------------------

_config_override: dict | None = None


@contextlib.contextmanager
def override_config(**blocks):
    """Force block sizes (``fwd_m``, ``fwd_n``, ``dkdv_m``, ``dkdv_n``, ``dq_m``, ``dq_n``, ``split``) in a scope.

    For tests (to reach the multi-key-block and multi-split paths at small shapes) and for tuning runs.
    """
    global _config_override
    previous, _config_override = _config_override, dict(blocks)
    try:
        yield
    finally:
        _config_override = previous


def _pow2(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


def _warps(block_m: int, block_n: int) -> int:
    # ~16 score elements per thread: the mask, bias gather and softmax temporaries of each element live in registers
    # too, and at ~32 per thread the dq kernel spills (see benchmarks/kernel_resources.py).
    return max(1, min(8, block_m * block_n // 512))


def _blocks(n_tokens: int, head_dim: int) -> dict:
    """Default tiles ``(rows, cols)`` per kernel; ``override_config`` sets others.

    LF-VILA's windows hold 30, 60, 120, 240, 480 tokens, 94% of a 32/64/128/256/512-token tiling. Chosen so that
    no kernel spills at head_dim 32 on sm_90 (``benchmarks/kernel_resources.py``); not yet timed on a GPU. The dq
    kernel takes few query rows when one key tile covers the window, so its bias-gradient accumulator stays in
    registers; longer windows accumulate it in a program-private scratch instead.
    """
    p = _pow2(n_tokens)
    if p <= 64:
        cfg = dict(fwd_m=p, fwd_n=p, dkdv_m=p, dkdv_n=p, dq_m=32 if p <= 32 else 16, dq_n=p)
    elif p == 128:
        cfg = dict(fwd_m=64, fwd_n=128, dkdv_m=128, dkdv_n=64, dq_m=16, dq_n=128)
    else:
        cfg = dict(fwd_m=128 if head_dim <= 64 else 64, fwd_n=64, dkdv_m=64, dkdv_n=64, dq_m=64, dq_n=32)
    if _config_override:
        cfg.update({k: v for k, v in _config_override.items() if k != "split"})
    return cfg


def _geometry(q: torch.Tensor, window, shift) -> dict:
    B, T, H, W, nh, hd = q.shape
    wt, wh, ww = window
    n_win_t, n_win_h, n_win_w = -(-T // wt), -(-H // wh), -(-W // ww)
    if B * nh > _MAX_GRID_YZ:
        raise ValueError(f"batch * heads = {B * nh} exceeds the kernel's grid limit {_MAX_GRID_YZ}")
    return dict(
        n_win=n_win_t * n_win_h * n_win_w, n_win_h=n_win_h, n_win_w=n_win_w, N=wt * wh * ww,
        bias_c=(wt - 1) * (2 * wh - 1) * (2 * ww - 1) + (wh - 1) * (2 * ww - 1) + (ww - 1),
    )


def _strides(x: torch.Tensor) -> tuple[int, ...]:
    return tuple(x.stride()[:5])


def _table_arg(table: torch.Tensor | None, q: torch.Tensor):
    """The bias table transposed to ``(heads, R)`` contiguous, so a head's gathers stay within one small row."""
    if table is None:
        return q, 0  # never read (HAS_BIAS=False)
    tab = table.detach().t().contiguous()
    return tab, tab.stride(0)


def _dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # fp32 inputs get fp32 products, not tf32


def _launch_fwd(q, k, v, table, window, shift, scale):
    B, T, H, W, nh, hd = q.shape
    g = _geometry(q, window, shift)
    cfg = _blocks(g["N"], hd)
    o = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((B, T, H, W, nh), dtype=torch.float32, device=q.device)
    tab, s_tab = _table_arg(table, q)
    n_qblk = triton.cdiv(g["N"], cfg["fwd_m"])
    grid = (g["n_win"] * n_qblk, B * nh)
    _htwa_fwd_kernel[grid](
        q, k, v, tab, o, lse,
        *_strides(q), *_strides(k), *_strides(v), *_strides(o), s_tab,
        T, H, W, nh, *shift, g["n_win_h"], g["n_win_w"], n_qblk, scale * LOG2E,
        HD=hd, BLOCK_D=_pow2(hd), WT=window[0], WH=window[1], WW=window[2], N=g["N"], BIAS_C=g["bias_c"],
        BLOCK_M=cfg["fwd_m"], BLOCK_N=cfg["fwd_n"], HAS_BIAS=table is not None, DOT_PREC=_dot_precision(q.dtype),
        num_warps=_warps(cfg["fwd_m"], cfg["fwd_n"]), num_stages=2,
    )
    return o, lse


def _num_splits(n_items: int, programs_per_split: int, warps: int, partial_bytes: int, input_bytes: int,
                device: torch.device) -> int:
    """How many programs share the (batch, window) items of one (query tile, head) in the dq kernel.

    Enough programs for ~32 warps per SM, as long as the fp32 partials stay within twice the size of q (at least
    32 MB, at most 256 MB). A function of shapes and the device only, so the bias-gradient summation order is the
    same on every run."""
    if _config_override and "split" in _config_override:
        return max(1, min(n_items, int(_config_override["split"])))
    if device.type != "cuda":
        return min(n_items, 2)
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    want = math.ceil(32 * sms / (programs_per_split * warps))
    budget = min(256 << 20, max(32 << 20, 2 * input_bytes))
    return max(1, min(n_items, want, budget // max(1, partial_bytes)))


def _bias_grad_from_dense(dense: torch.Tensor, window) -> torch.Tensor:
    """Fold the dense bias gradient ``(heads, N, N)`` onto the table ``(R, heads)``, in a fixed order.

    Table row ``(dt, dh, dw)`` (offsets query minus key) sums the pairs with those offsets. The offsets separate by
    axis, so each axis is reduced along its diagonals in turn: gathers and sums, no scatter, no atomics.
    """
    wt, wh, ww = window
    nh = dense.shape[0]

    def diagonals(x, w):  # (..., w, w) indexed (a, b) -> (..., 2w-1) indexed a - b + w - 1
        d = torch.arange(-(w - 1), w, device=x.device)
        a = torch.arange(w, device=x.device)
        b = a[None, :] - d[:, None]  # (2w-1, w)
        ok = (b >= 0) & (b < w)
        idx = b.clamp(0, w - 1).expand(*x.shape[:-2], 2 * w - 1, w).unsqueeze(-1)
        y = torch.gather(x.unsqueeze(-3).expand(*x.shape[:-2], 2 * w - 1, w, w), -1, idx).squeeze(-1)
        return (y * ok).sum(-1)

    x = dense.reshape(nh, wt, wh, ww, wt, wh, ww)
    x = diagonals(x.permute(0, 2, 3, 5, 6, 1, 4), wt)  # (nh, ah, aw, bh, bw, Dt)
    x = diagonals(x.permute(0, 2, 4, 5, 1, 3), wh)  # (nh, aw, bw, Dt, Dh)
    x = diagonals(x.permute(0, 3, 4, 1, 2), ww)  # (nh, Dt, Dh, Dw)
    return x.reshape(nh, -1).t().contiguous()


def _launch_bwd(do, q, k, v, o, lse, table, window, shift, scale, bias_grad=True):
    """dq, dk, dv and the table gradient (an empty tensor without a table, or with ``bias_grad=False``)."""
    B, T, H, W, nh, hd = q.shape
    g = _geometry(q, window, shift)
    cfg = _blocks(g["N"], hd)
    do = do.contiguous()
    BLOCK_D = _pow2(hd)
    n_rows = o.numel() // hd
    delta = torch.empty(lse.shape, dtype=torch.float32, device=q.device)
    _htwa_bwd_delta_kernel[(triton.cdiv(n_rows, 64),)](o, do, delta, n_rows, HD=hd, BLOCK_R=64, BLOCK_D=BLOCK_D)

    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dv = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    tab, s_tab = _table_arg(table, q)
    common = dict(HD=hd, BLOCK_D=BLOCK_D, WT=window[0], WH=window[1], WW=window[2], N=g["N"], BIAS_C=g["bias_c"],
                  HAS_BIAS=table is not None, DOT_PREC=_dot_precision(q.dtype), num_stages=2)
    geo = (T, H, W, nh, *shift, g["n_win_h"], g["n_win_w"])
    in_strides = (*_strides(q), *_strides(k), *_strides(v), *_strides(do), s_tab)

    n_kblk = triton.cdiv(g["N"], cfg["dkdv_n"])
    _htwa_bwd_dkdv_kernel[(g["n_win"] * n_kblk, B * nh)](
        q, k, v, tab, do, lse, delta, dk, dv, *in_strides, *geo, n_kblk, scale * LOG2E, scale,
        BLOCK_M=cfg["dkdv_m"], BLOCK_N=cfg["dkdv_n"], num_warps=_warps(cfg["dkdv_m"], cfg["dkdv_n"]), **common,
    )

    n_qblk = triton.cdiv(g["N"], cfg["dq_m"])
    nq_pad, nk_pad = n_qblk * cfg["dq_m"], triton.cdiv(g["N"], cfg["dq_n"]) * cfg["dq_n"]
    n_items = B * g["n_win"]
    bias_grad = bias_grad and table is not None
    if not bias_grad:
        n_split, partials = n_items, q  # one program per item; no partials
    else:
        n_split = _num_splits(n_items, n_qblk * nh, _warps(cfg["dq_m"], cfg["dq_n"]), nh * nq_pad * nk_pad * 4,
                              q.numel() * q.element_size(), q.device)
        alloc = torch.empty if nk_pad == cfg["dq_n"] else torch.zeros  # register path overwrites; RMW path adds
        partials = alloc((n_split, nh, nq_pad, nk_pad), dtype=torch.float32, device=q.device)
    _htwa_bwd_dq_kernel[(n_split, n_qblk, nh)](
        q, k, v, tab, do, lse, delta, dq, partials, *in_strides, *geo, n_items, n_split, scale * LOG2E, scale,
        BLOCK_M=cfg["dq_m"], BLOCK_N=cfg["dq_n"], NQ_PAD=nq_pad, NK_PAD=nk_pad, SINGLE_KBLK=nk_pad == cfg["dq_n"],
        BIAS_GRAD=bias_grad, num_warps=_warps(cfg["dq_m"], cfg["dq_n"]), **common,
    )
    if not bias_grad:
        dtable = q.new_empty(0)
    else:
        dense = partials.sum(0)[:, : g["N"], : g["N"]]  # (heads, N, N), fixed-order reduction over splits
        dtable = _bias_grad_from_dense(dense, window).to(table.dtype)
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
