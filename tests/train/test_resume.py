"""Resuming is exact: a stage-1 run (VPC + MTC, dropout and drop path on) killed with SIGKILL right after a mid-epoch
checkpoint and restarted with ``--run.resume auto`` logs bitwise the losses and learning rates of the uninterrupted
run, with 0 and with 2 DataLoader workers; and a resume whose config changes the schedule is refused (or, with
``run.resume_changes: keep``, allowed with a warning naming the keys).

The killed and the resumed runs are separate processes running ``train.pretrain.main`` (what ``python -m
train.pretrain`` runs): SIGKILL gives the program no chance to clean up, so only what is on disk carries over, which
is what a preempted job gets, and the resumed process starts with nothing of the killed one. They are forked from a
multiprocessing forkserver that has imported the training code once (an interpreter start plus the imports cost ~6 s
of CPU, most of this file's time otherwise); forked before any training ran, each child is as fresh as a new
interpreter. The uninterrupted reference runs in this process; the children use its thread count, on which the CPU
float results depend. Sizes are tiny (a shrunk lfvila-tiny, 12 training videos = 3 batches of 4 per epoch, 8 steps,
a checkpoint every 4) so that the file runs in well under a minute on two cores. The step-4 checkpoint is mid-epoch
(epoch 1 after its first batch, two batches left), and the resumed part crosses an epoch boundary. No evaluation: it
runs at the same steps in both runs, so it could not tell them apart (tests/data/test_loader.py checks that
iterating a loader leaves the global RNG alone)."""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import signal
import time
from pathlib import Path

import pytest
import torch

from lfvila.config import load_config
from lfvila.data.synthetic import make_dataset
from train import checkpoint as ckpt
from train.loop import Trainer

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "train" / "configs" / "demo_stage1.yaml"
TERMS = ("loss", "vpc", "mtc", "lr")
MAX_STEPS, CKPT_EVERY, BATCHES_PER_EPOCH = 8, 4, 3


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("syn")
    summary = make_dataset(root, videos=16, seed=3, size=(48, 96), min_seconds=6.0, max_seconds=8.0)
    assert summary["splits"]["train"] == 4 * BATCHES_PER_EPOCH
    return root, summary


