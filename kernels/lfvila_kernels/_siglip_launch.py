"""The fused SigLIP loss on the GPU: tiles and grids, the launchers, the ``torch.library`` ops.

The ``@triton.jit`` kernels, and the design they implement, are in ``_siglip_kernels.py``; the public op in
``siglip.py``.
"""

from __future__ import annotations

import contextlib

import torch
import triton

from ._contrastive_launch import HOIST_ROW_BYTES, _dot_precision, _row_strided, _sm_count, _stages
from ._siglip_kernels import _sl_bwd_kernel, _sl_fwd_kernel
from .dispatch import interpreting

_config_override: dict | None = None


@contextlib.contextmanager
def override_config(**cfg):
    """Force tiles (``block_m``, ``block_n``, ``block_k``, ``block_do``), warps (``fwd_warps``, ``bwd_warps``),
    stages (``fwd_stages``, ``bwd_stages``) or the target program count ``programs`` in a scope: for tests
    (multi-tile, column-split and feature-chunked paths at small sizes) and tuning runs."""
    global _config_override
    previous, _config_override = _config_override, dict(cfg)
    try:
        yield
    finally:
        _config_override = previous


def _tiles(d: int, dtype: torch.dtype) -> dict:
    """Tiles of both kernels: the contrastive loss's (same operands, one logit tile per step; the reasons are in
    ``_contrastive_launch._config`` and ``_for_dtype``). Half precision: 64 x 64 logit tiles with the whole padded row
    resident up to 512 features (one b tile serves the logits and ``dz @ b``), 64-wide chunks and 512-column backward
    programs beyond. fp32 (FFMA): 64-wide chunks, backward programs of up to 256 columns, unpipelined backward."""
    bd = max(16, triton.next_power_of_2(d))
    itemsize = torch.empty((), dtype=dtype).element_size()
    if itemsize > 2:
        cfg = dict(block_m=64, block_n=64, block_k=min(64, bd), block_do=min(256, bd), fwd_warps=4, bwd_warps=8,
                   bwd_stages=1)
    elif bd * 2 <= HOIST_ROW_BYTES:
        cfg = dict(block_m=64, block_n=64, block_k=bd, block_do=bd, fwd_warps=4, bwd_warps=8 if bd >= 256 else 4)
    else:
        cfg = dict(block_m=64, block_n=64, block_k=64, block_do=512, fwd_warps=4, bwd_warps=8)
    if _config_override:
        cfg.update({k: v for k, v in _config_override.items() if k != "programs"})
    cfg["hoist"] = cfg["block_k"] >= d  # one feature chunk covers the row: the row tile is resident
    return cfg


def _device_programs(device: torch.device) -> int:
    """Programs that fill the device: one per SM on CUDA; 3 under the CPU interpreter (splits at test sizes)."""
    if _config_override and "programs" in _config_override:
        return max(1, int(_config_override["programs"]))
    if device.type != "cuda":
        return 3
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def _splits(programs: int, n_col_blocks: int, device: torch.device, max_splits: int | None = None) -> tuple[int, int]:
    """``(S, column blocks per split)``: enough column splits that ``programs * S`` fills the device. A function of
    the shapes and the device only, so the partials, and their fixed-order sum, are the same on every run."""
    splits = max(1, min(n_col_blocks, triton.cdiv(_device_programs(device), programs)))
    if max_splits is not None:
        splits = max(1, min(splits, max_splits))
    per_split = triton.cdiv(n_col_blocks, splits)
    return triton.cdiv(n_col_blocks, per_split), per_split


def _launch_fwd(a, b, scale, bias, negative_only: bool) -> torch.Tensor:
    """The loss ``sum_ij softplus(-y_ij z_ij) / N``: 0-dim fp32."""
    a, b = _row_strided(a), _row_strided(b)
    n, d = a.shape
    m = b.shape[0]
    cfg = _tiles(d, a.dtype)
    n_row_blocks, n_col_blocks = triton.cdiv(n, cfg["block_m"]), triton.cdiv(m, cfg["block_n"])
    splits, per_split = _splits(n_row_blocks, n_col_blocks, a.device)
    row = torch.empty((splits, n), dtype=torch.float32, device=a.device)
    _sl_fwd_kernel[(n_row_blocks, splits)](
        a, b, scale, bias, row, n, m, d, per_split,
        S_A=a.stride(0), S_B=b.stride(0), NEG_ONLY=negative_only, BLOCK_M=cfg["block_m"], BLOCK_N=cfg["block_n"],
        BLOCK_K=cfg["block_k"], HOIST=cfg["hoist"], DOT_PREC=_dot_precision(a.dtype), num_warps=cfg["fwd_warps"],
        num_stages=_stages(cfg, a.element_size(), "fwd"),
    )
    return row.sum() / n  # fixed-order reduction of the (S, N) partials


