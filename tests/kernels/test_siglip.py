"""sigmoid_loss and the SigLipLoss drop-in, one process: against open_clip's ``SigLipLoss`` in fp32 (loss and the
gradients of both features, logit_scale and logit_bias within 1e-5), and the Triton kernels (interpreted on the CPU)
and the chunked torch path against the float64 definition under the error rule of ``tests/kernels/_compare.py``."""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lfvila_kernels import _siglip_launch as fused
from lfvila_kernels import sigmoid_loss
from lfvila_kernels.siglip import sigmoid_loss_naive
from lfvila_kernels.siglip_loss import SigLipLoss

from ._compare import RoundedOps, assert_within_eager_error

TOL = {"atol": 1e-5, "rtol": 1e-5}
NAMES = ("loss", "d_image", "d_text", "d_logit_scale", "d_logit_bias")
SMALL_TILES = dict(block_m=16, block_n=16, block_k=16, block_do=16, programs=8)  # column splits on both passes


@functools.cache
def open_clip_siglip_class():
    """open_clip's ``SigLipLoss``, or None when open_clip_torch is not installed (its ``loss.py`` needs torch alone:
    loaded by itself where the package import fails, e.g. on an unusable torchvision)."""
    try:
        from open_clip.loss import SigLipLoss as OpenClipSigLipLoss

        return OpenClipSigLipLoss
    except Exception:
        spec = importlib.util.find_spec("open_clip")
        if spec is None or not spec.submodule_search_locations:
            return None
        path = Path(next(iter(spec.submodule_search_locations))) / "loss.py"
        module_spec = importlib.util.spec_from_file_location("_open_clip_loss_file", path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
        return module.SigLipLoss


def features(n, m, d, seed=0, dtype=torch.float64):
    """Unit rows; b's first min(n, m) rows near a's (positives with cosine ~0.9)."""
    g = torch.Generator().manual_seed(seed)
    a = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)
    b = torch.randn(m, d, generator=g, dtype=torch.float64)
    k = min(n, m)
    b[:k] = b[:k] * 0.5 + a[:k] * 2
    return a.to(dtype), F.normalize(b, dim=-1).to(dtype)


def loss_and_grads(fn, a, b, scale, bias, dtype=None, **kwargs):
    """``(loss, d a, d b, d scale, d bias)`` of ``fn(a, b, scale, bias, **kwargs)``; scale and bias fp32 tensors of
    shape ``()`` or, from a float, of a's dtype."""
    dtype = dtype or a.dtype
    a, b = a.to(dtype).detach().requires_grad_(), b.to(dtype).detach().requires_grad_()
    scale = torch.as_tensor(scale, dtype=torch.float64 if dtype == torch.float64 else torch.float32).clone()
    bias = torch.as_tensor(bias, dtype=scale.dtype).clone()
    scale.requires_grad_(), bias.requires_grad_()
    loss = fn(a, b, scale, bias, **kwargs)
    return (loss.detach(), *torch.autograd.grad(loss, (a, b, scale, bias)))


def ours(impl):
    return lambda a, b, s, c, **kw: sigmoid_loss(a, b, s, c, impl=impl, **kw)


# --------------------------------------------------------------------------------------------------- open_clip
@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("n, d, scale, bias", [(1, 16, 10.0, -10.0), (7, 16, 10.0, -10.0), (37, 24, 3.0, 0.5),
                                               (64, 32, 20.0, -5.0)])  # fmt: skip
def test_matches_open_clip_fp32(impl, n, d, scale, bias):
    open_clip_cls = open_clip_siglip_class()
    if open_clip_cls is None:
        pytest.skip("open_clip_torch is not installed (pip install --no-deps open_clip_torch)")
    a, b = features(n, n, d, seed=n, dtype=torch.float32)
    got = loss_and_grads(SigLipLoss(impl=impl), a, b, scale, bias)
    want = loss_and_grads(open_clip_cls(), a, b, scale, bias)
    for name, x, y in zip(NAMES, got, want):
        assert x.shape == y.shape and x.dtype == y.dtype, name
        torch.testing.assert_close(x, y, **TOL, msg=name)


