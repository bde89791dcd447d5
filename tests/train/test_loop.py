"""The training loop on lfvila-tiny with real synthetic videos: every pre-training / retrieval task runs, the loss goes
down, resuming reproduces the uninterrupted run, SIGTERM checkpoints and stops, non-finite steps are skipped and
counted, DDP on two gloo processes equals one process on the whole batch, and config errors name the key."""

from __future__ import annotations

import json
import math
import os
import signal
import socket

import pytest
import torch
import torch.multiprocessing as mp

from lfvila.config import ConfigError, load_config
from lfvila.data.synthetic import make_dataset
from train import checkpoint as ckpt
from train.loop import Trainer

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "..", "train", "configs")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("syn")
    summary = make_dataset(root, videos=16, seed=3, min_seconds=8.0, max_seconds=12.0)
    return root, summary


def _cfg(data, run_dir, name="demo_stage1.yaml", *extra):
    root, summary = data
    args = ["--data.video_root", str(root), "--data.train", str(root / "train.json"),
            "--data.val", str(root / "val.json"), "--data.test", str(root / "test.json"),
            "--data.vocab", str(root / "vocab.txt"), "--data.num_workers", "0",
            "--train.batch_size", "4", "--train.log_every", "1", "--train.ckpt_every", "1000",
            "--run.dir", str(run_dir), "--run.progress", "false", "--run.tensorboard", "false",
            "--train.max_steps", "4", "--eval.split", "val", "--eval.test_split", "null",
            "--train.eval_every", "1000"]
    overrides = {"text": {"vocab_size": summary["vocab_size"]}}
    if name == "demo_stage1.yaml":
        overrides["stage"] = 1
    args += ["--model.overrides", json.dumps(overrides)]
    return load_config(os.path.join(CONFIGS, name), args + list(extra))


def _losses(run_dir, key="loss"):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r[key] for r in rows if key in r}


@pytest.mark.parametrize("task", ["stage1", "stage2", "retrieval"])
def test_every_task_runs_a_few_steps(data, tmp_path, task):
    if task == "retrieval":
        cfg = _cfg(data, tmp_path, "demo_retrieval.yaml", "--eval.test_split", "test", "--train.eval_every", "2")
    elif task == "stage2":
        cfg = _cfg(data, tmp_path, "demo_stage1.yaml", "--train.task", "stage2",
                   "--model.overrides", json.dumps({"stage": 2, "text": {"vocab_size": data[1]["vocab_size"]}}),
                   "--train.frozen", '["^video_encoder\\\\.", "^sent_embedding\\\\."]', "--train.exclude", "[pooler]")
    else:
        cfg = _cfg(data, tmp_path)
    result = Trainer(cfg).fit()
    assert result["step"] == 4 and not result["preempted"] and result["bad_steps"] == 0
    losses = _losses(tmp_path)
    assert sorted(losses) == [1, 2, 3, 4] and all(math.isfinite(v) for v in losses.values())
    terms = {"stage1": ("vpc", "mtc"), "stage2": ("mlm", "vtm"), "retrieval": ("vpc",)}[task]
    for term in terms:
        assert _losses(tmp_path, term)
    assert ckpt.latest_checkpoint(tmp_path) is not None
    assert (tmp_path / "config.yaml").exists() and (tmp_path / "result.json").exists()
    if task == "retrieval":
        assert (tmp_path / "best" / "model.safetensors").exists()
        assert result["test"]["t2v_n"] == data[1]["splits"]["test"]
        assert 0 <= result["test"]["t2v_R@1"] <= 100


@pytest.fixture(scope="module")
def four(tmp_path_factory):
    """6 videos: 4 in the train split, i.e. one batch of 4 per epoch."""
    root = tmp_path_factory.mktemp("syn4")
    return root, make_dataset(root, videos=6, seed=5, min_seconds=8.0, max_seconds=12.0)


