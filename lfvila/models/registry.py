"""Named model variants: ``create_model("lfvila-base")``.

Each variant is a config factory (a dataclass instance per variant) plus a builder that turns the config into a
module. ``create_model(name, **overrides)`` replaces config fields (``dataclasses.replace``), then builds. A name says
what the model is: the size (``base``: the official numbers; ``tiny``: scaled down for tests and the CPU demo), then
the part or the head, never a dataset. A dataset is a config (``train/configs/*.yaml``): a head plus its class count
(``model.overrides.num_classes``).

Variants (``list_models()``; importing ``lfvila.models`` registers them all), name -> class:

    ``lfvila-base``, ``lfvila-tiny``                          -> ``LFVILA``: the full pre-training model
                                                                 (``stage=1 | 2``; ``pretraining.py``)
    ``lfvila-base-video``, ``lfvila-tiny-video``              -> ``VideoEncoder``: the video encoder alone
    ``lfvila-base-retrieval``, ``lfvila-tiny-retrieval``      -> ``LFVILARetrieval``: paragraph-to-video retrieval
    ``lfvila-base-multichoice``, ``lfvila-tiny-multichoice``  -> ``LFVILAForMultipleChoice``: multiple-choice QA
    ``lfvila-base-classification``, ``lfvila-tiny-classification``
                                                              -> ``LFVILAForClassification``: QA answers as classes
                                                                 (ActivityNet-QA 1654, VIOLIN 2)
    ``lfvila-base-video-classification``, ``lfvila-tiny-video-classification``
                                                              -> ``LFVILAForVideoClassification``: video-only
                                                                 classification (COIN 180, LVU 4 / 6 / 5)

The two classification heads have no class count of their own: building one without ``num_classes``
(``model.overrides.num_classes`` in a config, ``create_model(name, num_classes=N)`` in code) raises a ValueError naming
``model.overrides.num_classes``. The task heads: ``tasks.py``.

    ``lfvila-base-video``: the official video encoder (89,229,448 parameters), input 32 x 192 x 320 (4 clips x 8
        frames).
    ``lfvila-tiny-video``: the same structure scaled down for tests and the CPU demo: width 32 (dims 32, 64, 128, 128,
        128, 256), heads 2, 4, 8, 8, 8, 16 (head_dim 16), depths 2 everywhere (so every layer has a shifted block),
        windows (1,2,3) (2,2,3) (4,2,3) (8,2,3) (8,2,3) (16,2,3), clips of 4 frames (``local_window=4``, the local
        branch is layer 2). Intended input 8 x 64 x 96 (patch grid 8 x 8 x 12, final grid 8 x 1 x 2); any size works.

Aliases (``register_alias``; ``list_aliases()``: alias -> target; ``alias_info(name)``): another name for a registered
variant plus preset config fields, applied before the caller's overrides. ``create_model``, ``model_config`` and
``build`` accept an alias wherever they accept a name; the model built is its target's class. Alias -> target (preset):

    ``lfvila-base-model`` -> ``lfvila-base``; ``lfvila-tiny-model`` -> ``lfvila-tiny``
    ``lfvila-base-how2qa`` -> ``lfvila-base-multichoice``
    ``lfvila-base-actnet-qa`` -> ``lfvila-base-classification`` (``num_classes=1654``)
    ``lfvila-base-violin`` -> ``lfvila-base-classification`` (``num_classes=2``)
    ``lfvila-{base,tiny}-coin-cls`` -> ``lfvila-{base,tiny}-video-classification`` (``num_classes=180``)
    ``lfvila-{base,tiny}-lvu-relationship-cls`` -> ``lfvila-{base,tiny}-video-classification`` (``num_classes=4``)
    ``lfvila-{base,tiny}-lvu-scene-cls`` -> ``lfvila-{base,tiny}-video-classification`` (``num_classes=6``)
    ``lfvila-{base,tiny}-lvu-wayspeaking-cls`` -> ``lfvila-{base,tiny}-video-classification`` (``num_classes=5``)

Breaking change, with no alias: ``lfvila-base`` / ``lfvila-tiny`` used to name the video encoder and now name the full
model; the video encoder is ``lfvila-base-video`` / ``lfvila-tiny-video``.
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


@dataclasses.dataclass(frozen=True)
class AliasEntry:
    """A registered alias: variant ``target`` with config fields ``overrides`` preset."""

    target: str
    overrides: dict[str, Any]
    description: str = ""


_REGISTRY: dict[str, ModelEntry] = {}
_ALIASES: dict[str, AliasEntry] = {}


def register_model(name: str, config: Callable[[], Any], build: Callable[[Any], nn.Module], description: str = ""):
    """Register a variant under ``name``; a name already registered (variant or alias) raises ValueError."""
    if name in _REGISTRY or name in _ALIASES:
        raise ValueError(f"model {name!r} is already registered")
    _REGISTRY[name] = ModelEntry(config, build, description)


def register_alias(name: str, target: str, description: str = "", **config_overrides):
    """Register ``name`` as another name for variant ``target`` with ``config_overrides`` preset (applied before the
    caller's overrides). ``target`` must be a registered variant (not an alias); a taken ``name`` or an unknown
    config field raises ValueError / TypeError here, not at first use."""
    if name in _REGISTRY or name in _ALIASES:
        raise ValueError(f"model {name!r} is already registered")
    if target not in _REGISTRY:
        raise ValueError(f"alias {name!r}: target {target!r} is not a registered variant")
    dataclasses.replace(_REGISTRY[target].config(), **config_overrides)  # unknown fields raise now
    _ALIASES[name] = AliasEntry(target, dict(config_overrides), description)


def list_models() -> list[str]:
    """Names of the registered variants, sorted (aliases not included: ``list_aliases``)."""
    return sorted(_REGISTRY)


def list_aliases() -> dict[str, str]:
    """The registered aliases and their targets, ``{alias: target}``, sorted by alias."""
    return {name: _ALIASES[name].target for name in sorted(_ALIASES)}


def alias_info(name: str) -> AliasEntry:
    """The ``AliasEntry`` (``target``, ``overrides``, ``description``) of alias ``name``; KeyError if not an alias."""
    return _ALIASES[name]


def is_registered(name: str) -> bool:
    """Whether ``name`` is a registered variant or alias."""
    return name in _REGISTRY or name in _ALIASES


def resolve(name: str) -> tuple[str, dict[str, Any]]:
    """``(variant, preset overrides)`` of ``name``: ``(name, {})`` for a variant, the target and preset for an alias;
    an unknown name raises ValueError listing the known ones."""
    if name in _REGISTRY:
        return name, {}
    if name in _ALIASES:
        alias = _ALIASES[name]
        return alias.target, dict(alias.overrides)
    raise ValueError(f"unknown model {name!r}; known: {', '.join(list_models())}; aliases: "
                     f"{', '.join(sorted(_ALIASES))}")


def model_config(name: str, **overrides) -> Any:
    """The config dataclass of variant or alias ``name`` (an alias's preset first) with ``overrides`` applied (unknown
    fields raise TypeError)."""
    target, preset = resolve(name)
    return dataclasses.replace(_REGISTRY[target].config(), **{**preset, **overrides})


def create_model(name: str, **overrides) -> nn.Module:
    """Build variant (or alias) ``name`` with config ``overrides`` (e.g. ``attn_impl="torch"``,
    ``grad_checkpointing=True``, ``compat_official=True``, ``drop_path_rate=0.0``, ``num_classes=180``)."""
    config = model_config(name, **overrides)
    return _REGISTRY[resolve(name)[0]].build(config)


def model_class(name: str):
    """What variant (or alias) ``name`` builds: its module class (or builder)."""
    return _REGISTRY[resolve(name)[0]].build


def build(name: str, config: Any) -> nn.Module:
    """The module of variant (or alias) ``name`` built from ``config`` (its config dataclass, e.g. ``model.cfg`` of a
    built model: an unsharded copy of a sharded one). ``config`` is used as given: an alias's preset is not
    re-applied."""
    return _REGISTRY[resolve(name)[0]].build(config)


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


register_model("lfvila-base-video", lambda: VideoEncoderConfig(extra={"input": (32, 192, 320)}), VideoEncoder,
               "official LF-VILA video encoder, 89,229,448 parameters")
register_model("lfvila-tiny-video", _tiny_video_config, VideoEncoder,
               "scaled-down video encoder for tests and the CPU demo")
