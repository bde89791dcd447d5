"""train.checkpoint: exact resume (weights, AdamW, LambdaLR, GradScaler, RNG), keep_last, atomicity against a writer
killed with SIGKILL mid-save and against an exception mid-save, corrupt / missing files named in errors,
resolve_resume, and two gloo ranks (DDP and FSDP2, both run on the CPU) writing one RNG file each and loading the
same weights on both ranks."""

from __future__ import annotations

import copy
import datetime
import json
import logging
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

import train.checkpoint as ckpt
from train.checkpoint import (
    CheckpointError,
    capture_rng,
    latest_checkpoint,
    load_checkpoint,
    resolve_resume,
    restore_rng,
    save_checkpoint,
)

REPO = Path(__file__).resolve().parents[2]
VOCAB, DIM = 16, 8


class Toy(nn.Module):
    """Embedding tied to the output head, dropout (the RNG matters), a random persistent buffer and a non-persistent
    one."""

    def __init__(self, dim: int = DIM, extra: bool = False):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, dim)
        self.lin1 = nn.Linear(dim, 2 * dim)
        self.drop = nn.Dropout(0.3)
        self.lin2 = nn.Linear(2 * dim, dim)
        self.head = nn.Linear(dim, VOCAB, bias=False)
        self.head.weight = self.emb.weight
        self.register_buffer("scale", torch.rand(dim) + 0.5)
        self.register_buffer("positions", torch.arange(dim), persistent=False)
        if extra:
            self.extra = nn.Linear(dim, dim)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids) * self.scale
        return self.head(self.lin2(self.drop(F.gelu(self.lin1(h)))))


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def make_objects(seed: int = 0, dim: int = DIM):
    torch.manual_seed(seed)
    model = Toy(dim)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (1 + s))
    scaler = torch.amp.GradScaler("cpu", enabled=True, growth_interval=2)
    return model, optimizer, scheduler, scaler


def batch():
    """Data drawn from all three RNGs, so that a wrong restore of any one changes the losses."""
    ids = torch.randint(0, VOCAB, (4, 5))
    targets = (ids + random.randrange(VOCAB) + int(np.random.randint(0, VOCAB))) % VOCAB
    return ids, targets


def train_steps(model, optimizer, scheduler=None, scaler=None, n: int = 3) -> list[float]:
    losses = []
    model.train()
    for _ in range(n):
        ids, targets = batch()
        loss = F.cross_entropy(model(ids).flatten(0, 1), targets.flatten())
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        if scheduler is not None:
            scheduler.step()
        losses.append(loss.item())
    return losses


