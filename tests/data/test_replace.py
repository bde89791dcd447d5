"""``on_error="replace"``: a bad training sample is logged, counted and replaced by a deterministic other sample, so
the batch keeps its size; the choice depends on ``(seed, epoch, index, attempt)`` only (same with two loader
constructions, with 0 or 2 workers); too many bad files still stop the run; evaluation never replaces."""

from __future__ import annotations

import logging

import pytest
import torch

from lfvila.data import decode as decoding
from lfvila.data.formats import build_dataset
from lfvila.data.loader import (
    LoaderConfig,
    VideoTextDataset,
    build_loader,
    replacement_index,
    replacement_rng,
    sample_rng,
)
from lfvila.data.text import load_tokenizer

from ._clip_rows import FRAME, clip_file, decode_code, sentence_words, write_rows

ROWS, BAD_ROW, BAD_CLIP = 8, 3, 2


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("replace")
    path = write_rows(root, [5] * ROWS)
    bad = clip_file(root, BAD_ROW, BAD_CLIP)
    bad.write_bytes(b"\x00garbage" * 100)  # a corrupt clip inside the row's first window
    return root, path, bad


def _cfg(**kw):
    return LoaderConfig(size=FRAME, frames_per_clip=2, max_len=8, augment=False,
                        **{"train": True, "on_error": "replace", "max_skip_fraction": 1.0, **kw})


def _loader(data, workers=0, epoch=0, **kw):
    root, path, _ = data
    loader = build_loader(build_dataset("lfvila_pretrain", path, root / "videos"), load_tokenizer(root / "vocab.txt"),
                          _cfg(**kw), batch_size=4, num_workers=workers)
    loader.set_epoch(epoch)
    return loader


def _epoch(loader):
    return [(b["index"].tolist(), b["meta"], b["video"], b["text_ids"]) for b in loader]


def test_replacement_index_is_another_index_drawn_from_its_key():
    draws = [replacement_index(10, 4, 0, 0, a) for a in range(1, 400)]
    assert set(draws) == set(range(10)) - {4}
    assert draws == [replacement_index(10, 4, 0, 0, a) for a in range(1, 400)]
    assert replacement_index(10, 4, 0, 1, 1) != replacement_index(10, 4, 0, 0, 1) or \
        replacement_index(10, 4, 0, 1, 2) != replacement_index(10, 4, 0, 0, 2)  # the epoch enters the key
    assert replacement_index(1, 0, 0, 0, 1) is None
    # a replacement's draws are a stream of their own, not a copy of that index's own sample
    assert replacement_rng(0, 0, 5, 4).integers(0, 2**62) != sample_rng(0, 0, 5).integers(0, 2**62)


def test_a_corrupt_clip_is_replaced_and_the_batch_keeps_its_size(data, caplog):
    _, _, bad = data
    with caplog.at_level(logging.WARNING):
        loader = _loader(data)
        batches = _epoch(loader)
    assert [len(i) for i, *_ in batches] == [4, 4]  # 8 rows, batch 4: nothing lost
    replaced = [(m["replaced"], i) for idx, meta, *_ in batches for i, m in zip(idx, meta) if "replaced" in m]
    other = replacement_index(ROWS, BAD_ROW, 0, 0, 1)
    assert replaced == [(BAD_ROW, other)]
    # the replacement is a real, aligned sample of its own row
    for idx, meta, video, ids in batches:
        for b, i in enumerate(idx):
            start = meta[b]["clip_start"]
            assert [decode_code(f)[:2] for f in video[b].numpy()[::2]] == [(i, start + k) for k in range(4)]
            assert sentence_words(loader.dataset.tokenizer, ids[b]) == [f"clip{start + k}" for k in range(4)]
    skips = loader.dataset.skips
    assert skips.skipped == 1 and skips.seen == ROWS + 1 and bad.name in skips.reasons[0]
    logged = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(bad.name in m and "skipping" in m for m in logged)  # the file and the reason
    assert any(f"replaced by index {other}" in m for m in logged)


