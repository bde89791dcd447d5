"""The DALI loading path on DALI's CPU backend (VP9): same frames, layout and normalisation as the DataLoader path."""

from __future__ import annotations

import json

import pytest
import torch

from lfvila.data import decode as decoding
from lfvila.data.dali_loader import DaliLoader
from lfvila.data.datasets import build_dataset
from lfvila.data.loader import LoaderConfig, build_loader, to_model_input
from lfvila.data.synthetic import make_dataset
from lfvila.data.text import load_tokenizer

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


def _ann(out, name, **kw):
    return build_dataset("activitynet_captions", out / name, out, **kw)


def test_eval_batches_match_the_dataloader_path(synthetic):
    tok = load_tokenizer(synthetic / "vocab.txt")
    cfg = LoaderConfig(size=SIZE, sampling="clips")
    dali = list(DaliLoader(_ann(synthetic, "vp9.json"), tok, cfg, batch_size=2, device="cpu"))
    torch_batches = [to_model_input(b, "cpu") for b in build_loader(_ann(synthetic, "vp9.json"), tok, cfg, 2)]
    for d, t in zip(dali, torch_batches, strict=True):
        assert d["video"].shape == t["video"].shape == (d["video"].shape[0], 3, 32, *SIZE)
        assert [m["frames"] for m in d["meta"]] == [m["frames"] for m in t["meta"]]
        assert torch.equal(d["text_ids"], t["text_ids"]) and torch.equal(d["index"], t["index"])
        # different resize kernels (DALI vs torch antialiased bilinear): close, not equal, in normalised units
        assert (d["video"] - t["video"]).abs().mean() < 0.1


def test_train_batches_are_seeded(synthetic):
    tok = load_tokenizer(synthetic / "vocab.txt")
    cfg = LoaderConfig(size=SIZE, sampling="clips", train=True, seed=5)
    runs = [next(iter(DaliLoader(_ann(synthetic, "vp9.json"), tok, cfg, batch_size=2, device="cpu"))) for _ in "ab"]
    assert runs[0]["video"].shape == (2, 3, 32, *SIZE)
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