def test_open_clip_reference_is_available_where_installed():
    if importlib.util.find_spec("open_clip") is None:
        pytest.skip("open_clip_torch is not installed")
    assert open_clip_siglip_class().__name__ == "SigLipLoss"


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_negative_only_and_no_bias_match_open_clip_blocks(impl):
    """open_clip's ``_loss(..., negative_only=True)`` (the neighbour blocks, here rectangular in shape only through
    ours: open_clip's labels need n == m) and ``logit_bias=None``."""
    open_clip_cls = open_clip_siglip_class()
    if open_clip_cls is None:
        pytest.skip("open_clip_torch is not installed")
    a, b = features(9, 9, 16, seed=5, dtype=torch.float32)
    theirs = lambda x, y, s, c: open_clip_cls()._loss(x, y, s, c, negative_only=True)  # noqa: E731
    mine = lambda x, y, s, c: sigmoid_loss(x, y, s, c, negative_only=True, impl=impl)  # noqa: E731
    for name, x, y in zip(NAMES, loss_and_grads(mine, a, b, 10.0, -10.0), loss_and_grads(theirs, a, b, 10.0, -10.0)):
        torch.testing.assert_close(x, y, **TOL, msg=f"negative_only {name}")
    x, y, scale = a.clone().requires_grad_(), b.clone().requires_grad_(), torch.tensor(10.0, requires_grad=True)
    got = [sigmoid_loss(x, y, scale, None, impl=impl)]
    got += torch.autograd.grad(got[0], (x, y, scale))
    want = [open_clip_cls()(x, y, scale, None)]
    want += torch.autograd.grad(want[0], (x, y, scale))
    for name, g, w in zip(NAMES, got, want):
        torch.testing.assert_close(g, w, **TOL, msg=f"no bias {name}")


# --------------------------------------------------------------------------------------------------- the kernels
CASES = [
    pytest.param(1, 1, 16, False, {}, id="N1"),
    pytest.param(37, 37, 24, False, {}, id="N37-d24"),
    pytest.param(37, 37, 24, False, SMALL_TILES, id="N37-d24-multitile-splits"),
    pytest.param(33, 33, 40, False, dict(SMALL_TILES, block_do=32), id="N33-d40-feature-chunks"),
    pytest.param(20, 29, 24, True, SMALL_TILES, id="negative-only-rect"),
]


@pytest.mark.parametrize("n, m, d, negative_only, tiles", CASES)
@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_matches_definition_float64(impl, n, m, d, negative_only, tiles):
    a, b = features(n, m, d, seed=3)
    kw = dict(negative_only=negative_only)
    want = loss_and_grads(sigmoid_loss_naive, a, b, 10.0, -10.0, **kw)
    with RoundedOps():  # the eager definition at fp32, the same on every CPU (tests/kernels/_compare.py)
        eager = loss_and_grads(sigmoid_loss_naive, a, b, 10.0, -10.0, torch.float32, **kw)
    with fused.override_config(**tiles):
        got = loss_and_grads(ours(impl), a, b, 10.0, -10.0, torch.float32, **kw)
    for name, x, y, e in zip(NAMES, got, want, eager):
        assert_within_eager_error(name, x, e, y, torch.float32)


def test_triton_fp16_within_twice_eager_error():
    """fp16 through the interpreter. bf16 is checked on a GPU only (below): Triton 3.9's interpreter computes bf16
    tiles wrongly (the contrastive kernels' loss comes out ~1e11 there too)."""
    a, b = features(37, 37, 24, seed=4)
    want = loss_and_grads(sigmoid_loss_naive, a, b, 10.0, -10.0)
    with RoundedOps():
        eager = loss_and_grads(sigmoid_loss_naive, a, b, 10.0, -10.0, torch.float16)
    with fused.override_config(**SMALL_TILES):
        got = loss_and_grads(ours("triton"), a, b, 10.0, -10.0, torch.float16)
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.float16 and got[3].dtype == torch.float32
    for name, x, y, e in zip(NAMES, got, want, eager):
        assert_within_eager_error(name, x, e, y, torch.float16)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n, d", [(1000, 256), (333, 768)])  # resident rows; 64-wide feature chunks
