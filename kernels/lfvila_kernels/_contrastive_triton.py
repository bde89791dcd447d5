"""Triton kernels of the fused contrastive loss (``contrastive.py`` holds the public op), launchers, torch.library op.

The loss over ``logits = a @ b.T * scale`` is computed tile by tile, never materialising the N x M logits:

- forward, one pass over the tiles: every program owns a set of row blocks; for each it keeps the online row max and
  sum-exp in registers (row log-sum-exp, and the positive's logit) and folds each tile's column max / sum-exp into its
  own private ``(M,)`` column partials (read-modify-write by that program alone: no atomics). The partials of the G
  programs are merged by a fixed-order torch reduction into the column log-sum-exps.
- backward, from the saved log-sum-exps: ``dlogits = w_row * (softmax_row - onehot) + w_col * (softmax_col - onehot)``
  recomputed per tile; one launch per side (rows of a -> da, rows of b -> db, same kernel with the roles swapped),
  each program owning its output rows, so the gradients (and the scale's, from per-program partials) are
  deterministic.

Extra memory: O(N + M) log-sum-exps plus ``G * M`` column partials (G bounded by the feature size), never O(N * M).
Logits are handled in the log2 domain with a running max, so |logits| up to 100 and beyond (tau = 0.01 with unit
vectors) cannot overflow.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from .dispatch import interpreting

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


@triton.jit
def _raw_tile(A, B, rows, cols, rmask, cmask, s_a, s_b, D,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PREC: tl.constexpr):
    """``a[rows] @ b[cols].T`` for one tile, fp32, looping over the feature dim in BLOCK_K chunks."""
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k in range(0, D, BLOCK_K):
        ks = k + tl.arange(0, BLOCK_K)
        kmask = ks < D
        a = tl.load(A + rows[:, None].to(tl.int64) * s_a + ks[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
        b = tl.load(B + cols[:, None].to(tl.int64) * s_b + ks[None, :], mask=cmask[:, None] & kmask[None, :], other=0.0)
        acc += tl.dot(a, tl.trans(b), input_precision=DOT_PREC)
    return acc


@triton.jit
def _cl_fwd_kernel(
    A, B, Y, SCALE,  # a (N, D), b (M, D) row-major; Y (N,) int64 positive column of each row; SCALE 0-dim fp32
    LSE_R, POS, COL_M, COL_L,  # out: row lse (N,) log2 units, positive logit (N,); column partials (G, M) log2
    N, M, D, s_a, s_b, n_row_blocks, G,
    HAS_COL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    pid = tl.program_id(0)
    scale = tl.load(SCALE).to(tl.float32)
    scale2 = scale * 1.4426950408889634  # the backward computes log2-domain logits exactly the same way
    for rb in range(pid, n_row_blocks, G):
        rows = rb * BLOCK_M + tl.arange(0, BLOCK_M)
        rmask = rows < N
        y = tl.load(Y + rows, mask=rmask, other=-1)
        m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        pos = tl.zeros([BLOCK_M], dtype=tl.float32)
        for cb in range(0, M, BLOCK_N):
            cols = cb + tl.arange(0, BLOCK_N)
            cmask = cols < M
            raw = _raw_tile(A, B, rows, cols, rmask, cmask, s_a, s_b, D, BLOCK_M, BLOCK_N, BLOCK_K, DOT_PREC)
            pos += tl.sum(tl.where(cols[None, :] == y[:, None], raw * scale, 0.0), 1)
            s = raw * scale2
            s_row = tl.where(cmask[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s_row, 1))
            l_i = l_i * tl.math.exp2(m_i - m_new) + tl.sum(tl.math.exp2(s_row - m_new[:, None]), 1)
            m_i = m_new
            if HAS_COL:  # fold this tile's column statistics into the program's private partials
                s_col = tl.where(rmask[:, None], s, float("-inf"))
                mc = tl.max(s_col, 0)
                lc = tl.sum(tl.math.exp2(s_col - mc[None, :]), 0)
                pm = COL_M + pid.to(tl.int64) * M + cols
                pl = COL_L + pid.to(tl.int64) * M + cols
                old_m = tl.load(pm, mask=cmask, other=-1.0e30)
                old_l = tl.load(pl, mask=cmask, other=0.0)
                new_m = tl.maximum(old_m, mc)
                tl.store(pl, old_l * tl.math.exp2(old_m - new_m) + lc * tl.math.exp2(mc - new_m), mask=cmask)
                tl.store(pm, new_m, mask=cmask)
                tl.debug_barrier()
        tl.store(LSE_R + rows, m_i + tl.math.log2(l_i), mask=rmask)
        tl.store(POS + rows, pos, mask=rmask)


@triton.jit
def _cl_bwd_kernel(
    A, B, SCALE, DA, DSCALE,  # grad rows of A from columns B; DSCALE (n_row_blocks,) fp32 partials of d scale
    YR, LSE_R, WR,  # row term: positive column of each row, row lse (log2 units), weight (upstream grad) per row
    YC, LSE_C, WC,  # column term: positive row of each column, column lse (log2 units), weight per column
    N, M, D, s_a, s_b, s_da,
    HAS_R: tl.constexpr, HAS_C: tl.constexpr, WITH_DSCALE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_DO: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    rb = tl.program_id(0)
    chunk = tl.program_id(1)  # which BLOCK_DO slice of the feature dim this program writes
    rows = rb * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < N
    dcols = chunk * BLOCK_DO + tl.arange(0, BLOCK_DO)
    dmask = dcols < D
    scale = tl.load(SCALE).to(tl.float32)
    if HAS_R:
        yr = tl.load(YR + rows, mask=rmask, other=-1)
        lse_r = tl.load(LSE_R + rows, mask=rmask, other=0.0)
        wr = tl.load(WR + rows, mask=rmask, other=0.0)
    acc = tl.zeros([BLOCK_M, BLOCK_DO], dtype=tl.float32)
    dsc = tl.zeros([BLOCK_M], dtype=tl.float32)
    for cb in range(0, M, BLOCK_N):
        cols = cb + tl.arange(0, BLOCK_N)
        cmask = cols < M
        raw = _raw_tile(A, B, rows, cols, rmask, cmask, s_a, s_b, D, BLOCK_M, BLOCK_N, BLOCK_K, DOT_PREC)
        s = raw * (scale * 1.4426950408889634)
        ds = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        if HAS_R:
            hit = (cols[None, :] == yr[:, None]).to(tl.float32)
            ds += wr[:, None] * (tl.math.exp2(s - lse_r[:, None]) - hit)
        if HAS_C:
            yc = tl.load(YC + cols, mask=cmask, other=-1)
            lse_c = tl.load(LSE_C + cols, mask=cmask, other=0.0)
            wc = tl.load(WC + cols, mask=cmask, other=0.0)
            hit = (rows[:, None] == yc[None, :]).to(tl.float32)
            ds += wc[None, :] * (tl.math.exp2(s - lse_c[None, :]) - hit)
        ds = tl.where(rmask[:, None] & cmask[None, :], ds, 0.0)
        if WITH_DSCALE:
            dsc += tl.sum(ds * raw, 1)
        b = tl.load(B + cols[:, None].to(tl.int64) * s_b + dcols[None, :], mask=cmask[:, None] & dmask[None, :],
                    other=0.0)
        acc += tl.dot(ds.to(b.dtype), b, input_precision=DOT_PREC)
    tl.store(DA + rows[:, None].to(tl.int64) * s_da + dcols[None, :], (acc * scale).to(DA.dtype.element_ty),
             mask=rmask[:, None] & dmask[None, :])
    if WITH_DSCALE:
        if chunk == 0:
            tl.store(DSCALE + rb, tl.sum(dsc, 0))


# ----------------------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------------------

_config_override: dict | None = None


@contextlib.contextmanager
def override_config(**cfg):
    """Force tiles (``block_m``, ``block_n``, ``block_k``, ``block_do``), warps (``fwd_warps``, ``bwd_warps``) or the
    forward's program count ``programs`` in a scope: for tests (multi-tile and multi-program paths at small sizes)
    and tuning runs."""
    global _config_override
    previous, _config_override = _config_override, dict(cfg)
    try:
        yield
    finally:
        _config_override = previous


def _config(n: int, m: int, d: int) -> dict:
    """Default tiles (not yet timed on a GPU): 64 x 64 score tiles, 64-wide feature chunks, and backward programs
    that each write up to 256 feature columns (d <= 256: each logit tile is computed once per side; d = 512: twice).
    The backward's 64 x 256 fp32 accumulator needs 8 warps not to spill on sm_90 (benchmarks/kernel_resources.py)."""
    cfg = dict(block_m=64, block_n=64, block_k=min(64, max(16, triton.next_power_of_2(d))),
               block_do=min(256, max(16, triton.next_power_of_2(d))), fwd_warps=4, bwd_warps=8)
    if _config_override:
        cfg.update(_config_override)
    return cfg


