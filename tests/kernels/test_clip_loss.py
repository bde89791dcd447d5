"""``lfvila_kernels.clip_loss.ClipLoss`` against open_clip's ``ClipLoss`` and against the loss written out here.

Two references: open_clip's own ``ClipLoss`` (``open_clip_torch``; its ``loss.py`` depends on torch alone, so when the
``open_clip`` package cannot be imported because torchvision is unusable, that file is loaded by itself), and
:func:`_rank_loss`, the definition with materialised logits, differentiated by autograd in one process. Single
process, and two gloo processes for every combination of ``local_loss`` and ``gather_with_grad``.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from lfvila_kernels.clip_loss import ClipLoss

WORLD, ROWS, DIM = 2, 5, 16
CONFIGS = [(False, False), (False, True), (True, False), (True, True)]  # (local_loss, gather_with_grad)
TOL = {"atol": 1e-5, "rtol": 1e-5}


@functools.cache
def open_clip_loss_class():
    """open_clip's ``ClipLoss`` class, or None when open_clip_torch is not installed."""
    try:
        from open_clip.loss import ClipLoss as OpenClipLoss

        return OpenClipLoss
    except Exception:  # not installed, or its package import fails on torchvision: load loss.py alone
        spec = importlib.util.find_spec("open_clip")
        if spec is None or not spec.submodule_search_locations:
            return None
        path = Path(next(iter(spec.submodule_search_locations))) / "loss.py"
        module_spec = importlib.util.spec_from_file_location("_open_clip_loss_file", path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
        return module.ClipLoss


def _features(n, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(n, DIM, generator=g, dtype=torch.float64), dim=-1)
    txt = F.normalize(img + 0.5 * torch.randn(n, DIM, generator=g, dtype=torch.float64), dim=-1)
    return img.to(dtype), txt.to(dtype)


def _rank_loss(img_all, txt_all, img_local, txt_local, scale, rank, local_loss):
    """open_clip's loss on one rank, written out: materialised logits, ``F.cross_entropy``."""
    n = img_local.shape[0]
    if local_loss:
        labels = torch.arange(n) + n * rank
        return (F.cross_entropy(scale * img_local @ txt_all.T, labels)
                + F.cross_entropy(scale * txt_local @ img_all.T, labels)) / 2  # fmt: skip
    logits = scale * img_all @ txt_all.T
    labels = torch.arange(img_all.shape[0])
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def _loss_and_grads(loss_fn, img, txt, scale_value, **kwargs):
    img, txt = img.clone().requires_grad_(True), txt.clone().requires_grad_(True)
    scale = torch.tensor(scale_value, dtype=img.dtype, requires_grad=True)
    loss = loss_fn(img, txt, scale, **kwargs)
    loss.backward()
    return loss.detach(), img.grad, txt.grad, scale.grad


# --------------------------------------------------------------------------------------------------- one process
@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("n", [1, 7, 64])
def test_single_process_matches_open_clip_and_the_definition(n, impl):
    img, txt = _features(n, seed=n)
    ours = _loss_and_grads(ClipLoss(impl=impl), img, txt, 14.3)
    written = _loss_and_grads(lambda a, b, s: _rank_loss(a, b, a, b, s, 0, False), img, txt, 14.3)
    for name, got, want in zip(("loss", "d_image", "d_text", "d_logit_scale"), ours, written):
        torch.testing.assert_close(got, want, **TOL, msg=name)
    open_clip_cls = open_clip_loss_class()
    if open_clip_cls is not None:
        theirs = _loss_and_grads(open_clip_cls(), img, txt, 14.3)
        for name, got, want in zip(("loss", "d_image", "d_text", "d_logit_scale"), ours, theirs):
            torch.testing.assert_close(got, want, **TOL, msg=name)


def test_open_clip_reference_is_available_where_installed():
    if importlib.util.find_spec("open_clip") is None:
        pytest.skip("open_clip_torch is not installed (pip install --no-deps open_clip_torch)")
    assert open_clip_loss_class().__name__ == "ClipLoss"


def test_forward_options_and_refusals():
    img, txt = _features(6, seed=3)
    scale = torch.tensor(10.0)
    loss = ClipLoss()(img, txt, scale)
    assert ClipLoss(cache_labels=True)(img, txt, scale, output_dict=True) == {"contrastive_loss": loss}
    torch.testing.assert_close(ClipLoss()(img, txt, 10.0), loss)  # a float scale
    bias = torch.tensor([-3.0], requires_grad=True)  # a constant shift of every logit cancels in softmax
    with_bias = ClipLoss()(img, txt, scale, logit_bias=bias)
    torch.testing.assert_close(with_bias, loss)
    with_bias.backward()
    assert bias.grad is not None and bias.grad.abs().item() == 0.0
    open_clip_cls = open_clip_loss_class()
    if open_clip_cls is not None:
        torch.testing.assert_close(open_clip_cls()(img, txt, scale, logit_bias=bias.detach()), loss, **TOL)

    with pytest.raises(ValueError, match="use_horovod=True is not supported"):
        ClipLoss(use_horovod=True)
    with pytest.raises(ValueError, match=r"rank must be an int in \[0, world_size=2\), got 2"):
        ClipLoss(rank=2, world_size=2)
    with pytest.raises(ValueError, match="logit_bias must hold one element"):
        ClipLoss()(img, txt, scale, logit_bias=torch.zeros(6, 6))
    with pytest.raises(ValueError, match=r"logit_scale must be a float or a one-element tensor .* got \(2,\)"):
        ClipLoss()(img, txt, torch.ones(2))
    with pytest.raises(ValueError, match="world_size=2 needs an initialised torch.distributed process group"):
        ClipLoss(rank=1, world_size=2)(img, txt, scale)
    with pytest.raises(ValueError, match="impl must be one of"):
        ClipLoss(impl="cuda")


# --------------------------------------------------------------------------------------------------- two processes
def _worker(rank, init_file, out_dir, impl):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        img, txt = _features(WORLD * ROWS, seed=11)
        rows = slice(rank * ROWS, (rank + 1) * ROWS)
        scale_value = 12.0 + rank  # a per-rank scale: its gradient must come from this rank's loss only
        open_clip_cls = open_clip_loss_class()
        results = {}
        for local_loss, gather_with_grad in CONFIGS:
            kwargs = {"local_loss": local_loss, "gather_with_grad": gather_with_grad, "rank": rank, "world_size": WORLD}
            results[(local_loss, gather_with_grad, "ours")] = _loss_and_grads(
                ClipLoss(**kwargs, impl=impl), img[rows], txt[rows], scale_value)
            if open_clip_cls is not None:
                results[(local_loss, gather_with_grad, "open_clip")] = _loss_and_grads(
                    open_clip_cls(**kwargs), img[rows], txt[rows], scale_value)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        # every rank past its last collective before any tears its group down (one rank's SIGABRT in gloo's teardown,
        # "terminate called without an active exception", was seen once on a loaded 2-core machine)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _expected(rank, local_loss, gather_with_grad):
    """Loss and gradients of ``rank`` from the global batch in one process (the gather's gradient rule applied)."""
    img, txt = _features(WORLD * ROWS, seed=11)
    rows = slice(rank * ROWS, (rank + 1) * ROWS)
    scale = torch.tensor(12.0 + rank, requires_grad=True)
    if gather_with_grad:  # all_gather's backward sums every rank's gradient of the gathered rows
        img, txt = img.requires_grad_(True), txt.requires_grad_(True)
        losses = [_rank_loss(img, txt, img[r * ROWS:(r + 1) * ROWS], txt[r * ROWS:(r + 1) * ROWS],
                             scale if r == rank else torch.tensor(12.0 + r), r, local_loss) for r in range(WORLD)]
        sum(losses).backward()
        return losses[rank].detach(), img.grad[rows], txt.grad[rows], scale.grad
    img_local, txt_local = img[rows].clone().requires_grad_(True), txt[rows].clone().requires_grad_(True)
    img_all, txt_all = img.clone(), txt.clone()
    if not local_loss:  # the rank's own slot is its local (gradient-carrying) tensor
        img_all = torch.cat([img[: rank * ROWS], img_local, img[(rank + 1) * ROWS:]])
        txt_all = torch.cat([txt[: rank * ROWS], txt_local, txt[(rank + 1) * ROWS:]])
    loss = _rank_loss(img_all, txt_all, img_local, txt_local, scale, rank, local_loss)
    loss.backward()
    return loss.detach(), img_local.grad, txt_local.grad, scale.grad


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_two_gloo_processes_match_open_clip_and_the_definition(tmp_path, impl):
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path), impl), nprocs=WORLD, join=True)
    per_rank = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    names = ("loss", "d_image", "d_text", "d_logit_scale")
    for rank, results in enumerate(per_rank):
        for local_loss, gather_with_grad in CONFIGS:
            expected = _expected(rank, local_loss, gather_with_grad)
            ours = results[(local_loss, gather_with_grad, "ours")]
            theirs = results.get((local_loss, gather_with_grad, "open_clip"))
            where = f"rank {rank} {local_loss=} {gather_with_grad=}"
            for name, got, want in zip(names, ours, expected):
                torch.testing.assert_close(got, want, **TOL, msg=f"{where} {name}")
            if theirs is not None:
                for name, got, want in zip(names, ours, theirs):
                    torch.testing.assert_close(got, want, **TOL, msg=f"{where} {name} vs open_clip")