def test_loss_decreases(four, tmp_path):
    # the same 4 videos every step (augmented differently): the contrastive loss must fall well below chance
    # (2 ln 4 = 2.77); the demo configs' from-scratch settings (no dropout, BERT init std 0.1) apply
    assert four[1]["splits"]["train"] == 4
    cfg = _cfg(four, tmp_path, "demo_retrieval.yaml", "--train.max_steps", "24", "--train.epochs", "30",
               "--train.lr", "1e-4",
               "--train.schedule", "constant", "--train.warmup_steps", "0")
    Trainer(cfg).fit()
    losses = _losses(tmp_path)
    first, last = sum(losses[s] for s in (1, 2, 3, 4)) / 4, sum(losses[s] for s in (21, 22, 23, 24)) / 4
    assert last < 0.5 * first, losses


def test_gradient_checkpointing_changes_nothing_but_memory(data, tmp_path):
    # the demo configs have no dropout / drop path, so recomputing the video blocks in the backward must reproduce the
    # plain run's losses (and hence its gradients: step 2 and 3 losses depend on the updates)
    plain, ckpt_run = tmp_path / "plain", tmp_path / "ckpt"
    Trainer(_cfg(data, plain, "demo_stage1.yaml", "--train.max_steps", "3")).fit()
    trainer = Trainer(_cfg(data, ckpt_run, "demo_stage1.yaml", "--train.max_steps", "3",
                           "--model.grad_checkpointing", "true"))
    assert trainer.raw_model.video_encoder.cfg.grad_checkpointing
    trainer.fit()
    want, got = _losses(plain), _losses(ckpt_run)
    assert sorted(got) == [1, 2, 3]
    for step in got:
        assert got[step] == pytest.approx(want[step], rel=1e-5), (step, got, want)


@pytest.mark.slow
def test_compile_switch_trains(data, tmp_path):
    trainer = Trainer(_cfg(data, tmp_path, "demo_stage1.yaml", "--train.max_steps", "2", "--model.compile", "true"))
    assert hasattr(trainer.model, "_orig_mod")  # torch.compile's wrapper
    result = trainer.fit()
    losses = _losses(tmp_path)
    assert result["step"] == 2 and sorted(losses) == [1, 2] and all(math.isfinite(v) for v in losses.values())


def _stop_after(trainer, n):
    original = trainer._step

    def step(micro):
        out = original(micro)
        if trainer.state["step"] == n - 1:  # the step being finished is step n
            os.kill(os.getpid(), signal.SIGTERM)  # a real signal through the installed handler
        return out

    trainer._step = step


def test_sigterm_checkpoints_and_resume_reproduces_losses(data, tmp_path):
    full = tmp_path / "full"
    Trainer(_cfg(data, full, "demo_stage1.yaml", "--train.max_steps", "6")).fit()
    parted = tmp_path / "parted"
    first = Trainer(_cfg(data, parted, "demo_stage1.yaml", "--train.max_steps", "6"))
    _stop_after(first, 2)  # mid-epoch: 3 batches per epoch, so the resumed run starts a fresh iterator at batch 2
    result = first.fit()
    assert result["preempted"] and result["step"] == 2
    assert ckpt.latest_checkpoint(parted).name == "step_00000002"
    resumed = Trainer(_cfg(data, parted, "demo_stage1.yaml", "--train.max_steps", "6"))
    assert (resumed.state["step"], resumed.state["epoch"], resumed.state["batch"]) == (2, 0, 2)
    result = resumed.fit()
    assert result["step"] == 6 and not result["preempted"]
    for key in ("loss", "vpc", "mtc", "lr"):  # bitwise: the same random draws, the same float operations
        got, want = _losses(parted, key), _losses(full, key)
        assert sorted(got) == [1, 2, 3, 4, 5, 6]
        assert got == want, (key, got, want)


