"""QA accuracy, and gather_by_index on two gloo processes: the gathered result equals the single-process result on
the full data, with the sampler's padded duplicate removed."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lfvila.eval import accuracy, both_directions, gather_by_index, qa_metrics

WORLD, N, DIM, CHOICES = 2, 7, 4, 5


def _full_data():
    """Per-example eval outputs for N examples: text/video features, multiple-choice logits, labels."""
    g = torch.Generator().manual_seed(0)
    text = torch.randn(N, DIM, generator=g)
    video = torch.randn(N, DIM, generator=g)
    logits = torch.randn(N, CHOICES, generator=g)
    labels = torch.randint(0, CHOICES, (N,), generator=g)
    labels[:3] = logits[:3].argmax(-1)  # some right, the rest at chance
    labels[3] = (logits[3].argmax(-1) + 1) % CHOICES  # definitely wrong
    return {"text": text, "video": video, "logits": logits, "labels": labels, "mask": text[:, 0] > 0}


def _shard(rank):
    """DistributedSampler(shuffle=False) over N=7 on 2 ranks: padded to 8 with index 0, rank r takes [r::2]."""
    padded = list(range(N)) + [0]
    return torch.tensor(padded[rank::WORLD])


def _worker(rank, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        full = _full_data()
        res = {}
        # 1. DistributedSampler shards: rank 1 ends with a padded duplicate of index 0
        idx = _shard(rank)
        local = {k: v[idx] for k, v in full.items()}
        res["sampler"] = gather_by_index(local, idx, num_samples=N)
        res["qa"] = qa_metrics(local["logits"], local["labels"], index=idx, num_samples=N)
        # 2. uneven counts, unsorted, and a duplicate whose row differs: the first occurrence (rank 0) wins
        idx2 = torch.tensor([4, 0, 6, 2, 5]) if rank == 0 else torch.tensor([3, 1, 4])
        val2 = full["text"][idx2]
        if rank == 1:
            val2[idx2 == 4] += 100.0  # rank 1's copy of index 4 differs
        res["uneven"] = gather_by_index({"x": val2, "i32": idx2.to(torch.int32)}, idx2)
        # 3. one rank has nothing
        idx3 = torch.arange(N) if rank == 0 else torch.zeros(0, dtype=torch.int64)
        res["empty_rank"] = gather_by_index({"x": full["text"][idx3]}, idx3)
        # 4. mismatched trailing shapes raise on every rank (no hang)
        try:
            gather_by_index({"x": torch.zeros(2, 3 + rank)}, torch.arange(2))
            res["mismatch"] = "no error"
        except ValueError as e:
            res["mismatch"] = str(e)
        # 5. a missing example is reported
        try:
            gather_by_index({"x": torch.zeros(1)}, torch.tensor([rank]), num_samples=3)
            res["missing"] = "no error"
        except ValueError as e:
            res["missing"] = str(e)
        torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()  # every rank past its last collective before any tears down (see test_contrastive_distributed)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def gloo_results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gather")
    mp.spawn(_worker, args=(str(tmp / "init"), str(tmp)), nprocs=WORLD, join=True)
    return [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def test_gather_removes_sampler_duplicate(gloo_results):
    full = _full_data()
    for res in gloo_results:  # every rank gets the whole, de-duplicated result
        out, idx = res["sampler"]
        torch.testing.assert_close(idx, torch.arange(N))
        assert set(out) == set(full)
        for k, v in full.items():
            torch.testing.assert_close(out[k], v, rtol=0, atol=0)
            assert out[k].dtype == v.dtype
        # retrieval on the gathered features == retrieval on the full features
        assert both_directions(out["text"] @ out["video"].T) == both_directions(full["text"] @ full["video"].T)


def test_gather_uneven_first_occurrence_and_empty_rank(gloo_results):
    full = _full_data()
    for res in gloo_results:
        out, idx = res["uneven"]
        torch.testing.assert_close(idx, torch.arange(N))
        torch.testing.assert_close(out["x"], full["text"])  # index 4 from rank 0, not rank 1's +100 copy
        assert out["i32"].dtype == torch.int32 and out["i32"].tolist() == list(range(N))
        out3, idx3 = res["empty_rank"]
        torch.testing.assert_close(idx3, torch.arange(N))
        torch.testing.assert_close(out3["x"], full["text"])


def test_gather_errors_raise_on_every_rank(gloo_results):
    for res in gloo_results:
        assert "differ across ranks" in res["mismatch"]
        assert "missing (first 10): [2]" in res["missing"]


def test_distributed_qa_counts_each_example_once(gloo_results):
    full = _full_data()
    single = qa_metrics(full["logits"], full["labels"])
    assert single["n"] == N
    for res in gloo_results:
        assert res["qa"] == single
    # the official way (mean of the two ranks' accuracies, duplicate included) differs here
    per_rank = [accuracy(full["logits"][_shard(r)], full["labels"][_shard(r)]) for r in range(WORLD)]
    assert 100 * np.mean(per_rank) != pytest.approx(single["acc"])


def test_single_process_gather_sorts_and_dedups():
    x = torch.arange(12.0).reshape(6, 2)
    idx = torch.tensor([3, 1, 3, 0, 2, 1])
    out, uniq = gather_by_index({"x": x, "flag": idx > 1}, idx, num_samples=4)
    assert uniq.tolist() == [0, 1, 2, 3]
    torch.testing.assert_close(out["x"], x[[3, 1, 4, 0]])
    assert out["flag"].tolist() == [False, False, True, True]
    with pytest.raises(ValueError, match="rows like index"):
        gather_by_index({"x": x[:5]}, idx)


def test_accuracy_logits_predictions_numpy():
    logits = torch.tensor([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])
    labels = torch.tensor([1, 0, 0, 1])
    assert accuracy(logits, labels) == 0.5
    assert accuracy(logits.argmax(-1), labels) == 0.5
    assert accuracy(logits.numpy(), labels.numpy()) == 0.5
    assert accuracy([1, 0, 1, 1], [1, 0, 0, 1]) == 0.75
    assert qa_metrics(logits, labels) == {"acc": 50.0, "n": 4}
    # an unanswerable label (-100) is wrong unless ignored
    labels2 = torch.tensor([1, 0, -100, -100])
    assert qa_metrics(logits, labels2) == {"acc": 50.0, "n": 4}
    assert qa_metrics(logits, labels2, ignore_index=-100) == {"acc": 100.0, "n": 2}


def test_qa_single_process_index_dedups():
    logits = torch.tensor([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7], [0.1, 0.9]])
    labels = torch.tensor([1, 0, 0, 1])
    # rows 0 and 3 are the same example (index 0), correct: counted once -> 2 of 3
    m = qa_metrics(logits, labels, index=torch.tensor([0, 1, 2, 0]))
    assert m["n"] == 3 and m["acc"] == pytest.approx(200 / 3)
    with pytest.raises(ValueError, match="predictions"):
        accuracy(logits, labels[:3])
