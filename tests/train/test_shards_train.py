"""``data.format: shards`` in the trainer: the training loader is a ``ShardStream`` that takes the sampler's place,
evaluation reads every written sample once over the ranks, ``data.backend: dali`` is refused with its reason, and a
tiny stage-1 run trains two steps and evaluates from shards."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lfvila.config import load_config
from lfvila.data.samplers import EpochSampler
from lfvila.data.shard_map import ShardDataset
from lfvila.data.shard_writer import write_shards
from lfvila.data.shards import ShardStream, load_index
from lfvila.data.synthetic import make_dataset
from train import data as tdata
from train.loop import Trainer

CONFIG = Path(__file__).resolve().parents[2] / "train" / "configs" / "demo_stage1.yaml"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("syn")
    summary = make_dataset(root, videos=10, seed=1, size=(48, 96), min_seconds=6.0, max_seconds=7.0)
    for split in ("train", "val"):
        write_shards(root, root / f"shards-{split}", root / f"{split}.json", "activitynet_captions", shard_samples=2,
                     max_height=48)
    return root, summary


def _args(data, run_dir, *extra: str) -> list[str]:
    root, summary = data
    model = {"stage": 1, "embed_dim": 16,
             "video": {"embed_dim": 8, "depths": [1] * 6, "num_heads": [1, 1, 2, 2, 2, 2]},
             "text": {"vocab_size": summary["vocab_size"], "hidden_size": 16, "num_attention_heads": 2,
                      "intermediate_size": 32}}
    return ["--model.overrides", json.dumps(model), "--data.format", "shards",
            "--data.train", str(root / "shards-train" / "index.json"),
            "--data.val", str(root / "shards-val" / "index.json"), "--data.test", "null",
            "--data.vocab", str(root / "vocab.txt"), "--data.size", "[48, 64]", "--data.backend", "pyav",
            "--data.num_workers", "0", "--data.shard_buffer", "2", "--train.batch_size", "2",
            "--train.max_steps", "2", "--train.ckpt_every", "2", "--train.eval_every", "2", "--eval.test_split",
            "null", "--run.dir", str(run_dir), "--run.progress", "false", "--run.tensorboard", "false", *extra]


def test_loaders_read_shards_and_dali_is_refused(data, tmp_path):
    cfg = load_config(CONFIG, _args(data, tmp_path / "run"))
    tok = tdata.tokenizer(cfg)
    loader, position = tdata.train_loader(cfg, tok, rank=0, world_size=1)
    assert isinstance(position, ShardStream) and position is loader.dataset
    position.set_position(0, 1)
    tdata.set_epoch(loader, 0)
    batches = [b for b in loader if b is not None]
    assert len(batches) == position.batches_per_epoch() - 1 and batches[0]["video"].shape[1:] == (8, 48, 64, 3)
    val = load_index(Path(cfg.data.val))
    seen = [i for r in range(2) for b in tdata.eval_loader(cfg, tok, "val", r, 2) for i in b["index"].tolist()]
    assert sorted(seen) == sorted(i for s in val["shards"] for i in s.indices)  # every written sample once
    with pytest.raises(ValueError, match="dali cannot read data.format shards: DALI's fn.readers.webdataset"):
        tdata.train_loader(load_config(CONFIG, _args(data, tmp_path / "run", "--data.backend", "dali")), tok, 0, 1)
    with pytest.raises(ValueError, match="data.format shards has no annotation dataset"):
        tdata.annotations(cfg, "train")


def test_two_steps_of_stage1_from_shards(data, tmp_path):
    result = Trainer(load_config(CONFIG, _args(data, tmp_path / "run"))).fit()
    assert result["step"] == 2 and not result["preempted"]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any("loss" in r for r in rows) and any("val/t2v_R@1" in r for r in rows)


def test_resume_refuses_a_new_worker_count_with_shards_only():
    """With shards the workers are slots of the stream (which samples the rest of the epoch holds): a resume that
    changes data.num_workers is a change; on the annotation path it stays free."""
    from train.resume import resume_changes

    def tree(fmt, workers):
        return {"data": {"format": fmt, "num_workers": workers, "train": "x"}, "train": {"log_every": 1}}

    assert resume_changes(tree("shards", 2), tree("shards", 4)) == [("data.num_workers", 2, 4)]
    assert resume_changes(tree("lfvila_pretrain", 2), tree("lfvila_pretrain", 4)) == []
    assert resume_changes(tree("shards", 2), tree("shards", 2)) == []


def test_sampler_order_trains_and_resumes_with_any_worker_count(data, tmp_path):
    """``data.shard_order: sampler``: the annotation path's EpochSampler over a ShardDataset, evaluation every written
    sample once; a stage-1 run trains from it; a resume may change data.num_workers (the sampler's order does not
    depend on it), as on the annotation path, while the stream order still refuses it."""
    from train.resume import resume_changes

    cfg = load_config(CONFIG, _args(data, tmp_path / "run", "--data.shard_order", "sampler"))
    tok = tdata.tokenizer(cfg)
    loader, sampler = tdata.train_loader(cfg, tok, rank=0, world_size=1)
    assert isinstance(loader.dataset, ShardDataset) and isinstance(sampler, EpochSampler)
    assert len(loader.dataset) == load_index(Path(cfg.data.train))["annotation_samples"]
    val = load_index(Path(cfg.data.val))
    seen = [i for r in range(2) for b in tdata.eval_loader(cfg, tok, "val", r, 2) for i in b["index"].tolist()]
    assert sorted(seen) == sorted(i for s in val["shards"] for i in s.indices)
    result = Trainer(cfg).fit()
    assert result["step"] == 2 and not result["preempted"]

    def tree(order, workers):
        return {"data": {"format": "shards", "shard_order": order, "num_workers": workers, "train": "x"}}

    assert resume_changes(tree("sampler", 2), tree("sampler", 4)) == []
    assert resume_changes(tree("stream", 2), tree("stream", 4)) == [("data.num_workers", 2, 4)]
    with pytest.raises(ValueError, match="data.shard_order: must be stream or sampler, got 'random'"):
        load_config(CONFIG, _args(data, tmp_path / "run", "--data.shard_order", "random"))
