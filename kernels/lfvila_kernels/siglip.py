"""The pairwise sigmoid loss of SigLIP (Zhai et al., 2023) without materialising the N x M logits.

With ``z = logit_scale * a @ b.T + logit_bias`` and labels ``y = +1`` on the diagonal, -1 elsewhere (-1 everywhere
with ``negative_only``), the loss is open_clip's ``SigLipLoss._loss``::

    loss = -sum_ij logsigmoid(y_ij z_ij) / N = sum_ij softplus(-y_ij z_ij) / N

:func:`sigmoid_loss` dispatches between the Triton kernels (``_siglip_kernels.py``, ``_siglip_launch.py``) and the
chunked torch path here (:func:`sigmoid_loss_chunked`, the CPU path: O(chunk * M) memory, logits recomputed in the
backward). :func:`sigmoid_loss_naive` is the materialised definition, the test oracle.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._siglip_launch import sigmoid_loss_fused
from .contrastive import autocast_features
from .dispatch import select_impl

TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check_features(a, b, negative_only):
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
    if b.shape[1] != a.shape[1]:
        raise ValueError(f"b has feature dim {b.shape[1]}, a has {a.shape[1]}")
    if b.dtype != a.dtype:
        raise ValueError(f"b dtype {b.dtype} differs from a dtype {a.dtype}")
    if b.device != a.device:
        raise ValueError(f"b device {b.device} differs from a device {a.device}")
    if not isinstance(negative_only, bool):
        raise ValueError(f"negative_only must be a bool, got {negative_only!r}")
    if not negative_only and a.shape[0] != b.shape[0]:
        raise ValueError(f"a has {a.shape[0]} rows and b has {b.shape[0]}: the paired loss (positives on the "
                         "diagonal) needs N == M; only negative_only=True takes a rectangular pair")


def _as_param(value, name, a) -> torch.Tensor:
    """A one-element tensor on a's device (0-dim view of it, keeping its graph), from a tensor or a Python number."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        dtype = torch.float64 if a.dtype == torch.float64 else torch.float32
        return torch.tensor(float(value), dtype=dtype, device=a.device)
    if not isinstance(value, torch.Tensor) or value.numel() != 1 or not value.is_floating_point():
        got = f"shape {tuple(value.shape)} {value.dtype}" if isinstance(value, torch.Tensor) else type(value).__name__
        raise ValueError(f"{name} must be a float or a floating-point tensor with one element, got {got}")
    if value.device != a.device:
        raise ValueError(f"{name} device {value.device} differs from a device {a.device}")
    return value.reshape(())


def sigmoid_loss(a, b, logit_scale, logit_bias=None, negative_only: bool = False, impl: str = "auto"):
    """SigLIP's loss ``-sum_ij logsigmoid(y_ij (logit_scale * a_i . b_j + logit_bias)) / N``, logits never stored.

    Args:
        a: ``(N, d)`` features (open_clip: image), b: ``(M, d)`` (text); fp32/fp16/bf16 (fp64 on the torch path), a
            contiguous last dim. ``M == N`` unless ``negative_only``.
        logit_scale: the multiplier of the logits, already exponentiated (open_clip passes ``logit_scale.exp()``
            from the model, SigLIP's init 10): a one-element tensor (it gets its gradient) or a float.
        logit_bias: the added bias (SigLIP's init -10): a one-element tensor (it gets its gradient), a float, or None
            (no bias).
        negative_only: every label -1 (open_clip's blocks of another rank's text); then ``M`` may differ from ``N``.
        impl: ``"auto"`` (Triton on CUDA, the chunked torch path elsewhere), ``"triton"``, ``"torch"``. Under
            autocast the Triton path casts fp32 features to the autocast dtype (:func:`autocast_features`).

    Returns the 0-dim loss: fp32 for fp16/bf16/fp32 features, fp64 for fp64. Deterministic on both paths.
    """
    _check_features(a, b, negative_only)
    scale = _as_param(logit_scale, "logit_scale", a)
    bias = _as_param(0.0 if logit_bias is None else logit_bias, "logit_bias", a)
    if select_impl(impl, a.device, a.dtype, TRITON_DTYPES) == "triton":
        return sigmoid_loss_fused(*autocast_features(a, b), scale, bias, negative_only)
    return sigmoid_loss_chunked(a, b, scale, bias, negative_only, chunk=_chunk_rows(b.shape[0]))