def test_non_finite_steps_are_skipped_then_stop(data, tmp_path):
    trainer = Trainer(_cfg(data, tmp_path, "demo_stage1.yaml", "--train.max_steps", "4", "--train.max_bad_steps", "2"))
    original = trainer._loss
    calls = {"n": 0}

    def loss(batch):
        out = original(batch)
        calls["n"] += 1
        if calls["n"] in (3,):  # one bad step (the first call is the FLOP count)
            out = {**out, "loss": out["loss"] * float("nan")}
        return out

    trainer._loss = loss
    before = {k: v.clone() for k, v in trainer.raw_model.state_dict().items()}
    result = trainer.fit()
    assert result["bad_steps"] == 1 and result["step"] == 4
    assert any(not torch.equal(before[k], v) for k, v in trainer.raw_model.state_dict().items())

    trainer = Trainer(_cfg(data, tmp_path / "b", "demo_stage1.yaml", "--train.max_steps", "6",
                           "--train.max_bad_steps", "2"))
    original2 = trainer._loss
    trainer._loss = lambda batch: {**(out := original2(batch)), "loss": out["loss"] * float("inf")}
    with pytest.raises(RuntimeError, match="max_bad_steps"):
        trainer.fit()


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"^train\.lrr: unknown key"):
        load_config(os.path.join(CONFIGS, "demo_stage1.yaml"), ["--train.lrr", "1"])
    with pytest.raises(ConfigError, match=r"^train\.batch_size: expected int"):
        load_config(os.path.join(CONFIGS, "demo_stage1.yaml"), ["--train.batch_size", "big"])
    with pytest.raises(ConfigError, match=r"^model\.init\[0\]\.kind"):
        load_config(None, ["--model.init", "[{kind: nope, path: x}]"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  epochs: [1, 2]\n")
    with pytest.raises(ConfigError, match=r"^train\.epochs: expected int"):
        load_config(bad)
    bad.write_text("data: {sizes: [1, 2]}\n")
    with pytest.raises(ConfigError, match=r"^data\.sizes: unknown key"):
        load_config(bad)
    child = tmp_path / "child.yaml"
    child.write_text(f"defaults: {os.path.abspath(os.path.join(CONFIGS, 'actnet_ret.yaml'))}\ntrain: {{lr: 1e-4}}\n")
    cfg = load_config(child)
    assert cfg.train.lr == 1e-4 and cfg.train.schedule == "step" and cfg.model.name == "lfvila-base-retrieval"


def test_every_shipped_config_validates():
    for name in sorted(os.listdir(CONFIGS)):
        cfg = load_config(os.path.join(CONFIGS, name))
        assert cfg.train.lr > 0, name


# ------------------------------------------------------------------------------ DDP == one process


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, batch, out_path):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from lfvila.models import create_model

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.manual_seed(0)
    # eval: no dropout, so both runs see the same function; float64, so the reassociation error is far below the bound
    model = create_model("lfvila-tiny-retrieval").double().eval()
    ddp = DistributedDataParallel(model, find_unused_parameters=True)
    n = batch["video"].shape[0] // world
    part = {k: v[rank * n:(rank + 1) * n] for k, v in batch.items()}
    out = ddp(part["video"], part["ids"], part["mask"])
    out["loss"].backward()
    if rank == 0:
        torch.save({k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}, out_path)
    dist.barrier()  # every rank past its last collective before any tears down (see test_contrastive_distributed)
    dist.destroy_process_group()


def test_ddp_two_gloo_processes_equal_one_process_on_the_whole_batch(tmp_path):
    from lfvila.models import create_model

    g = torch.Generator().manual_seed(1)
    batch = {"video": torch.randn(4, 3, 8, 64, 96, generator=g, dtype=torch.float64),
             "ids": torch.randint(1, 128, (4, 4, 12), generator=g), "mask": torch.ones(4, 4, 12, dtype=torch.long)}
    torch.manual_seed(0)
    model = create_model("lfvila-tiny-retrieval").double().eval()
    model(batch["video"], batch["ids"], batch["mask"])["loss"].backward()
    want = {k: p.grad for k, p in model.named_parameters() if p.grad is not None}
    out_path = str(tmp_path / "grads.pt")
    mp.start_processes(_ddp_worker, args=(2, _free_port(), batch, out_path), nprocs=2, join=True,
                       start_method="spawn")
    got = torch.load(out_path, weights_only=True)
    assert set(got) == set(want)
    for k in want:
        if k.endswith("attention.self.key.bias"):
            # softmax is invariant to a key bias: its exact gradient is 0, both runs hold rounding noise
            assert float(want[k].abs().max()) < 1e-12 and float(got[k].abs().max()) < 1e-12, k
            continue
        # the two runs sum the same terms in another order (two half batches, then DDP's average): float64
        # reassociation, orders of magnitude below this bound on any CPU (fp32 was within 2x of a 1e-5 bound)
        scale = float(want[k].abs().max())
        assert float((got[k] - want[k]).abs().max()) <= 1e-10 * scale, (k, scale)
