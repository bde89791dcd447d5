"""Atomic training checkpoints: full weights, optimizer, scheduler, grad scaler, RNG and loop state; ``--resume auto``.

``save_checkpoint(run_dir, step, model=..., optimizer=..., ...)`` writes ``run_dir/checkpoints/step_{step:08d}/``
(``model.safetensors`` full and unsharded, through ``lfvila.models.weights``; ``optimizer.pt``, ``scheduler.pt``,
``scaler.pt`` read back with ``torch.load(weights_only=True)``; ``rng_rank{r}.pt`` per rank; ``state.json``; and the
``COMPLETE`` marker last) into a temporary directory, then renames it into place, so a checkpoint exists whole or not
at all. ``load_checkpoint`` restores it into a plain, DDP, ``torch.compile`` or FSDP2 model of any world size. Both
are collective under ``torch.distributed``. The run directory (which checkpoints are complete, pruning,
``resolve_resume``): ``train.rundir``. The layout, the atomicity argument and the distributed protocol step by step:
``docs/training.md``, "Checkpoints".
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from lfvila.models.weights import (
    CheckpointError,
    alias_groups,
    canonical,
    compare_keys,
    fsync_dir,
    listing,
    mismatch_message,
    read_safetensors,
    replace_dir,
    storable,
    write_file,
    write_safetensors,
)

from .dist import unwrap_model
from .persist import capture_rng, check_plain, restore_rng, text_writer, torch_writer
from .rundir import (
    CHECKPOINTS_DIR,
    COMPLETE_FILE,
    TMP_PREFIX,
    TRASH_PREFIX,
    latest_checkpoint,
    prune,
    resolve_resume,
    step_name,
)

__all__ = [
    "CHECKPOINTS_DIR",
    "CheckpointError",
    "capture_rng",
    "latest_checkpoint",
    "load_checkpoint",
    "read_state",
    "resolve_resume",
    "restore_rng",
    "save_checkpoint",
    "unwrap_model",
]

log = logging.getLogger(__name__)

MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
SCHEDULER_FILE = "scheduler.pt"
SCALER_FILE = "scaler.pt"
STATE_FILE = "state.json"
FORMAT = "lfvila-train-checkpoint"
FORMAT_VERSION = 1


def _rng_file(rank: int) -> str:
    return f"rng_rank{rank}.pt"


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _sync(error: BaseException | None, what: str, payload: Any = None) -> list[Any]:
    """Exchange (error, payload) between all ranks. A rank that failed re-raises its own exception, the others raise
    :class:`CheckpointError` naming the failed ranks. Returns every rank's payload. Single process: raises ``error``
    if any, returns ``[payload]``."""
    if not _distributed():
        if error is not None:
            raise error
        return [payload]
    message = None if error is None else f"{type(error).__name__}: {error}"
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (message, payload))
    if error is not None:
        raise error
    failed = [(rank, msg) for rank, (msg, _) in enumerate(gathered) if msg is not None]
    if failed:
        raise CheckpointError(f"{what}: failed on " + "; ".join(f"rank {r}: {m}" for r, m in failed))
    return [p for _, p in gathered]


def save_checkpoint(run_dir, step: int, *, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    scheduler=None, scaler=None, state: dict | None = None, keep_last: int | None = 3) -> Path | None:
    """Write ``run_dir/checkpoints/step_{step:08d}/`` atomically (layout and distributed protocol: module docstring).

    ``model``: a plain module, a DDP- or ``torch.compile``-wrapped one, or an FSDP2 (``fully_shard``) model; its full
    state is stored unsharded in the parameters' dtype. ``optimizer`` / ``scheduler`` / ``scaler`` (a
    ``torch.amp.GradScaler``, enabled or not): stored when given. ``state``: any JSON-serialisable dict (epoch, step,
    batches consumed, counters, config hash, ...), returned by :func:`load_checkpoint` (through JSON: tuples come back
    as lists, dict keys as strings). ``keep_last``: how many complete checkpoints to keep, the new one always among
    them (``None``: keep all).

    Collective under ``torch.distributed``: every rank calls it. Returns the checkpoint path on rank 0, None on the
    other ranks. Raises (on every rank) if any rank failed; nothing then appears under the final name.
    """
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be a non-negative int, got {step!r}")
    if keep_last is not None and keep_last < 1:
        raise ValueError(f"keep_last must be >= 1 (or None to keep every checkpoint), got {keep_last}")
    rank, world = _rank_world()
    module = unwrap_model(model)
    root = Path(run_dir) / CHECKPOINTS_DIR
    final = root / step_name(step)
    tmp = root / (TMP_PREFIX + final.name)

    # 0. every rank: gather full CPU state dicts (collective for FSDP2; rank 0 gets them) and capture the RNG states
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state = get_model_state_dict(module, options=options)
    optim_state = None
    if optimizer is not None:
        # an optimizer that has not stepped yet gets its state created by a zero-lr step inside
        # get_optimizer_state_dict; undo that, so that saving never changes the training that follows
        fresh = not optimizer.state
        optim_state = get_optimizer_state_dict(module, optimizer, options=options)
        if fresh:
            optimizer.state.clear()
            if optim_state:
                optim_state["state"] = {}
    rng = {**capture_rng(), "rank": rank, "world_size": world}

    done = False
    try:
        # 1. rank 0 writes everything but the other ranks' RNG files
        files: dict[str, int] = {}
        error = None
        if rank == 0:
            try:
                files = _write_rank0_files(tmp, root, step, module, model_state, optim_state, scheduler, scaler,
                                           state, rng)
            except Exception as e:
                error = e
        del model_state, optim_state
        _sync(error, f"saving checkpoint {final} (rank 0 writing)")

        # 2. the other ranks write their RNG files into the temporary directory
        mine: dict[str, int] = {}
        error = None
        if rank != 0:
            try:
                if not tmp.is_dir():
                    raise CheckpointError(f"{tmp}: not visible from rank {rank}; the run directory must be on a "
                                          "filesystem shared by every rank")
                name = _rng_file(rank)
                mine[name] = write_file(tmp / name, torch_writer(rng))
            except Exception as e:
                error = e
        everyone = _sync(error, f"saving checkpoint {final} (RNG files)", mine)

        # 3. rank 0 seals the checkpoint: COMPLETE, fsync, rename, fsync the parent
        error = None
        if rank == 0:
            try:
                for sizes in everyone[1:]:
                    for name, size in sizes.items():
                        seen = (tmp / name).stat().st_size if (tmp / name).exists() else None
                        if seen != size:
                            raise CheckpointError(f"{tmp / name}: written by another rank ({size} bytes) but rank 0 "
                                                  f"sees {seen}; the run directory must be on a shared filesystem")
                        files[name] = size
                _seal(tmp, final, root, step, world, files)
            except Exception as e:
                error = e
        _sync(error, f"saving checkpoint {final} (rename)")
        done = True
    finally:
        if rank == 0 and not done:
            shutil.rmtree(tmp, ignore_errors=True)

    if rank != 0:
        return None
    log.info("checkpoint saved: %s", final)
    try:
        prune(root, final, keep_last)
    except Exception as e:  # a failed cleanup must not fail the save
        log.warning("could not delete old checkpoints in %s: %s: %s", root, type(e).__name__, e)
    return final


def _write_rank0_files(tmp: Path, root: Path, step: int, module: nn.Module, model_state, optim_state, scheduler,
                       scaler, state, rng) -> dict[str, int]:
    # validate everything before the first byte is written
    if state is not None and not isinstance(state, dict):
        raise TypeError(f"state must be a dict, got {type(state).__name__}")
    state_text = json.dumps({} if state is None else state, indent=2)
    tensors, aliases = storable(model_state, module)
    extra: dict[str, Any] = {}
    if optim_state is not None:
        check_plain(optim_state, "optimizer state")
        extra[OPTIMIZER_FILE] = optim_state
    if scheduler is not None:
        extra[SCHEDULER_FILE] = scheduler.state_dict()
        check_plain(extra[SCHEDULER_FILE], "scheduler.state_dict()")
    if scaler is not None:
        extra[SCALER_FILE] = scaler.state_dict()
        check_plain(extra[SCALER_FILE], "scaler.state_dict()")
    check_plain(rng, "RNG state")

    root.mkdir(parents=True, exist_ok=True)
    if tmp.exists():
        log.warning("%s: removing the leftover of an interrupted save", tmp)
        shutil.rmtree(tmp)
    tmp.mkdir()
    files = {MODEL_FILE: write_safetensors(tmp / MODEL_FILE, tensors, aliases, {"format": "pt", "step": str(step)},
                                           write=lambda path, fn: write_file(path, fn))}
    for name, obj in extra.items():
        files[name] = write_file(tmp / name, torch_writer(obj))
    files[STATE_FILE] = write_file(tmp / STATE_FILE, text_writer(state_text))
    files[_rng_file(0)] = write_file(tmp / _rng_file(0), torch_writer(rng))
    return files


def _seal(tmp: Path, final: Path, root: Path, step: int, world: int, files: dict[str, int]) -> None:
    fsync_dir(tmp)
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "step": step, "world_size": world,
                "files": dict(sorted(files.items())), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    write_file(tmp / COMPLETE_FILE, text_writer(json.dumps(manifest, indent=2) + "\n"))
    fsync_dir(tmp)
    # the same step saved again (e.g. a preemption save right after a periodic one) replaces the old one
    replace_dir(tmp, final, root / (TRASH_PREFIX + final.name))


# ------------------------------------------------------------------------------------------------ loading


def _read_manifest(path: Path) -> dict:
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint directory")
    marker = path / COMPLETE_FILE
    if not marker.is_file():
        raise CheckpointError(f"{marker}: missing; {path} is not a complete checkpoint (an interrupted save?)")
    try:
        manifest = json.loads(marker.read_text(encoding="utf-8"))
        if manifest.get("format") != FORMAT or not isinstance(manifest.get("files"), dict):
            raise ValueError(f"not a {FORMAT} marker")
    except (OSError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{marker}: unreadable checkpoint marker ({type(e).__name__}: {e})") from e
    return manifest


def _checked_file(path: Path, manifest: dict, name: str, why: str) -> Path:
    file = path / name
    size = manifest["files"].get(name)
    if size is None:
        raise CheckpointError(f"{file}: not in this checkpoint ({why})")
    if not file.is_file():
        raise CheckpointError(f"{file}: missing (listed in {path / COMPLETE_FILE})")
    actual = file.stat().st_size
    if actual != size:
        raise CheckpointError(f"{file}: {actual} bytes, {COMPLETE_FILE} records {size} (truncated or modified)")
    return file


def _torch_read(file: Path) -> Any:
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{file}: cannot read ({type(e).__name__}: {str(e)[:300]})") from e


def _read_weights(file: Path, module: nn.Module, strict: bool) -> dict[str, torch.Tensor]:
    try:
        weights, _ = read_safetensors(file)
    except Exception as e:
        raise CheckpointError(f"{file}: cannot read ({type(e).__name__}: {str(e)[:300]})") from e
    for names in alias_groups(module):  # tied in this model: any stored name satisfies the others
        source = next((n for n in names if n in weights), None)
        if source is not None:
            for name in names:
                weights.setdefault(name, weights[source])
    target = {canonical(k): v for k, v in module.state_dict().items()}
    missing, unexpected, mismatched = compare_keys(weights, target)
    if missing or unexpected or mismatched:
        message = mismatch_message(f"{file}: the checkpoint does not fit {type(module).__name__}", (
            ("missing", missing), ("unexpected", unexpected), ("shape mismatch (checkpoint vs model)", mismatched)))
        if strict:
            raise CheckpointError(message)
        log.warning("%s (strict=False: loading the rest)", message)
        bad = set(unexpected) | {m.split(":", 1)[0] for m in mismatched}
        weights = {k: v for k, v in weights.items() if k not in bad}
    return weights


def _check_optimizer_state(file: Path, saved: Any, module: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    if not (isinstance(saved, dict) and isinstance(saved.get("state"), dict)
            and isinstance(saved.get("param_groups"), list)):
        raise CheckpointError(f"{file}: not an optimizer state dict (expected 'state' and 'param_groups')")
    names = {id(p): canonical(n) for n, p in module.named_parameters()}
    current = [[names.get(id(p)) for p in g["params"]] for g in optimizer.param_groups]
    if any(n is None for group in current for n in group):
        raise CheckpointError(f"{file}: the optimizer holds parameters that are not in the model")
    stored = [list(g.get("params", [])) for g in saved["param_groups"]]
    if len(stored) != len(current):
        raise CheckpointError(f"{file}: {len(stored)} parameter groups in the checkpoint, {len(current)} in the "
                              "optimizer")
    for i, (have, want) in enumerate(zip(stored, current)):
        if set(have) != set(want):
            raise CheckpointError("\n  ".join([f"{file}: parameter group {i} does not fit the optimizer",
                                               *([listing("missing", set(want) - set(have))]
                                                 if set(want) - set(have) else []),
                                               *([listing("unexpected", set(have) - set(want))]
                                                 if set(have) - set(want) else [])]))


def read_state(path) -> dict:
    """The ``state`` dict saved with the checkpoint at ``path`` (what :func:`load_checkpoint` returns), read alone and
    loading nothing: a caller can check it (e.g. the config it records) before restoring anything. The marker and the
    file's recorded size are checked as in :func:`load_checkpoint` (:class:`CheckpointError` naming the file). Not
    collective: every rank may call it (the run directory is shared)."""
    path = Path(path)
    return _read_state(path, _read_manifest(path))


def _read_state(path: Path, manifest: dict) -> dict:
    file = _checked_file(path, manifest, STATE_FILE, "loop state")
    try:
        state = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{file}: cannot read ({type(e).__name__}: {e})") from e
    if not isinstance(state, dict):
        raise CheckpointError(f"{file}: expected a JSON object, got {type(state).__name__}")
    return state


def load_checkpoint(path, *, model: nn.Module, optimizer: torch.optim.Optimizer | None = None, scheduler=None,
                    scaler=None, strict: bool = True) -> dict:
    """Restore a checkpoint written by :func:`save_checkpoint` into ``model`` (plain, DDP, ``torch.compile`` or FSDP2;
    any world size) and the given ``optimizer`` / ``scheduler`` / ``scaler``; restore this rank's RNG states (rank 0's,
    with a warning, when the world size differs from the save's); return the saved ``state`` dict.

    ``strict``: every model key must be in the file with the same shape and nothing else (the error lists the
    missing, unexpected and mismatched keys); ``strict=False`` loads the keys that fit and logs the rest. A missing
    checkpoint, marker or file, a file whose size differs from the marker's record, an unreadable or corrupt file, an
    optimizer whose parameters differ from the saved ones: :class:`CheckpointError` naming the file.

    Collective under ``torch.distributed``: every rank calls it and reads the files itself (see the module docstring).
    """
    path = Path(path)
    rank, world = _rank_world()
    module = unwrap_model(model)

    # read and check everything on every rank, then agree before the (collective) loads
    error, payload = None, None
    try:
        payload = _read_all(path, module, optimizer, scheduler, scaler, strict, rank, world)
    except Exception as e:
        error = e
    _sync(error, f"loading checkpoint {path}")
    weights, optim_state, sched_state, scaler_state, rng, state = payload

    try:
        set_model_state_dict(module, weights, options=StateDictOptions(full_state_dict=True, strict=strict))
    except Exception as e:
        raise CheckpointError(f"{path / MODEL_FILE}: cannot load into {type(module).__name__} "
                              f"({type(e).__name__}: {e})") from e
    if optimizer is not None:
        hyper = [{k: v for k, v in g.items() if k != "params"} for g in optim_state["param_groups"]]
        with_state = set(optim_state["state"])
        for group, saved in zip(optimizer.param_groups, hyper):
            # hyperparameters only the saved groups have (e.g. a scheduler's ``initial_lr``) would trip the state-dict
            # flattening in set_optimizer_state_dict (KeyError); the load sets them to the saved values anyway
            for key, value in saved.items():
                group.setdefault(key, value)
        try:
            set_optimizer_state_dict(module, optimizer, optim_state,
                                     options=StateDictOptions(full_state_dict=True, strict=False))
        except Exception as e:
            raise CheckpointError(f"{path / OPTIMIZER_FILE}: cannot load into {type(optimizer).__name__} "
                                  f"({type(e).__name__}: {e})") from e
        for group, saved in zip(optimizer.param_groups, hyper):  # the state-dict flattening turns tuples into lists
            for key, value in saved.items():
                if isinstance(value, tuple) and isinstance(group.get(key), list) and list(value) == group[key]:
                    group[key] = value
        # parameters without saved state (never had a gradient) keep none, as in the run that saved: the loader's
        # zero-lr initialisation step would otherwise leave them a state with step 1
        names = {id(p): canonical(n) for n, p in module.named_parameters()}
        for group in optimizer.param_groups:
            for p in group["params"]:
                if names.get(id(p)) not in with_state:
                    optimizer.state.pop(p, None)
    for obj, sd, name in ((scheduler, sched_state, SCHEDULER_FILE), (scaler, scaler_state, SCALER_FILE)):
        if obj is not None:
            try:
                obj.load_state_dict(sd)
            except Exception as e:
                raise CheckpointError(f"{path / name}: cannot load into {type(obj).__name__} "
                                      f"({type(e).__name__}: {e})") from e
    restore_rng(rng)
    return state


def _read_all(path: Path, module, optimizer, scheduler, scaler, strict: bool, rank: int, world: int):
    manifest = _read_manifest(path)
    weights = _read_weights(_checked_file(path, manifest, MODEL_FILE, "no weights"), module, strict)
    optim_state = sched_state = scaler_state = None
    if optimizer is not None:
        file = _checked_file(path, manifest, OPTIMIZER_FILE, "saved without an optimizer")
        optim_state = _torch_read(file)
        _check_optimizer_state(file, optim_state, module, optimizer)
    if scheduler is not None:
        file = _checked_file(path, manifest, SCHEDULER_FILE, "saved without a scheduler")
        sched_state = _torch_read(file)
        if not isinstance(sched_state, dict):
            raise CheckpointError(f"{file}: not a scheduler state dict")
    if scaler is not None:
        file = _checked_file(path, manifest, SCALER_FILE, "saved without a grad scaler")
        scaler_state = _torch_read(file)
        if not isinstance(scaler_state, dict):
            raise CheckpointError(f"{file}: not a grad scaler state dict")
    saved_world = int(manifest.get("world_size", 1))
    rng_rank = rank
    if saved_world != world:
        rng_rank = 0
        if rank == 0:
            log.warning("%s was saved by %d rank(s), this run has %d: every rank restores rank 0's RNG states",
                        path, saved_world, world)
    file = _checked_file(path, manifest, _rng_file(rng_rank), "RNG states")
    rng = _torch_read(file)
    if not isinstance(rng, dict):
        raise CheckpointError(f"{file}: not an RNG state dict")
    return weights, optim_state, sched_state, scaler_state, rng, _read_state(path, manifest)
