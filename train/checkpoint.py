"""Atomic training checkpoints: full weights, optimizer, scheduler, grad scaler, RNG and loop state; ``--resume auto``.

On-disk layout (``run_dir/checkpoints/``)::

    step_00001200/                 one complete checkpoint (``step_{step:08d}``; more digits past 99,999,999)
      model.safetensors            full, unsharded weights in the parameters' own dtype (fp32 master weights);
                                   tied / shared tensors stored once, the other names in the metadata ``aliases``
      optimizer.pt                 ``torch.save`` of the full optimizer state dict, parameters named by their FQN
                                   (``torch.distributed.checkpoint.state_dict`` layout: the same for a plain, DDP
                                   or FSDP2 model, so a checkpoint written by one loads into another)
      scheduler.pt, scaler.pt      ``torch.save`` of ``scheduler.state_dict()`` / ``scaler.state_dict()``
      rng_rank{r}.pt               one per rank: python ``random``, numpy, torch CPU and every CUDA device's RNG
      state.json                   the caller's ``state`` (epoch, step, batches consumed, counters, config, ...)
      COMPLETE                     written last: JSON with the step, the world size and every file with its size
    .tmp-step_00001300/            a save in progress, or one that was interrupted: never loaded
    .trash-step_00000900/          an old checkpoint being deleted: never loaded

Every ``.pt`` file holds only tensors, numbers, strings, ``None``, lists, tuples and dicts (checked before writing),
so it is read back with ``torch.load(weights_only=True)``; the weights go through safetensors. Nothing unpickles
arbitrary objects. Optimizer, scheduler and scaler files are written only for the objects passed to the save.

Atomicity: everything is written into ``.tmp-step_N``, each file flushed and fsynced; then ``COMPLETE`` (fsynced), the
temporary directory fsynced, renamed to ``step_N`` and the parent directory fsynced. A checkpoint directory therefore
either exists under its final name with every file and its ``COMPLETE`` marker, or not at all: a writer killed at any
point leaves at most a ``.tmp-*`` directory, which :func:`latest_checkpoint` ignores (with a warning) and the next
save of that step replaces. Only after the rename are checkpoints beyond ``keep_last`` deleted (renamed to
``.trash-*`` first, then removed; never the new one); leftover ``.tmp-*`` / ``.trash-*`` directories of earlier
interrupted saves are removed at the same time.

Distributed protocol (``torch.distributed`` initialised; the same code runs single-process with every collective
skipped). ``save_checkpoint`` and ``load_checkpoint`` are collective: every rank must call them, with the same path
and step. The run directory must be on a filesystem that every rank sees (each rank writes its RNG file and reads
the checkpoint itself).

``save_checkpoint``:
  0. every rank: ``get_model_state_dict`` / ``get_optimizer_state_dict`` with
     ``StateDictOptions(full_state_dict=True, cpu_offload=True)`` (collective for FSDP2: the shards are gathered;
     only rank 0 receives the full CPU state dicts, the others empty ones); every rank captures its RNG states.
  1. rank 0: creates ``.tmp-step_N`` (removing a stale one), writes the weights, optimizer, scheduler, scaler,
     ``state.json`` and ``rng_rank0.pt``, each fsynced. Sync A (``all_gather_object`` of each rank's error or
     ``None``; it doubles as a barrier): the temporary directory now exists.
  2. every other rank: writes ``rng_rank{r}.pt`` into it (fsynced). Sync B: rank 0 learns every file and its size
     and checks that it sees them (a run directory that is not shared fails here, loudly).
  3. rank 0: writes ``COMPLETE``, fsyncs, renames to ``step_N`` (an existing ``step_N`` is replaced), fsyncs the
     parent. Sync C: when ``save_checkpoint`` returns on any rank, the checkpoint is complete on disk.
  4. rank 0: deletes old checkpoints (failures there are logged, never raised).
  An error on any rank in steps 1-3 is reported to all ranks at the next sync: rank 0 removes the temporary
  directory and every rank raises (no rank is left waiting in a barrier).

``load_checkpoint``: every rank reads the files itself (the simple correct option: no broadcast of tensors, the same
code for a plain, DDP or FSDP2 model; it costs one full CPU copy of the weights and optimizer state per rank while
loading). Files are read and checked against the model first, then a sync (every rank raises if any rank failed),
then ``set_model_state_dict`` / ``set_optimizer_state_dict`` with ``StateDictOptions(full_state_dict=True)`` (for
FSDP2 each rank keeps its own shards of the full tensors; collective). Each rank restores its own RNG file; when the
world size changed since the save, every rank restores rank 0's states, with a warning.

``resolve_resume`` is collective as well when a process group is initialised: rank 0 decides and broadcasts, so that
every rank loads the same checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from collections.abc import Callable
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

from lfvila.models._io import CheckpointError

from .dist import unwrap_model
from .persist import _check_plain, _fsync_dir, _text_writer, _torch_writer, _write_file, capture_rng, restore_rng

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

CHECKPOINTS_DIR = "checkpoints"
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
SCHEDULER_FILE = "scheduler.pt"
SCALER_FILE = "scaler.pt"
STATE_FILE = "state.json"
COMPLETE_FILE = "COMPLETE"
TMP_PREFIX = ".tmp-"
TRASH_PREFIX = ".trash-"
FORMAT = "lfvila-train-checkpoint"
FORMAT_VERSION = 1
_STEP_RE = re.compile(r"step_(\d+)")
_LIST = 12  # keys listed per category in an error message


def _rng_file(rank: int) -> str:
    return f"rng_rank{rank}.pt"


def _step_name(step: int) -> str:
    return f"step_{step:08d}"


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _canonical(name: str) -> str:
    """A state-dict key as ``torch.distributed.checkpoint.state_dict`` names it (no ``torch.compile`` prefixes)."""
    return name.replace("_orig_mod.", "")


def _listing(title: str, keys) -> str:
    keys = sorted(keys)
    more = f" (+{len(keys) - _LIST} more)" if len(keys) > _LIST else ""
    return f"{title} ({len(keys)}): " + ", ".join(keys[:_LIST]) + more


# ------------------------------------------------------------------------------------------------ RNG


def _alias_groups(module: nn.Module) -> list[list[str]]:
    """Names that refer to one tensor object (tied weights, shared buffers), in registration order; groups of 2+."""
    by_id: dict[int, list[str]] = {}
    named = list(module.named_parameters(remove_duplicate=False)) + list(module.named_buffers(remove_duplicate=False))
    for name, tensor in named:
        names = by_id.setdefault(id(tensor), [])
        key = _canonical(name)
        if key not in names:
            names.append(key)
    return [names for names in by_id.values() if len(names) > 1]


def _weights_for_safetensors(state: dict[str, Any], module: nn.Module) -> tuple[dict[str, torch.Tensor],
                                                                                   dict[str, str]]:
    """(tensors to store, ``{alias: stored name}``): tied names stored once; the rest contiguous, unshared CPU
    tensors (safetensors refuses tensors that share memory)."""
    extra = sorted(k for k, v in state.items() if not isinstance(v, torch.Tensor))
    if extra:
        raise TypeError(_listing("model state entries that are not tensors (extra state is not supported)", extra))
    out = dict(state)
    aliases: dict[str, str] = {}
    for names in _alias_groups(module):
        present = [n for n in names if n in out]
        for name in present[1:]:
            aliases[name] = present[0]
            del out[name]
    storages: set[int] = set()
    for key, value in out.items():
        value = value.detach()
        if value.device.type != "cpu":
            value = value.cpu()
        if not value.is_contiguous():
            value = value.contiguous()
        if value.numel():
            ptr = value.untyped_storage().data_ptr()
            if ptr in storages:
                value = value.clone()
            else:
                storages.add(ptr)
        out[key] = value
    return out, aliases


def _safetensors_writer(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Callable[[Path], None]:
    def write(path: Path) -> None:
        from safetensors.torch import save_file

        save_file(tensors, str(path), metadata=metadata)
    return write


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
    final = root / _step_name(step)
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
                mine[name] = _write_file(tmp / name, _torch_writer(rng))
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
        _prune(root, final, keep_last)
    except Exception as e:  # a failed cleanup must not fail the save
        log.warning("could not delete old checkpoints in %s: %s: %s", root, type(e).__name__, e)
    return final


def _write_rank0_files(tmp: Path, root: Path, step: int, module: nn.Module, model_state, optim_state, scheduler,
                       scaler, state, rng) -> dict[str, int]:
    # validate everything before the first byte is written
    if state is not None and not isinstance(state, dict):
        raise TypeError(f"state must be a dict, got {type(state).__name__}")
    state_text = json.dumps({} if state is None else state, indent=2)
    tensors, aliases = _weights_for_safetensors(model_state, module)
    extra: dict[str, Any] = {}
    if optim_state is not None:
        _check_plain(optim_state, "optimizer state")
        extra[OPTIMIZER_FILE] = optim_state
    if scheduler is not None:
        extra[SCHEDULER_FILE] = scheduler.state_dict()
        _check_plain(extra[SCHEDULER_FILE], "scheduler.state_dict()")
    if scaler is not None:
        extra[SCALER_FILE] = scaler.state_dict()
        _check_plain(extra[SCALER_FILE], "scaler.state_dict()")
    _check_plain(rng, "RNG state")

    root.mkdir(parents=True, exist_ok=True)
    if tmp.exists():
        log.warning("%s: removing the leftover of an interrupted save", tmp)
        shutil.rmtree(tmp)
    tmp.mkdir()
    files = {MODEL_FILE: _write_file(tmp / MODEL_FILE, _safetensors_writer(
        tensors, {"format": "pt", "step": str(step), "aliases": json.dumps(aliases, sort_keys=True)}))}
    for name, obj in extra.items():
        files[name] = _write_file(tmp / name, _torch_writer(obj))
    files[STATE_FILE] = _write_file(tmp / STATE_FILE, _text_writer(state_text))
    files[_rng_file(0)] = _write_file(tmp / _rng_file(0), _torch_writer(rng))
    return files


def _seal(tmp: Path, final: Path, root: Path, step: int, world: int, files: dict[str, int]) -> None:
    _fsync_dir(tmp)
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "step": step, "world_size": world,
                "files": dict(sorted(files.items())), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    _write_file(tmp / COMPLETE_FILE, _text_writer(json.dumps(manifest, indent=2) + "\n"))
    _fsync_dir(tmp)
    old = None
    if final.exists():  # the same step saved again (e.g. a preemption save right after a periodic one)
        old = root / (TRASH_PREFIX + final.name)
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
    os.replace(tmp, final)
    _fsync_dir(root)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _complete_steps(root: Path) -> list[tuple[int, Path]]:
    out = []
    for entry in root.iterdir():
        m = _STEP_RE.fullmatch(entry.name)
        if m and entry.is_dir() and (entry / COMPLETE_FILE).is_file():
            out.append((int(m.group(1)), entry))
    return sorted(out)


def _prune(root: Path, new: Path, keep_last: int | None) -> None:
    """Delete complete checkpoints beyond the ``keep_last`` newest (never ``new``) and leftovers of interrupted
    saves / deletions. Each doomed directory is renamed to ``.trash-*`` first, so a half-deleted one is never taken
    for a checkpoint."""
    doomed = []
    if keep_last is not None:
        ranked = sorted(_complete_steps(root), reverse=True)
        keep = {path for _, path in ranked[:keep_last]} | {new}
        doomed = [path for _, path in ranked if path not in keep]
    for path in doomed:
        trash = root / (TRASH_PREFIX + path.name)
        if trash.exists():
            shutil.rmtree(trash)
        os.replace(path, trash)
        log.info("deleted old checkpoint %s", path)
    if doomed:
        _fsync_dir(root)
    for entry in root.iterdir():
        if entry.is_dir() and entry.name.startswith((TMP_PREFIX, TRASH_PREFIX)):
            shutil.rmtree(entry, ignore_errors=True)


# ------------------------------------------------------------------------------------------------ finding


def latest_checkpoint(run_dir) -> Path | None:
    """The newest ``run_dir/checkpoints/step_*`` directory with a ``COMPLETE`` marker, or None. Directories without
    the marker and ``.tmp-*`` / ``.trash-*`` leftovers of interrupted saves or deletions are never returned; each is
    reported with ``logging.warning``. Not collective (plain filesystem reads)."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return None
    best: tuple[int, Path] | None = None
    for entry in sorted(root.iterdir()):
        if entry.name.startswith(TMP_PREFIX):
            log.warning("%s: incomplete checkpoint (a save that did not finish): ignored", entry)
            continue
        if entry.name.startswith(TRASH_PREFIX):
            log.warning("%s: a checkpoint whose deletion did not finish: ignored", entry)
            continue
        m = _STEP_RE.fullmatch(entry.name)
        if not m or not entry.is_dir():
            continue
        if not (entry / COMPLETE_FILE).is_file():
            log.warning("%s: no %s marker (incomplete checkpoint): ignored", entry, COMPLETE_FILE)
            continue
        step = int(m.group(1))
        if best is None or step > best[0]:
            best = (step, entry)
    return None if best is None else best[1]


