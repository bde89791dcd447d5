"""The DataLoader path end to end on the synthetic dataset: shapes, exact frames, sharding, skips, normalisation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lfvila.data import decode as decoding
from lfvila.data.augment import augment
from lfvila.data.formats import build_dataset
from lfvila.data.framecode import read_index
from lfvila.data.loader import LoaderConfig, build_loader, to_model_input
from lfvila.data.synthetic import make_dataset
from lfvila.data.text import load_tokenizer

SIZE = (96, 160)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic")
    make_dataset(out, videos=6, seed=0, size=SIZE, min_seconds=10, max_seconds=14)
    return out


def _loader(out, split="train.json", world_size=1, rank=0, workers=0, **cfg):
    ann = build_dataset("activitynet_captions", out / split, out, on_error=cfg.pop("ann_on_error", "raise"))
    tok = load_tokenizer(out / "vocab.txt")
    return build_loader(ann, tok, LoaderConfig(size=SIZE, **cfg), batch_size=2, num_workers=workers,
                        rank=rank, world_size=world_size)


@pytest.mark.parametrize("sampling", ["uniform", "clips"])
def test_two_workers_give_exact_frames_and_aligned_text(synthetic, sampling):
    loader = _loader(synthetic, workers=2, sampling=sampling, augment=False)
    seen = []
    for batch in loader:
        B = batch["video"].shape[0]
        assert batch["video"].shape == (B, 32, *SIZE, 3) and batch["video"].dtype == torch.uint8
        assert batch["text_ids"].shape == (B, 4, 50) and batch["text_mask"].shape == (B, 4, 50)
        assert batch["sentence_real"].dtype == torch.bool
        for b in range(B):
            frames = batch["meta"][b]["frames"]
            wanted = [i for clip in frames for i in clip] if isinstance(frames[0], list) else list(frames)
            assert [read_index(f) for f in batch["video"][b].numpy()] == wanted  # frame i is frame i
        seen += batch["index"].tolist()
    assert sorted(seen) == list(range(len(loader.dataset)))


def test_two_ranks_cover_the_eval_set_once(synthetic):
    parts = [[i for batch in _loader(synthetic, world_size=2, rank=r) for i in batch["index"].tolist()]
             for r in range(2)]
    assert not set(parts[0]) & set(parts[1])
    assert sorted(parts[0] + parts[1]) == list(range(len(_loader(synthetic).dataset)))


def test_train_batches_are_reproducible_and_change_with_the_epoch(synthetic):
    def first(epoch):
        loader = _loader(synthetic, train=True, sampling="clips")
        loader.sampler.set_epoch(epoch)
        loader.dataset.set_epoch(epoch)
        return next(iter(loader))

    a, b, c = first(0), first(0), first(1)
    assert torch.equal(a["video"], b["video"]) and a["meta"] == b["meta"]
    assert not (torch.equal(a["video"], c["video"]) and a["index"].tolist() == c["index"].tolist())


def _corrupt_one(out):
    victim = sorted((out / "videos").glob("*.mp4"))[0]
    victim.write_bytes(b"\x00" * 1000)
    return victim


def test_bad_video_raises_naming_the_file_or_is_skipped_and_counted(tmp_path):
    make_dataset(tmp_path, videos=6, seed=1, size=SIZE, min_seconds=10, max_seconds=12)
    victim = _corrupt_one(tmp_path)
    split = next(s for s in ("train.json", "val.json", "test.json") if victim.stem in (tmp_path / s).read_text())
    with pytest.raises(decoding.DecodeError, match=victim.name):
        for _ in _loader(tmp_path, split=split):
            pass
    loader = _loader(tmp_path, split=split, on_error="skip", max_skip_fraction=1.0)
    n = sum(batch["video"].shape[0] for batch in loader if batch is not None)
    assert n == len(loader.dataset) - 1
    assert loader.dataset.skips.skipped == 1 and victim.name in loader.dataset.skips.reasons[0]


def test_too_many_skips_stop_the_run(tmp_path):
    make_dataset(tmp_path, videos=6, seed=1, size=SIZE, min_seconds=10, max_seconds=12)
    victim = _corrupt_one(tmp_path)
    split = next(s for s in ("train.json", "val.json", "test.json") if victim.stem in (tmp_path / s).read_text())
    loader = _loader(tmp_path, split=split, on_error="skip", max_skip_fraction=0.0)
    loader.dataset.skips.min_seen = 1
    with pytest.raises(decoding.TooManySkipsError):
        for _ in loader:
            pass


def test_augment_shapes_and_eval_determinism():
    rng = np.random.default_rng(0)
    video = torch.randint(0, 256, (4, 120, 200, 3), dtype=torch.uint8)
    train = augment(video, (64, 96), True, rng)
    assert train.shape == (4, 64, 96, 3) and train.dtype == torch.uint8
    ev1 = augment(video, (64, 96), False, np.random.default_rng(1))
    ev2 = augment(video, (64, 96), False, np.random.default_rng(2))
    assert torch.equal(ev1, ev2)  # eval uses no randomness


def test_to_model_input_moves_uint8_frames_for_the_model_to_normalise():
    video = torch.randint(0, 256, (1, 2, 4, 4, 3), dtype=torch.uint8)
    batch = {"video": video, "text_ids": torch.zeros(1, 4, 5, dtype=torch.int64), "text_mask": torch.zeros(1, 4, 5),
             "sentence_real": torch.ones(1, 4, dtype=torch.bool), "index": torch.tensor([0]), "meta": [{}]}
    x = to_model_input(batch, "cpu")["video"]
    assert x.dtype == torch.uint8 and torch.equal(x, video)  # (B, T, H, W, C): VideoEncoder.normalize does the rest


def test_iterating_never_touches_the_global_rng_and_worker_seeds_follow_the_epoch(synthetic):
    # a plain DataLoader draws every iterator's worker base seed from the global torch RNG, which a resumed run has
    # just restored: one draw more than the uninterrupted run, and every later dropout / MTC draw differs
    for loader in (_loader(synthetic), _loader(synthetic, train=True, workers=2)):
        before = torch.get_rng_state()
        assert sum(1 for _ in loader) >= 1
        assert torch.equal(torch.get_rng_state(), before)

    def base_seed(rank=0, epoch=0, seed=0):
        loader = _loader(synthetic, train=True, rank=rank, world_size=2, seed=seed)
        loader.set_epoch(epoch)
        assert loader.sampler.epoch == epoch and loader.dataset.epoch == epoch
        return iter(loader)._base_seed

    torch.manual_seed(0)
    first = base_seed()
    torch.manual_seed(1)  # the global state does not matter
    assert base_seed() == first == base_seed()  # a fresh iterator mid-epoch gets its epoch's seed
    assert len({first, base_seed(epoch=1), base_seed(rank=1), base_seed(seed=1)}) == 4


class _FreezeProbe(torch.utils.data.Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, i):
        import gc

        return torch.tensor([i, gc.get_freeze_count()])


def _mark_worker(worker_id):
    torch.utils.data.get_worker_info().dataset.marked = worker_id


def test_seeded_loader_workers_freeze_the_inherited_heap_and_run_the_users_init():
    """Workers freeze what they inherit (no copy-on-write of the parent's objects by the garbage collector), and a
    user's worker_init_fn still runs after that."""
    from lfvila.data.loader import SeededDataLoader

    loader = SeededDataLoader(_FreezeProbe(), batch_size=None, num_workers=2, worker_init_fn=_mark_worker,
                              multiprocessing_context="fork")
    got = torch.stack(list(loader))
    assert got[:, 0].tolist() == [0, 1, 2, 3] and bool((got[:, 1] > 0).all())
    assert loader.worker_init_fn.then is _mark_worker
