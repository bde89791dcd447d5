"""window_attention: the Triton kernels (interpreted on the CPU) and the torch reference against an independent eager
Video-Swin implementation (roll + pad + partition + explicit softmax), outputs and every gradient."""

from __future__ import annotations

import pytest
import torch

from benchmarks.videoswin_eager import videoswin_window_attention
from lfvila_kernels import _window_attention_launch as fused
from lfvila_kernels import window_attention
from lfvila_kernels.reference import bias_table_rows

from ._compare import RoundedOps, assert_close_verbose, assert_within_eager_error

# (B, T, H, W, heads, head_dim), window, shift. Every LF-VILA window (2,3,5) ... (32,3,5), shifted and not, at
# reduced spatial size; T = 1 (2D Swin); grids not divisible by the window; odd batch and head counts.
CASES = [
    pytest.param((1, 4, 6, 10, 2, 32), (2, 3, 5), (0, 0, 0), id="lfvila-l0"),
    pytest.param((1, 4, 6, 10, 2, 32), (2, 3, 5), (0, 1, 2), id="lfvila-l0-shift"),
    pytest.param((1, 8, 6, 10, 1, 32), (4, 3, 5), (0, 0, 0), id="lfvila-l1"),
    pytest.param((1, 8, 6, 10, 1, 32), (4, 3, 5), (0, 1, 2), id="lfvila-l1-shift"),
    pytest.param((1, 8, 3, 10, 1, 32), (8, 3, 5), (0, 0, 0), id="lfvila-l2"),
    pytest.param((1, 8, 6, 5, 1, 32), (8, 3, 5), (0, 1, 0), id="lfvila-l2-shift"),
    pytest.param((1, 16, 3, 5, 1, 32), (16, 3, 5), (0, 0, 0), id="lfvila-l3"),
    pytest.param((1, 16, 3, 5, 1, 32), (16, 3, 5), (0, 1, 2), id="lfvila-l3-shift"),
    pytest.param((1, 32, 3, 5, 1, 32), (32, 3, 5), (0, 0, 0), id="lfvila-l5"),
    pytest.param((1, 32, 3, 5, 1, 16), (32, 3, 5), (0, 1, 2), id="lfvila-l5-shift"),
    pytest.param((2, 1, 14, 14, 3, 32), (1, 7, 7), (0, 3, 3), id="swin2d-T1"),
    pytest.param((1, 5, 7, 11, 2, 16), (2, 3, 5), (1, 1, 2), id="not-divisible-shift"),
    pytest.param((1, 3, 8, 9, 1, 32), (2, 3, 4), (0, 0, 0), id="not-divisible"),
    pytest.param((3, 2, 6, 5, 3, 16), (2, 3, 5), (1, 2, 3), id="odd-batch-heads-temporal-shift"),
    pytest.param((1, 2, 6, 5, 2, 64), (2, 3, 5), (0, 1, 2), id="hd64"),
    pytest.param((1, 2, 3, 5, 1, 128), (2, 3, 5), (1, 0, 0), id="hd128"),
    pytest.param((1, 2, 6, 5, 1, 24), (2, 3, 5), (0, 1, 2), id="hd24-not-pow2"),
]


def make_inputs(shape, window, dtype=torch.float32, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(shape, generator=g).to(dtype).requires_grad_() for _ in range(3))
    table = None
    if bias:  # the table is a parameter: fp32 even when activations are half
        table = (torch.randn(bias_table_rows(window), shape[4], generator=g) * 0.5).requires_grad_()
    return q, k, v, table


def run(fn, q, k, v, table, window, shift, grad_out, **kw):
    """Forward + backward; returns (out, dq, dk, dv, dtable) detached."""
    out = fn(q, k, v, window, shift, table, **kw)
    inputs = (q, k, v) + ((table,) if table is not None else ())
    grads = torch.autograd.grad(out, inputs, grad_out)
    return (out.detach(), *grads) + ((None,) if table is None else ())


def oracle(q, k, v, table, window, shift, grad_out, **kw):
    """The eager Video-Swin implementation in float64."""
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    t64 = None if table is None else table.detach().double().requires_grad_()
    return run(videoswin_window_attention, q64, k64, v64, t64, window, shift, grad_out.double(), **kw)


NAMES = ("out", "dq", "dk", "dv", "dtable")


def check_triton_against_videoswin(shape, window, shift, dtype=torch.float32, blocks=None):
    """The interpreted Triton kernels' output and gradients are within the rule of ``tests/kernels/_compare.py``:
    2x the error of eager Video-Swin at ``dtype`` plus the floor (both against the float64 oracle). ``blocks``: tile
    overrides (``override_config``)."""
    q, k, v, table = make_inputs(shape, window, dtype=dtype)
    grad_out = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    with fused.override_config(**(blocks or {})):
        got = run(window_attention, q, k, v, table, window, shift, grad_out, impl="triton")
    assert got[0].dtype == dtype and got[4].dtype == table.dtype
    want = oracle(q, k, v, table, window, shift, grad_out)
    with RoundedOps():  # eager Video-Swin at ``dtype``, the same on every CPU (tests/kernels/_compare.py)
        eager = run(videoswin_window_attention, q, k, v, table, window, shift, grad_out)
    for name, a, b, e in zip(NAMES, got, want, eager):
        assert_within_eager_error(name, a, e, b, dtype)


