"""The loader's QA modes on synthetic QA files: batch shapes, exact frames over the whole video, the segments of every
candidate answer, span labels from the true frame times, and the errors for data that does not fit the mode."""

from __future__ import annotations

import math

import pytest
import torch

from lfvila.data.formats import build_dataset
from lfvila.data.framecode import read_index
from lfvila.data.loader import LoaderConfig, VideoTextDataset, build_loader, collate, span_targets, to_model_input
from lfvila.data.sampling import merge_segments, uniform_indices
from lfvila.data.synthetic import make_dataset
from lfvila.data.synthetic_qa import make_qa
from lfvila.data.text import encode_sentences, load_tokenizer
from lfvila.losses import span_frame_labels

SIZE = (48, 96)
FPS = 3.0  # the synthetic videos' constant rate
FORMATS = {"how2qa": "lfvila_how2qa", "violin": "lfvila_violin", "actnet_qa": "lfvila_actnet_qa"}


@pytest.fixture(scope="module")
def syn(tmp_path_factory):
    root = tmp_path_factory.mktemp("loaderqa")
    make_dataset(root, videos=6, seed=4, size=SIZE, min_seconds=8, max_seconds=12)
    summary = make_qa(root, seed=0)
    return root, summary, load_tokenizer(root / "vocab.txt")


def _ann(syn, task, split="train"):
    root, summary, _ = syn
    return build_dataset(FORMATS[task], root / "qa" / f"{task}_{split}.jsonl", summary["video_root"])


def _loader(syn, task, split="train", batch_size=3, **cfg):
    cfg = {"size": SIZE, "clips": 4, "frames_per_clip": 2, "max_len": 12, "augment": False, **cfg}
    return build_loader(_ann(syn, task, split), syn[2], LoaderConfig(**cfg), batch_size=batch_size)


def _expected_span_labels(frames, span):
    """Frame i is shown over [i / fps, (i + 1) / fps); in the span when that overlaps it."""
    inside = [k for k, i in enumerate(frames) if i / FPS < span[1] and (i + 1) / FPS > span[0]]
    labels = torch.zeros(len(frames), dtype=torch.long)
    labels[inside[0]:inside[-1] + 1] = 1
    return labels


@pytest.mark.parametrize("train", [False, True])
def test_multichoice_batches(syn, train):
    loader = _loader(syn, "how2qa", sentences=6, train=train, sampling="clips")  # QA ignores "clips" sampling
    assert loader.dataset.mode == "multichoice"
    ann, tok = loader.dataset.annotations, syn[2]
    seen = []
    for batch in loader:
        b = batch["video"].shape[0]
        assert batch["video"].shape == (b, 8, *SIZE, 3)
        assert batch["text_ids"].shape == batch["text_mask"].shape == (b, 4, 6, 12)
        assert batch["sentence_real"].shape == (b, 4, 6) and batch["sentence_real"].dtype == torch.bool
        assert batch["answer"].dtype == batch["span_labels"].dtype == torch.int64
        assert batch["span_labels"].shape == batch["span_weights"].shape == (b, 8)
        assert batch["span_weights"].dtype == torch.float32
        for k in range(b):
            sample = ann[int(batch["index"][k])]
            frames = batch["meta"][k]["frames"]
            assert [read_index(f) for f in batch["video"][k].numpy()] == list(frames)  # frame i is frame i
            if not train:  # the official QA eval rule: uniform over the whole video
                assert list(frames) == uniform_indices(_num_frames(sample["video"]), 8)
            assert int(batch["answer"][k]) == sample["answer"]
            subs = [s.text for s in merge_segments(sample["subtitles"], 4)]
            for c, answer in enumerate(sample["answers"]):
                want, want_mask = encode_sentences(tok, [sample["question"], answer, *subs], 12)
                assert torch.equal(batch["text_ids"][k, c], want) and torch.equal(batch["text_mask"][k, c], want_mask)
                assert batch["sentence_real"][k, c].tolist() == [True, True, *(t != "" for t in subs)]
            labels = _expected_span_labels(frames, sample["span"])
            assert torch.equal(batch["span_labels"][k], labels)
            n1 = int(labels.sum())
            assert torch.allclose(batch["span_weights"][k], torch.where(labels == 1, 4.0 / n1, 4.0 / (8 - n1)))
            seen.append(int(batch["index"][k]))
    if not train:
        assert sorted(seen) == list(range(len(ann)))


