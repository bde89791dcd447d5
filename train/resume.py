"""Which config changes a resumed run may make: :data:`RESUME_FREE`, :func:`resume_changes`, :func:`check_resume`.

A checkpoint's scheduler keeps its schedule (total and warmup steps, shape) and its optimizer the hyperparameters it
was written with, whatever the new config says, and a changed batch size, seed or dataset moves the data position.
So a resume whose config differs from the checkpoint's (its ``state.json``) in a key outside :data:`RESUME_FREE` is
refused with a ValueError naming each key with its old and new value, unless ``run.resume_changes: keep``, which logs
the keys and resumes with the checkpoint's schedule and optimizer state.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from lfvila.config import Config, config_to_dict

from . import checkpoint as ckpt
from .data import SHARDS

log = logging.getLogger(__name__)

# Config keys a resumed run may change freely: they decide what is logged, saved and evaluated, never what a training
# step computes (entries ending in "." are whole sections). Every other key of model / data / train can change the
# schedule, the optimizer, the data order or the model, and a resume that changes one is refused (run.resume_changes).
RESUME_FREE = ("train.log_every", "train.ckpt_every", "train.eval_every", "train.keep_last", "train.max_bad_steps",
               "data.num_workers", "data.val", "data.test", "eval.", "run.")
_ABSENT = object()


def _flat(tree: dict, prefix: str = "") -> dict:
    """Nested config dicts as ``{"train.lr": 1e-4, "model.overrides.text.vocab_size": 236, ...}`` (lists whole)."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def resume_changes(saved: dict, current: dict) -> list[tuple[str, object, object]]:
    """``(key, checkpoint value, current value)`` for every dotted key outside :data:`RESUME_FREE` whose value differs
    between two ``config_to_dict`` trees (``saved`` through JSON, so tuples compare as lists); a key only one side
    has is paired with ``_ABSENT``, except a key the checkpoint predates that is at its default now (a field added
    since, whose default is what the old run did). With ``data.format: shards`` read as a stream a new
    ``data.num_workers`` is a change too: the stream's slots (ranks x workers) decide which samples the rest of the
    epoch holds (``lfvila.data.shards``)."""
    old, new = _flat(saved), _flat(json.loads(json.dumps(current)))
    defaults = _flat(json.loads(json.dumps(config_to_dict(Config()))))
    shards = any(t.get("data.format") == SHARDS and t.get("data.shard_order", "stream") == "stream" for t in (old, new))
    changes = []
    for key in sorted(set(old) | set(new)):
        free = key in RESUME_FREE or key.startswith(tuple(k for k in RESUME_FREE if k.endswith(".")))
        if free and not (shards and key == "data.num_workers"):
            continue
        a, b = old.get(key, _ABSENT), new.get(key, _ABSENT)
        if a is _ABSENT and key in defaults and b == defaults[key]:
            continue  # a key added since the checkpoint was written, at its default: what that run did
        if a != b or (type(a) is not type(b) and not {type(a), type(b)} <= {int, float}):  # 1 == True, 1 == 1.0
            changes.append((key, a, b))
    return changes


def _show(value) -> str:
    return "(absent)" if value is _ABSENT else json.dumps(value)


def check_resume(cfg: Config, path: Path, is_main: bool) -> None:
    """Compare ``cfg`` with the config the checkpoint at ``path`` was written under, before anything is loaded (see
    the module docstring). Every rank reads the same file, so every rank decides alike; ``is_main`` logs."""
    saved = ckpt.read_state(path).get("config")
    if not isinstance(saved, dict):
        if is_main:
            log.warning("%s records no config: cannot check that this run's config matches it", path)
        return
    changes = resume_changes(saved, config_to_dict(cfg))
    if not changes:
        return
    listing = "; ".join(f"{key}: {_show(old)} -> {_show(new)}" for key, old, new in changes)
    if cfg.run.resume_changes == "keep":
        if is_main:
            log.warning("resuming from %s although the config changed (run.resume_changes: keep): %s. The "
                        "checkpoint's lr schedule, optimizer state and hyperparameters and its data position are "
                        "kept; the losses will follow neither config's uninterrupted run", path, listing)
        return
    raise ValueError(f"run.resume: {path} was written under another config; these keys change the schedule, the "
                     f"optimizer, the data or the model (checkpoint -> now): {listing}. Resume with the "
                     f"checkpoint's values, start a new run.dir, or set run.resume_changes: keep to continue with "
                     f"the checkpoint's schedule and optimizer state")
