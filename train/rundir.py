"""The run directory's checkpoints: names, which ones are complete, the newest, pruning, and ``run.resume``.

``run_dir/checkpoints/`` holds ``step_{step:08d}/`` directories (more digits past 99,999,999), each complete only
with its ``COMPLETE`` marker; ``.tmp-step_*`` (a save in progress or interrupted) and ``.trash-step_*`` (a deletion
in progress) are never taken for a checkpoint. What a checkpoint holds and how it is written: ``train.checkpoint``.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch.distributed as dist

from lfvila.models.weights import CheckpointError, fsync_dir

log = logging.getLogger(__name__)

CHECKPOINTS_DIR = "checkpoints"
COMPLETE_FILE = "COMPLETE"
TMP_PREFIX = ".tmp-"
TRASH_PREFIX = ".trash-"
_STEP_RE = re.compile(r"step_(\d+)")


def step_name(step: int) -> str:
    return f"step_{step:08d}"


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def complete_steps(root: Path) -> list[tuple[int, Path]]:
    out = []
    for entry in root.iterdir():
        m = _STEP_RE.fullmatch(entry.name)
        if m and entry.is_dir() and (entry / COMPLETE_FILE).is_file():
            out.append((int(m.group(1)), entry))
    return sorted(out)


def prune(root: Path, new: Path, keep_last: int | None) -> None:
    """Delete complete checkpoints beyond the ``keep_last`` newest (never ``new``) and leftovers of interrupted
    saves / deletions. Each doomed directory is renamed to ``.trash-*`` first, so a half-deleted one is never taken
    for a checkpoint."""
    doomed = []
    if keep_last is not None:
        ranked = sorted(complete_steps(root), reverse=True)
        keep = {path for _, path in ranked[:keep_last]} | {new}
        doomed = [path for _, path in ranked if path not in keep]
    for path in doomed:
        trash = root / (TRASH_PREFIX + path.name)
        if trash.exists():
            shutil.rmtree(trash)
        os.replace(path, trash)
        log.info("deleted old checkpoint %s", path)
    if doomed:
        fsync_dir(root)
    for entry in root.iterdir():
        if entry.is_dir() and entry.name.startswith((TMP_PREFIX, TRASH_PREFIX)):
            shutil.rmtree(entry, ignore_errors=True)


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
