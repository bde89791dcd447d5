"""Video classification data: the ``lfvila_video_cls`` format (official ``video_id`` / ``recipe_type`` jsonl), the
synthetic classification files, the official frame-index rule, and the loader's ``video`` mode (no text)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lfvila.data import decode
from lfvila.data.formats import build_dataset
from lfvila.data.framecode import read_index
from lfvila.data.loader import (
    LoaderConfig,
    VideoTextDataset,
    build_loader,
    collate,
    sample_mode,
    sample_rng,
    to_model_input,
)
from lfvila.data.row_parsing import AnnotationError
from lfvila.data.sampling import jittered_indices, uniform_indices
from lfvila.data.synthetic import make_dataset
from lfvila.data.synthetic_cls import CLASSES, make_cls, video_class
from lfvila.data.synthetic_qa import make_qa

SIZE = (48, 96)


@pytest.fixture(scope="module")
def syn(tmp_path_factory):
    root = tmp_path_factory.mktemp("videocls")
    make_dataset(root, videos=6, seed=2, size=SIZE, min_seconds=8, max_seconds=12)
    return root, make_cls(root)


def _ann(syn, split="train", **kw):
    root, summary = syn
    return build_dataset("lfvila_video_cls", root / "cls" / f"{split}.jsonl", summary["video_root"], **kw)


def _official_train(num_frames, t, rng):
    """The official train rule (``VideoClassificationDataset._read_video``), numpy's randint as Generator.integers
    (both half-open), so the same generator gives the same draws."""
    interval = int(num_frames / (t - 1))
    start = rng.integers(0, interval + 1)
    end = rng.integers(num_frames - 1 - interval, num_frames)
    return np.linspace(start, end, num=t).astype(int).tolist()


def test_frame_indices_follow_the_official_formula():
    for n in [1, 2, 5, 30, 31, 32, 33, 62, 100, 257, 1000, 4321]:
        for seed in range(5):
            got = jittered_indices(n, 32, np.random.default_rng(seed))
            assert got == _official_train(n, 32, np.random.default_rng(seed)), (n, seed)
            assert len(got) == 32 and 0 <= got[0] <= got[-1] <= n - 1
        assert uniform_indices(n, 32) == np.linspace(0, n - 1, num=32).astype(int).tolist()


def test_synthetic_files_and_the_format(syn, tmp_path):
    root, summary = syn
    assert summary["rows"] == {"train": 4, "val": 1, "test": 1} and summary["num_classes"] == len(CLASSES) == 9
    source = json.loads((root / "train.json").read_text())
    ann = _ann(syn, num_classes=9)
    assert len(ann) == 4
    for i, (vid, entry) in enumerate(source.items()):
        sample = ann[i]
        lengths = [e - s for s, e in entry["timestamps"]]
        longest = entry["sentences"][lengths.index(max(lengths))].lower()
        assert sample["video_id"] == vid and CLASSES[sample["label"]] in longest.split()
        assert sample["question"] is None and sample["segments"] == [] and sample["text"] == ""
        assert sample["video"] == str(root / entry["video"])  # a .webm found through the fallback extensions
        assert sample_mode(sample) == "video"
    assert video_class([{"colour": "red", "start": 0, "end": 2}, {"colour": "blue", "start": 2, "end": 4}]) == \
        CLASSES.index("red")  # ties: the earliest
    again = make_cls(root, tmp_path / "again")
    assert again["rows"] == summary["rows"]
    assert (tmp_path / "again" / "train.jsonl").read_bytes() == (root / "cls" / "train.jsonl").read_bytes()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"video_id": "a", "recipe_type": 3}\n{"video_id": "b", "recipe_type": 9}\n{"video_id": "c"}\n'
                   '{"video_id": "d", "recipe_type": "2"}\n')
    with pytest.raises(AnnotationError, match=r"line 2.*recipe_type 9 outside \[0, 9\)"):
        build_dataset("lfvila_video_cls", bad, root, num_classes=9)
    skipped = build_dataset("lfvila_video_cls", bad, root, num_classes=9, on_error="skip", max_skip_fraction=0.5)
    assert [s["label"] for s in skipped] == [3, 2] and skipped.skipped == 2


@pytest.mark.parametrize("train", [False, True])
def test_video_mode_batches(syn, train):
    ann = _ann(syn)
    cfg = LoaderConfig(size=SIZE, clips=4, frames_per_clip=8, train=train, augment=False, seed=7)
    loader = build_loader(ann, None, cfg, batch_size=3)  # no tokenizer: the video mode makes no text
    assert loader.dataset.mode == "video"
    seen = []
    for batch in loader:
        b = batch["video"].shape[0]
        assert set(batch) == {"video", "label", "index", "meta"}
        assert batch["video"].shape == (b, 32, *SIZE, 3) and batch["video"].dtype == torch.uint8
        assert batch["label"].dtype == batch["index"].dtype == torch.int64 and batch["label"].shape == (b,)
        for k in range(b):
            i = int(batch["index"][k])
            sample, frames = ann[i], batch["meta"][k]["frames"]
            assert int(batch["label"][k]) == sample["label"] and batch["meta"][k]["video_id"] == sample["video_id"]
            n = decode.probe(sample["video"]).num_frames
            # train: the official jittered rule, its draws the first of the sample's (seed, epoch, index) stream
            want = _official_train(n, 32, sample_rng(7, 0, i)) if train else uniform_indices(n, 32)
            assert list(frames) == want
            assert [read_index(f) for f in batch["video"][k].numpy()] == list(frames)  # frame i is frame i
            seen.append(i)
    if not train:
        assert sorted(seen) == list(range(len(ann)))
    moved = to_model_input(batch, "cpu")
    assert moved["video"].shape == (b, 32, *SIZE, 3) and torch.equal(moved["label"], batch["label"])


def test_video_mode_refuses_other_samples(syn, tmp_path):
    root, summary = syn
    with pytest.raises(ValueError, match=r"a video sample in a classification loader"):
        VideoTextDataset(_ann(syn), None, LoaderConfig(size=SIZE, mode="classification"))[0]
    make_qa(root, tmp_path / "qa", seed=0)
    violin = build_dataset("lfvila_violin", tmp_path / "qa" / "violin_train.jsonl", summary["video_root"])
    assert sample_mode(violin[0]) == "classification"  # a QA sample with a label stays classification
    with pytest.raises(ValueError, match=r"a classification sample in a video loader"):
        VideoTextDataset(violin, None, LoaderConfig(size=SIZE, mode="video"))[0]
    assert collate([None]) is None
