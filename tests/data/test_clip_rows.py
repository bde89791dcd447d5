"""Official pretraining rows (one file per clip) through the DataLoader path: a window of ``clips`` consecutive
clips, clip files and sentences cut with the same ``[start:start + clips]`` (sentence i is the transcript of the clip
at position i), train start random over every valid start, eval start 0; rows shorter than ``clips`` repeat their
last clip and pad the sentences."""

from __future__ import annotations

import pytest
import torch

from lfvila.data.formats import build_dataset
from lfvila.data.loader import LoaderConfig, VideoTextDataset, build_loader, plan_clips, sample_rng
from lfvila.data.text import load_tokenizer, tokenize_paragraph

from ._clip_rows import FRAME, decode_code, sentence_words, write_rows

LENGTHS = [4, 5, 9, 2]  # clips per row; row 3 is shorter than a window


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    root = tmp_path_factory.mktemp("cliprows")
    path = write_rows(root, LENGTHS)
    return build_dataset("lfvila_pretrain", path, root / "videos"), load_tokenizer(root / "vocab.txt")


def _dataset(rows, **cfg):
    ann, tok = rows
    return VideoTextDataset(ann, tok, LoaderConfig(size=FRAME, frames_per_clip=2, max_len=8, augment=False, **cfg))


def _check_aligned(sample, row: int, tok) -> int:
    """Every sentence i names the clip whose frames sit at position i, the clips are consecutive from the window
    start, and the frames are the planned ones; returns the start."""
    start, n = sample["meta"]["clip_start"], LENGTHS[row]
    window = list(range(start, min(start + 4, n)))
    positions = window + [window[-1]] * (4 - len(window))  # a short row repeats its last clip
    codes = [decode_code(f) for f in sample["video"].numpy()]  # (row, clip, frame) per decoded frame, clip-major
    assert [c[0] for c in codes] == [row] * 8
    assert [c[1] for c in codes] == [k for k in positions for _ in range(2)]
    assert [c[2] for c in codes] == [f for idx in sample["meta"]["frames"] for f in idx]
    words = sentence_words(tok, sample["text_ids"])
    assert words == [f"clip{k}" for k in window] + [""] * (4 - len(window))
    expected = tokenize_paragraph(tok, [f"clip{k}" for k in window], 4, 8)
    assert torch.equal(sample["text_ids"], expected["ids"]) and torch.equal(sample["sentence_real"], expected["real"])
    assert sample["meta"]["clips"] == [sample["meta"]["video"] + f"/yt{row}.{k}.mp4" for k in positions]
    return start


def test_eval_takes_the_first_window_and_pairs_each_sentence_with_its_clip(rows):
    ds = _dataset(rows)
    for i in range(len(LENGTHS)):
        assert _check_aligned(ds[i], i, rows[1]) == 0  # official eval: start_index = 0
    ds.set_epoch(3)
    assert all(ds[i]["meta"]["clip_start"] == 0 for i in range(len(LENGTHS)))  # fixed whatever the epoch


def test_train_windows_are_aligned_vary_and_reach_the_last_start(rows):
    ds = _dataset(rows, train=True)
    starts = {i: set() for i in range(len(LENGTHS))}
    for epoch in range(12):
        ds.set_epoch(epoch)
        for i in range(len(LENGTHS)):
            starts[i].add(_check_aligned(ds[i], i, rows[1]))
    assert starts[0] == {0} and starts[3] == {0}  # nothing to choose
    assert starts[1] == {0, 1}  # the official range(len - 4) would never give 1
    assert len(starts[2]) > 2  # varies over the epochs
    # the rule over many draws (planning only, no decoding): every valid start 0..len-4, the last one included
    cfg = LoaderConfig(size=FRAME, frames_per_clip=2, train=True)
    ann = rows[0]
    drawn = {plan_clips(ann[2], cfg, sample_rng(0, epoch, 2)).start for epoch in range(200)}
    assert drawn == set(range(LENGTHS[2] - 3))
    assert len({plan_clips(ann[2], cfg, sample_rng(0, 0, i)).start for i in range(2, 200)}) > 2  # varies by index
    again = _dataset(rows, train=True)
    again.set_epoch(5)
    ds.set_epoch(5)
    assert again[2]["meta"] == ds[2]["meta"]  # reproducible


def test_dataloader_batches_keep_the_pairing_with_two_workers(rows):
    ann, tok = rows
    loader = build_loader(ann, tok, LoaderConfig(size=FRAME, frames_per_clip=2, max_len=8, augment=False, train=True),
                          batch_size=2, num_workers=2)
    loader.set_epoch(1)
    seen = []
    for batch in loader:
        for b, i in enumerate(batch["index"].tolist()):
            sample = {k: batch[k][b] for k in ("video", "text_ids", "sentence_real")} | {"meta": batch["meta"][b]}
            _check_aligned(sample, i, tok)
            seen.append(i)
    assert sorted(seen) == list(range(len(LENGTHS)))
