"""The training loop on the DALI path (``data.backend: dali``), on DALI's CPU backend with VP9 videos: batches arrive
on the device as uint8 frames (the model normalises them) and pass the prefetcher untouched, every training sample is
served from the loop's resumable sampler, and a backend that cannot run is refused naming ``data.backend``."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

from lfvila.config import load_config
from lfvila.data import decode as decoding
from lfvila.data.synthetic import make_dataset
from train import data as tdata
from train.loop import Trainer

pytest.importorskip("nvidia.dali")
CONFIGS = os.path.join(os.path.dirname(__file__), "..", "..", "train", "configs")


@pytest.fixture(scope="module")
def vp9(tmp_path_factory):
    root = tmp_path_factory.mktemp("vp9")
    summary = make_dataset(root, videos=12, seed=5, min_seconds=8.0, max_seconds=10.0, vp9_every=1)  # all VP9
    return root, summary


def _cfg(vp9, run_dir, *extra):
    root, summary = vp9
    args = ["--data.video_root", str(root), "--data.train", str(root / "train.json"),
            "--data.val", str(root / "val.json"), "--data.test", str(root / "test.json"),
            "--data.vocab", str(root / "vocab.txt"), "--data.num_workers", "1", "--data.backend", "dali",
            "--train.batch_size", "4", "--train.log_every", "1", "--train.ckpt_every", "1000",
            "--run.dir", str(run_dir), "--run.progress", "false", "--run.tensorboard", "false", "--run.device", "cpu",
            "--train.max_steps", "3", "--eval.split", "val", "--eval.test_split", "null", "--train.eval_every", "1000",
            "--model.overrides", json.dumps({"stage": 1, "text": {"vocab_size": summary["vocab_size"]}})]
    return load_config(os.path.join(CONFIGS, "demo_stage1.yaml"), args + list(extra))


def test_stage1_trains_on_dali_batches(vp9, tmp_path):
    cfg = _cfg(vp9, tmp_path)
    trainer = Trainer(cfg)
    assert type(trainer.loader).__name__ == "DaliLoader" and trainer.loader.sampler is trainer.sampler
    seen = []
    for batch in tdata.Prefetcher(trainer.loader, torch.device("cpu")):
        assert batch["video"].dtype == torch.uint8 and batch["video"].shape[1:] == (8, 64, 96, 3)
        assert batch["video"].float().std() > 10  # real frames, not a constant
        seen += batch["index"].tolist()
    per_epoch = trainer.sampler.batches_per_epoch() * cfg.train.batch_size
    assert len(seen) == per_epoch and sorted(seen) == sorted(set(seen))  # the sampler's epoch, each sample once
    result = trainer.fit()
    assert result["step"] == 3 and result["bad_steps"] == 0
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)


def test_backend_selection_and_refusal(vp9, tmp_path, monkeypatch):
    cpu = torch.device("cpu")
    assert tdata.use_dali(_cfg(vp9, tmp_path), cpu)
    assert not tdata.use_dali(_cfg(vp9, tmp_path, "--data.backend", "auto"), cpu)  # auto: DALI on CUDA only
    assert not tdata.use_dali(_cfg(vp9, tmp_path, "--data.backend", "pyav"), cpu)
    monkeypatch.setattr(decoding.DaliDecoder, "available", classmethod(lambda cls, device: "no DALI here"))
    with pytest.raises(ValueError, match="data.backend: dali cannot run on cpu: no DALI here"):
        Trainer(_cfg(vp9, tmp_path))
    assert not tdata.use_dali(_cfg(vp9, tmp_path, "--data.backend", "auto"), torch.device("cuda"))
