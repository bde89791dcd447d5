"""Compiled contrastive kernels on a CUDA GPU: bf16 at N = 65536, d = 512 within twice the error of the naive bf16 loss
(both against a naive fp32 oracle: torch's default fp32 matmul, no tf32), fp16 and fp32 at the benchmark's N = 32768,
d = 512 under the same rule (fp32 against a float64 oracle), bitwise determinism of the loss and of every gradient in
each dtype, the rectangular layout. Skipped without CUDA."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lfvila_kernels import contrastive_loss
from lfvila_kernels.reference import contrastive_loss_naive

from ._compare import assert_within_eager_error

pytestmark = pytest.mark.gpu


def _features(n, m, d, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    a = F.normalize(torch.randn(n, d, device="cuda", generator=g), dim=-1)
    b = F.normalize(torch.randn(m, d, device="cuda", generator=g), dim=-1)
    return a.to(dtype), b.to(dtype)


def _naive(a, b, scale, labels=None):
    """The naive loss, its mean taken in fp32 (float64 for a float64 oracle)."""
    row_ce, col_ce = contrastive_loss_naive(a, b, scale, labels)
    acc = torch.float64 if a.dtype == torch.float64 else torch.float32
    return row_ce.to(acc).mean() if col_ce is None else (row_ce.to(acc).mean() + col_ce.to(acc).mean()) / 2


def _loss_and_grads(fn, a, b, scale, **kw):
    a, b = a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    scale = scale.detach().clone().requires_grad_()
    loss = fn(a, b, scale, **kw)
    return (loss.detach(), *torch.autograd.grad(loss, (a, b, scale)))


def _fused(a, b, scale, **kw):
    return contrastive_loss(a, b, logit_scale=scale, impl="triton", **kw)


@pytest.mark.parametrize("n, d, labels", [(65536, 512, False), (4099, 2048, False), (3000, 256, True)],
                         ids=["N65536-d512", "N4099-d2048", "rect-labels"])
def test_bf16_within_twice_naive_error(n, d, labels):
    m = n + 517 if labels else n
    a, b = _features(n, m, d, torch.bfloat16)
    lab = torch.randint(0, m, (n,), device="cuda") if labels else None
    scale = torch.tensor(20.0, device="cuda")
    oracle = _loss_and_grads(_naive, a.float(), b.float(), scale, labels=lab)
    eager = _loss_and_grads(_naive, a, b, scale, labels=lab)
    torch.cuda.empty_cache()  # the naive runs' logits are freed before the fused run
    got = _loss_and_grads(_fused, a, b, scale, labels=lab)
    for name, x, e, y in zip(("loss", "da", "db", "dscale"), got, eager, oracle):
        assert_within_eager_error(name, x, e, y, torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
def test_fp16_fp32_within_twice_naive_error(dtype):
    """N = 32768, d = 512 (the benchmark's problem). fp16: against the naive fp32 oracle, as bf16 is; fp32: the naive
    fp32 loss is the eager result, so the oracle is the naive loss in float64 (a 32768^2 float64 logit matrix, 8.6 GB,
    and its softmax: about 40 GB at the peak)."""
    a, b = _features(32768, 32768, 512, dtype)
    scale = torch.tensor(20.0, device="cuda")
    finer = torch.float64 if dtype == torch.float32 else torch.float32
    oracle = _loss_and_grads(_naive, a.to(finer), b.to(finer), scale.to(finer))
    torch.cuda.empty_cache()
    eager = _loss_and_grads(_naive, a, b, scale)
    torch.cuda.empty_cache()
    got = _loss_and_grads(_fused, a, b, scale)
    for name, x, e, y in zip(("loss", "da", "db", "dscale"), got, eager, oracle):
        assert_within_eager_error(name, x, e, y, dtype)


@pytest.mark.parametrize("n, d, dtype", [(8192, 512, torch.bfloat16), (32768, 512, torch.bfloat16),
                                         (32768, 512, torch.float16), (32768, 512, torch.float32)],
                         ids=["N8192-d512-bf16", "N32768-d512-bf16", "N32768-d512-fp16", "N32768-d512-fp32"])
def test_deterministic(n, d, dtype):
    """Two identical calls agree bitwise: loss, da, db and the logit scale's gradient (per-program partials reduced in
    a fixed order, no atomics), at the benchmark's N = 32768 as well as at a smaller tiling."""
    a, b = _features(n, n, d, dtype)
    scale = torch.tensor(20.0, device="cuda")
    first = _loss_and_grads(_fused, a, b, scale)
    second = _loss_and_grads(_fused, a, b, scale)
    for name, x, y in zip(("loss", "da", "db", "dscale"), first, second):
        assert torch.equal(x, y), f"{name} differs between two identical runs"
