"""Reading state dicts safely: the one place where checkpoint files are opened.

Nothing here unpickles arbitrary objects: ``.safetensors`` through safetensors, everything else through
``torch.load(..., weights_only=True)``. A file that cannot be read raises :class:`CheckpointError` naming it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import torch

__all__ = ["CheckpointError", "LoadReport", "read_state_dict"]


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model; the message names the file and the keys."""


@dataclass
class LoadReport:
    """What a loader did: keys loaded, model keys left at their init (missing), source keys unused (unexpected),
    shape mismatches (``"key: (source shape) vs (model shape)"``), and keys dropped on purpose by the key map."""

    loaded: list[str]
    missing: list[str]
    unexpected: list[str]
    mismatched: list[str]
    dropped: list[str] = field(default_factory=list)


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
            from safetensors.torch import load_file

            return load_file(path)
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt, truncated, or a pickle that needs arbitrary objects
        raise CheckpointError(f"{path}: cannot read checkpoint ({type(e).__name__}: {str(e)[:300]})") from e
    return _unwrap(sd, path)