def test_gpu_within_twice_eager_error(dtype, n, d):
    """Compiled kernels on CUDA against the float64 definition, the eager definition on the same GPU as yardstick."""
    a, b = (t.cuda() for t in features(n, n, d, seed=8))
    want = loss_and_grads(sigmoid_loss_naive, a, b, 10.0, -10.0)
    eager = loss_and_grads(sigmoid_loss_naive, a, b, 10.0, -10.0, dtype)
    got = loss_and_grads(ours("triton"), a, b, 10.0, -10.0, dtype)
    again = loss_and_grads(ours("triton"), a, b, 10.0, -10.0, dtype)
    for name, x, y, e, x2 in zip(NAMES, got, want, eager, again):
        assert_within_eager_error(name, x, e, y, dtype)
        assert torch.equal(x, x2), f"{name} differs between two identical runs"


def test_large_logits_stay_finite_and_accurate():
    """|z| up to 110 (scale 100, bias -10): softplus and sigmoid must neither overflow nor lose the small terms."""
    a, b = features(24, 24, 16, seed=6)
    want = loss_and_grads(sigmoid_loss_naive, a, b, 100.0, -10.0)
    with fused.override_config(**SMALL_TILES):
        got = loss_and_grads(ours("triton"), a, b, 100.0, -10.0, torch.float32)
    for name, x, y in zip(NAMES, got, want):
        assert torch.isfinite(x).all(), name
        torch.testing.assert_close(x.double(), y, atol=1e-5, rtol=1e-5, msg=name)


@pytest.mark.parametrize("tiles", [{}, SMALL_TILES], ids=["default", "multitile-splits"])
@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_deterministic(impl, tiles):
    a, b = features(37, 37, 24, seed=7, dtype=torch.float32)
    with fused.override_config(**tiles):
        first = loss_and_grads(ours(impl), a, b, 10.0, -10.0)
        second = loss_and_grads(ours(impl), a, b, 10.0, -10.0)
    for name, x, y in zip(NAMES, first, second):
        assert torch.equal(x, y), f"{name} differs between two identical runs"


def test_small_tiles_split_the_columns():
    """At SMALL_TILES the forward and both backward sides run several column splits, so the tests above check the
    fixed-order partial sums; the default tiles at N = 37 take one program per pass."""
    assert fused.backward_grid(37, 37, 24, torch.float32, "cpu") == (1, 1, 1)
    with fused.override_config(**SMALL_TILES):
        assert fused.backward_grid(37, 37, 24, torch.float32, "cpu") == (3, 2, 2)  # 16-row blocks, 16-wide chunks
        assert fused.backward_grid(20, 29, 24, torch.float32, "cpu") == (2, 2, 2)
        assert fused.backward_grid(29, 20, 24, torch.float32, "cpu") == (2, 2, 2)


def test_torch_compile_fullgraph():
    from torch._inductor.utils import fresh_inductor_cache

    torch._dynamo.reset()
    module = SigLipLoss(impl="triton")
    a, b = (x.requires_grad_() for x in features(16, 16, 16, dtype=torch.float32))
    scale = torch.tensor(10.0, requires_grad=True)
    bias = torch.tensor(-10.0, requires_grad=True)
    eager = module(a, b, scale, bias)
    eager_grads = torch.autograd.grad(eager, (a, b, scale, bias))
    compiled = torch.compile(module, fullgraph=True)
    with fresh_inductor_cache():
        loss = compiled(a, b, scale, bias)
        grads = torch.autograd.grad(loss, (a, b, scale, bias))
    torch.testing.assert_close(loss, eager, atol=1e-6, rtol=1e-6)
    for name, x, y in zip(NAMES[1:], grads, eager_grads):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-6, msg=name)