@pytest.mark.parametrize("shape, window, shift", CASES)
def test_triton_fp32_matches_videoswin(shape, window, shift):
    check_triton_against_videoswin(shape, window, shift)


@pytest.mark.parametrize("shape, window, shift", CASES[:2] + CASES[10:14])
def test_reference_matches_videoswin_float64(shape, window, shift):
    q, k, v, table = make_inputs(shape, window, dtype=torch.float64)
    table = table.detach().double().requires_grad_()
    grad_out = torch.randn(shape, dtype=torch.float64)
    got = run(window_attention, q, k, v, table, window, shift, grad_out, impl="torch")
    want = oracle(q, k, v, table, window, shift, grad_out)
    for name, a, b in zip(NAMES, got, want):
        assert_close_verbose(a, b, atol=1e-10, rtol=1e-10, name=name)


@pytest.mark.parametrize("shape, window, shift", [CASES[1], CASES[11]])
def test_triton_fp16_within_twice_eager_error(shape, window, shift):
    check_triton_against_videoswin(shape, window, shift, dtype=torch.float16)


@pytest.mark.parametrize(
    "blocks",
    [
        pytest.param(dict(fwd_m=16, fwd_n=16, bwd="split", dkdv_m=16, dkdv_n=16, dq_m=16, dq_n=16, split=3),
                     id="all-16-split3"),
        pytest.param(dict(fwd_m=32, fwd_n=16, bwd="split", dkdv_m=16, dkdv_n=32, dq_m=32, dq_n=16, split=1),
                     id="mixed-split1"),
        pytest.param(dict(bwd="split", dq_n=32, split=2), id="split-dq-one-key-block"),
        pytest.param(dict(bwd="split", dkdv_m=32, dkdv_n=16, dq_m=16, dq_n=32, db_m=16, db_n=32, split=8),
                     id="split-bias-grad-tiles-groups8"),
        pytest.param(dict(fwd_warps=2, fused_warps=1), id="warps-override"),
        pytest.param(dict(group=1, fused_qb=16), id="fused-group1-two-subblocks"),
        pytest.param(dict(group=5, fwd_m=16, fwd_n=32), id="fused-group5-fwd-rows16"),
        pytest.param(dict(i64=True, fwd_n=16, bwd="split", split=2), id="int64-offsets-split"),
        pytest.param(dict(i64=True), id="int64-offsets-fused"),
    ],
)
def test_triton_multi_block_paths(blocks):
    """Windows spanning several key/query tiles (the online-softmax loop; the split backward's dk/dv, dq and
    bias-gradient tiles, and its item groups), the split backward at a window the fused one would take, other group
    sizes (items per program), query sub-blocks and warps of the fused backward."""
    check_triton_against_videoswin((2, 4, 6, 5, 2, 16), (2, 3, 5), (1, 1, 2), blocks=blocks)


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_without_bias_and_custom_scale(impl):
    shape, window, shift = (1, 4, 6, 5, 2, 32), (2, 3, 5), (1, 1, 2)
    q, k, v, _ = make_inputs(shape, window, bias=False)
    grad_out = torch.randn(shape)
    got = run(window_attention, q, k, v, None, window, shift, grad_out, scale=0.3, impl=impl)
    want = oracle(q, k, v, None, window, shift, grad_out, scale=0.3)
    for name, a, b in zip(NAMES[:4], got, want):
        assert_close_verbose(a, b, atol=2e-5, rtol=1e-5, name=name)


@pytest.mark.parametrize(
    "blocks", [pytest.param({}, id="default-fused"),
               pytest.param(dict(bwd="split", dq_m=16, dq_n=16, db_m=16, db_n=16, split=3), id="split-groups3")]
)
def test_bias_gradient_is_deterministic(blocks):
    shape, window, shift = (2, 4, 6, 5, 2, 16), (2, 3, 5), (0, 1, 2)  # 8 (batch, window) pairs: 3 splits of them
    q, k, v, table = make_inputs(shape, window)
    grad_out = torch.randn(shape)
    with fused.override_config(**blocks):
        first = run(window_attention, q, k, v, table, window, shift, grad_out, impl="triton")
        second = run(window_attention, q, k, v, table, window, shift, grad_out, impl="triton")
    for name, a, b in zip(NAMES, first, second):
        assert torch.equal(a, b), f"{name} differs between two identical runs"


