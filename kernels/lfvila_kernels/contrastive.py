"""Fused symmetric InfoNCE in O(N + M) memory: the public op, its checks, and the multi-GPU version.

``contrastive_loss`` is the CLIP / LF-VILA video-paragraph loss ``(CE(a b^T / tau, diag) + CE(b a^T / tau, diag)) / 2``
computed without materialising the N x M logits (Triton kernels in ``_contrastive_kernels.py``; the CPU path is the
chunked reference). ``distributed_contrastive_loss`` gathers features from every rank with gradients and computes
each rank's rows against the global batch, open_clip's "local loss" layout.
"""

from __future__ import annotations

import os

import torch

from ._contrastive_launch import check_labels_range, contrastive_ce_fused
from .dispatch import ENV_VAR, select_impl
from .reference import contrastive_ce_chunked

TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# impl="auto" sends fp32 features (outside autocast) on CUDA to the chunked cuBLAS path from these sizes on: both are
# FFMA-bound there, and from d > 512 the fused kernels' feature-chunked backward costs (3 + 2c) N M d multiply-adds
# (c = d / 256) against the chunked path's 5 (benchmarks/NOTES-contrastive.md, "Dispatch").
CHUNKED_FP32_MIN_DIM = 513
CHUNKED_MIN_LOGITS = 1 << 24
REDUCTIONS = ("mean", "sum", "none")


