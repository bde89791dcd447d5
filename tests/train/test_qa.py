"""QA fine-tuning in the training loop on lfvila-tiny with synthetic QA data: How2QA-style multiple choice (CE + span
loss), VIOLIN- and ActivityNet-QA-style classification run a few steps through ``python -m train.finetune_qa``, the
loss falls on a fixed batch, evaluation counts every example once and agrees with a per-example hand count, the
evaluate CLI reproduces a run's test accuracy from its best checkpoint, and data / model / task mismatches are
refused naming the key."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

from lfvila.config import load_config
from lfvila.data.loader import collate
from lfvila.data.synthetic import make_dataset
from lfvila.data.synthetic_qa import ANSWERS, make_qa
from lfvila.eval.qa import qa_metrics, qa_predictions
from train import data as tdata
from train import evaluate as evaluate_cli
from train import finetune_qa
from train.loop import Trainer
from train.tasks import check_qa_data, evaluate_qa

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "..", "train", "configs")
# task -> (config, tiny model, M segments, L tokens, model overrides); M * L stays within the tiny BERT's 64 positions
TASKS = {
    "how2qa": ("how2qa.yaml", "lfvila-tiny-multichoice", 6, 10, {}),
    "violin": ("violin_qa.yaml", "lfvila-tiny-classification", 4, 12, {"num_classes": 2}),
    "actnet_qa": ("actnet_qa.yaml", "lfvila-tiny-classification", 1, 12, {"num_classes": len(ANSWERS)}),
}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """6 videos (4 train, 1 val, 1 test); ``qa1``: one question per video (4 how2qa training rows: one batch),
    ``qa``: a question per event (several per video)."""
    root = tmp_path_factory.mktemp("synqa")
    summary = make_dataset(root, videos=6, seed=5, size=(48, 96), min_seconds=8.0, max_seconds=12.0)
    make_qa(root, root / "qa1", seed=0, questions_per_video=1)
    make_qa(root, root / "qa", seed=0)
    return root, summary


def _args(data, run_dir, task, qa="qa1", *extra):
    root, summary = data
    _, model, m, length, overrides = TASKS[task]
    # from scratch, the tiny model needs the demo configs' settings: no dropout, a wider BERT init
    overrides = {**overrides, "video": {"drop_path_rate": 0.0},
                 "text": {"vocab_size": summary["vocab_size"], "hidden_dropout_prob": 0.0,
                          "attention_probs_dropout_prob": 0.0, "initializer_range": 0.1}}
    return ["--model.name", model, "--model.init", "[]", "--model.overrides", json.dumps(overrides),
            "--data.video_root", str(root / "videos"), "--data.vocab", str(root / "vocab.txt"),
            *(a for s in ("train", "val", "test") for a in (f"--data.{s}", str(root / qa / f"{task}_{s}.jsonl"))),
            "--data.format_kwargs", "{}", "--data.size", "[64, 96]", "--data.frames_per_clip", "2",
            "--data.sentences", str(m), "--data.max_len", str(length), "--data.num_workers", "0",
            "--data.flip", "false",  # the captions name left and right
            "--train.batch_size", "4", "--train.log_every", "1", "--train.max_steps", "3", "--train.eval_every", "1000",
            "--train.ckpt_every", "1000", "--eval.test_split", "test", "--run.dir", str(run_dir),
            "--run.progress", "false", "--run.tensorboard", "false", *extra]


def _cfg(data, run_dir, task, qa="qa1", *extra):
    return load_config(os.path.join(CONFIGS, TASKS[task][0]), _args(data, run_dir, task, qa, *extra))


def _rows(data, task, split, qa="qa1"):
    return len((data[0] / qa / f"{task}_{split}.jsonl").read_text().splitlines())


def _metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def how2qa_run(data, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("how2qa_run")
    argv = ["--config", os.path.join(CONFIGS, "how2qa.yaml"), *_args(data, run_dir, "how2qa", "qa")]
    return run_dir, argv, finetune_qa.main(argv)


@pytest.mark.parametrize("task", ["how2qa", "violin", "actnet_qa"])
def test_every_qa_task_runs_a_few_steps(data, tmp_path, how2qa_run, task):
    if task == "how2qa":
        run_dir, _, result = how2qa_run
    else:
        run_dir = tmp_path
        result = finetune_qa.main(["--config", os.path.join(CONFIGS, TASKS[task][0]), *_args(data, run_dir, task,
                                                                                               "qa")])
    assert result["step"] == 3 and not result["preempted"] and result["bad_steps"] == 0
    rows = _metrics(run_dir)
    terms = ("loss", "ce", "span") if task == "how2qa" else ("loss",)
    for term in terms:
        assert [r["step"] for r in rows if term in r] == [1, 2, 3], term
    if task == "how2qa":  # loss = ce + span_weight (1.0) * span
        for r in rows:
            if "loss" in r:
                assert r["loss"] == pytest.approx(r["ce"] + r["span"], rel=1e-5)
    vals = [r for r in rows if "val/acc" in r]
    assert [r["step"] for r in vals] == [0, 3]  # the official configs' eval.at_start, then the last step
    assert all(v["val/n"] == _rows(data, task, "val", "qa") for v in vals)
    assert result["best"] == max(v["val/acc"] for v in vals)
    assert result["test"]["n"] == _rows(data, task, "test", "qa") and 0 <= result["test"]["acc"] <= 100
    assert (run_dir / "best" / "model.safetensors").exists() and (run_dir / "result.json").exists()


@pytest.mark.parametrize("task", ["how2qa", "actnet_qa"])
def test_loss_decreases_on_a_fixed_batch(data, tmp_path, task):
    # the official lr 5e-5, held constant
    trainer = Trainer(_cfg(data, tmp_path, task, "qa1", "--train.schedule", "constant", "--train.warmup_steps", "0"))
    batch = tdata.to_device(next(iter(trainer.loader)), trainer.device)
    assert batch["video"].shape[0] == 4
    trainer.model.train()
    history = [{k: float(v) for k, v in trainer._step([batch])[0].items()} for _ in range(16)]
    first, last = history[0], history[-1]
    if task == "how2qa":  # the choice CE starts at ln 4 and the fixed batch gets memorised
        assert first["ce"] == pytest.approx(torch.log(torch.tensor(4.0)).item(), abs=0.1)
        assert last["ce"] < 0.3 * first["ce"], history
    assert last["loss"] < 0.5 * first["loss"], history


def test_evaluate_counts_every_example_once_and_agrees_with_a_hand_count(data, tmp_path):
    # every event of the 4 training videos, in batches of 3 (the last one short)
    cfg = _cfg(data, tmp_path, "how2qa", "qa", "--eval.batch_size", "3")
    trainer = Trainer(cfg)
    model = trainer.raw_model
    metrics = evaluate_qa(model, cfg, trainer.tok, "train", trainer.env)
    dataset = tdata.eval_loader(cfg, trainer.tok, "train", 0, 1).dataset
    n = _rows(data, "how2qa", "train", "qa")
    assert len(dataset) == n > 3 and metrics["n"] == n
    correct = 0
    model.eval()
    with torch.no_grad():
        for i in range(n):  # one example at a time, by hand
            batch = tdata.to_device(collate([dataset[i]]), trainer.device)
            logits = model(batch["video"], batch["text_ids"], batch["text_mask"], real=batch["sentence_real"])["logits"]
            assert logits.shape == (1, 4)
            correct += int(logits.argmax(-1).item() == dataset.annotations[i]["answer"])
    assert metrics["acc"] == pytest.approx(100.0 * correct / n)
    assert trainer.evaluate("train") == metrics  # the Trainer dispatches QA tasks to evaluate_qa
    # a rank left without batches (or with only all-skipped ones) still joins the gather, with nothing to count
    preds, labels, index = qa_predictions(model, [None], "answer", device=trainer.device)
    assert preds.shape == labels.shape == index.shape == (0,)
    empty = qa_metrics(preds, labels, index=index)
    assert empty["n"] == 0 and math.isnan(empty["acc"])


def test_evaluate_cli_reproduces_the_test_accuracy_of_the_best_checkpoint(how2qa_run, tmp_path, capsys):
    run_dir, argv, result = how2qa_run
    out = tmp_path / "metrics.json"
    metrics = evaluate_cli.main([*argv, "--checkpoint", str(run_dir / "best"), "--split", "test", "--out", str(out)])
    assert metrics == result["test"]
    printed = json.loads(out.read_text())
    assert printed["task"] == "multichoice" and printed["acc"] == result["test"]["acc"] and printed["split"] == "test"
    stdout = capsys.readouterr().out
    assert json.loads(stdout[stdout.index('{\n  "checkpoint"'):]) == printed


def test_mismatches_are_refused_naming_the_key(data, tmp_path):
    with pytest.raises(SystemExit) as exit_info:  # the QA entry point runs QA tasks only
        finetune_qa.main(["--config", os.path.join(CONFIGS, "actnet_ret.yaml")])
    assert exit_info.value.code == 2
    with pytest.raises(ValueError, match=r"^eval\.select: QA tasks report 'acc'"):
        Trainer(_cfg(data, tmp_path / "a", "how2qa", "qa1", "--eval.select", "t2v_R@1"))
    with pytest.raises(ValueError, match=r"train\.task 'classification' does not fit model\.name"):
        Trainer(_cfg(data, tmp_path / "b", "violin", "qa1", "--model.name", "lfvila-tiny-multichoice"))
    root = data[0]
    with pytest.raises(ValueError, match=r"^data\.train: train\.task 'multichoice' needs multichoice samples, but "
                                         r"data\.format 'lfvila_violin' gives classification samples"):
        Trainer(_cfg(data, tmp_path / "c", "how2qa", "qa1", "--data.format", "lfvila_violin",
                     "--data.train", str(root / "qa1" / "violin_train.jsonl")))
    with pytest.raises(ValueError, match=r"^data\.train: \d+ labels outside the model's 5 classes.*num_classes"):
        Trainer(_cfg(data, tmp_path / "d", "actnet_qa", "qa1", "--model.overrides",
                     json.dumps({"num_classes": 5, "text": {"vocab_size": data[1]["vocab_size"]}})))

    class ParagraphOnlyLoader:  # a loader without QA modes, such as the DALI one
        annotations = None

    with pytest.raises(ValueError, match=r"^data\.backend: ParagraphOnlyLoader makes paragraph batches only"):
        check_qa_data("classification", ParagraphOnlyLoader(), None, "train")
    check_qa_data("retrieval", ParagraphOnlyLoader(), None, "train")  # paragraph tasks are not its concern