def _resolve(run_dir, resume) -> Path | None:
    text = "" if resume is None else os.fspath(resume).strip()
    if text.lower() in ("", "none"):
        return None
    if text.lower() == "auto":
        return latest_checkpoint(run_dir)
    path = Path(text)
    if not path.exists() and not path.is_absolute() and (Path(run_dir) / CHECKPOINTS_DIR / text).exists():
        path = Path(run_dir) / CHECKPOINTS_DIR / text
    if not path.is_dir():
        raise CheckpointError(f"{path}: resume checkpoint not found (expected a step_* checkpoint directory)")
    if not (path / COMPLETE_FILE).is_file():
        raise CheckpointError(f"{path}: not a complete checkpoint (no {COMPLETE_FILE} marker: an interrupted save?)")
    return path


def resolve_resume(run_dir, resume: str | os.PathLike | None) -> Path | None:
    """The checkpoint to resume from: ``"auto"`` the newest complete one in ``run_dir`` (None when there is none),
    ``"none"`` / ``""`` / None nothing, anything else a checkpoint directory (absolute, relative to the working
    directory, or a name under ``run_dir/checkpoints``) that must be complete, else :class:`CheckpointError`.

    Collective when a process group is initialised: rank 0 decides and broadcasts its answer (or its error)."""
    if not _distributed() or dist.get_world_size() == 1:
        return _resolve(run_dir, resume)
    answer: list[Any] = [None]
    if dist.get_rank() == 0:
        try:
            found = _resolve(run_dir, resume)
            answer = [("ok", None if found is None else str(found))]
        except Exception as e:
            answer = [("error", str(e))]
    dist.broadcast_object_list(answer, src=0)
    kind, value = answer[0]
    if kind == "error":
        raise CheckpointError(value)
    return None if value is None else Path(value)


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
        from safetensors import safe_open

        with safe_open(str(file), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            weights = {k: f.get_tensor(k) for k in f.keys()}
        aliases = json.loads(metadata.get("aliases", "{}"))
    except Exception as e:
        raise CheckpointError(f"{file}: cannot read ({type(e).__name__}: {str(e)[:300]})") from e
    for alias, stored in aliases.items():
        if stored in weights:
            weights.setdefault(alias, weights[stored])
    for names in _alias_groups(module):  # tied in this model: any stored name satisfies the others
        source = next((n for n in names if n in weights), None)
        if source is not None:
            for name in names:
                weights.setdefault(name, weights[source])
    target = {_canonical(k): v for k, v in module.state_dict().items()}
    missing = [k for k in target if k not in weights]
    unexpected = [k for k in weights if k not in target]
    mismatched = [f"{k}: {tuple(weights[k].shape)} vs {tuple(target[k].shape)}" for k in weights
                  if k in target and isinstance(target[k], torch.Tensor) and weights[k].shape != target[k].shape]
    if missing or unexpected or mismatched:
        parts = [f"{file}: the checkpoint does not fit {type(module).__name__}"]
        for title, keys in (("missing", missing), ("unexpected", unexpected),
                            ("shape mismatch (checkpoint vs model)", mismatched)):
            if keys:
                parts.append(_listing(title, keys))
        if strict:
            raise CheckpointError("\n  ".join(parts))
        log.warning("%s (strict=False: loading the rest)", "\n  ".join(parts))
        bad = set(unexpected) | {m.split(":", 1)[0] for m in mismatched}
        weights = {k: v for k, v in weights.items() if k not in bad}
    return weights


def _check_optimizer_state(file: Path, saved: Any, module: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    if not (isinstance(saved, dict) and isinstance(saved.get("state"), dict)
            and isinstance(saved.get("param_groups"), list)):
        raise CheckpointError(f"{file}: not an optimizer state dict (expected 'state' and 'param_groups')")
    names = {id(p): _canonical(n) for n, p in module.named_parameters()}
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
                                               *([_listing("missing", set(want) - set(have))]
                                                 if set(want) - set(have) else []),
                                               *([_listing("unexpected", set(have) - set(want))]
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
        names = {id(p): _canonical(n) for n, p in module.named_parameters()}
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
