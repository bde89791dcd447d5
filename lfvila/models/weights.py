"""Weights I/O, the one codec of ``save_pretrained`` (``lfvila.models.convert``) and the training checkpoints
(``train.checkpoint``): reading state dicts safely, writing safetensors with tied tensors stored once, the strict key
check and its listing, durable (fsynced) files and an atomic directory replace.

Nothing here unpickles arbitrary objects: ``.safetensors`` through safetensors, everything else through
``torch.load(..., weights_only=True)``. A file that cannot be read raises :class:`CheckpointError` naming it.

Tied tensors (one tensor under several names: BERT's decoder weight and its word embeddings) are stored once under
the first name; the safetensors metadata ``aliases`` maps every other name to it, and :func:`read_safetensors` gives
each name its tensor again.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

__all__ = [
    "CheckpointError",
    "LoadReport",
    "alias_groups",
    "canonical",
    "compare_keys",
    "fsync_dir",
    "listing",
    "mismatch_message",
    "read_safetensors",
    "read_state_dict",
    "replace_dir",
    "storable",
    "write_file",
    "write_safetensors",
]

LIST = 12  # keys listed per category in an error message


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model; the message names the file and the keys."""


@dataclass
class LoadReport:
    """What a loader did: keys loaded, model keys left at their init (missing), source keys unused (unexpected),
    shape mismatches (``"key: (source shape) vs (model shape)"``), keys dropped on purpose by the key map, and source
    bias tables resampled to the model's window (``resize_windows``; loaded too)."""

    loaded: list[str]
    missing: list[str]
    unexpected: list[str]
    mismatched: list[str]
    dropped: list[str] = field(default_factory=list)
    resized: list[str] = field(default_factory=list)


def _unwrap(sd, path: str) -> dict[str, torch.Tensor]:
    for key in ("state_dict", "model", "module"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    if not isinstance(sd, dict):
        raise CheckpointError(f"{path}: expected a state dict, found {type(sd).__name__}")
    bad = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{path}: entries that are not tensors: {', '.join(map(str, bad[:10]))}"
                              + (f" (+{len(bad) - 10} more)" if len(bad) > 10 else ""))
    return sd


def read_state_dict(src) -> dict[str, torch.Tensor]:
    """A flat ``{name: tensor}`` from a dict, a ``.safetensors`` file, a ``.bin`` / ``.pt`` / ``.pth`` file (a bare
    state dict or one under ``state_dict`` / ``model`` / ``module``), or a local directory holding
    ``model.safetensors`` or ``pytorch_model.bin`` (single or sharded with an ``*.index.json``)."""
    if isinstance(src, dict):
        return _unwrap(dict(src), "<dict>")
    path = os.fspath(src)
    if os.path.isdir(path):
        for index_name, single in (("model.safetensors.index.json", "model.safetensors"),
                                   ("pytorch_model.bin.index.json", "pytorch_model.bin")):
            if os.path.exists(os.path.join(path, single)):
                return read_state_dict(os.path.join(path, single))
            index = os.path.join(path, index_name)
            if os.path.exists(index):
                try:
                    with open(index) as f:
                        shards = sorted(set(json.load(f)["weight_map"].values()))
                except (OSError, ValueError, KeyError) as e:
                    raise CheckpointError(f"{index}: unreadable shard index ({type(e).__name__}: {e})") from e
                out: dict[str, torch.Tensor] = {}
                for shard in shards:
                    out.update(read_state_dict(os.path.join(path, shard)))
                return out
        raise CheckpointError(f"{path}: no model.safetensors or pytorch_model.bin in this directory")
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        if path.endswith(".safetensors"):
            return read_safetensors(path)[0]
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt, truncated, or a pickle that needs arbitrary objects
        raise CheckpointError(f"{path}: cannot read checkpoint ({type(e).__name__}: {str(e)[:300]})") from e
    return _unwrap(sd, path)


def read_safetensors(path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``(tensors, metadata)`` of a safetensors file on the CPU, every alias of the ``aliases`` metadata given its
    tensor (module docstring). Errors propagate (callers name the file)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device="cpu") as f:
        metadata = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    for alias, stored in json.loads(metadata.get("aliases", "{}")).items():
        if stored in tensors:
            tensors.setdefault(alias, tensors[stored])
    return tensors, metadata


