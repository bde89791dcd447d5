"""distributed_contrastive_loss on two gloo processes equals the single-process loss of the concatenated batch, with
the same gradients (the all-gather carries them back to each rank's rows)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from lfvila_kernels import contrastive_loss, distributed_contrastive_loss

WORLD, ROWS, DIM = 2, 6, 16


def _global_batch():
    g = torch.Generator().manual_seed(0)
    a = F.normalize(torch.randn(WORLD * ROWS, DIM, generator=g), dim=-1)
    b = F.normalize(torch.randn(WORLD * ROWS, DIM, generator=g), dim=-1)
    return a, b


def _worker(rank, init_file, out_dir, impl, ddp_average):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        a, b = _global_batch()
        rows = slice(rank * ROWS, (rank + 1) * ROWS)
        a_local, b_local = a[rows].clone().requires_grad_(), b[rows].clone().requires_grad_()
        scale = torch.tensor(20.0, requires_grad=True)
        loss = distributed_contrastive_loss(a_local, b_local, logit_scale=scale, ddp_average=ddp_average, impl=impl)
        loss.backward()
        torch.save(
            {"loss": loss.detach(), "da": a_local.grad, "db": b_local.grad, "dscale": scale.grad},
            os.path.join(out_dir, f"rank{rank}.pt"),
        )
        # every rank past its last collective before any tears its group down (one rank's SIGABRT in gloo's teardown,
        # "terminate called without an active exception", was seen once on a loaded 2-core machine)
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("ddp_average", [False, True], ids=["sum-share", "ddp-average"])
@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_two_gloo_ranks_match_single_process(tmp_path, impl, ddp_average):
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path), impl, ddp_average), nprocs=WORLD, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]

    a, b = (x.clone().requires_grad_() for x in _global_batch())
    scale = torch.tensor(20.0, requires_grad=True)
    loss = contrastive_loss(a, b, logit_scale=scale, impl="torch")
    da, db, dscale = torch.autograd.grad(loss, (a, b, scale))

    # DDP convention: the ranks' mean loss is the global loss; every gradient is WORLD x the single-process one
    # (DDP's gradient averaging divides it back). Sum-share convention: losses sum to it, gradients equal it.
    factor = WORLD if ddp_average else 1
    losses = torch.stack([r["loss"] for r in results])
    torch.testing.assert_close(losses.mean() if ddp_average else losses.sum(), loss.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.cat([r["da"] for r in results]), factor * da, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(torch.cat([r["db"] for r in results]), factor * db, atol=1e-5, rtol=1e-4)
    # the scale is replicated (not gathered): its gradient is each rank's share, summed by DDP's all-reduce
    total_dscale = sum(r["dscale"] for r in results)
    torch.testing.assert_close(total_dscale / factor, dscale, atol=1e-5, rtol=1e-4)
