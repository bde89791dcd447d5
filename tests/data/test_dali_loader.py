"""The DALI loading path on DALI's CPU backend (VP9): same frames and layout (uint8, the model normalises) as the
DataLoader path; for rows with one file per clip, the same clip windows, sentences and replacements."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from lfvila.data import decode as decoding
from lfvila.data.dali_loader import DaliLoader
from lfvila.data.formats import build_dataset
from lfvila.data.loader import LoaderConfig, build_loader, to_model_input
from lfvila.data.synthetic import make_dataset
from lfvila.data.text import load_tokenizer

from ._clip_rows import FRAME, clip_file, clip_of_grey, sentence_words, write_rows

pytest.importorskip("nvidia.dali")
SIZE = (64, 96)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic")
    make_dataset(out, videos=8, seed=3, size=(96, 160), min_seconds=10, max_seconds=12)
    entries = {}
    for split in ("train.json", "val.json", "test.json"):
        entries.update(json.loads((out / split).read_text()))
    vp9 = {k: v for k, v in entries.items() if v["video"].endswith(".webm")}
    h264 = {k: v for k, v in entries.items() if v["video"].endswith(".mp4")}
    assert len(vp9) >= 2 and h264
    (out / "vp9.json").write_text(json.dumps(vp9))
    (out / "mixed.json").write_text(json.dumps({**vp9, **dict(list(h264.items())[:1])}))
    return out


def _norm(video: torch.Tensor) -> torch.Tensor:
    """uint8 ``(B, T, H, W, C)`` -> the encoder's normalised float ``(B, C, T, H, W)`` (``VideoEncoder.normalize``)."""
    from lfvila.models.video_encoder import IMAGENET_MEAN, IMAGENET_STD

    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1, 1)
    return (video.permute(0, 4, 1, 2, 3).float() / 255.0 - mean) / std


def _ann(out, name, **kw):
    return build_dataset("activitynet_captions", out / name, out, **kw)


def test_eval_batches_match_the_dataloader_path(synthetic):
    tok = load_tokenizer(synthetic / "vocab.txt")
    cfg = LoaderConfig(size=SIZE, sampling="clips")
    dali = list(DaliLoader(_ann(synthetic, "vp9.json"), tok, cfg, batch_size=2, device="cpu"))
    torch_batches = [to_model_input(b, "cpu") for b in build_loader(_ann(synthetic, "vp9.json"), tok, cfg, 2)]
    for d, t in zip(dali, torch_batches, strict=True):
        assert d["video"].dtype == t["video"].dtype == torch.uint8  # the encoder normalises, not the loaders
        assert d["video"].shape == t["video"].shape == (d["video"].shape[0], 32, *SIZE, 3)
        assert [m["frames"] for m in d["meta"]] == [m["frames"] for m in t["meta"]]
        assert torch.equal(d["text_ids"], t["text_ids"]) and torch.equal(d["index"], t["index"])
        # different resize kernels (DALI vs torch antialiased bilinear): close, not equal, in normalised units
        assert (_norm(d["video"]) - _norm(t["video"])).abs().mean() < 0.1


def test_train_batches_are_seeded(synthetic):
    tok = load_tokenizer(synthetic / "vocab.txt")
    cfg = LoaderConfig(size=SIZE, sampling="clips", train=True, seed=5)
    runs = [next(iter(DaliLoader(_ann(synthetic, "vp9.json"), tok, cfg, batch_size=2, device="cpu"))) for _ in "ab"]
    assert runs[0]["video"].shape == (2, 32, *SIZE, 3)
    assert torch.equal(runs[0]["video"], runs[1]["video"])


def test_two_ranks_cover_the_eval_set_once(synthetic):
    tok = load_tokenizer(synthetic / "vocab.txt")
    cfg = LoaderConfig(size=SIZE)
    parts = [[i for b in DaliLoader(_ann(synthetic, "vp9.json"), tok, cfg, 1, device="cpu", rank=r, world_size=2)
              for i in b["index"].tolist()] for r in range(2)]
    assert sorted(parts[0] + parts[1]) == list(range(len(_ann(synthetic, "vp9.json"))))