def assert_same(a, b, where="state"):
    """Exact equality of nested state: tensors bit-equal, containers of the same type."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{where}: keys {sorted(a)} vs {sorted(b)}"
        for k in a:
            assert_same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), f"{where}: {a!r} vs {b!r}"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} vs {b!r}"


def save(run_dir, step, objs, **kw):
    model, optimizer, scheduler, scaler = objs
    return save_checkpoint(run_dir, step, model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler,
                           state={"step": step, "epoch": 0, "batch": step, "bad_steps": 0}, **kw)


def load(path, objs, **kw):
    model, optimizer, scheduler, scaler = objs
    return load_checkpoint(path, model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler, **kw)


# ------------------------------------------------------------------------------------------------ single process


def test_resume_is_exact(tmp_path):
    seed_all(0)
    objs = make_objects(0)
    train_steps(*objs, n=3)
    path = save(tmp_path, 3, objs)
    assert path == tmp_path / "checkpoints" / "step_00000003"
    assert sorted(p.name for p in path.iterdir()) == ["COMPLETE", "model.safetensors", "optimizer.pt", "rng_rank0.pt",
                                                      "scaler.pt", "scheduler.pt", "state.json"]
    losses = train_steps(*objs, n=3)
    model, optimizer, scheduler, scaler = objs

    seed_all(1234)
    fresh = make_objects(seed=7)
    assert not torch.equal(fresh[0].lin1.weight, model.lin1.weight)
    state = load(latest_checkpoint(tmp_path), fresh)
    assert state == {"step": 3, "epoch": 0, "batch": 3, "bad_steps": 0}
    assert fresh[0].head.weight is fresh[0].emb.weight  # still tied after the load
    resumed = train_steps(*fresh, n=3)
    assert resumed == losses  # bit-identical
    assert_same(fresh[0].state_dict(), model.state_dict(), "model")
    assert_same(fresh[1].state_dict(), optimizer.state_dict(), "optimizer")
    assert_same(fresh[2].state_dict(), scheduler.state_dict(), "scheduler")
    assert_same(fresh[3].state_dict(), scaler.state_dict(), "scaler")
    assert scaler.state_dict()["scale"] != 65536.0  # the scaler state was not trivial


def test_save_before_first_step_and_unused_parameter(tmp_path):
    """Saving an optimizer that has not stepped has no side effect on the training that follows, and a parameter
    that never gets a gradient (no optimizer state) resumes without state, exactly as in the saving run."""
    runs = []
    for save_first in (True, False):
        seed_all(0)
        torch.manual_seed(0)
        model = Toy(extra=True)  # ``extra`` is not used in forward: never a gradient
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
        if save_first:
            save_checkpoint(tmp_path, 0, model=model, optimizer=optimizer)
            assert not optimizer.state and all(p.grad is None for p in model.parameters())
        runs.append((train_steps(model, optimizer, n=3), optimizer.state_dict()))
    assert runs[0][0] == runs[1][0]
    assert_same(runs[0][1], runs[1][1], "optimizer")
    assert len(runs[0][1]["state"]) == 5  # not ``extra.weight`` / ``extra.bias``

    seed_all(5)
    model = Toy(extra=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    load_checkpoint(tmp_path / "checkpoints" / "step_00000000", model=model, optimizer=optimizer)
    assert not optimizer.state
    assert train_steps(model, optimizer, n=3) == runs[0][0]
    assert_same(optimizer.state_dict(), runs[0][1], "resumed optimizer")
    path = save_checkpoint(tmp_path, 3, model=model, optimizer=optimizer)
    assert sorted(torch.load(path / "optimizer.pt", weights_only=True)["state"]) == [
        "emb.weight", "lin1.bias", "lin1.weight", "lin2.bias", "lin2.weight"]
    fresh = Toy(extra=True)
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-2, weight_decay=0.1)
    load_checkpoint(path, model=fresh, optimizer=fresh_opt)
    assert_same(fresh_opt.state_dict(), optimizer.state_dict(), "optimizer with a parameter without state")


def test_weights_file_layout(tmp_path):
    from safetensors import safe_open

    objs = make_objects(0)
    objs[0].double()  # stored in the parameters' own dtype
    path = save(tmp_path, 0, objs)
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        keys = sorted(f.keys())
        meta = f.metadata()
        assert f.get_tensor("lin1.weight").dtype == torch.float64
    assert keys == ["emb.weight", "lin1.bias", "lin1.weight", "lin2.bias", "lin2.weight", "scale"]  # tied: once
    assert json.loads(meta["aliases"]) == {"head.weight": "emb.weight"}
    manifest = json.loads((path / "COMPLETE").read_text())
    assert manifest["step"] == 0 and manifest["world_size"] == 1
    assert manifest["files"] == {p.name: p.stat().st_size for p in path.iterdir() if p.name != "COMPLETE"}
    for name in ("optimizer.pt", "scheduler.pt", "scaler.pt", "rng_rank0.pt"):
        torch.load(path / name, weights_only=True)


def test_optional_parts_and_missing_file(tmp_path):
    model = Toy()
    path = save_checkpoint(tmp_path, 1, model=model)
    assert sorted(p.name for p in path.iterdir()) == ["COMPLETE", "model.safetensors", "rng_rank0.pt", "state.json"]
    assert load_checkpoint(path, model=Toy()) == {}
    optimizer = torch.optim.AdamW(model.parameters())
    with pytest.raises(CheckpointError, match=r"optimizer\.pt: not in this checkpoint"):
        load_checkpoint(path, model=model, optimizer=optimizer)


def test_rng_capture_restore_and_through_checkpoint(tmp_path):
    seed_all(5)
    state = capture_rng()
    first = (torch.rand(4), random.random(), np.random.rand(3))
    seed_all(6)
    restore_rng(state)
    second = (torch.rand(4), random.random(), np.random.rand(3))
    assert torch.equal(first[0], second[0]) and first[1] == second[1] and np.array_equal(first[2], second[2])

    seed_all(7)
    model = Toy()
    path = save_checkpoint(tmp_path, 2, model=model)
    expected = (torch.rand(4), random.random(), np.random.rand(3))
    seed_all(8)
    load_checkpoint(path, model=Toy())
    got = (torch.rand(4), random.random(), np.random.rand(3))
    assert torch.equal(expected[0], got[0]) and expected[1] == got[1] and np.array_equal(expected[2], got[2])


def test_keep_last_deletes_only_the_oldest(tmp_path):
    model = Toy()
    for step in range(1, 6):
        save_checkpoint(tmp_path, step, model=model, keep_last=3)
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step_00000003", "step_00000004", "step_00000005"]
    # a save at a lower step (after resuming from an older checkpoint) is never deleted by its own pruning
    save_checkpoint(tmp_path, 2, model=model, keep_last=1)
    assert sorted(p.name for p in root.iterdir()) == ["step_00000002", "step_00000005"]
    # saving a step again replaces it
    save_checkpoint(tmp_path, 5, model=model, state={"again": True}, keep_last=None)
    assert json.loads((root / "step_00000005" / "state.json").read_text()) == {"again": True}
    assert sorted(p.name for p in root.iterdir()) == ["step_00000002", "step_00000005"]
    with pytest.raises(ValueError, match="keep_last"):
        save_checkpoint(tmp_path, 6, model=model, keep_last=0)


def test_latest_ignores_incomplete_directories(tmp_path, caplog):
    model = Toy()
    assert latest_checkpoint(tmp_path) is None
    good = save_checkpoint(tmp_path, 10, model=model)
    root = tmp_path / "checkpoints"
    (root / "step_00000020").mkdir()  # no COMPLETE
    (root / ".tmp-step_00000030").mkdir()
    (root / "notes.txt").write_text("not a checkpoint")
    with caplog.at_level(logging.WARNING, logger="train.checkpoint"):
        assert latest_checkpoint(tmp_path) == good
    assert "step_00000020" in caplog.text and ".tmp-step_00000030" in caplog.text
    with pytest.raises(CheckpointError, match=r"step_00000020.*COMPLETE"):
        load_checkpoint(root / "step_00000020", model=model)
    # the next successful save cleans the leftover of the interrupted one
    save_checkpoint(tmp_path, 11, model=model)
    assert not (root / ".tmp-step_00000030").exists()


def test_exception_mid_save_leaves_nothing(tmp_path, monkeypatch):
    seed_all(0)
    objs = make_objects(0)
    train_steps(*objs, n=2)
    good = save(tmp_path, 2, objs)
    saved = {k: v.clone() for k, v in objs[0].state_dict().items()}
    train_steps(*objs, n=2)

    real = ckpt.write_file
    written = []

    def failing(path, write):
        if written and written[-1] == "model.safetensors":
            raise OSError(28, "No space left on device")
        size = real(path, write)
        written.append(path.name)
        return size

    monkeypatch.setattr(ckpt, "write_file", failing)
    with pytest.raises(OSError, match="No space left"):
        save(tmp_path, 4, objs)
    monkeypatch.undo()
    assert written == ["model.safetensors"]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00000002"]
    assert latest_checkpoint(tmp_path) == good
    fresh = make_objects(3)
    assert load(good, fresh)["step"] == 2
    assert_same(fresh[0].state_dict(), saved)


_KILLED_WRITER = r"""
import sys, time
import train.checkpoint as ckpt
from tests.train.test_checkpoint import make_objects, save, seed_all, train_steps