def _chunk_rows(m: int) -> int:
    """Rows per chunk of the torch path: its (chunk, M) fp32 temporaries within 256 MB each."""
    return max(64, min(1024, (64 << 20) // max(1, m)))


def _diagonal(z: torch.Tensor, i0: int, m: int, negative_only: bool):
    """Indices ``(rows, cols)`` of the positive pairs (label +1) inside the chunk of rows ``i0 .. i0 + len(z)``."""
    if negative_only:
        return None
    cols = torch.arange(i0, min(i0 + z.shape[0], m), device=z.device)
    return cols - i0, cols


class _ChunkedSigmoid(torch.autograd.Function):
    """The loss in chunks of rows: the forward keeps nothing of size N x M, the backward recomputes each chunk's
    logits. Every label is -1 but the diagonal's, so a chunk costs one ``(chunk, M)`` logit tile (in fp32, fp64 for
    fp64 features; products in the features' dtype) and the diagonal is corrected from a gathered copy:
    ``softplus(-z)`` there instead of ``softplus(z)``, and ``dz = sigmoid(z) - 1`` instead of ``sigmoid(z)``."""

    @staticmethod
    def forward(ctx, a, b, scale, bias, negative_only, chunk):
        acc = torch.float64 if a.dtype == torch.float64 else torch.float32
        s, c = scale.to(acc), bias.to(acc)
        total = torch.zeros((), dtype=acc, device=a.device)
        for i in range(0, a.shape[0], chunk):
            z = (a[i : i + chunk] @ b.t()).to(acc).mul_(s).add_(c)  # (chunk, M)
            pos = _diagonal(z, i, b.shape[0], negative_only)
            if pos is not None:
                zd = z[pos]
                total = total - F.logsigmoid(zd).sum() + F.logsigmoid(-zd).sum()
            total = total - F.logsigmoid(z.neg_()).sum()  # -logsigmoid(-z): every pair as a negative
        ctx.save_for_backward(a, b, scale, bias)
        ctx.negative_only, ctx.chunk = negative_only, chunk
        return total / a.shape[0]

    @staticmethod
    def backward(ctx, grad):
        a, b, scale, bias = ctx.saved_tensors
        acc = torch.float64 if a.dtype == torch.float64 else torch.float32
        s, c = scale.to(acc), bias.to(acc)
        w = grad.to(acc) / a.shape[0]
        da, db = torch.empty_like(a), torch.zeros(b.shape, dtype=acc, device=a.device)
        dscale = torch.zeros((), dtype=acc, device=a.device)
        dbias = torch.zeros((), dtype=acc, device=a.device)
        for i in range(0, a.shape[0], ctx.chunk):
            rows = a[i : i + ctx.chunk]
            dz = (rows @ b.t()).to(acc).mul_(s).add_(c).sigmoid_().mul_(w)  # d loss / d z as if all negative
            pos = _diagonal(dz, i, b.shape[0], ctx.negative_only)
            if pos is not None:
                dz[pos] -= w
            g = (dz.to(a.dtype) @ b).to(acc)  # (chunk, d): sum_j dz_ij b_j
            da[i : i + ctx.chunk] = (g * s).to(a.dtype)
            db += (dz.to(a.dtype).t() @ rows).to(acc) * s
            dscale += (g * rows.to(acc)).sum()  # sum_ij dz_ij a_i . b_j
            dbias += dz.sum()
        return (da, db.to(b.dtype), dscale.to(scale.dtype).reshape(scale.shape),
                dbias.to(bias.dtype).reshape(bias.shape), None, None)  # fmt: skip


def sigmoid_loss_chunked(a, b, scale: torch.Tensor, bias: torch.Tensor, negative_only: bool = False,
                         chunk: int = 1024) -> torch.Tensor:
    """:func:`sigmoid_loss` in chunks of ``chunk`` rows (O(chunk * M) extra memory): the CPU path. ``scale``, ``bias``
    0-dim tensors (they get gradients when they require them). Returns the 0-dim loss (fp32, fp64 for fp64)."""
    return _ChunkedSigmoid.apply(a, b, scale, bias, negative_only, chunk)


def sigmoid_loss_naive(a, b, logit_scale, logit_bias=None, negative_only: bool = False) -> torch.Tensor:
    """The definition with materialised ``(N, M)`` logits and labels (open_clip's ``SigLipLoss._loss`` written out),
    differentiated by autograd: the test oracle. Computed in a's dtype."""
    logits = logit_scale * (a @ b.t())
    if logit_bias is not None:
        logits = logits + logit_bias
    labels = -torch.ones_like(logits)
    if not negative_only:
        labels = labels + 2 * torch.eye(a.shape[0], b.shape[0], dtype=logits.dtype, device=a.device)
    return -F.logsigmoid(labels * logits).sum() / a.shape[0]
