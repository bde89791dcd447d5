"""``lfvila_kernels.siglip_loss.SigLipLoss`` across gloo processes against open_clip's ``SigLipLoss`` run in the same
processes, and against the single-process definition: loss and the gradients of the local image and text features,
logit_scale and logit_bias within 1e-5, for every ``dist_impl``. Two processes run the one-way exchange (bidir's
remainder step, and shift); three run bidir's bidirectional exchange."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lfvila_kernels.siglip import sigmoid_loss_naive
from lfvila_kernels.siglip_loss import SigLipLoss

from .test_siglip import NAMES, TOL, features, open_clip_siglip_class

ROWS, DIM = 5, 16
DIST_IMPLS = ("bidir", "shift", "reduce", "gather")
IMPLS = ("torch", "triton")  # both in the same processes: one spawn (and its imports) per world size


def _loss_and_grads(loss_fn, img, txt, scale_value, bias_value):
    img, txt = img.clone().requires_grad_(True), txt.clone().requires_grad_(True)
    scale = torch.tensor(scale_value, requires_grad=True)
    bias = torch.tensor(bias_value, requires_grad=True)
    loss = loss_fn(img, txt, scale, bias)
    loss.backward()
    return loss.detach(), img.grad, txt.grad, scale.grad, bias.grad


def _params(rank):
    return 10.0 + rank, -10.0 + 0.5 * rank  # per rank: their gradients must come from this rank's loss only


def _worker(rank, world, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        img, txt = features(world * ROWS, world * ROWS, DIM, seed=world, dtype=torch.float32)
        rows = slice(rank * ROWS, (rank + 1) * ROWS)
        open_clip_cls = open_clip_siglip_class()
        results = {}
        for dist_impl in DIST_IMPLS:
            kwargs = {"rank": rank, "world_size": world, "dist_impl": dist_impl}
            for impl in IMPLS:
                results[(dist_impl, impl)] = _loss_and_grads(SigLipLoss(**kwargs, impl=impl), img[rows], txt[rows],
                                                             *_params(rank))
            if open_clip_cls is not None:
                results[(dist_impl, "open_clip")] = _loss_and_grads(open_clip_cls(**kwargs), img[rows], txt[rows],
                                                                    *_params(rank))
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()  # every rank past its last collective before any tears its group down
    finally:
        dist.destroy_process_group()


def _expected(rank, world):
    """Rank ``rank``'s loss and gradients from the global batch in one process: its images against every rank's
    text (its own block paired, the others all-negative), each block over ``ROWS``; the text gradient of this rank's
    rows sums every rank's loss (the exchange's backward returns it)."""
    img, txt = features(world * ROWS, world * ROWS, DIM, seed=world, dtype=torch.float32)
    img, txt = img.double().requires_grad_(True), txt.double().requires_grad_(True)
    params = [tuple(torch.tensor(v, dtype=torch.float64, requires_grad=True) for v in _params(r)) for r in range(world)]
    losses = []
    for r in range(world):
        mine = img[r * ROWS:(r + 1) * ROWS]
        loss = 0
        for k in range(world):
            loss = loss + sigmoid_loss_naive(mine, txt[k * ROWS:(k + 1) * ROWS], *params[r], negative_only=k != r)
        losses.append(loss)
    sum(losses).backward()
    rows = slice(rank * ROWS, (rank + 1) * ROWS)
    return losses[rank].detach(), img.grad[rows], txt.grad[rows], params[rank][0].grad, params[rank][1].grad


@pytest.mark.parametrize("world", [2, 3])
def test_gloo_processes_match_open_clip_and_the_definition(tmp_path, world):
    mp.spawn(_worker, args=(world, str(tmp_path / "init"), str(tmp_path)), nprocs=world, join=True)
    per_rank = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(world)]
    for rank, results in enumerate(per_rank):
        expected = _expected(rank, world)
        for dist_impl in DIST_IMPLS:
            theirs = results.get((dist_impl, "open_clip"))
            for impl in IMPLS:
                ours = results[(dist_impl, impl)]
                where = f"world {world} rank {rank} {dist_impl} impl={impl}"
                for name, got, want in zip(NAMES, ours, expected):
                    torch.testing.assert_close(got.double(), want, **TOL, msg=f"{where} {name}")
                if theirs is not None:
                    for name, got, want in zip(NAMES, ours, theirs):
                        torch.testing.assert_close(got, want, **TOL, msg=f"{where} {name} vs open_clip")
