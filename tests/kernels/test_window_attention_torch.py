"""The torch path (``_window_attention_torch``: geometry gather + SDPA per mask class) against the step-by-step
reference, in float64 so that the comparison does not depend on the CPU's accumulation order."""

from __future__ import annotations

import sys

import pytest
import torch

import lfvila_kernels._window_attention_torch as torch_path
from lfvila_kernels import window_attention, window_attention_reference
from lfvila_kernels.reference import bias_table_rows

ATOL = 1e-10  # float64: both paths agree to ~1e-15 here; a wrong mask or bias row is off by > 1e-3

CASES = [  # (B, T, H, W, heads, head_dim), window, shift
    ((2, 4, 6, 10, 2, 16), (2, 3, 5), (0, 0, 0)),
    ((2, 4, 6, 10, 2, 16), (2, 3, 5), (0, 1, 2)),
    ((1, 5, 7, 11, 3, 8), (2, 3, 5), (1, 1, 2)),  # odd grid: partial windows on every axis, 3-D shift
    ((2, 3, 5, 4, 1, 32), (2, 2, 3), (1, 0, 2)),
    ((1, 4, 3, 5, 2, 64), (4, 3, 5), (0, 0, 0)),  # one window = the whole grid
    ((1, 6, 6, 6, 2, 24), (3, 3, 3), (2, 1, 0)),  # head_dim not a power of two
]


def _inputs(shape, window, strided: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    B, T, H, W, nh, hd = shape
    if strided:  # views of one fused qkv projection, as WindowAttention3D passes them
        q, k, v = torch.randn(B, T, H, W, 3, nh, hd, generator=g, dtype=torch.float64).unbind(4)
    else:
        q, k, v = (torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(3))
    table = torch.randn(bias_table_rows(window), nh, generator=g, dtype=torch.float64)
    return q, k, v, table


@pytest.mark.parametrize("shape, window, shift", CASES, ids=[f"{c[1]}-{c[2]}-hd{c[0][-1]}" for c in CASES])
@pytest.mark.parametrize("with_table", [True, False], ids=["bias", "nobias"])
def test_matches_reference_forward_and_gradients(shape, window, shift, with_table):
    q, k, v, table = _inputs(shape, window, strided=True)
    table = table if with_table else None
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)] + (
        [table.clone().requires_grad_()] if with_table else [])
    grad_out = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    results = []
    for fn in (torch_path.window_attention_torch, window_attention_reference):
        xs = [t.detach().clone().requires_grad_() for t in leaves]
        out = fn(xs[0], xs[1], xs[2], window, shift, xs[3] if with_table else None, 0.3)
        grads = torch.autograd.grad(out, xs, grad_out)
        results.append((out, grads))
    (out, grads), (ref, ref_grads) = results
    assert out.shape == ref.shape and out.is_contiguous() and out.dtype == torch.float64
    torch.testing.assert_close(out, ref, rtol=0, atol=ATOL)
    for name, g, r in zip(("dq", "dk", "dv", "dtable"), grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=0, atol=ATOL, msg=name)


def test_strided_and_contiguous_inputs_agree():
    shape, window, shift = (2, 5, 7, 11, 2, 16), (2, 3, 5), (1, 1, 2)
    q, k, v, table = _inputs(shape, window, strided=True)
    a = torch_path.window_attention_torch(q, k, v, window, shift, table, 0.25)
    b = torch_path.window_attention_torch(q.contiguous(), k.contiguous(), v.contiguous(), window, shift, table, 0.25)
    torch.testing.assert_close(a, b, rtol=0, atol=ATOL)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lower_precision_close_to_float64(dtype):
    shape, window, shift = (2, 4, 6, 10, 2, 32), (2, 3, 5), (0, 1, 2)
    q, k, v, table = _inputs(shape, window, strided=False)
    ref = window_attention_reference(q, k, v, window, shift, table, 32**-0.5)
    out = torch_path.window_attention_torch(*(t.to(dtype) for t in (q, k, v)), window, shift, table.to(dtype),
                                            32**-0.5)
    assert out.dtype == dtype
    atol = 1e-5 if dtype == torch.float32 else 3e-2  # bf16: inputs rounded to 8 bits of mantissa
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=atol)


def test_a_wrong_tile_is_caught(monkeypatch):
    """The comparison above can fail: a tile with one class's mask dropped differs from the reference."""
    shape, window, shift = (1, 4, 6, 10, 2, 16), (2, 3, 5), (0, 1, 2)
    q, k, v, table = _inputs(shape, window, strided=False)
    original = torch_path._class_masks

    def unmasked(geo, tbl, win, dtype):
        masks = original(geo, tbl, win, dtype)
        return [masks[0]] * len(masks)  # class 0 (no wrapped tokens) has no -inf: every class loses its mask

    monkeypatch.setattr(torch_path, "_class_masks", unmasked)
    out = torch_path.window_attention_torch(q, k, v, window, shift, table, 0.25)
    ref = window_attention_reference(q, k, v, window, shift, table, 0.25)
    assert (out - ref).abs().max() > 1e-3


def test_public_op_on_cpu_takes_this_path(monkeypatch):
    calls = []
    original = torch_path.window_attention_torch
    monkeypatch.delenv("LFVILA_KERNELS", raising=False)
    op = sys.modules["lfvila_kernels.window_attention"]  # the package's attribute of that name is the function
    monkeypatch.setattr(op, "window_attention_torch", lambda *a: calls.append(1) or original(*a))
    q, k, v, table = _inputs((1, 2, 3, 5, 2, 8), (2, 3, 5), strided=False)
    window_attention(q, k, v, (2, 3, 5), (0, 1, 2), table, impl="torch")
    assert calls == [1]
