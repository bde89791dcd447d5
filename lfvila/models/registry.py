"""Named model variants: ``create_model("lfvila-base")``.

Each variant is a config factory (a dataclass instance per variant) plus a builder that turns the config into a
module. ``create_model(name, **overrides)`` replaces config fields (``dataclasses.replace``), then builds. For now the
variants build the video encoder; the full LF-VILA model registers its own names the same way later.

Variants:
    ``lfvila-base``: the official video encoder (89,229,448 parameters), input 32 x 192 x 320 (4 clips x 8 frames).
    ``lfvila-tiny``: the same structure scaled down for tests and the CPU demo: width 32 (dims 32, 64, 128, 128, 128,
        256), heads 2, 4, 8, 8, 8, 16 (head_dim 16), depths 2 everywhere (so every layer has a shifted block), windows
        (1,2,3) (2,2,3) (4,2,3) (8,2,3) (8,2,3) (16,2,3), clips of 4 frames (``local_window=4``, the local branch is
        layer 2). Intended input 8 x 64 x 96 (patch grid 8 x 8 x 12, final grid 8 x 1 x 2); any size works.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch.nn as nn

from .video_encoder import VideoEncoder, VideoEncoderConfig


@dataclasses.dataclass(frozen=True)
class ModelEntry:
    """A registered variant: ``config()`` returns a fresh config dataclass, ``build(config)`` the module."""

    config: Callable[[], Any]
    build: Callable[[Any], nn.Module]
    description: str = ""


_REGISTRY: dict[str, ModelEntry] = {}


def register_model(name: str, config: Callable[[], Any], build: Callable[[Any], nn.Module], description: str = ""):
    """Register a variant under ``name``; an existing name raises ValueError."""
    if name in _REGISTRY:
        raise ValueError(f"model {name!r} is already registered")
    _REGISTRY[name] = ModelEntry(config, build, description)


def list_models() -> list[str]:
    """Names of the registered variants, sorted."""
    return sorted(_REGISTRY)


def model_config(name: str, **overrides) -> Any:
    """The config dataclass of variant ``name`` with ``overrides`` applied (unknown fields raise TypeError)."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(list_models())}")
    return dataclasses.replace(_REGISTRY[name].config(), **overrides)


def create_model(name: str, **overrides) -> nn.Module:
    """Build variant ``name`` with config ``overrides`` (e.g. ``attn_impl="torch"``, ``grad_checkpointing=True``,
    ``compat_official=True``, ``drop_path_rate=0.0``)."""
    config = model_config(name, **overrides)
    return _REGISTRY[name].build(config)


def build(name: str, config: Any) -> nn.Module:
    """The module of variant ``name`` built from ``config`` (its config dataclass, e.g. ``model.cfg`` of a built
    model: an unsharded copy of a sharded one)."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(list_models())}")
    return _REGISTRY[name].build(config)


def with_overrides(obj, overrides: dict, where: str):
    """``obj`` (a config dataclass) with ``overrides`` applied: nested dicts onto nested config dataclasses
    (``{text: {vocab_size: 200}}``), each value checked against its field's type (``lfvila.config.from_dict`` with
    ``base=obj``); an unknown field or a wrong type raises a ValueError naming it as ``where.key``."""
    from lfvila.config import from_dict

    return from_dict(type(obj), overrides, where, base=obj)


def _tiny_video_config() -> VideoEncoderConfig:
    return VideoEncoderConfig(
        embed_dim=32, depths=(2, 2, 2, 2, 2, 2), num_heads=(2, 4, 8, 8, 8, 16),
        window_size=((1, 2, 3), (2, 2, 3), (4, 2, 3), (8, 2, 3), (8, 2, 3), (16, 2, 3)), local_window=4,
        extra={"input": (8, 64, 96)},
    )


register_model("lfvila-base", lambda: VideoEncoderConfig(extra={"input": (32, 192, 320)}), VideoEncoder,
               "official LF-VILA video encoder, 89,229,448 parameters")
register_model("lfvila-tiny", _tiny_video_config, VideoEncoder, "scaled-down video encoder for tests and the CPU demo")
