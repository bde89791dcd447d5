"""Compiled Triton kernels on a CUDA GPU at the full LF-VILA shapes (B = 16): bf16/fp16/fp32 against a float64
eager Video-Swin oracle with the 2x-eager-error rule, and bitwise determinism of the output and of every gradient
(the bias table's included) in each dtype. Skipped without CUDA.

Order: bf16 at every layer first, then fp16, then fp32 (parametrize's last-listed argument varies fastest), so that a
GPU session cut short by its time cap has the training dtype's results. Layer 4 has layer 3's shapes."""

from __future__ import annotations

import pytest
import torch

from benchmarks.videoswin_eager import videoswin_window_attention
from lfvila_kernels import window_attention
from lfvila_kernels.reference import bias_table_rows

from ._compare import assert_within_eager_error

pytestmark = pytest.mark.gpu

# The six LF-VILA video layers: grid (T, H, W), heads, window; head_dim 32; odd blocks shifted (0, 1, 2).
LFVILA_LAYERS = [
    pytest.param((32, 24, 40), 4, (2, 3, 5), (0, 1, 2), id="layer0"),
    pytest.param((32, 12, 20), 8, (4, 3, 5), (0, 1, 2), id="layer1"),
    pytest.param((32, 6, 10), 16, (8, 3, 5), (0, 1, 2), id="layer2"),
    pytest.param((32, 6, 10), 16, (16, 3, 5), (0, 1, 2), id="layer3"),
    pytest.param((32, 3, 5), 32, (32, 3, 5), (0, 0, 0), id="layer5"),
]


def _inputs(grid, heads, window, dtype, batch=16):
    g = torch.Generator(device="cuda").manual_seed(0)
    shape = (batch, *grid, heads, 32)
    q, k, v = (torch.randn(shape, device="cuda", generator=g).to(dtype).requires_grad_() for _ in range(3))
    table = (torch.randn(bias_table_rows(window), heads, device="cuda", generator=g) * 0.5).requires_grad_()
    grad_out = torch.randn(shape, device="cuda", generator=g).to(dtype)
    return q, k, v, table, grad_out


def _run(fn, q, k, v, table, window, shift, grad_out, **kw):
    out = fn(q, k, v, window, shift, table, **kw)
    return (out.detach(), *torch.autograd.grad(out, (q, k, v, table), grad_out))


DTYPES = pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])


@pytest.mark.parametrize("grid, heads, window, shift", LFVILA_LAYERS)
@DTYPES
def test_full_shape_within_twice_eager_error(grid, heads, window, shift, dtype):
    q, k, v, table, grad_out = _inputs(grid, heads, window, dtype)
    got = _run(window_attention, q, k, v, table, window, shift, grad_out, impl="triton")
    eager = _run(videoswin_window_attention, q, k, v, table, window, shift, grad_out)
    q64, k64, v64, t64 = (x.detach().double().requires_grad_() for x in (q, k, v, table))
    want = _run(videoswin_window_attention, q64, k64, v64, t64, window, shift, grad_out.double())
    for name, a, e, b in zip(("out", "dq", "dk", "dv", "dtable"), got, eager, want):
        assert_within_eager_error(f"{name}", a, e, b, dtype)


@pytest.mark.parametrize("grid, heads, window, shift", LFVILA_LAYERS)
@DTYPES
def test_full_shape_deterministic(grid, heads, window, shift, dtype):
    """Two identical forward + backward passes agree bitwise: output, dq, dk, dv and the bias-table gradient (which
    the kernels reduce in a fixed order, without atomics)."""
    q, k, v, table, grad_out = _inputs(grid, heads, window, dtype)
    first = _run(window_attention, q, k, v, table, window, shift, grad_out, impl="triton")
    second = _run(window_attention, q, k, v, table, window, shift, grad_out, impl="triton")
    for name, a, b in zip(("out", "dq", "dk", "dv", "dtable"), first, second):
        assert torch.equal(a, b), f"{name} differs between two identical runs"


@pytest.mark.parametrize("grid, heads, window, shift", LFVILA_LAYERS)
def test_compiled_tile_equals_the_torch_tiles(grid, heads, window, shift):
    """The compiled ``_window_attention_tile_kernel`` rounds like torch (bf16 included, which the CPU interpreter
    cannot check: it truncates), and its transpose is the transposed tile."""
    from lfvila_kernels import _window_attention_launch as fused

    geo = fused._geometry(grid, window, shift, torch.device("cuda"))
    table = torch.randn(bias_table_rows(window), heads, device="cuda")
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        want = fused._tiles(geo, table, window, dtype, 32**-0.5)
        assert torch.equal(fused._tile(geo, table, window, dtype, 32**-0.5), want)
        assert torch.equal(fused._tile(geo, table, window, dtype, 32**-0.5, transpose=True), want.transpose(-1, -2))