def _check_features(a, b, labels, reduction, check_finite):
    for name, t in (("a", a), ("b", b)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 2:
            raise ValueError(f"{name} must be 2-D (rows, dim), got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise ValueError(f"{name} must be floating point, got {t.dtype}")
        if t.shape[0] == 0 or t.shape[1] == 0:
            raise ValueError(f"{name} is empty (shape {tuple(t.shape)})")
        if t.stride(1) != 1:
            raise ValueError(f"{name} must have a contiguous last dim (stride 1), got strides {t.stride()}")
        if check_finite and not bool(torch.isfinite(t).all()):
            raise ValueError(f"{name} contains NaN or inf")
    if b.shape[1] != a.shape[1]:
        raise ValueError(f"b has feature dim {b.shape[1]}, a has {a.shape[1]}")
    if b.dtype != a.dtype:
        raise ValueError(f"b dtype {b.dtype} differs from a dtype {a.dtype}")
    if b.device != a.device:
        raise ValueError(f"b device {b.device} differs from a device {a.device}")
    if labels is None:
        if a.shape[0] != b.shape[0]:
            raise ValueError(
                f"a has {a.shape[0]} rows and b has {b.shape[0]}: a rectangular loss needs labels (N,) giving each "
                "row of a its positive row of b"
            )
    else:
        if not isinstance(labels, torch.Tensor) or labels.dim() != 1 or labels.shape[0] != a.shape[0]:
            raise ValueError(f"labels must be a 1-D tensor of {a.shape[0]} indices (one per row of a)")
        if labels.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"labels must be int32 or int64, got {labels.dtype}")
        if labels.device != a.device:
            raise ValueError(f"labels device {labels.device} differs from a device {a.device}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def _scale(a, temperature, logit_scale) -> torch.Tensor:
    if logit_scale is not None:
        if not isinstance(logit_scale, torch.Tensor) or logit_scale.numel() != 1 or not logit_scale.is_floating_point():
            raise ValueError("logit_scale must be a floating-point tensor with one element (logits = a b^T * it)")
        if logit_scale.device != a.device:
            raise ValueError(f"logit_scale device {logit_scale.device} differs from a device {a.device}")
        return logit_scale.reshape(())
    if isinstance(temperature, torch.Tensor) or not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ValueError(f"temperature must be a positive float (or pass logit_scale), got {temperature!r}")
    dtype = torch.float64 if a.dtype == torch.float64 else torch.float32
    return torch.tensor(1.0 / temperature, dtype=dtype, device=a.device)


def contrastive_loss(
    a, b, temperature: float = 0.05, logit_scale=None, labels=None, reduction: str = "mean",
    return_directions: bool = False, impl: str = "auto", check_finite: bool = False,
):
    """Symmetric InfoNCE over ``logits = a @ b.T * scale`` without materialising the logits.

    Args:
        a: ``(N, d)`` features (e.g. videos), b: ``(M, d)`` features (e.g. paragraphs); fp32/fp16/bf16 (fp64 on the
            torch path), contiguous last dim. Usually L2-normalised, which the op does not require.
        temperature: ``scale = 1 / temperature`` (LF-VILA: 0.05), unless ``logit_scale`` is given.
        logit_scale: a one-element tensor, ``logits = a b^T * logit_scale`` (CLIP's ``logit_scale.exp()``); it gets
            its gradient when it requires one.
        labels: None (square, N = M, row i's positive is column i), or ``(N,)`` int indices into the rows of b:
            the rectangular a -> b loss only (open_clip's local rows against gathered columns), no b -> a term.
        reduction: ``"mean"``: ``(mean_i CE_row_i + mean_j CE_col_j) / 2`` (with labels ``mean_i CE_row_i``);
            ``"sum"``: the same with sums; ``"none"``: ``(N,)`` per-row ``(CE_row_i + CE_col_i) / 2`` (with
            labels ``CE_row_i``).
        return_directions: also return the a -> b and b -> a terms, each reduced like the loss (b -> a is None with
            labels).
        impl: ``"auto"`` (Triton on CUDA, the chunked torch reference elsewhere, and on CUDA for large fp32
            problems with d > 512 outside autocast: :func:`chunked_wins`), ``"triton"``, ``"torch"``. Under
            autocast the Triton path computes with fp32 features cast to the autocast dtype (the logits the naive
            ``a @ b.T`` would compute under autocast; see :func:`autocast_features`); the gradients of a and b keep
            their dtype.
        check_finite: raise ValueError if a or b holds NaN/inf (one extra pass and a device sync). Otherwise a
            NaN/inf feature makes the loss NaN.

    Returns the loss (fp32 for half inputs), or ``(loss, loss_ab, loss_ba)``.
    """
    _check_features(a, b, labels, reduction, check_finite)
    if labels is not None and not torch.compiler.is_compiling():  # a data-dependent check: skipped when compiled
        check_labels_range(labels, b.shape[0])
    scale = _scale(a, temperature, logit_scale)
    return _reduce(*_per_row_ce(a, b, scale, labels, impl), reduction, return_directions)


def autocast_features(a, b):
    """``(a, b)`` as the fused op computes with them: under autocast (on their device type) fp32 features are cast
    to the autocast dtype, as autocast casts the operands of the ``a @ b.T`` the naive loss computes (``F.normalize``
    returns fp32 under autocast, and IEEE fp32 has no tensor-core path: the fp32 kernels run on FFMA). The cast is
    differentiable: the gradients come back in fp32. Other dtypes, and calls outside autocast, pass unchanged."""
    device_type = a.device.type
    if a.dtype == torch.float32 and torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        if dtype in (torch.float16, torch.bfloat16):
            return a.to(dtype), b.to(dtype)
    return a, b


def chunked_wins(device_type: str, dtype: torch.dtype, n: int, m: int, d: int, autocast: bool) -> bool:
    """The size-based dispatch of ``impl="auto"``: True where the chunked cuBLAS path is predicted faster than the
    fused kernels. Only fp32 outside autocast on CUDA (IEEE fp32, no tensor cores: both run on FFMA) with rows wider
    than 512 (where the fused backward recomputes the logits per 256-column chunk) and at least 2^24 logits (below,
    launch overheads of the chunked path's ~17 kernels per 1024 rows dominate). Half precision (and fp32 under
    autocast, cast to half) stays fused at every size: 5 N M d on the tensor cores against the chunked path's 5 plus
    ~40 passes over its fp32 logit chunks. The model: benchmarks/NOTES-contrastive.md, "Dispatch"."""
    return (device_type == "cuda" and dtype == torch.float32 and not autocast and d >= CHUNKED_FP32_MIN_DIM
            and n * m >= CHUNKED_MIN_LOGITS)


def _chunk_rows(m: int) -> int:
    """Rows per chunk of the chunked path: its (chunk, M) fp32 temporaries within 256 MB each."""
    return max(64, min(1024, (64 << 20) // max(1, m)))


def _per_row_ce(a, b, scale, labels, impl):
    """(row_ce (N,), col_ce (M,) or None) on checked arguments: fp32 for half/fp32 inputs, fp64 for fp64."""
    chosen = select_impl(impl, a.device, a.dtype, TRITON_DTYPES)
    if chosen == "triton" and impl == "auto" and not os.environ.get(ENV_VAR, "").strip() and chunked_wins(
            a.device.type, a.dtype, a.shape[0], b.shape[0], a.shape[1], torch.is_autocast_enabled(a.device.type)):
        chosen = "torch"
    if chosen == "triton":
        return contrastive_ce_fused(*autocast_features(a, b), scale, labels)
    row_ce, col_ce = contrastive_ce_chunked(a, b, scale.to(a.dtype) if a.dtype == torch.float64 else scale, labels,
                                            chunk=_chunk_rows(b.shape[0]))
    as_float = lambda t: t if t is None or t.dtype == torch.float64 else t.float()  # noqa: E731
    return as_float(row_ce), as_float(col_ce)


def _reduce(row_ce, col_ce, reduction, return_directions):
    if reduction == "none":
        loss = row_ce if col_ce is None else (row_ce + col_ce) / 2
        return (loss, row_ce, col_ce) if return_directions else loss
    op = torch.mean if reduction == "mean" else torch.sum
    ab = op(row_ce)
    ba = None if col_ce is None else op(col_ce)
    loss = ab if ba is None else (ab + ba) / 2
    return (loss, ab, ba) if return_directions else loss


def distributed_contrastive_loss(
    a_local, b_local, group=None, temperature: float = 0.05, logit_scale=None, ddp_average: bool = True,
    impl: str = "auto",
):
    """The symmetric loss of the global batch, with each rank holding ``n`` rows of a and of b.

    Every rank all-gathers a and b **with gradients** (``torch.distributed.nn.functional.all_gather``: the backward
    sends each rank the gradient of its own rows) and computes its local rows against the global columns in both
    directions with the fused op: ``CE(a_local b_all^T)`` and ``CE(b_local a_all^T)``, the positives at
    ``rank * n + i``. All ranks must hold the same number of rows.

    ``ddp_average=True`` (for DDP, which averages gradients over ranks): each rank returns the mean over its own rows,
    so the average of the ranks' losses is the single-process loss of the whole batch, and DDP's averaged parameter
    gradients are the single-process gradients. ``ddp_average=False``: each rank returns its rows' share
    ``sum_local / N_global``; the ranks' losses sum to the single-process loss and the feature gradients equal it.
    """
    import torch.distributed as dist
    from torch.distributed.nn.functional import all_gather

    _check_features(a_local, b_local, None, "mean", False)
    scale = _scale(a_local, temperature, logit_scale)
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    n = a_local.shape[0]
    sizes = [torch.zeros(1, dtype=torch.int64, device=a_local.device) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([n], device=a_local.device), group=group)
    if any(int(s) != n for s in sizes):
        raise ValueError(f"every rank must hold the same number of rows; got {[int(s) for s in sizes]}")
    a_all = torch.cat(all_gather(a_local, group=group), dim=0)  # (world * n, d)
    b_all = torch.cat(all_gather(b_local, group=group), dim=0)
    labels = torch.arange(rank * n, (rank + 1) * n, device=a_local.device)  # in range by construction
    ab, _ = _per_row_ce(a_local, b_all, scale, labels, impl)  # (n,): local videos against all paragraphs
    ba, _ = _per_row_ce(b_local, a_all, scale, labels, impl)  # (n,): local paragraphs against all videos
    total = ab.sum() + ba.sum()
    return total / (2 * n) if ddp_average else total / (2 * n * world)
