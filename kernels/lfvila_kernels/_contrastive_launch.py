"""The fused contrastive loss on the GPU: tiles and grids, the launchers, the ``torch.library`` op.

The ``@triton.jit`` kernels, and the design they implement, are in ``_contrastive_kernels.py``; the public op in
``contrastive.py``.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import triton

from ._contrastive_kernels import _cl_bwd_kernel, _cl_fwd_kernel
from .dispatch import interpreting

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


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