run_dir, flag = sys.argv[1], sys.argv[2]
seed_all(1)
objs = make_objects(1)
train_steps(*objs, n=2)
real = ckpt.write_file

def stall(path, write):
    size = real(path, write)
    if path.name == "model.safetensors":
        open(flag, "w").close()
        time.sleep(300)
    return size

ckpt.write_file = stall
save(run_dir, 6, objs)
"""


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_writer_killed_mid_save(tmp_path, caplog):
    seed_all(0)
    objs = make_objects(0)
    train_steps(*objs, n=3)
    good = save(tmp_path, 3, objs)
    saved = {k: v.clone() for k, v in objs[0].state_dict().items()}

    flag = tmp_path / "inside-save"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_WRITER, str(tmp_path), str(flag)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while not flag.exists():
            if proc.poll() is not None:
                pytest.fail(f"writer exited early ({proc.returncode}): {proc.stdout.read().decode()[-2000:]}")
            if time.monotonic() > deadline:
                pytest.fail("writer never reached the save")
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()

    root = tmp_path / "checkpoints"
    tmp = root / ".tmp-step_00000006"
    assert (tmp / "model.safetensors").is_file() and not (tmp / "COMPLETE").exists()  # killed inside the write
    assert not (root / "step_00000006").exists()
    with caplog.at_level(logging.WARNING, logger="train.checkpoint"):
        assert latest_checkpoint(tmp_path) == good
        assert resolve_resume(tmp_path, "auto") == good
    assert ".tmp-step_00000006" in caplog.text
    with pytest.raises(CheckpointError, match="tmp-step_00000006"):
        resolve_resume(tmp_path, str(tmp))
    fresh = make_objects(5)
    assert load(good, fresh)["step"] == 3
    assert_same(fresh[0].state_dict(), saved)
    # saving that step again replaces the leftover
    assert save(tmp_path, 6, objs) == root / "step_00000006"
    assert not tmp.exists() and latest_checkpoint(tmp_path) == root / "step_00000006"


@pytest.mark.parametrize("name", ["model.safetensors", "optimizer.pt"])
@pytest.mark.parametrize("how", ["truncated", "garbage"])
def test_corrupt_file_is_named(tmp_path, name, how):
    objs = make_objects(0)
    train_steps(*objs, n=1)
    path = save(tmp_path, 1, objs)
    file = path / name
    data = file.read_bytes()
    if how == "truncated":
        file.write_bytes(data[: len(data) // 2])
        match = "truncated or modified"
    else:  # same size, so it passes the size check and reaches the reader
        file.write_bytes(bytes((b * 7 + 13) % 256 for b in data[:64]) + data[64:])
        match = "cannot read"
    with pytest.raises(CheckpointError, match=re.escape(name) + ".*" + match):
        load(path, make_objects(1))


def test_missing_file_is_named(tmp_path):
    objs = make_objects(0)
    path = save(tmp_path, 1, objs)
    (path / "scheduler.pt").unlink()
    with pytest.raises(CheckpointError, match=r"scheduler\.pt: missing"):
        load(path, make_objects(1))


def test_mismatched_model_lists_keys(tmp_path):
    path = save_checkpoint(tmp_path, 1, model=Toy())
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*\n.*shape mismatch.*lin1\.weight"):
        load_checkpoint(path, model=Toy(dim=4))
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*\n.*missing \(2\): extra\.bias, extra\.weight"):
        load_checkpoint(path, model=Toy(extra=True))
    model = Toy(extra=True)
    before = model.extra.weight.clone()
    load_checkpoint(path, model=model, strict=False)  # loads what fits, keeps the rest
    assert torch.equal(model.extra.weight, before)
    source = Toy()
    load_checkpoint(path, model=source)
    assert torch.equal(model.lin1.weight, source.lin1.weight)


def test_mismatched_optimizer_is_named(tmp_path):
    objs = make_objects(0)
    train_steps(*objs, n=1)
    path = save(tmp_path, 1, objs)
    model = Toy()
    decay, rest = [model.lin1.weight, model.lin2.weight], [model.emb.weight, model.lin1.bias, model.lin2.bias]
    optimizer = torch.optim.AdamW([{"params": decay}, {"params": rest, "weight_decay": 0.0}])
    with pytest.raises(CheckpointError, match=r"optimizer\.pt: 1 parameter groups in the checkpoint, 2"):
        load_checkpoint(path, model=model, optimizer=optimizer)


def test_unstorable_state_fails_before_writing(tmp_path):
    with pytest.raises(TypeError):
        save_checkpoint(tmp_path, 1, model=Toy(), state={"bad": object()})

    class Odd:  # a scheduler whose state would need unpickling arbitrary objects (a numpy scalar)
        def state_dict(self):
            return {"last": [1.0, np.float64(0.5)]}

    with pytest.raises(TypeError, match=r"scheduler\.state_dict\(\)\['last'\]\[1\]: a float64"):
        save_checkpoint(tmp_path, 1, model=Toy(), scheduler=Odd())
    assert not (tmp_path / "checkpoints").exists()


def test_resolve_resume(tmp_path):
    assert resolve_resume(tmp_path, "auto") is None
    assert resolve_resume(tmp_path, "none") is None
    assert resolve_resume(tmp_path, "") is None
    assert resolve_resume(tmp_path, None) is None
    model = Toy()
    first = save_checkpoint(tmp_path, 1, model=model)
    second = save_checkpoint(tmp_path, 2, model=model)
    assert resolve_resume(tmp_path, "auto") == second
    assert resolve_resume(tmp_path, str(first)) == first
    assert resolve_resume(tmp_path, first) == first
    assert resolve_resume(tmp_path, "step_00000001") == first  # a name under run_dir/checkpoints
    with pytest.raises(CheckpointError, match="not found"):
        resolve_resume(tmp_path, str(tmp_path / "nowhere"))
    (first / "COMPLETE").unlink()
    with pytest.raises(CheckpointError, match=r"step_00000001.*not a complete checkpoint"):
        resolve_resume(tmp_path, str(first))
    assert resolve_resume(tmp_path, "auto") == second


# ------------------------------------------------------------------------------------------------ two gloo ranks

WORLD = 2


def _wrap(model: nn.Module, mode: str) -> nn.Module:
    if mode == "ddp":
        return nn.parallel.DistributedDataParallel(model)
    from torch.distributed.fsdp import fully_shard

    fully_shard(model.lin1)
    fully_shard(model.lin2)
    fully_shard(model)
    return model


def _full_state(model: nn.Module, optimizer) -> tuple[dict, dict]:
    """Full (unsharded) model and optimizer state dicts on every rank (collective)."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    module = ckpt.unwrap_model(model)
    options = StateDictOptions(full_state_dict=True)
    weights = get_model_state_dict(module, options=options)
    optim = get_optimizer_state_dict(module, optimizer, options=options)
    return copy.deepcopy(weights), copy.deepcopy(optim)  # snapshots: the live tensors keep training


