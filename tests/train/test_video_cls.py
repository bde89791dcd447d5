"""Video classification (``train.task: video_classification``) in the training loop on lfvila-tiny with synthetic
data: a few steps through ``python -m train.finetune_cls`` without any text (no ``data.vocab``), accuracy evaluated
every example once and equal to a per-example hand count, the evaluate CLI on the best checkpoint, the official
configs, and the mismatches refused naming the key."""

from __future__ import annotations

import json
import os

import pytest
import torch

from lfvila.config import load_config
from lfvila.data.loader import collate
from lfvila.data.synthetic import make_dataset
from lfvila.data.synthetic_cls import make_cls
from train import data as tdata
from train import evaluate as evaluate_cli
from train import finetune_cls
from train.loop import Trainer
from train.tasks import evaluate_qa, get_task

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "..", "train", "configs")
DEMO = os.path.join(CONFIGS, "demo_video_cls.yaml")
OFFICIAL = {"coin_cls.yaml": (180, 200), "lvu_relationship_cls.yaml": (4, 5), "lvu_scene_cls.yaml": (6, 50),
            "lvu_wayspeaking_cls.yaml": (5, 10)}  # config -> (classes, eval_every)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """8 videos (6 train, 1 val, 1 test) and their classification files."""
    root = tmp_path_factory.mktemp("syncls")
    make_dataset(root, videos=8, seed=3, size=(48, 96), min_seconds=8.0, max_seconds=12.0)
    make_cls(root)
    return root


def _args(root, run_dir, *extra):
    return ["--data.video_root", str(root / "videos"),
            *(a for s in ("train", "val", "test") for a in (f"--data.{s}", str(root / "cls" / f"{s}.jsonl"))),
            "--data.num_workers", "0", "--train.batch_size", "2", "--train.log_every", "1", "--train.max_steps", "3",
            "--train.eval_every", "2", "--train.ckpt_every", "1000", "--run.dir", str(run_dir),
            "--run.progress", "false", "--run.tensorboard", "false", *extra]


@pytest.fixture(scope="module")
def run(data, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("cls_run")
    argv = ["--config", DEMO, *_args(data, run_dir)]
    return run_dir, argv, finetune_cls.main(argv)


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_few_steps_with_accuracy_evaluation(run):
    run_dir, _, result = run
    assert result["step"] == 3 and not result["preempted"] and result["bad_steps"] == 0
    rows = _rows(run_dir / "metrics.jsonl")
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 3] and all(r["loss"] > 0 for r in train_rows)
    # tokens: video patches only (2 clips x 8 frames x (64 / 8) x (96 / 8) patches), no text
    assert all(r["tokens_per_s"] * r["step_time_s"] == pytest.approx(2 * 8 * 8 * 12) for r in train_rows)
    val = [r for r in rows if "val/acc" in r]
    assert [r["step"] for r in val] == [2, 3] and all(r["val/n"] == 1 for r in val)
    assert result["best"] == max(r["val/acc"] for r in val)
    assert result["test"]["n"] == 1 and result["test"]["acc"] in (0.0, 100.0)
    assert (run_dir / "best" / "model.safetensors").exists() and (run_dir / "result.json").exists()
    config = json.loads((run_dir / "best" / "config.json").read_text())
    assert config["class"] == "LFVILAForVideoClassification" and config["config"]["num_classes"] == 9


def test_evaluation_counts_every_example_once_and_agrees_with_a_hand_count(data, tmp_path):
    cfg = load_config(DEMO, _args(data, tmp_path, "--eval.batch_size", "4"))  # 6 train videos: batches 4 + 2
    trainer = Trainer(cfg)
    assert trainer.tok is None and get_task("video_classification").text is False
    model = trainer.raw_model
    metrics = evaluate_qa(model, cfg, None, "train", trainer.env)
    dataset = tdata.eval_loader(cfg, None, "train", 0, 1).dataset
    assert metrics["n"] == len(dataset) == 6
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(len(dataset)):
            batch = tdata.to_device(collate([dataset[i]]), trainer.device)
            correct += int(model(batch["video"])["logits"].argmax(-1).item() == dataset.annotations[i]["label"])
    assert metrics["acc"] == pytest.approx(100.0 * correct / 6)
    assert trainer.evaluate("train") == metrics


