"""contrastive_loss: the Triton kernels (interpreted on the CPU) and the chunked reference against the naive
materialised-logits loss in float64: loss and the gradients of a, b and the logit scale."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lfvila_kernels import ContrastiveLoss, contrastive_loss
from lfvila_kernels import _contrastive_launch as fused
from lfvila_kernels.reference import contrastive_loss_naive

from ._compare import RoundedOps, assert_close_verbose, assert_within_eager_error

SMALL_TILES = dict(block_m=16, block_n=16, block_k=16, block_do=16, programs=2)


def features(n, m, d, seed=0, duplicate_rows=False):
    g = torch.Generator().manual_seed(seed)
    a = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)
    b = F.normalize(torch.randn(m, d, generator=g, dtype=torch.float64), dim=-1)
    if duplicate_rows and n > 3:
        a[1] = a[0]
        b[3] = b[2]
    return a, b


def naive_loss(a, b, scale, labels=None):
    row_ce, col_ce = contrastive_loss_naive(a, b, scale, labels)
    return row_ce.mean() if col_ce is None else (row_ce.mean() + col_ce.mean()) / 2


def loss_and_grads(fn, a, b, scale, dtype, **kw):
    a, b = a.to(dtype).requires_grad_(), b.to(dtype).requires_grad_()
    scale = scale.detach().clone().requires_grad_()
    loss = fn(a, b, scale, **kw)
    return (loss.detach(), *torch.autograd.grad(loss, (a, b, scale)))


def ours(impl):
    return lambda a, b, scale, **kw: contrastive_loss(a, b, logit_scale=scale, impl=impl, **kw)


CASES = [
    pytest.param(1, 1, 16, 0.05, None, {}, id="N1"),
    pytest.param(7, 7, 40, 0.05, None, {}, id="odd-N-d40"),
    pytest.param(37, 37, 24, 0.01, None, SMALL_TILES, id="N37-tau0.01-multitile"),
    pytest.param(33, 33, 32, 1.0, None, SMALL_TILES, id="N33-tau1"),
    pytest.param(20, 20, 16, 0.05, "dup", SMALL_TILES, id="duplicated-rows"),
    pytest.param(5, 23, 16, 0.05, [3, 1, 1, 0, 22], SMALL_TILES, id="rect-labels-dup"),
    pytest.param(19, 40, 48, 0.01, list(range(21, 40)), SMALL_TILES, id="rect-local-rows"),
    pytest.param(5, 5, 2048, 0.05, None, {}, id="d2048"),
]


@pytest.mark.parametrize("n, m, d, tau, labels, tiles", CASES)
@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_matches_naive_float64(impl, n, m, d, tau, labels, tiles):
    a, b = features(n, m, d, duplicate_rows=labels == "dup")
    labels = torch.tensor(labels) if isinstance(labels, list) else None
    scale = torch.tensor(1 / tau, dtype=torch.float64)
    want = loss_and_grads(naive_loss, a, b, scale, torch.float64, labels=labels)
    with RoundedOps():  # the eager loss at fp32, the same on every CPU (tests/kernels/_compare.py)
        eager = loss_and_grads(naive_loss, a, b, scale.float(), torch.float32, labels=labels)
    with fused.override_config(**tiles):
        got = loss_and_grads(ours(impl), a, b, scale.float(), torch.float32, labels=labels)
    for name, x, y, e in zip(("loss", "da", "db", "dscale"), got, want, eager):
        assert_within_eager_error(name, x, e, y, torch.float32)


@pytest.mark.parametrize("tiles", [{}, SMALL_TILES], ids=["default", "multitile"])
def test_triton_fp16_within_twice_eager_error(tiles):
    a, b = features(40, 40, 32)
    scale = torch.tensor(20.0, dtype=torch.float64)
    want = loss_and_grads(naive_loss, a, b, scale, torch.float64)
    with RoundedOps():
        eager = loss_and_grads(naive_loss, a, b, scale.float(), torch.float16)
    with fused.override_config(**tiles):
        got = loss_and_grads(ours("triton"), a, b, scale.float(), torch.float16)
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.float16
    for name, x, y, e in zip(("loss", "da", "db", "dscale"), got, want, eager):
        assert_within_eager_error(name, x, e, y, torch.float16)


def test_large_logits_do_not_overflow():
    """|logits| up to 100 (tau = 0.01, unit vectors; here identical rows make the positives exactly 100)."""
    a, _ = features(24, 24, 16)
    b = a.clone()
    scale = torch.tensor(100.0, dtype=torch.float64)
    want = loss_and_grads(naive_loss, a, b, scale, torch.float64)
    with fused.override_config(**SMALL_TILES):
        got = loss_and_grads(ours("triton"), a, b, scale.float(), torch.float32)
    assert all(torch.isfinite(x).all() for x in got)
    assert_close_verbose(got[0], want[0], atol=1e-4, rtol=1e-5, name="loss")


@pytest.mark.parametrize("tiles", [{}, SMALL_TILES], ids=["default", "multitile"])
def test_deterministic(tiles):
    a, b = features(37, 37, 24)
    scale = torch.tensor(20.0)
    with fused.override_config(**tiles):
        first = loss_and_grads(ours("triton"), a, b, scale, torch.float32)
        second = loss_and_grads(ours("triton"), a, b, scale, torch.float32)
    for name, x, y in zip(("loss", "da", "db", "dscale"), first, second):
        assert torch.equal(x, y), f"{name} differs between two identical runs"


@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_reductions_and_directions(impl, reduction):
    a, b = features(9, 9, 16)
    a, b = a.float(), b.float()
    loss, ab, ba = contrastive_loss(a, b, temperature=0.1, reduction=reduction, return_directions=True, impl=impl)
    row_ce, col_ce = contrastive_loss_naive(a.double(), b.double(), 10.0)
    if reduction == "sum":
        expected = (row_ce.sum(), col_ce.sum())
        assert_close_verbose(loss, (expected[0] + expected[1]) / 2, atol=1e-4, name="loss")
    else:
        expected = (row_ce, col_ce)
        assert loss.shape == (9,)
        assert_close_verbose(loss, (row_ce + col_ce) / 2, atol=1e-5, name="loss")
    assert_close_verbose(ab, expected[0], atol=1e-4, name="a->b")
    assert_close_verbose(ba, expected[1], atol=1e-4, name="b->a")


def test_module_with_learnable_temperature():
    a, b = features(12, 12, 16)
    module = ContrastiveLoss(temperature=0.07, learnable=True, impl="triton")
    loss = module(a.float(), b.float())
    loss.backward()
    scale = torch.tensor(1 / 0.07, dtype=torch.float64, requires_grad=True)
    ref = naive_loss(a, b, scale)
    (dscale,) = torch.autograd.grad(ref, scale)
    assert_close_verbose(loss, ref, atol=1e-5, name="loss")
    # d loss / d log_scale = d loss / d scale * scale
    assert_close_verbose(module.log_logit_scale.grad, dscale / 0.07, atol=1e-5, name="dlog_scale")


def test_torch_compile_fullgraph():
    from torch._inductor.utils import fresh_inductor_cache

    torch._dynamo.reset()
    module = ContrastiveLoss(temperature=0.05, learnable=True, impl="triton")
    a, b = (x.float().requires_grad_() for x in features(16, 16, 16))
    eager = module(a, b)
    eager_grads = torch.autograd.grad(eager, (a, b))
    compiled = torch.compile(module, fullgraph=True)
    with fresh_inductor_cache():
        loss = compiled(a, b)
        grads = torch.autograd.grad(loss, (a, b))
    assert_close_verbose(loss, eager, atol=1e-6, name="loss")
    for name, x, y in zip(("da", "db"), grads, eager_grads):
        assert_close_verbose(x, y, atol=1e-6, name=name)


def test_opcheck_custom_op():
    a, b = (x.float().requires_grad_() for x in features(8, 8, 16))
    scale = torch.tensor(20.0, requires_grad=True)
    torch.library.opcheck(torch.ops.lfvila_kernels.contrastive_fwd.default, (a, b, scale, None))
    labels = torch.tensor([1, 0, 2, 3, 7, 5, 6, 4])
    torch.library.opcheck(torch.ops.lfvila_kernels.contrastive_fwd.default, (a, b, scale, labels))


def _bad_calls():
    a, b = torch.randn(4, 8), torch.randn(4, 8)
    yield "rank", dict(a=a[0], b=b), "a must be 2-D"
    yield "dim", dict(a=a, b=torch.randn(4, 6)), "feature dim"
    yield "dtype", dict(a=a, b=b.double()), "b dtype"
    yield "rect", dict(a=a, b=torch.randn(5, 8)), "needs labels"
    yield "labels shape", dict(a=a, b=b, labels=torch.tensor([0, 1])), "labels must be a 1-D tensor of 4"
    yield "labels dtype", dict(a=a, b=b, labels=torch.zeros(4)), "labels must be int"
    yield "labels range", dict(a=a, b=b, labels=torch.tensor([0, 1, 2, 4])), r"labels must lie in \[0, 4\)"
    yield "labels negative", dict(a=a, b=b, labels=torch.tensor([0, -1, 2, 3])), r"labels must lie in"
    yield "temperature 0", dict(a=a, b=b, temperature=0.0), "temperature must be a positive"
    yield "temperature <0", dict(a=a, b=b, temperature=-0.1), "temperature must be a positive"
    yield "logit_scale", dict(a=a, b=b, logit_scale=torch.ones(2)), "logit_scale must be"
    yield "reduction", dict(a=a, b=b, reduction="avg"), "reduction"
    yield "nan", dict(a=a.clone().fill_(float("nan")), b=b, check_finite=True), "a contains NaN"
    yield "int", dict(a=a.long(), b=b.long()), "floating point"


@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("name, kwargs, match", list(_bad_calls()), ids=[c[0] for c in _bad_calls()])
def test_bad_calls_raise_value_error(impl, name, kwargs, match):
    with pytest.raises(ValueError, match=match):
        contrastive_loss(impl=impl, **kwargs)
