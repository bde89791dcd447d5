"""The error rule of ``_compare.py`` still catches wrong kernels: the interpreted Triton kernels with a defect
injected (a backward that drops the last column tile, a softmax scale off by 1e-4 relative) fail it, the same kernels
without the defect pass it on the same problem, and the yardstick itself does not depend on the BLAS's summation order
or thread count (the reason it is the same on every CPU)."""

from __future__ import annotations

import pytest
import torch

from lfvila_kernels import _contrastive_launch as fused_cl
from lfvila_kernels import window_attention

from . import test_contrastive as tc
from . import test_window_attention as tw
from ._compare import RoundedOps, assert_within_eager_error, error_bound

TILES = dict(block_m=16, block_n=16, block_k=16, block_do=16, programs=2)


class _DropLastColumnTile:
    """A proxy for ``_cl_bwd_kernel``: launches it with ``M`` one column tile short, so the gradient sums skip the
    last tile of columns, as a kernel with an off-by-one tile loop would."""

    M_ARG = 12  # (A, B, SCALE, DA, DSCALE, YR, LSE_R, WR, YC, LSE_C, WC, N, M, ...)

    def __init__(self, kernel):
        self.kernel = kernel

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def call(*args, **kwargs):
            args = list(args)
            args[self.M_ARG] -= kwargs["BLOCK_N"]
            return launch(*args, **kwargs)

        return call


def _contrastive_problem():
    a, b = tc.features(37, 37, 24)
    scale = torch.tensor(20.0, dtype=torch.float64)
    want = tc.loss_and_grads(tc.naive_loss, a, b, scale, torch.float64)
    with RoundedOps():
        eager = tc.loss_and_grads(tc.naive_loss, a, b, scale.float(), torch.float32)
    return a, b, scale, want, eager


def _violations(got, want, eager):
    names = ("loss", "da", "db", "dscale")
    bad = []
    for name, x, y, e in zip(names, got, want, eager):
        try:
            assert_within_eager_error(name, x, e, y, torch.float32)
        except AssertionError:
            bad.append(name)
    return bad


def test_contrastive_correct_kernel_passes():
    a, b, scale, want, eager = _contrastive_problem()
    with fused_cl.override_config(**TILES):
        got = tc.loss_and_grads(tc.ours("triton"), a, b, scale.float(), torch.float32)
    assert _violations(got, want, eager) == []


def test_contrastive_kernel_dropping_a_tile_fails(monkeypatch):
    a, b, scale, want, eager = _contrastive_problem()
    monkeypatch.setattr(fused_cl, "_cl_bwd_kernel", _DropLastColumnTile(fused_cl._cl_bwd_kernel))
    with fused_cl.override_config(**TILES):
        got = tc.loss_and_grads(tc.ours("triton"), a, b, scale.float(), torch.float32)
    assert {"da", "db"} <= set(_violations(got, want, eager))


def test_contrastive_scale_off_by_1e_4_fails():
    a, b, scale, want, eager = _contrastive_problem()
    off = scale.float() * (1 + 1e-4)  # what a kernel computing logits with a slightly wrong scale would see
    with fused_cl.override_config(**TILES):
        got = tc.loss_and_grads(tc.ours("triton"), a, b, off, torch.float32)
    assert len(_violations(got, want, eager)) >= 3  # loss and both gradients at least


@pytest.mark.parametrize("off", [0.0, 1e-4], ids=["exact-scale", "scale-off-1e-4"])
def test_window_attention_scale(off):
    shape, window, shift = (1, 4, 6, 10, 2, 32), (2, 3, 5), (0, 1, 2)
    q, k, v, table = tw.make_inputs(shape, window)
    grad_out = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    scale = shape[-1] ** -0.5
    got = tw.run(window_attention, q, k, v, table, window, shift, grad_out, impl="triton", scale=scale * (1 + off))
    want = tw.oracle(q, k, v, table, window, shift, grad_out)
    with RoundedOps():
        eager = tw.run(tw.videoswin_window_attention, q, k, v, table, window, shift, grad_out)
    bad = []
    for name, x, y, e in zip(tw.NAMES, got, want, eager):
        try:
            assert_within_eager_error(name, x, e, y, torch.float32)
        except AssertionError:
            bad.append(name)
    assert bad == [] if off == 0 else len(bad) >= 3, bad


def test_yardstick_independent_of_thread_count():
    """The eager term under RoundedOps is the same with 1 and 2 threads (BLAS splits its sums by thread), and smaller
    than or equal to the plain eager error (it has no accumulation error of its own)."""
    a, b = tc.features(64, 64, 256)
    scale = torch.tensor(20.0, dtype=torch.float64)
    want = tc.loss_and_grads(tc.naive_loss, a, b, scale, torch.float64)
    threads = torch.get_num_threads()
    bounds = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            with RoundedOps():
                eager = tc.loss_and_grads(tc.naive_loss, a, b, scale.float(), torch.float32)
            bounds.append([error_bound(e, w, torch.float32) for e, w in zip(eager, want)])
    finally:
        torch.set_num_threads(threads)
    assert bounds[0] == bounds[1]


def test_rounded_ops_round_every_op_and_keep_views_and_in_place():
    x = torch.randn(5, 7, generator=torch.Generator().manual_seed(0))
    with RoundedOps():
        y = (x @ x.T).exp()
        t = x.T  # a view stays a view
        z = torch.zeros(3)
        z.add_(torch.ones(3) / 3)  # in place: the target gets the rounded result
    assert y.dtype == torch.float32 and t.data_ptr() == x.data_ptr()
    assert torch.equal(y, (x.double() @ x.double().T).float().double().exp().float())
    assert z.dtype == torch.float32 and torch.equal(z, torch.full((3,), 1 / 3, dtype=torch.float64).float())