def test_loss_decreases_on_a_fixed_batch(data, tmp_path):
    cfg = load_config(DEMO, _args(data, tmp_path, "--train.schedule", "constant", "--train.warmup_steps", "0",
                                  "--train.batch_size", "4"))
    trainer = Trainer(cfg)
    batch = tdata.to_device(next(iter(trainer.loader)), trainer.device)
    assert set(batch) == {"video", "label", "index", "meta"}
    trainer.model.train()
    history = [float(trainer._step([batch])[0]["loss"]) for _ in range(10)]
    # CE over 9 classes starts near ln 9; the logits of an L2-normed feature move slowly at lr 1e-4
    assert history[0] == pytest.approx(torch.log(torch.tensor(9.0)).item(), abs=0.3)
    assert history[-1] == min(history) and history[-1] < history[0] - 0.1, history


def test_evaluate_cli_reproduces_the_test_accuracy(run, tmp_path):
    run_dir, argv, result = run
    out = tmp_path / "metrics.json"
    metrics = evaluate_cli.main([*argv, "--checkpoint", str(run_dir / "best"), "--split", "test", "--out", str(out)])
    assert metrics == result["test"]
    assert json.loads(out.read_text())["task"] == "video_classification"


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_official_configs(name):
    cfg = load_config(os.path.join(CONFIGS, name), [])
    classes, eval_every = OFFICIAL[name]
    t = cfg.train
    assert cfg.model.name == "lfvila-base-video-classification"
    assert (cfg.model.overrides["num_classes"], cfg.data.format_kwargs["num_classes"], t.eval_every) == (
        classes, classes, eval_every)
    assert (t.task, t.epochs, t.batch_size, t.lr, tuple(t.betas), t.weight_decay, t.schedule, t.warmup_epochs) == (
        "video_classification", 500, 16, 5e-5, (0.9, 0.98), 0.05, "linear", 1.0)
    assert (cfg.data.format, cfg.data.clips * cfg.data.frames_per_clip, tuple(cfg.data.size)) == (
        "lfvila_video_cls", 32, (192, 320))
    assert [(s.kind, s.path) for s in cfg.model.init] == [("pretraining", "pretrained/lfvila_stage1.bin")]
    assert cfg.eval.select == "acc" and cfg.data.vocab == ""


def test_mismatches_are_refused_naming_the_key(data, tmp_path):
    with pytest.raises(SystemExit) as exit_info:  # the entry point runs video classification only
        finetune_cls.main(["--config", os.path.join(CONFIGS, "how2qa.yaml")])
    assert exit_info.value.code == 2
    with pytest.raises(ValueError, match=r"^eval\.select: train\.task 'video_classification' reports 'acc'"):
        Trainer(load_config(DEMO, _args(data, tmp_path / "a", "--eval.select", "t2v_R@1")))
    with pytest.raises(ValueError, match=r"train\.task 'video_classification' does not fit model\.name"):
        Trainer(load_config(DEMO, _args(data, tmp_path / "b", "--model.name", "lfvila-tiny-classification",
                                        "--model.overrides", "{}", "--data.max_len", "8")))  # text shapes that fit
    cfg = load_config(DEMO, _args(data, tmp_path / "c", "--model.overrides", '{"num_classes": 2}'))
    cfg.data.format_kwargs = {}  # the format's own check (num_classes 9) would refuse the rows first
    with pytest.raises(ValueError, match=r"^data\.train: \d+ labels outside the model's 2 classes.*num_classes"):
        Trainer(cfg)
    cfg = load_config(DEMO, _args(data, tmp_path / "d", "--data.format", "activitynet_captions", "--data.train",
                                  str(data / "train.json"), "--data.video_root", str(data)))
    cfg.data.format_kwargs = {}
    with pytest.raises(ValueError, match=r"^data\.train: train\.task 'video_classification' needs video samples, "
                                         r"but data\.format 'activitynet_captions' gives paragraph samples"):
        Trainer(cfg)