def test_opcheck_custom_op():
    a, b = (x.requires_grad_() for x in features(8, 8, 16, dtype=torch.float32))
    scale, bias = torch.tensor(10.0, requires_grad=True), torch.tensor([-10.0], requires_grad=True)
    torch.library.opcheck(torch.ops.lfvila_kernels.sigmoid_loss_fwd.default, (a, b, scale, bias, False))
    torch.library.opcheck(torch.ops.lfvila_kernels.sigmoid_loss_fwd.default, (a, b[:5], scale, bias, True))


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_parameter_shapes_and_floats(impl):
    """Gradients come back in each parameter's own shape; floats are constants."""
    a, b = features(6, 6, 16, dtype=torch.float32)
    scale, bias = torch.tensor([10.0], requires_grad=True), torch.tensor([[-10.0]], requires_grad=True)
    loss = sigmoid_loss(a, b, scale, bias, impl=impl)
    loss.backward()
    assert scale.grad.shape == (1,) and bias.grad.shape == (1, 1)
    torch.testing.assert_close(sigmoid_loss(a, b, 10.0, -10.0, impl=impl), loss.detach())
    torch.testing.assert_close(sigmoid_loss(a.double(), b.double(), 10.0, -10.0), loss.detach().double(), **TOL)


def _bad_calls():
    a, b = torch.randn(4, 8), torch.randn(4, 8)
    s = torch.tensor(10.0)
    yield "rank", dict(a=a[0], b=b, logit_scale=s), "a must be 2-D"
    yield "dim", dict(a=a, b=torch.randn(4, 6), logit_scale=s), "feature dim"
    yield "dtype", dict(a=a, b=b.double(), logit_scale=s), "b dtype"
    yield "rect", dict(a=a, b=torch.randn(5, 8), logit_scale=s), "needs N == M"
    yield "int", dict(a=a.long(), b=b.long(), logit_scale=s), "floating point"
    yield "empty", dict(a=a[:0], b=b[:0], logit_scale=s), "a is empty"
    yield "strided", dict(a=torch.randn(8, 4).t(), b=b, logit_scale=s), "contiguous last dim"
    yield "scale", dict(a=a, b=b, logit_scale=torch.ones(2)), "logit_scale must be a float or"
    yield "bias", dict(a=a, b=b, logit_scale=s, logit_bias=torch.zeros(4, 4)), "logit_bias must be a float or"
    yield "bias int", dict(a=a, b=b, logit_scale=s, logit_bias=torch.tensor(1)), "logit_bias must be a float or"
    yield "negative_only", dict(a=a, b=b, logit_scale=s, negative_only=1), "negative_only must be a bool"


@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("name, kwargs, match", list(_bad_calls()), ids=[c[0] for c in _bad_calls()])
def test_bad_calls_raise_value_error(impl, name, kwargs, match):
    with pytest.raises(ValueError, match=match):
        sigmoid_loss(impl=impl, **kwargs)


# --------------------------------------------------------------------------------------------------- the drop-in
def test_drop_in_options_and_refusals():
    a, b = features(6, 6, 16, dtype=torch.float32)
    scale, bias = torch.tensor(10.0), torch.tensor(-10.0)
    loss = SigLipLoss()(a, b, scale, bias)
    assert SigLipLoss(cache_labels=True)(a, b, scale, bias, output_dict=True) == {"contrastive_loss": loss}
    torch.testing.assert_close(SigLipLoss()(a, b, 10.0, -10.0), loss)
    assert SigLipLoss().dist_impl == "bidir" and SigLipLoss(dist_impl="gather").dist_impl == "gather"
    with pytest.raises(ValueError, match="dist_impl must be one of"):
        SigLipLoss(dist_impl="ring")
    with pytest.raises(ValueError, match=r"rank must be an int in \[0, world_size=2\), got 2"):
        SigLipLoss(rank=2, world_size=2)
    with pytest.raises(ValueError, match="world_size must be an int >= 1"):
        SigLipLoss(world_size=0)
    with pytest.raises(ValueError, match="impl must be one of"):
        SigLipLoss(impl="cuda")
    with pytest.raises(ValueError, match="world_size=2 needs an initialised torch.distributed process group"):
        SigLipLoss(rank=1, world_size=2)(a, b, scale, bias)