def _args(data, run_dir, workers: int, *extra: str) -> list[str]:
    """Overrides of train/configs/demo_stage1.yaml for a tiny, fast stage-1 run. Dropout and drop path are switched
    on (the demo config has them off) so that the global torch RNG is consumed by the model as well as by MTC."""
    root, summary = data
    model = {"stage": 1, "embed_dim": 32,
             "video": {"embed_dim": 8, "depths": [1] * 6, "num_heads": [1, 1, 2, 2, 2, 2], "drop_path_rate": 0.1},
             "text": {"vocab_size": summary["vocab_size"], "hidden_size": 32, "num_attention_heads": 2,
                      "intermediate_size": 64, "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1}}
    return ["--model.overrides", json.dumps(model),
            "--data.video_root", str(root), "--data.train", str(root / "train.json"),
            "--data.val", "null", "--data.test", "null",
            "--data.vocab", str(root / "vocab.txt"), "--data.backend", "pyav", "--data.num_workers", str(workers),
            "--train.batch_size", "4", "--train.max_steps", str(MAX_STEPS), "--train.ckpt_every", str(CKPT_EVERY),
            "--train.log_every", "1", "--eval.test_split", "null",
            "--run.dir", str(run_dir), "--run.progress", "false", "--run.tensorboard", "false", *extra]


def _metrics(run_dir: Path) -> dict[int, tuple]:
    """``{step: (loss, vpc, mtc, lr)}`` from metrics.jsonl; for a step logged twice (by the killed process after its
    last checkpoint, then by the resumed one) the later row, the resumed run's."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: tuple(r[k] for k in TERMS) for r in rows if "loss" in r}


def _train(argv: list[str], log: str, threads: int) -> None:
    """The body of a training process: ``python -m train.pretrain ARGV`` with its output appended to ``log``."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    # a forkserver child inherits the forkserver start method; back to the platform default, as under `python -m`, so
    # that the DataLoader workers are forked children of this process (and die with it when it is SIGKILLed, where a
    # forkserver of their own would outlive it with them)
    multiprocessing.set_start_method(None, force=True)
    torch.set_num_threads(threads)
    from train.pretrain import main

    main(argv)


def _launch(args: list[str], log: Path) -> multiprocessing.Process:
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["train.pretrain", "torch._dynamo", "torch.utils.flop_counter"])  # until it starts
    proc = ctx.Process(target=_train, args=(["--config", str(CONFIG), *args], str(log), torch.get_num_threads()))
    proc.start()
    return proc


def _stop(proc: multiprocessing.Process) -> None:
    if proc.is_alive():
        proc.kill()
    proc.join()


def _run(args: list[str], log: Path) -> None:
    proc = _launch(args, log)
    try:
        proc.join(timeout=300)
        assert proc.exitcode == 0, log.read_text()[-3000:]
    finally:
        _stop(proc)


@pytest.fixture(scope="module")
def uninterrupted(data, tmp_path_factory):
    """The reference run, in this process, with 0 workers: the losses do not depend on the worker count (the runs
    with 2 workers check that too, on their steps before the kill)."""
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    Trainer(load_config(CONFIG, _args(data, run_dir, 0))).fit()
    metrics = _metrics(run_dir)
    assert sorted(metrics) == list(range(1, MAX_STEPS + 1))
    return metrics


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
@pytest.mark.parametrize("workers", [0, 2])
def test_sigkill_mid_epoch_then_resume_is_bitwise_exact(data, uninterrupted, tmp_path, workers):
    run_dir, log = tmp_path / "run", tmp_path / "log.txt"
    args = _args(data, run_dir, workers)
    proc = _launch(args, log)
    try:
        deadline = time.monotonic() + 300
        while (found := ckpt.latest_checkpoint(run_dir)) is None:  # complete checkpoints only (COMPLETE, renamed)
            assert proc.is_alive(), f"exited early ({proc.exitcode}): {log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, "no checkpoint within 300 s"
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(timeout=60)
        assert proc.exitcode == -signal.SIGKILL, "the run finished before it could be killed"
    finally:
        _stop(proc)
    assert ckpt.latest_checkpoint(run_dir) == found
    state = json.loads((found / "state.json").read_text())
    # mid-epoch: epoch 1 after its first batch, two of its three batches still to come
    assert (state["step"], state["epoch"], state["batch"]) == (CKPT_EVERY, 1, 1), state

    _run([*args, "--run.resume", "auto"], log)
    assert f"resumed from {found} at step {state['step']}" in log.read_text()
    got = _metrics(run_dir)
    assert sorted(got) == list(range(1, MAX_STEPS + 1))
    diff = {step: (got[step], uninterrupted[step]) for step in got if got[step] != uninterrupted[step]}
    assert not diff, f"resumed at step {state['step']}: steps whose {TERMS} differ (resumed, uninterrupted): {diff}"


# ------------------------------------------------------------------------------------------------ config changes


def _trainer_args(data, run_dir, *extra: str) -> list[str]:
    return _args(data, run_dir, 0, "--train.max_steps", "1", *extra)


@pytest.fixture(scope="module")
def one_step(data, tmp_path_factory):
    """A run directory holding the checkpoint of one in-process training step."""
    run_dir = tmp_path_factory.mktemp("one_step")
    Trainer(load_config(CONFIG, _trainer_args(data, run_dir))).fit()
    assert ckpt.latest_checkpoint(run_dir).name == "step_00000001"
    return run_dir


def test_resume_refuses_a_changed_schedule_naming_each_key(data, one_step):
    written = (one_step / "config.yaml").read_text()
    with pytest.raises(ValueError) as info:
        Trainer(load_config(CONFIG, _trainer_args(data, one_step, "--train.max_steps", "3", "--train.lr", "2e-4",
                                                  "--train.batch_size", "2")))
    message = str(info.value)
    for key, old, new in (("train.max_steps", "1", "3"), ("train.lr", "0.0001", "0.0002"),
                          ("train.batch_size", "4", "2")):
        assert f"{key}: {old} -> {new}" in message, message
    assert "run.resume_changes" in message and "log_every" not in message
    assert (one_step / "config.yaml").read_text() == written  # the refused config is not recorded as the run's


def test_resume_allows_free_keys_and_keep_warns(data, one_step, caplog):
    # keys that cannot change the losses (logging, checkpointing, evaluation, the worker count) may change freely
    free = Trainer(load_config(CONFIG, _trainer_args(data, one_step, "--train.log_every", "7", "--train.keep_last",
                                                     "5", "--data.num_workers", "2", "--eval.batch_size", "3")))
    assert free.state["step"] == 1
    with caplog.at_level(logging.WARNING, logger="train.loop"):
        kept = Trainer(load_config(CONFIG, _trainer_args(data, one_step, "--train.max_steps", "3",
                                                         "--run.resume_changes", "keep")))
    # what the warning says: the loaded scheduler follows the checkpoint's 1-step schedule, not the new 3 steps
    assert kept.state["step"] == 1 and kept.total_steps == 3 and kept.scheduler.lr_lambdas[0].total_steps == 1
    warning = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "train.max_steps: 1 -> 3" in warning and "kept" in warning, warning
