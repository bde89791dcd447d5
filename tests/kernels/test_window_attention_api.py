"""window_attention's argument checks and the dispatch between the Triton and torch paths."""

from __future__ import annotations

import pytest
import torch

import lfvila_kernels.dispatch as dispatch
from lfvila_kernels import _window_attention_launch as fused
from lfvila_kernels import window_attention, window_attention_reference
from lfvila_kernels._window_attention_torch import window_attention_torch
from lfvila_kernels.reference import bias_table_rows

SHAPE, WINDOW = (1, 4, 6, 5, 2, 16), (2, 3, 5)


def qkv(shape=SHAPE, dtype=torch.float32):
    return [torch.randn(shape, dtype=dtype) for _ in range(3)]


def table(window=WINDOW, heads=2):
    return torch.randn(bias_table_rows(window), heads)


def bad_calls():
    q, k, v = qkv()
    fused_qkv = torch.randn(1, 4, 6, 5, 2, 16, 3)
    yield "q", dict(q=q[0], k=k[0], v=v[0], window=(2, 3, 5)), "6 dims"
    yield "k shape", dict(q=q, k=k[:, :2], v=v, window=WINDOW), "k shape"
    yield "v dtype", dict(q=q, k=k, v=v.double(), window=WINDOW), "v dtype"
    yield "q int", dict(q=q.long(), k=k, v=v, window=WINDOW), "q must be a floating"
    yield "last dim", dict(q=fused_qkv[..., 0], k=k, v=v, window=WINDOW), "q must have a contiguous last dim"
    yield "window len", dict(q=q, k=k, v=v, window=(2, 3)), "window must be a sequence of three"
    yield "window zero", dict(q=q, k=k, v=v, window=(0, 3, 5)), "window must be positive"
    yield "window too big", dict(q=q, k=k, v=v, window=(8, 3, 5)), "larger than the grid"
    yield "shift negative", dict(q=q, k=k, v=v, window=WINDOW, shift=(0, -1, 0)), "shift"
    yield "shift = window", dict(q=q, k=k, v=v, window=WINDOW, shift=(0, 3, 0)), "shift"
    yield "table rows", dict(q=q, k=k, v=v, window=WINDOW, rel_pos_bias=table((2, 3, 4))), "rel_pos_bias must have"
    yield "table heads", dict(q=q, k=k, v=v, window=WINDOW, rel_pos_bias=table(heads=3)), "rel_pos_bias must have"
    yield "scale", dict(q=q, k=k, v=v, window=WINDOW, scale=-1.0), "scale"
    yield "impl", dict(q=q, k=k, v=v, window=WINDOW, impl="cuda"), "impl"


@pytest.mark.parametrize("name, kwargs, match", list(bad_calls()), ids=[c[0] for c in bad_calls()])
def test_bad_calls_raise_value_error_naming_the_argument(name, kwargs, match, monkeypatch):
    monkeypatch.setattr(fused, "_launch_fwd", _never)  # no kernel may launch for a bad call
    with pytest.raises(ValueError, match=match):
        window_attention(**kwargs)


def _never(*args, **kwargs):
    raise AssertionError("a kernel launched for a bad call")


def test_auto_on_cpu_takes_the_torch_path(monkeypatch):
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    monkeypatch.setattr(fused, "_launch_fwd", _never)
    q, k, v = qkv()
    out = window_attention(q, k, v, WINDOW, (0, 1, 2))
    assert torch.equal(out, window_attention_torch(q, k, v, WINDOW, (0, 1, 2), None, q.shape[-1] ** -0.5))
    torch.testing.assert_close(out, window_attention_reference(q, k, v, WINDOW, (0, 1, 2)), atol=1e-5, rtol=1e-5)


def test_environment_forces_triton(monkeypatch):
    monkeypatch.setenv(dispatch.ENV_VAR, "triton")
    calls = []
    original = fused._launch_fwd
    monkeypatch.setattr(fused, "_launch_fwd", lambda *a: calls.append(1) or original(*a))
    q, k, v = qkv()
    window_attention(q, k, v, WINDOW)
    assert calls == [1]


def test_environment_forces_torch(monkeypatch):
    monkeypatch.setenv(dispatch.ENV_VAR, "torch")
    monkeypatch.setattr(fused, "_launch_fwd", _never)
    window_attention(*qkv(), WINDOW)


def test_bad_environment_value(monkeypatch):
    monkeypatch.setenv(dispatch.ENV_VAR, "cuda")
    with pytest.raises(ValueError, match=dispatch.ENV_VAR):
        window_attention(*qkv(), WINDOW)


def test_forcing_triton_on_cpu_without_interpreter_says_why(monkeypatch):
    monkeypatch.setattr(dispatch, "interpreting", lambda: False)
    with pytest.raises(RuntimeError, match="need CUDA tensors"):
        window_attention(*qkv(), WINDOW, impl="triton")


def test_float64_refused_by_triton_but_served_by_torch():
    with pytest.raises(RuntimeError, match="float64 is not supported by the Triton kernel"):
        window_attention(*qkv(dtype=torch.float64), WINDOW, impl="triton")
    assert window_attention(*qkv(dtype=torch.float64), WINDOW).dtype == torch.float64