def _draws() -> dict:
    state = capture_rng()
    out = {"torch": torch.rand(3), "python": random.random(), "numpy": float(np.random.rand())}
    restore_rng(state)
    return out


def _dist_worker(rank, mode, init_file, run_dir, out_dir):
    # a bounded timeout: a protocol bug shows up as an error, not as a hung test
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=120))
    try:
        torch.manual_seed(0)
        model = _wrap(Toy(), mode)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (1 + s))
        seed_all(10 + rank)  # each rank its own data and dropout masks
        train_steps(model, optimizer, scheduler, n=2)

        # a save that fails on rank 1 (its RNG file) raises on every rank and leaves nothing behind
        real = ckpt.write_file

        def failing(path, write):
            if rank == 1:
                raise OSError(5, "Input/output error")
            return real(path, write)

        ckpt.write_file = failing
        try:
            save_checkpoint(run_dir, 1, model=model, optimizer=optimizer, scheduler=scheduler)
            failure = None
        except Exception as e:
            failure = f"{type(e).__name__}: {e}"
        finally:
            ckpt.write_file = real
        dist.barrier()
        leftovers = sorted(p.name for p in (Path(run_dir) / "checkpoints").iterdir())
        dist.barrier()  # every rank has looked before rank 0 starts the next save

        path = save_checkpoint(run_dir, 2, model=model, optimizer=optimizer, scheduler=scheduler,
                               state={"step": 2, "epoch": 0})
        expected_draws = _draws()
        saved_weights, saved_optim = _full_state(model, optimizer)
        losses = train_steps(model, optimizer, scheduler, n=2)

        seed_all(99)
        torch.manual_seed(3)
        fresh = _wrap(Toy(), mode)
        fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-2, weight_decay=0.1)
        fresh_sched = torch.optim.lr_scheduler.LambdaLR(fresh_opt, lambda s: 1.0 / (1 + s))
        resume = resolve_resume(run_dir, "auto")
        state = load_checkpoint(resume, model=fresh, optimizer=fresh_opt, scheduler=fresh_sched)
        got_draws = _draws()
        loaded_weights, loaded_optim = _full_state(fresh, fresh_opt)
        resumed = train_steps(fresh, fresh_opt, fresh_sched, n=2)
        torch.save({"failure": failure, "leftovers": leftovers,
                    "path": None if path is None else str(path), "resume": str(resume), "state": state,
                    "expected_draws": expected_draws, "got_draws": got_draws,
                    "saved_weights": saved_weights, "loaded_weights": loaded_weights,
                    "saved_optim": saved_optim, "loaded_optim": loaded_optim,
                    "losses": losses, "resumed": resumed}, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_two_gloo_ranks(tmp_path, mode, caplog):
    """FSDP2 (``fully_shard``) runs on the CPU with gloo in this torch, so it is tested here, not only on GPUs."""
    run_dir = tmp_path / "run"
    mp.spawn(_dist_worker, args=(mode, str(tmp_path / "init"), str(run_dir), str(tmp_path)), nprocs=WORLD, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    assert results[0]["failure"].startswith("CheckpointError") and "rank 1: OSError" in results[0]["failure"]
    assert results[1]["failure"].startswith("OSError")
    assert results[0]["leftovers"] == results[1]["leftovers"] == []
    path = run_dir / "checkpoints" / "step_00000002"
    assert results[0]["path"] == str(path) and results[1]["path"] is None
    assert all(r["resume"] == str(path) for r in results)
    assert sorted(p.name for p in path.iterdir()) == ["COMPLETE", "model.safetensors", "optimizer.pt", "rng_rank0.pt",
                                                      "rng_rank1.pt", "scheduler.pt", "state.json"]
    assert json.loads((path / "COMPLETE").read_text())["world_size"] == WORLD
    from safetensors import safe_open

    with safe_open(str(path / "model.safetensors"), framework="pt") as f:  # unsharded, the tied pair stored once
        assert sorted(f.keys()) == ["emb.weight", "lin1.bias", "lin1.weight", "lin2.bias", "lin2.weight", "scale"]
        assert f.get_tensor("lin1.weight").shape == (2 * DIM, DIM)
    assert not any(p.name.startswith(".") for p in path.parent.iterdir())
    rng = [torch.load(path / f"rng_rank{r}.pt", weights_only=True) for r in range(WORLD)]
    assert [r["rank"] for r in rng] == [0, 1] and not torch.equal(rng[0]["torch"], rng[1]["torch"])

    for rank, r in enumerate(results):
        assert r["state"] == {"step": 2, "epoch": 0}
        assert_same(r["loaded_weights"], r["saved_weights"], f"rank {rank} weights")
        assert_same(r["loaded_weights"], results[0]["saved_weights"], f"rank {rank} vs rank 0 weights")
        assert_same(r["loaded_optim"], r["saved_optim"], f"rank {rank} optimizer")
        assert_same(r["got_draws"], r["expected_draws"], f"rank {rank} RNG")
        assert r["resumed"] == r["losses"], f"rank {rank}"
    assert results[0]["expected_draws"]["python"] != results[1]["expected_draws"]["python"]

    # the unsharded checkpoint loads into a plain single-process model; another world size restores rank 0's RNG
    seed_all(123)
    plain = Toy()
    # no scheduler here: the saved groups carry its ``initial_lr``, which this optimizer lacks
    optimizer = torch.optim.AdamW(plain.parameters(), lr=1e-2, weight_decay=0.1)
    with caplog.at_level(logging.WARNING, logger="train.checkpoint"):
        load_checkpoint(path, model=plain, optimizer=optimizer)
    assert "saved by 2 rank(s), this run has 1" in caplog.text
    assert_same(_draws(), results[0]["expected_draws"], "rank 0 RNG in a single process")
    assert_same(plain.state_dict(), results[0]["saved_weights"], "plain weights")
    assert_same(optimizer.state_dict()["state"][0], results[0]["saved_optim"]["state"]["emb.weight"], "plain AdamW")


# ------------------------------------------------------------------------------------------------ CUDA


@pytest.mark.gpu
def test_cuda_model_and_rng(tmp_path):
    """A CUDA model (dropout draws from the CUDA RNG) resumes with the same losses; the CUDA RNG state of every
    device is saved and restored; the weights come back onto the model's device."""
    seed_all(0)
    model = Toy().cuda()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    scaler = torch.amp.GradScaler("cuda", enabled=True, growth_interval=2)

    def run(model, optimizer, scaler, n):
        losses = []
        for _ in range(n):
            ids, targets = (t.cuda() for t in batch())
            with torch.autocast("cuda", dtype=torch.float16):
                loss = F.cross_entropy(model(ids).flatten(0, 1).float(), targets.flatten())
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            losses.append(loss.item())
        return losses

    run(model, optimizer, scaler, 2)
    path = save_checkpoint(tmp_path, 2, model=model, optimizer=optimizer, scaler=scaler)
    assert len(torch.load(path / "rng_rank0.pt", weights_only=True)["cuda"]) == torch.cuda.device_count()
    expected = torch.rand(5, device="cuda")
    torch.cuda.manual_seed_all(1)
    torch.rand(5, device="cuda")
    load_checkpoint(path, model=Toy().cuda(), optimizer=None)
    assert torch.equal(torch.rand(5, device="cuda"), expected)

    load_checkpoint(path, model=model, optimizer=optimizer, scaler=scaler)  # back to the saved point
    losses = run(model, optimizer, scaler, 2)
    seed_all(9)
    fresh = Toy().cuda()
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-2, weight_decay=0.1)
    fresh_scaler = torch.amp.GradScaler("cuda", enabled=True, growth_interval=2)
    load_checkpoint(path, model=fresh, optimizer=fresh_opt, scaler=fresh_scaler)
    assert fresh.lin1.weight.device.type == "cuda" and fresh.lin1.weight.dtype == torch.float32
    assert fresh_opt.state[fresh.lin1.weight]["exp_avg"].device.type == "cuda"
    torch.testing.assert_close(run(fresh, fresh_opt, fresh_scaler, 2), losses, rtol=1e-5, atol=1e-6)