def _num_programs(n_row_blocks: int, m: int, feature_bytes: int, device: torch.device) -> int:
    """Forward programs: enough to fill the GPU, while their ``(G, M)`` fp32 column partials (8 bytes a column each)
    stay under half the bytes of the features (at least 16 MB). Depends on shapes and the device only, so the
    column-statistics merge order, and so the result, is the same on every run."""
    if _config_override and "programs" in _config_override:
        return max(1, min(n_row_blocks, int(_config_override["programs"])))
    if device.type != "cuda":
        return min(n_row_blocks, 3)
    want = 2 * torch.cuda.get_device_properties(device).multi_processor_count
    cap = max(1, max(16 << 20, feature_bytes // 2) // (8 * m))
    return max(1, min(n_row_blocks, want, cap))


def _dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def _arange(n: int, device) -> torch.Tensor:
    return torch.arange(n, device=device, dtype=torch.int64)


def check_labels_range(labels: torch.Tensor, m: int) -> None:
    """Raise ValueError if a label is outside ``[0, m)`` (one device sync)."""
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= m):
        raise ValueError(f"labels must lie in [0, {m}) (the rows of b), got values in "
                         f"[{int(labels.min())}, {int(labels.max())}]")


def _launch_fwd(a, b, scale, labels):
    n, d = a.shape
    m = b.shape[0]
    symmetric = labels is None
    y = _arange(n, a.device) if symmetric else labels.to(torch.int64)
    cfg = _config(n, m, d)
    n_row_blocks = triton.cdiv(n, cfg["block_m"])
    # without a column term, one program per row block; with one, G programs share the row blocks
    g = _num_programs(n_row_blocks, m, (a.numel() + b.numel()) * a.element_size(), a.device) if symmetric else \
        n_row_blocks
    lse_r = torch.empty(n, dtype=torch.float32, device=a.device)
    pos = torch.empty(n, dtype=torch.float32, device=a.device)
    if symmetric:
        col_m = torch.full((g, m), -1.0e30, dtype=torch.float32, device=a.device)
        col_l = torch.zeros((g, m), dtype=torch.float32, device=a.device)
    else:
        col_m = col_l = lse_r  # never touched (HAS_COL=False)
    _cl_fwd_kernel[(g,)](
        a, b, y, scale, lse_r, pos, col_m, col_l, n, m, d, a.stride(0), b.stride(0), n_row_blocks, g,
        HAS_COL=symmetric, BLOCK_M=cfg["block_m"], BLOCK_N=cfg["block_n"], BLOCK_K=cfg["block_k"],
        DOT_PREC=_dot_precision(a.dtype), num_warps=cfg["fwd_warps"],
    )
    row_ce = lse_r * LN2 - pos
    if not symmetric:
        return row_ce, a.new_empty(0, dtype=torch.float32), lse_r, a.new_empty(0, dtype=torch.float32)
    peak = col_m.max(0).values  # fixed-order merge of the G programs' column partials
    lse_c = peak + torch.log2((col_l * torch.exp2(col_m - peak)).sum(0))
    return row_ce, lse_c * LN2 - pos, lse_r, lse_c  # square: column j's positive is row j, whose logit is pos[j]


def _launch_bwd_side(a, b, scale, da, dscale, yr, lse_r, wr, yc, lse_c, wc, with_dscale):
    n, d = a.shape
    m = b.shape[0]
    cfg = _config(n, m, d)
    grid = (triton.cdiv(n, cfg["block_m"]), triton.cdiv(d, cfg["block_do"]))
    dummy = lse_r if lse_r is not None else lse_c
    _cl_bwd_kernel[grid](
        a, b, scale, da, dscale if with_dscale else dummy,
        yr if yr is not None else dummy, lse_r if lse_r is not None else dummy, wr if wr is not None else dummy,
        yc if yc is not None else dummy, lse_c if lse_c is not None else dummy, wc if wc is not None else dummy,
        n, m, d, a.stride(0), b.stride(0), da.stride(0),
        HAS_R=lse_r is not None, HAS_C=lse_c is not None, WITH_DSCALE=with_dscale,
        BLOCK_M=cfg["block_m"], BLOCK_N=cfg["block_n"], BLOCK_K=cfg["block_k"], BLOCK_DO=cfg["block_do"],
        DOT_PREC=_dot_precision(a.dtype), num_warps=cfg["bwd_warps"],
    )
    return grid[0]


def _launch_bwd(g_row, g_col, a, b, scale, labels, lse_r, lse_c, with_dscale=True):
    n, m = a.shape[0], b.shape[0]
    symmetric = labels is None
    y = _arange(n, a.device) if symmetric else labels.to(torch.int64)
    g_row = g_row.float().contiguous()
    g_col = g_col.float().contiguous() if symmetric else None
    da, db = torch.empty_like(a), torch.empty_like(b)
    dscale = torch.empty(triton.cdiv(n, _config(n, m, a.shape[1])["block_m"]), dtype=torch.float32, device=a.device)
    lse_c = lse_c if symmetric else None
    # rows of a against columns of b: the row term (a's positives y) and, square, the column term (b_j's is row j)
    _launch_bwd_side(a, b, scale, da, dscale, y, lse_r, g_row, _arange(m, a.device) if symmetric else None,
                     lse_c, g_col, with_dscale)
    # rows of b against columns of a: the same terms with the roles swapped
    _launch_bwd_side(b, a, scale, db, None, _arange(m, a.device) if symmetric else None, lse_c, g_col,
                     y, lse_r, g_row, False)
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