@pytest.mark.parametrize("epoch", [0, 1])
def test_the_replacement_is_the_same_for_every_construction_and_worker_count(data, epoch):
    runs = [_epoch(_loader(data, workers=w, epoch=epoch)) for w in (0, 0, 2)]
    for run in runs[1:]:
        assert len(run) == len(runs[0])
        for (i0, m0, v0, t0), (i1, m1, v1, t1) in zip(runs[0], run):
            assert i0 == i1 and m0 == m1 and torch.equal(v0, v1) and torch.equal(t0, t1)
    assert any("replaced" in m for _, meta, *_ in runs[0] for m in meta)


def test_skip_shrinks_the_batch_and_raise_names_the_file(data):
    _, _, bad = data
    assert sorted(len(i) for i, *_ in _epoch(_loader(data, on_error="skip"))) == [3, 4]
    with pytest.raises(decoding.DecodeError, match=bad.name):
        _epoch(_loader(data, on_error="raise"))


def test_too_many_bad_files_still_stop_the_run(tmp_path):
    path = write_rows(tmp_path, [4] * 6)
    for row in (0, 2, 4):
        clip_file(tmp_path, row, 1).write_bytes(b"")  # empty files
    ann, tok = build_dataset("lfvila_pretrain", path, tmp_path / "videos"), load_tokenizer(tmp_path / "vocab.txt")
    ds = VideoTextDataset(ann, tok, _cfg(max_skip_fraction=0.1))
    ds.skips.min_seen = 1
    with pytest.raises(decoding.TooManySkipsError, match="max_skip_fraction"):
        for i in range(len(ds)):
            ds[i]


def test_no_replacement_left_drops_the_sample_and_counts_every_attempt(tmp_path):
    path = write_rows(tmp_path, [4] * 3)
    for row in range(3):
        clip_file(tmp_path, row, 0).write_bytes(b"\x00" * 64)
    ann, tok = build_dataset("lfvila_pretrain", path, tmp_path / "videos"), load_tokenizer(tmp_path / "vocab.txt")
    ds = VideoTextDataset(ann, tok, _cfg(replace_attempts=2))
    assert ds[0] is None and ds.skips.skipped == 3 and ds.skips.seen == 3  # the sample and 2 attempts


def test_evaluation_never_replaces():
    with pytest.raises(ValueError, match="training only"):
        LoaderConfig(on_error="replace")
    with pytest.raises(ValueError, match="on_error"):
        LoaderConfig(on_error="ignore", train=True)
    with pytest.raises(ValueError, match="replace_attempts"):
        LoaderConfig(train=True, on_error="replace", replace_attempts=0)


class _BadRow:
    """Annotations whose row ``bad`` cannot be parsed when read (as a bad stored LMDB row)."""

    def __init__(self, ann, bad: int):
        self.ann, self.bad, self.annotation_path = ann, bad, ann.annotation_path

    def __len__(self):
        return len(self.ann)

    def __getitem__(self, i):
        if i == self.bad:
            raise ValueError(f"{self.annotation_path}: key {i}: neither JSON nor a Python literal")
        return self.ann[i]


def test_an_unreadable_stored_row_is_replaced_or_raises_unchanged(data):
    root, path, _ = data
    ann, tok = _BadRow(build_dataset("lfvila_pretrain", path, root / "videos"), 5), load_tokenizer(root / "vocab.txt")
    ds = VideoTextDataset(ann, tok, _cfg())
    out = ds[5]
    assert out["meta"]["replaced"] == 5 and out["index"] == replacement_index(ROWS, 5, 0, 0, 1)
    assert ds.skips.skipped == 1 and "key 5" in ds.skips.reasons[0]
    with pytest.raises(ValueError, match="key 5: neither"):
        VideoTextDataset(ann, tok, _cfg(on_error="raise"))[5]
