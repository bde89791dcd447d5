"""Pieces of the checkpoint writer that know nothing about models: RNG states, the plain-data check that keeps every
``.pt`` file readable with ``torch.load(weights_only=True)``, and the writers of ``.pt`` and text files (their fsync:
``lfvila.models.weights.write_file``)."""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

log = logging.getLogger("train.checkpoint")


def capture_rng() -> dict[str, Any]:
    """This process's RNG states: ``python`` (``random.getstate()``), ``numpy`` (the legacy global generator, as
    ``{"keys": int64 tensor, "pos", "has_gauss", "cached_gaussian"}``), ``torch`` (CPU ``ByteTensor``) and, once this
    process has initialised CUDA, ``cuda`` (one ``ByteTensor`` per visible device). Only tensors, numbers, tuples,
    dicts: it can be saved and read back with ``weights_only=True``.

    These are the streams the training steps consume (dropout, drop path, MTC's draws, MLM masking). The data side
    needs none of them saved, and must not draw from them: its randomness is a function of the seed, the rank, the
    epoch and the sample (``train.data``), so what it would draw is not part of this state."""
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy is a dependency, but the RNG code does not need it
        np = None
    if np is not None:
        name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
        state["numpy"] = {"bit_generator": str(name), "keys": torch.from_numpy(keys.astype(np.int64)),
                          "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # a process that never touched CUDA: nothing to
        state["cuda"] = list(torch.cuda.get_rng_state_all())         # save, and no CUDA context created for it
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Set the RNG states captured by :func:`capture_rng` (missing entries are left alone; other keys ignored).
    CUDA states are restored for the devices both runs have; a different device count, or CUDA states without CUDA,
    is logged as a warning."""
    if "python" in state:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
    if "numpy" in state:
        import numpy as np

        s = state["numpy"]
        keys = s["keys"].numpy() if isinstance(s["keys"], torch.Tensor) else np.asarray(s["keys"])
        np.random.set_state((s.get("bit_generator", "MT19937"), keys.astype(np.uint32), int(s["pos"]),
                             int(s["has_gauss"]), float(s["cached_gaussian"])))
    if "torch" in state:
        torch.set_rng_state(state["torch"].cpu())
    cuda = state.get("cuda")
    if cuda:
        if not torch.cuda.is_available():
            log.warning("checkpoint has CUDA RNG states for %d device(s) but CUDA is not available: not restored",
                        len(cuda))
            return
        n = torch.cuda.device_count()
        if n != len(cuda):
            log.warning("checkpoint has CUDA RNG states for %d device(s), this process sees %d: restoring the first %d",
                        len(cuda), n, min(n, len(cuda)))
        for i in range(min(n, len(cuda))):
            torch.cuda.set_rng_state(cuda[i].cpu(), i)


# ------------------------------------------------------------------------------------------------ writing

_PLAIN_TYPES = (int, float, bool, str, type(None))


def check_plain(obj: Any, where: str) -> None:
    """Raise TypeError (naming the entry) unless ``obj`` loads with ``torch.load(weights_only=True)``: plain tensors,
    numbers, strings, None, and lists / tuples / dicts of them (exact types: a numpy scalar is not a float here)."""
    if isinstance(obj, torch.Tensor):
        if type(obj) not in (torch.Tensor, nn.Parameter):
            raise TypeError(f"{where}: a {type(obj).__name__} cannot be stored in a checkpoint (a plain tensor can)")
        return
    if type(obj) in _PLAIN_TYPES:
        return
    if type(obj) in (list, tuple, torch.Size):
        for i, v in enumerate(obj):
            check_plain(v, f"{where}[{i}]")
        return
    if isinstance(obj, dict) and type(obj).__module__ in ("builtins", "collections"):
        for k, v in obj.items():
            if type(k) not in (str, int):
                raise TypeError(f"{where}: key {k!r} of type {type(k).__name__} (only str / int keys can be stored)")
            check_plain(v, f"{where}[{k!r}]")
        return
    raise TypeError(f"{where}: a {type(obj).__name__} cannot be stored in a checkpoint (only tensors, numbers, "
                    "strings, None, lists, tuples and dicts load with weights_only=True)")


def torch_writer(obj: Any) -> Callable[[Path], None]:
    def write(path: Path) -> None:
        with open(path, "wb") as f:
            torch.save(obj, f)
    return write


def text_writer(text: str) -> Callable[[Path], None]:
    def write(path: Path) -> None:
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
    return write
