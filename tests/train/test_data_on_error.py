"""The pretraining configs replace a bad training sample (``data.on_error: replace``) and their evaluation skips
it; fine-tuning configs keep ``raise``; a training epoch resumed mid-way (``EpochSampler.set_position``) gets the
batches, replacements included, of the uninterrupted epoch."""

from __future__ import annotations

from pathlib import Path

import torch

from lfvila.config import load_config
from tests.data._clip_rows import FRAME, clip_file, write_rows
from train import data as tdata

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "train" / "configs"


def test_pretraining_configs_replace_and_their_evaluation_skips():
    for name in ("pretrain_stage1", "pretrain_stage2"):
        cfg = load_config(CONFIGS / f"{name}.yaml")
        assert cfg.data.on_error == "replace"
        assert tdata.loader_config(cfg, train=True).on_error == "replace"
        assert tdata.loader_config(cfg, train=False).on_error == "skip"  # evaluation never replaces
    for name in ("actnet_ret", "didemo_ret", "how2qa", "violin_qa", "demo_stage1"):
        cfg = load_config(CONFIGS / f"{name}.yaml")
        assert tdata.loader_config(cfg, train=True).on_error == cfg.data.on_error == "raise"


def _batches(loader):
    return [(b["index"].tolist(), b["meta"], b["video"]) for b in loader if b is not None]


def test_a_resumed_epoch_gets_the_same_replacements(tmp_path):
    path = write_rows(tmp_path, [5] * 8)
    clip_file(tmp_path, 2, 2).write_bytes(b"\x00" * 100)
    clip_file(tmp_path, 6, 3).write_bytes(b"")
    cfg = load_config(CONFIGS / "pretrain_stage1.yaml", [
        "--data.video_root", str(tmp_path / "videos"), "--data.train", str(path), "--data.val", "null",
        "--data.vocab", str(tmp_path / "vocab.txt"), "--data.size", str(list(FRAME)), "--data.frames_per_clip", "2",
        "--data.max_len", "8", "--data.num_workers", "0", "--data.max_skip_fraction", "1.0",
        "--train.batch_size", "2"])
    tok = tdata.tokenizer(cfg)
    loader, sampler = tdata.train_loader(cfg, tok, rank=0, world_size=1)
    sampler.set_position(1)
    tdata.set_epoch(loader, 1)
    full = _batches(loader)
    assert [len(i) for i, *_ in full] == [2] * 4
    assert sorted(m["replaced"] for _, meta, _ in full for m in meta if "replaced" in m) == [2, 6]
    resumed_loader, resumed_sampler = tdata.train_loader(cfg, tok, rank=0, world_size=1)
    resumed_sampler.set_position(1, 2)
    tdata.set_epoch(resumed_loader, 1)
    resumed = _batches(resumed_loader)
    assert len(resumed) == 2 and any("replaced" in m for _, meta, _ in resumed for m in meta)
    for (i0, m0, v0), (i1, m1, v1) in zip(full[2:], resumed):
        assert i0 == i1 and m0 == m1 and torch.equal(v0, v1)