def test_strided_views_of_fused_qkv():
    """q, k, v read in place out of one (B, T, H, W, 3, heads, head_dim) projection; gradients reach it."""
    B, T, H, W, nh, hd = 2, 4, 6, 5, 2, 16
    window, shift = (2, 3, 5), (0, 1, 2)
    qkv = torch.randn(B, T, H, W, 3, nh, hd, requires_grad=True)
    table = torch.randn(bias_table_rows(window), nh, requires_grad=True)
    q, k, v = qkv.unbind(4)
    assert not q.is_contiguous()
    out = window_attention(q, k, v, window, shift, table, impl="triton")
    grad_out = torch.randn_like(out)
    (g_qkv,) = torch.autograd.grad(out, qkv, grad_out)
    qc, kc, vc = (x.detach().contiguous().requires_grad_() for x in (q, k, v))
    out_c = window_attention(qc, kc, vc, window, shift, table, impl="triton")
    grads_c = torch.autograd.grad(out_c, (qc, kc, vc), grad_out)
    assert torch.equal(out, out_c)
    assert torch.equal(g_qkv, torch.stack(grads_c, dim=4))


def test_opcheck_custom_op():
    """The torch.library registration: schema, fake (meta) implementation, autograd formula agree with the op."""
    shape, window = (1, 2, 3, 5, 2, 16), (2, 3, 5)
    q, k, v, table = make_inputs(shape, window)
    args = (q, k, v, table, list(window), [1, 1, 2], 0.25)
    torch.library.opcheck(torch.ops.lfvila_kernels.window_attention_fwd.default, args)


def test_torch_compile_fullgraph():
    from torch._inductor.utils import fresh_inductor_cache

    from lfvila_kernels import WindowAttention3D

    torch._dynamo.reset()
    module = WindowAttention3D(32, 2, (2, 3, 5), (0, 1, 2), impl="triton")
    x = torch.randn(1, 2, 6, 10, 32, requires_grad=True)
    eager_out = module(x)
    (eager_grad,) = torch.autograd.grad(eager_out.sum(), x)
    compiled = torch.compile(module, fullgraph=True)
    with fresh_inductor_cache():  # a cached graph from an older op schema must not stand in for a real compile
        out = compiled(x)
        (grad,) = torch.autograd.grad(out.sum(), x)
    assert_close_verbose(out, eager_out, atol=1e-5, name="compiled out")
    assert_close_verbose(grad, eager_grad, atol=1e-5, name="compiled grad")


def test_frozen_bias_table_skips_its_gradient():
    """A table that needs no gradient costs no bias-gradient partials; q, k, v gradients are unchanged."""
    shape, window, shift = (2, 4, 6, 5, 2, 16), (2, 3, 5), (0, 1, 2)
    q, k, v, table = make_inputs(shape, window)
    grad_out = torch.randn(shape)
    trained = run(window_attention, q, k, v, table, window, shift, grad_out, impl="triton")
    frozen = table.detach()
    out = window_attention(q, k, v, window, shift, frozen, impl="triton")
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    for name, a, b in zip(NAMES[1:4], grads, trained[1:4]):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("shape, window, shift, bias", [
    pytest.param((1, 8, 6, 10, 1, 32), (4, 3, 5), (0, 1, 2), True, id="P64-shift"),
    pytest.param((1, 8, 6, 5, 2, 16), (8, 3, 5), (0, 1, 0), True, id="P128-two-subblocks"),
    pytest.param((2, 5, 7, 11, 2, 16), (2, 3, 5), (1, 1, 2), True, id="odd-grid-3d-shift"),
    pytest.param((1, 4, 6, 5, 2, 24), (2, 3, 5), (0, 1, 2), False, id="no-bias-hd24"),
])
def test_fused_backward_matches_split_backward(shape, window, shift, bias):
    """The fused one-pass backward (windows <= 128 tokens) against the two-kernel one, same forward."""
    q, k, v, table = make_inputs(shape, window, bias=bias)
    grad_out = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    with fused.override_config(bwd="fused", group=3):
        a = run(window_attention, q, k, v, table, window, shift, grad_out, impl="triton")
    with fused.override_config(bwd="split", split=2):
        b = run(window_attention, q, k, v, table, window, shift, grad_out, impl="triton")
    assert torch.equal(a[0], b[0])
    for name, x, y in zip(NAMES[1:], a[1:], b[1:]):
        if x is not None:
            assert_close_verbose(x, y, atol=1e-5 * float(y.abs().max()), rtol=1e-5, name=name)


def test_no_tile_path():
    """No bias, no shift, no padded keys (N a power of two): the kernels run without a tile."""
    shape, window = (2, 2, 8, 8, 2, 16), (1, 4, 4)
    q, k, v, _ = make_inputs(shape, window, bias=False)
    grad_out = torch.randn(shape)
    got = run(window_attention, q, k, v, None, window, (0, 0, 0), grad_out, impl="triton")
    want = oracle(q, k, v, None, window, (0, 0, 0), grad_out)
    with RoundedOps():
        eager = run(videoswin_window_attention, q, k, v, None, window, (0, 0, 0), grad_out)
    for name, a, b, e in zip(NAMES[:4], got, want, eager):
        assert_within_eager_error(name, a, e, b, torch.float32)