def backward_grid(n: int, m: int, d: int, dtype: torch.dtype, device) -> tuple[int, int, int]:
    """``(row blocks, feature chunks, column splits)`` of one backward side (tests, the notes)."""
    cfg = _tiles(d, dtype)
    block_do = cfg["block_k"] if cfg["hoist"] and cfg["block_do"] >= d else cfg["block_do"]
    rb, chunks = triton.cdiv(n, cfg["block_m"]), triton.cdiv(d, block_do)
    # the (S, n, d) fp32 partials within max(64 MB, 4 x the gradient's fp32 bytes)
    max_splits = max(1, max(64 << 20, 16 * n * d) // (4 * n * d))
    splits, _ = _splits(rb * chunks, triton.cdiv(m, cfg["block_n"]), torch.device(device), max_splits)
    return rb, chunks, splits


def _launch_bwd_side(a, b, scale, bias, w, negative_only: bool, with_dparams: bool):
    """``(da (N, d) in a's dtype, d scale, d bias)`` (fp32 0-dim, None without ``with_dparams``) of rows of a."""
    a, b = _row_strided(a), _row_strided(b)
    n, d = a.shape
    m = b.shape[0]
    cfg = _tiles(d, a.dtype)
    block_do = cfg["block_k"] if cfg["hoist"] and cfg["block_do"] >= d else cfg["block_do"]
    rb, chunks, splits = backward_grid(n, m, d, a.dtype, a.device)
    per_split = triton.cdiv(triton.cdiv(m, cfg["block_n"]), splits)
    part = torch.empty((splits, n, d), dtype=torch.float32, device=a.device)
    params = torch.empty((2, rb * chunks * splits), dtype=torch.float32, device=a.device)
    _sl_bwd_kernel[(rb, chunks, splits)](
        a, b, scale, bias, w, part, params[0], params[1], n, m, d, per_split,
        S_A=a.stride(0), S_B=b.stride(0), NEG_ONLY=negative_only, WITH_DPARAMS=with_dparams,
        BLOCK_M=cfg["block_m"], BLOCK_N=cfg["block_n"], BLOCK_K=cfg["block_k"], BLOCK_DO=block_do,
        HOIST=cfg["hoist"], SHARE_B=cfg["hoist"] and block_do == cfg["block_k"], DOT_PREC=_dot_precision(a.dtype),
        num_warps=cfg["bwd_warps"], num_stages=_stages({**cfg, "block_do": block_do}, a.element_size(), "bwd"),
    )
    grad = (part[0] if splits == 1 else part.sum(0)).to(a.dtype)  # fixed-order sum over the column splits
    if not with_dparams:
        return grad, None, None
    dscale = params[0].sum()
    dbias = params[1].view(rb, chunks, splits)[:, 0].sum()  # every feature chunk holds the same d bias share
    return grad, dscale, dbias


def _as_f32(t: torch.Tensor) -> torch.Tensor:
    return t.detach().float().reshape(())


# ----------------------------------------------------------------------------------------------------------------------
# torch.library ops
# ----------------------------------------------------------------------------------------------------------------------


@torch.library.custom_op("lfvila_kernels::sigmoid_loss_fwd", mutates_args=())
def _sigmoid_loss_fwd(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor,
                      negative_only: bool) -> torch.Tensor:
    return _launch_fwd(a, b, _as_f32(scale), _as_f32(bias), negative_only)


@_sigmoid_loss_fwd.register_fake
def _(a, b, scale, bias, negative_only):
    return a.new_empty((), dtype=torch.float32)


@torch.library.custom_op("lfvila_kernels::sigmoid_loss_bwd", mutates_args=())
def _sigmoid_loss_bwd(
    grad: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor, negative_only: bool,
    with_dparams: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    s, c = _as_f32(scale), _as_f32(bias)
    w = (grad.detach().float() / a.shape[0]).reshape(())
    da, dscale, dbias = _launch_bwd_side(a, b, s, c, w, negative_only, with_dparams)
    db, _, _ = _launch_bwd_side(b, a, s, c, w, negative_only, False)  # z^T: the same labels, a and b swapped
    if not with_dparams:  # two tensors: outputs of a custom op must not alias each other
        dscale, dbias = s.new_zeros(()), s.new_zeros(())
    return da, db, dscale.to(scale.dtype).reshape(scale.shape), dbias.to(bias.dtype).reshape(bias.shape)


@_sigmoid_loss_bwd.register_fake
def _(grad, a, b, scale, bias, negative_only, with_dparams):
    return torch.empty_like(a), torch.empty_like(b), torch.empty_like(scale), torch.empty_like(bias)


def _setup_context(ctx, inputs, output):
    a, b, scale, bias, negative_only = inputs
    ctx.save_for_backward(a, b, scale, bias)
    ctx.negative_only = negative_only


def _backward(ctx, grad):
    a, b, scale, bias = ctx.saved_tensors
    with_dparams = ctx.needs_input_grad[2] or ctx.needs_input_grad[3]
    da, db, dscale, dbias = _sigmoid_loss_bwd(grad, a, b, scale, bias, ctx.negative_only, with_dparams)
    return (da, db, dscale if ctx.needs_input_grad[2] else None, dbias if ctx.needs_input_grad[3] else None, None)


torch.library.register_autograd("lfvila_kernels::sigmoid_loss_fwd", _backward, setup_context=_setup_context)


def sigmoid_loss_fused(a, b, scale: torch.Tensor, bias: torch.Tensor, negative_only: bool = False) -> torch.Tensor:
    """The SigLIP loss through the Triton kernels: a ``(N, d)``, b ``(M, d)`` (M = N unless ``negative_only``), a
    contiguous last dim; ``scale``, ``bias`` one-element tensors (they get gradients). Returns the 0-dim fp32 loss."""
    if a.device.type == "cpu" and not interpreting():
        raise RuntimeError("the Triton SigLIP loss needs CUDA tensors (or TRITON_INTERPRET=1 on the CPU)")
    return _sigmoid_loss_fwd(a, b, scale, bias, negative_only)