def test_codec_the_backend_cannot_decode_raises_or_is_skipped(synthetic):
    tok = load_tokenizer(synthetic / "vocab.txt")
    with pytest.raises(decoding.DecodeError, match=r"\.mp4: DALI's CPU backend decodes only"):
        list(DaliLoader(_ann(synthetic, "mixed.json"), tok, LoaderConfig(size=SIZE), 4, device="cpu"))
    loader = DaliLoader(_ann(synthetic, "mixed.json"), tok, LoaderConfig(size=SIZE, on_error="skip",
                                                                        max_skip_fraction=1.0), 4, device="cpu")
    n = sum(b["video"].shape[0] for b in loader)
    assert n == len(_ann(synthetic, "mixed.json")) - 1 and loader.skips.skipped == 1


# ------------------------------------------------------------------------- rows with one file per clip (pretraining)
@pytest.fixture(scope="module")
def clip_rows(tmp_path_factory):
    root = tmp_path_factory.mktemp("cliprows")
    path = write_rows(root, [4, 5, 9, 2, 5, 6], codec="vp9")
    return root, path


def _clip_loaders(clip_rows, **kw):
    root, path = clip_rows
    tok = load_tokenizer(root / "vocab.txt")
    cfg = LoaderConfig(size=FRAME, frames_per_clip=2, max_len=8, **kw)
    ann = build_dataset("lfvila_pretrain", path, root / "videos")
    return (DaliLoader(ann, tok, cfg, batch_size=2, device="cpu"),
            build_loader(build_dataset("lfvila_pretrain", path, root / "videos"), tok, cfg, batch_size=2), tok)


def _grey_clips(video: torch.Tensor) -> list[int]:
    """The clip of each frame of a uint8 ``(T, H, W, C)`` video, from its grey level below the frame code."""
    h, w = video.shape[1:3]
    level = video[:, int(0.6 * h) : int(0.9 * h), w // 4 : 3 * w // 4, 0].float().mean((-2, -1))
    return [clip_of_grey(float(v)) for v in level]


@pytest.mark.parametrize("train", [False, True])
def test_clip_rows_take_the_dataloader_paths_window_frames_and_sentences(clip_rows, train):
    dali, torch_loader, tok = _clip_loaders(clip_rows, train=train)
    for epoch in (0, 1):
        dali.set_epoch(epoch)
        torch_loader.set_epoch(epoch)
        starts = []
        for d, t in zip(dali, torch_loader, strict=True):
            assert torch.equal(d["index"], t["index"]) and torch.equal(d["text_ids"], t["text_ids"])
            assert d["meta"] == t["meta"]  # frames, clip_start, clips
            assert d["video"].shape == (2, 8, *FRAME, 3)
            for b, meta in enumerate(d["meta"]):
                start, words = meta["clip_start"], sentence_words(tok, d["text_ids"][b])
                clips = _grey_clips(d["video"][b])[::2]  # one frame per clip position
                assert [w for w in words if w] == [f"clip{k}" for k in sorted(set(clips))]
                assert all(w == f"clip{k}" for w, k in zip(words, clips) if w)  # sentence i <-> clip at position i
                assert clips[0] == start
                starts.append(start)
            if not train:  # eval: the same frames up to the resize kernels
                assert (_norm(d["video"]) - _norm(to_model_input(t, "cpu")["video"])).abs().mean() < 0.1
        assert (set(starts) == {0}) != train


def test_clip_rows_replace_a_corrupt_clip_as_the_dataloader_path(clip_rows, tmp_path):
    root, path = clip_rows
    shutil.copytree(root, tmp_path / "copy")
    bad = clip_file(tmp_path / "copy", 1, 1, codec="vp9")
    bad.write_bytes(b"\x00" * 300)
    dali, torch_loader, _ = _clip_loaders((tmp_path / "copy", tmp_path / "copy" / "rows.jsonl"), train=True,
                                          on_error="replace", max_skip_fraction=1.0)
    d_batches, t_batches = list(dali), list(torch_loader)
    assert [len(b["index"]) for b in d_batches] == [len(b["index"]) for b in t_batches] == [2, 2, 2]
    for d, t in zip(d_batches, t_batches, strict=True):
        assert torch.equal(d["index"], t["index"]) and d["meta"] == t["meta"]
    assert sum("replaced" in m for b in d_batches for m in b["meta"]) == 1 and dali.skips.skipped == 1