def canonical(name: str) -> str:
    """A state-dict key without ``torch.compile``'s ``_orig_mod.`` prefixes."""
    return name.replace("_orig_mod.", "")


def alias_groups(module: nn.Module) -> list[list[str]]:
    """Names that refer to one tensor object (tied weights, shared buffers), in registration order; groups of 2+."""
    by_id: dict[int, list[str]] = {}
    named = list(module.named_parameters(remove_duplicate=False)) + list(module.named_buffers(remove_duplicate=False))
    for name, tensor in named:
        names = by_id.setdefault(id(tensor), [])
        key = canonical(name)
        if key not in names:
            names.append(key)
    return [names for names in by_id.values() if len(names) > 1]


def storable(state: dict, module: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``(tensors to store, {alias: stored name})`` from ``module``'s state dict ``state``: tied names stored once;
    the rest contiguous, unshared CPU tensors (safetensors refuses tensors that share memory)."""
    extra = sorted(k for k, v in state.items() if not isinstance(v, torch.Tensor))
    if extra:
        raise TypeError(listing("model state entries that are not tensors (extra state is not supported)", extra))
    out = dict(state)
    aliases: dict[str, str] = {}
    for names in alias_groups(module):
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


def listing(title: str, keys) -> str:
    """``"title (n): a, b, c (+k more)"``: at most :data:`LIST` keys, sorted."""
    keys = sorted(keys)
    more = f" (+{len(keys) - LIST} more)" if len(keys) > LIST else ""
    return f"{title} ({len(keys)}): " + ", ".join(keys[:LIST]) + more


def compare_keys(weights: dict, target: dict) -> tuple[list[str], list[str], list[str]]:
    """``(missing, unexpected, mismatched)`` of ``weights`` against the model's ``target`` state dict: target keys
    without a weight, weights without a target key, and ``"key: (file shape) vs (model shape)"`` for the rest."""
    missing = [k for k in target if k not in weights]
    unexpected = [k for k in weights if k not in target]
    mismatched = [f"{k}: {tuple(weights[k].shape)} vs {tuple(target[k].shape)}" for k in weights
                  if k in target and isinstance(target[k], torch.Tensor)
                  and tuple(weights[k].shape) != tuple(target[k].shape)]
    return missing, unexpected, mismatched


def mismatch_message(head: str, groups) -> str:
    """``head`` then one :func:`listing` line per non-empty ``(title, keys)`` of ``groups``."""
    return "\n  ".join([head, *(listing(title, keys) for title, keys in groups if keys)])


# ------------------------------------------------------------------------------------------------ durable writes


def fsync_dir(path: Path) -> None:
    """Flush a directory's entries (a rename or a new file in it) to disk; a no-op where directories cannot be
    opened or fsynced."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory handles
        return
    try:
        os.fsync(fd)
    except OSError as e:  # pragma: no cover - some filesystems refuse fsync on directories
        if e.errno not in (22, 9):  # EINVAL, EBADF
            raise
    finally:
        os.close(fd)


def write_file(path: Path, write: Callable[[Path], None]) -> int:
    """``write(path)``, then flush the file to disk (fsync); returns its size. Every weights and checkpoint file goes
    through here (tests wrap ``train.checkpoint.write_file`` to interrupt a save after a given file)."""
    write(path)
    with open(path, "rb+") as f:
        os.fsync(f.fileno())
    return Path(path).stat().st_size


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], aliases: dict[str, str], metadata: dict,
                      write: Callable = write_file) -> int:
    """Write ``tensors`` (from :func:`storable`) with ``aliases`` and ``metadata`` (str -> str) to ``path``, fsynced
    (through ``write``, :func:`write_file` by default); returns the size."""
    from safetensors.torch import save_file

    meta = {**metadata, "aliases": json.dumps(aliases, sort_keys=True)}
    return write(Path(path), lambda p: save_file(tensors, str(p), metadata=meta))


def replace_dir(tmp: Path, final: Path, trash: Path) -> None:
    """Make the complete directory ``tmp`` appear as ``final`` atomically: an existing ``final`` is first renamed to
    ``trash`` (a name no reader takes for a checkpoint), then ``tmp`` renamed to ``final``, the parent fsynced, and
    the old one deleted. At every moment ``final`` is either the old directory or the new one, whole."""
    old = None
    if final.exists():
        old = trash
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
    os.replace(tmp, final)
    fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
