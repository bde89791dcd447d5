"""Comparison helpers shared by the kernel tests: a verbose closeness check and the error rule.

The rule (flash-attention's, made machine-independent). A fused result passes when its error against a float64
oracle is at most

    2 x (error of the eager implementation at the working precision)  +  FLOOR_ULPS[dtype] x eps(dtype) x max|oracle|

Why the eager term is computed under :class:`RoundedOps` on the CPU. The plain eager implementation's error depends
on the machine: MKL / OpenBLAS pick different blockings and FMA paths on AVX2 and AVX-512, Intel and AMD, and on the
thread count, and ATen's vectorised sums and exponentials change their order with the vector width. So the yardstick
moved from one CPU to the next, and with it the verdict on an unchanged kernel. Under
:class:`RoundedOps` every arithmetic op of the eager implementation runs in float64 and its result is rounded once to
the working dtype: each op is (to within float64's 1e-16) correctly rounded, whatever the CPU, its BLAS or its thread
count. A float64 result differs between machines only in its last bits, which change the rounded value only when it
lies within 1e-16 of a rounding boundary, so the yardstick is the same number on every machine. It is the error any
implementation must make that rounds the same intermediates (the inputs, the scores, the probabilities, each output)
to the working dtype; it keeps cancellation in view (a gradient summed from large terms of both signs gets the
rounding error of those terms, not of its small result).

Why the floor. A correctly rounded op has no accumulation error, and a kernel's dot products accumulate in fp32 over
head_dim or d terms. The floor allows for that, in ulps of the tensor's largest element (a magnitude of the problem,
again machine-independent): ``FLOOR_ULPS`` = 16 for fp32. Measured on every fp32 case of test_window_attention and
test_contrastive, the interpreted kernels needed at most 4.2 such ulps beyond twice the rounded eager error, so 16
leaves a factor of ~4 for another CPU's BLAS inside the interpreter. For fp16 and bf16, whose eager error (every
intermediate stored in 11 or 8 bits) dominates, the floor is 1 ulp of the largest element, about the old fixed floors
(2e-3 / 1.6e-2) at the tensors' usual magnitudes. What the rule still catches (``tests/kernels/test_compare.py``, on
the interpreted Triton kernels): a softmax or logit scale off by 1e-4 relative, which is ~840 fp32 ulps of the
largest element, and a backward that drops its last column tile, an error of the order of the values themselves.

Whole models (the drop-in tests, ``test_patch.py``) run both the unpatched and the patched fp32 model under
:class:`RoundedOps`, which leaves our own ``lfvila_kernels::*`` ops at the working precision: every other op is then
rounded alike in both runs, and the difference between them is the kernels' own.

On a GPU (the ``gpu``-marked tests) the eager term is the real eager implementation on the one GPU that runs them;
there the tests compare against the library a user would otherwise run.
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

# The floor, in units of eps(dtype) x max|oracle| of each compared tensor (see the module docstring).
FLOOR_ULPS = {torch.float64: 16, torch.float32: 16, torch.float16: 1, torch.bfloat16: 1}
WORKING = (torch.float32, torch.float16, torch.bfloat16)


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


def error_bound(eager, oracle, dtype) -> float:
    """The rule's bound for one tensor (see the module docstring)."""
    floor = FLOOR_ULPS[dtype] * torch.finfo(dtype).eps * oracle.double().abs().max().item()
    return 2 * max_err(eager, oracle) + max(floor, torch.finfo(torch.float64).tiny)


def assert_within_eager_error(name, fused, eager, oracle, dtype):
    """The fused result's error against the float64 ``oracle`` is within :func:`error_bound` of ``eager`` (the eager
    implementation at ``dtype``, computed under :class:`RoundedOps` on the CPU)."""
    bound = error_bound(eager, oracle, dtype)
    err = max_err(fused, oracle)
    if not err <= bound:  # also catches NaN
        raise AssertionError(f"{name}: error {err:.3e} exceeds 2 x eager error + floor = {bound:.3e} ({dtype})")


def _is_view(func) -> bool:
    return any(r.alias_info is not None and not r.alias_info.is_write for r in func._schema.returns)


def _meta(x):
    return torch.empty_like(x, device="meta") if isinstance(x, torch.Tensor) else x


class RoundedOps(TorchDispatchMode):
    """Run the ops inside in float64 and round each result once to the dtype the op would have produced.

    Forward and backward (autograd's kernels dispatch through the mode too, so wrap the ``backward`` /
    ``autograd.grad`` call as well). Views pass through untouched (they do no arithmetic, and autograd and in-place
    ops need their aliasing); in-place and ``out=`` ops compute on float64 copies and write the rounded result back
    into their targets. Tensors of other dtypes (integers, bools, float64) are left as they are.

    Our own ops (the ``lfvila_kernels::*`` custom ops: the Triton kernels) run as they are, at the working precision:
    inside a model run under this mode they are the only arithmetic whose rounding is the real one, so comparing such a
    run with the unpatched model under the same mode measures the kernels' error alone.
    """

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        leaves, _ = tree_flatten((args, kwargs))
        floating = any(isinstance(x, torch.Tensor) and x.dtype in WORKING for x in leaves)
        if func.namespace == "lfvila_kernels" or _is_view(func) or not floating:
            return func(*args, **kwargs)
        # the dtypes (and shapes) the op would produce: its meta kernel on the original arguments
        try:
            like = func(*tree_map(_meta, args), **tree_map(_meta, kwargs))
        except (NotImplementedError, RuntimeError):
            return func(*args, **kwargs)  # no meta kernel: run it as it is (ops without one do no arithmetic here)

        copies = {}

        def up(x):
            if isinstance(x, torch.Tensor) and x.dtype in WORKING:
                copies[id(x)] = (x, x.double())
                return copies[id(x)][1]
            return x

        out = func(*tree_map(up, args), **tree_map(up, kwargs))
        if func._schema.is_mutable:  # write the mutated float64 copies back, rounded, into the real targets
            for i, arg in enumerate(func._schema.arguments):
                if arg.alias_info is not None and arg.alias_info.is_write:
                    target = kwargs.get(arg.name) if arg.kwarg_only or i >= len(args) else args[i]
                    for t in (target if isinstance(target, (list, tuple)) else [target]):
                        if isinstance(t, torch.Tensor) and id(t) in copies:
                            t.copy_(copies[id(t)][1])

        def down(result, ref):
            if isinstance(result, torch.Tensor) and isinstance(ref, torch.Tensor):
                for original, copy in copies.values():  # an in-place op returns its (now rounded) target
                    if result is copy:
                        return original
                if result.dtype != ref.dtype:
                    return result.to(ref.dtype)
            return result

        if isinstance(out, (tuple, list)):
            return type(out)(down(o, r) for o, r in zip(out, like))
        return down(out, like)
