"""Comparison helpers shared by the kernel tests: a verbose closeness check and the "2x eager error" rule."""

from __future__ import annotations

import torch

# Absolute floor added to the 2x-eager bound, per working dtype: it only matters when eager happens to be exact.
ERROR_FLOOR = {torch.float64: 1e-12, torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def assert_close_verbose(actual, expected, atol, rtol=0.0, name="tensor"):
    """Like torch.testing.assert_close, but says how many elements differ and where the first ones are."""
    actual, expected = actual.double(), expected.double()
    if actual.shape != expected.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}")
    bad = ~((actual - expected).abs() <= atol + rtol * expected.abs())
    if bad.any():
        idx = bad.nonzero()[:5].tolist()
        raise AssertionError(
            f"{name}: {int(bad.sum())} of {bad.numel()} elements differ (atol={atol}, rtol={rtol}); "
            f"max abs error {max_err(actual, expected):.3e}; first at {idx}: "
            f"{[actual[tuple(i)].item() for i in idx]} vs {[expected[tuple(i)].item() for i in idx]}"
        )


def assert_within_eager_error(name, fused, eager, oracle, dtype):
    """flash-attention's rule: the fused result's error against a float64 oracle is at most twice the error of the
    eager implementation run at the same precision (plus a small floor for when eager is exact)."""
    bound = 2 * max_err(eager, oracle) + ERROR_FLOOR[dtype]
    err = max_err(fused, oracle)
    if not err <= bound:  # also catches NaN
        raise AssertionError(f"{name}: error {err:.3e} exceeds 2 x eager error + floor = {bound:.3e} ({dtype})")
