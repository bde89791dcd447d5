"""MTC over the global batch (official ``SyncFunction`` all-gather, docs/official.md M6): two gloo ranks, each with
half of a fixed batch and its own generator seed (as the trainer's ``seed + rank``), against one process with the
whole batch and rank 0's seed."""

from __future__ import annotations

import dataclasses
import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

from lfvila.losses import mtc_loss

WORLD, ROWS, M, DIM, SEED = 2, 3, 4, 8, 5
FIELDS = ("keys", "values", "other", "valid", "other_valid")


def _batch():
    """Inputs of a shared projection (clips) and sentence features of ``WORLD * ROWS`` videos, with padding: video 1
    lacks a sentence, video 4 has one real sentence (its rows are ignored), video 5 none (its "other" sentence is
    masked out of v->t, also for rank 0's first video, whose shift-1 negative it is)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(WORLD * ROWS, M, DIM, generator=g)
    y = torch.randn(WORLD * ROWS, M, DIM, generator=g)
    real = torch.ones(WORLD * ROWS, M, dtype=torch.bool)
    real[1, 3] = False
    real[4, 1:] = False
    real[5] = False
    return x, y, real


def _proj() -> nn.Linear:
    """The same weights on every rank, as DDP keeps them."""
    torch.manual_seed(1)
    return nn.Linear(DIM, DIM)


def _step(x, y, real, compat, seed=SEED, **kw):
    """MTC of ``normalize(proj(x))`` clips against ``normalize(y)`` sentences -> loss, sample, grads of x, y, proj."""
    proj = _proj()
    x, y = x.clone().requires_grad_(), y.clone().requires_grad_()
    loss, sample = mtc_loss(F.normalize(proj(x), dim=-1), F.normalize(y, dim=-1), real,
                            generator=torch.Generator().manual_seed(seed), compat_official=compat,
                            return_sample=True, **kw)
    loss.backward()
    out = {"loss": loss.detach(), "dx": x.grad, "dy": y.grad, "dw": proj.weight.grad, "db": proj.bias.grad}
    out.update({f: getattr(sample, f) for f in FIELDS})
    out["shifts"] = torch.tensor(sample.shifts)
    return out


def _tiny_inputs():
    g = torch.Generator().manual_seed(2)
    video = torch.randn(WORLD, 3, 8, 64, 96, generator=g)
    ids = torch.randint(1, 128, (WORLD, M, 12), generator=g)
    mask = torch.ones(WORLD, M, 12, dtype=torch.long)
    mask[1, 3] = 0
    return video, ids * mask, mask


@torch.no_grad()
def _model_switch(rank):
    """``LFVILAConfig.mtc_gather`` through ``forward_stage1`` on ``lfvila-tiny``, one video per rank."""
    from lfvila.models import create_model

    torch.manual_seed(0)
    model = create_model("lfvila-tiny").eval()
    video, ids, mask = (x[rank:rank + 1] for x in _tiny_inputs())
    v, t = model.encode_video(video), model.encode_text(ids, mask)
    gen = lambda: torch.Generator().manual_seed(SEED + rank)  # noqa: E731
    on = model.forward_stage1(video, ids, mask, generator=gen())["mtc"]
    model.cfg = dataclasses.replace(model.cfg, mtc_gather=False)
    off = model.forward_stage1(video, ids, mask, generator=gen())["mtc"]
    return {"on": on, "off": off,
            "gathered": mtc_loss(v["clip"], t["sentence"], t["real"], generator=gen()),
            "local": mtc_loss(v["clip"], t["sentence"], t["real"], generator=gen(), distributed=False)}


def _worker(rank, init_file, out_dir):
    torch.set_num_threads(1)  # two processes on a small CPU
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        x, y, real = _batch()
        rows = slice(rank * ROWS, (rank + 1) * ROWS)
        res = {}
        for compat in (False, True):
            # distributed=None: auto, 2 ranks
            res[compat] = _step(x[rows], y[rows], real[rows], compat, SEED + rank)
            res[compat]["local"] = _step(x[rows], y[rows], real[rows], compat, SEED + rank, distributed=False)["loss"]
        try:  # unequal batches: a clear error on every rank, not a hang or a shape error inside the gather
            mtc_loss(F.normalize(x[: ROWS + rank], dim=-1), F.normalize(y[: ROWS + rank], dim=-1))
            res["mismatch"] = ""
        except ValueError as e:
            res["mismatch"] = str(e)
        res["model"] = _model_switch(rank)
        torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()  # every rank past its last collective before any tears down
    finally:
        dist.destroy_process_group()


def test_mtc_two_gloo_ranks_match_single_process(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    res = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    x, y, real = _batch()
    for compat in (False, True):
        ref = _step(x, y, real, compat)  # one process, the whole batch, rank 0's generator seed
        ranks = [r[compat] for r in res]
        assert ref["shifts"].tolist() == ([0, 1, 2] if compat else [1, 2, 3])
        for r in ranks:
            # the draw covers the global batch; every rank uses rank 0's, the single-process draw
            for f in (*FIELDS, "shifts"):
                assert torch.equal(r[f], ref[f]), (compat, f)
            # every rank returns the loss of the whole batch
            torch.testing.assert_close(r["loss"], ref["loss"])
        # all_gather's backward sums the ranks' gradients: each rank's feature gradient is WORLD x its rows' share
        for g in ("dx", "dy"):
            torch.testing.assert_close(torch.cat([r[g] for r in ranks]) / WORLD, ref[g])
        # DDP averages the parameter gradients over ranks: the single-process gradient of the whole batch
        for g in ("dw", "db"):
            torch.testing.assert_close(torch.stack([r[g] for r in ranks]).mean(0), ref[g])
        # distributed=False: each rank's own half, its roll wrapping within the rank
        for k, r in enumerate(ranks):
            rows = slice(k * ROWS, (k + 1) * ROWS)
            torch.testing.assert_close(r["local"], _step(x[rows], y[rows], real[rows], compat, SEED + k)["loss"])
            assert not torch.allclose(r["local"], r["loss"])
    for r in res:
        assert "same (B, M, D)" in r["mismatch"] and "(3, 4, 8)" in r["mismatch"] and "(4, 4, 8)" in r["mismatch"]
        m = r["model"]
        torch.testing.assert_close(m["on"], m["gathered"])  # mtc_gather=True (default): the global batch
        torch.testing.assert_close(m["off"], m["local"])  # mtc_gather=False: this rank's video only
        assert not torch.allclose(m["on"], m["off"])
    torch.testing.assert_close(res[0]["model"]["on"], res[1]["model"]["on"])