def _num_frames(path):
    from lfvila.data import decode

    return decode.probe(path).num_frames


@pytest.mark.parametrize("task,m,classes", [("violin", 5, 2), ("actnet_qa", 1, 17)])
def test_classification_batches(syn, task, m, classes):
    loader = _loader(syn, task, sentences=m, max_len=10)
    assert loader.dataset.mode == "classification"
    ann, tok = loader.dataset.annotations, syn[2]
    for batch in loader:
        b = batch["video"].shape[0]
        assert batch["text_ids"].shape == (b, m, 10) and batch["sentence_real"].shape == (b, m)
        assert "answer" not in batch and "span_labels" not in batch
        for k in range(b):
            sample = ann[int(batch["index"][k])]
            assert int(batch["label"][k]) == sample["label"] and 0 <= sample["label"] < classes
            subs = [s.text for s in merge_segments(sample["subtitles"] or [], m - 1)] if m > 1 else []
            want, _ = encode_sentences(tok, [sample["question"], *subs], 10)
            assert torch.equal(batch["text_ids"][k], want)
            assert batch["sentence_real"][k].tolist() == [True, *(t != "" for t in subs)]


def test_span_targets_rules():
    starts = torch.arange(8).double() * 1.5  # frames every 1.5 s, each shown 1/3 s
    ends = starts + 1 / 3
    labels, weights = span_targets((2.9, 6.1), starts, ends)  # frames at 3.0, 4.5, 6.0
    assert labels.tolist() == [0, 0, 1, 1, 1, 0, 0, 0]
    assert torch.allclose(weights, torch.tensor([0.8] * 2 + [8 / 6] * 3 + [0.8] * 3))
    assert math.isclose(float(weights.sum()), 8.0, rel_tol=1e-6)  # each class carries half of the total weight
    labels, _ = span_targets((3.4, 3.6), starts, ends)  # between frames 2 (3.0) and 3 (4.5): the nearer centre
    assert labels.tolist() == [0, 0, 1, 0, 0, 0, 0, 0]
    labels, _ = span_targets((4.6, 4.7), starts, ends)  # inside frame 3's display interval
    assert labels.tolist() == [0, 0, 0, 1, 0, 0, 0, 0]
    labels, weights = span_targets(None, starts, ends)  # no span: the whole video, as the official rule
    want = span_frame_labels(None, 1.0, 8)
    assert torch.equal(labels, want[0]) and torch.allclose(weights, want[1].float())


def test_mode_errors(syn):
    tok = syn[2]
    with pytest.raises(ValueError, match="mode must be one of"):
        LoaderConfig(mode="qa")
    with pytest.raises(ValueError, match="sentences must be >= 2 for multiple choice"):
        VideoTextDataset(_ann(syn, "how2qa"), tok, LoaderConfig(sentences=1))
    dataset = VideoTextDataset(_ann(syn, "violin"), tok, LoaderConfig(size=SIZE, mode="multichoice"))
    with pytest.raises(ValueError, match=r"violin_train\.jsonl: line 1: a classification sample in a multichoice"):
        dataset[0]
    # captions read as a paragraph stay paragraph batches (the retrieval format is unchanged)
    root = syn[0]
    captions = build_dataset("activitynet_captions", root / "train.json", root)
    assert VideoTextDataset(captions, tok, LoaderConfig()).mode == "paragraph"


def test_collate_refuses_mixed_candidate_counts_and_moves_targets(syn):
    loader = _loader(syn, "how2qa", sentences=3)
    a, b = loader.dataset[0], loader.dataset[1]
    b = {**b, "text_ids": b["text_ids"][:3], "text_mask": b["text_mask"][:3], "sentence_real": b["sentence_real"][:3]}
    with pytest.raises(ValueError, match="text shapes differ"):
        collate([a, b])
    batch = collate([a, None, loader.dataset[1]])
    assert batch["index"].tolist() == [0, 1]
    moved = to_model_input(batch, "cpu")
    for key in ("answer", "span_labels", "span_weights"):
        assert torch.equal(moved[key], batch[key])
    assert moved["video"].shape == (2, 8, *SIZE, 3)
