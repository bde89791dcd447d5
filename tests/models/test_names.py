"""Model names: every registered name builds the class its name says, every alias resolves to its target with its
preset, a classification head without a class count fails naming ``model.overrides.num_classes``, the old names still
work. The ``base`` variants are built on the meta device (no memory, no init cost). CPU, seconds."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import lfvila
from lfvila.config import ModelConfig
from lfvila.models import (
    LFVILA,
    LFVILAForClassification,
    LFVILAForMultipleChoice,
    LFVILAForVideoClassification,
    LFVILARetrieval,
    VideoEncoder,
    create_model,
    list_aliases,
    list_models,
    model_config,
    registry,
)
from lfvila.models.factory import build_model

SIZES = ("base", "tiny")
# suffix -> class: the part or head the name says
HEADS = {"": LFVILA, "-video": VideoEncoder, "-retrieval": LFVILARetrieval, "-multichoice": LFVILAForMultipleChoice,
         "-classification": LFVILAForClassification, "-video-classification": LFVILAForVideoClassification}
NEEDS_CLASSES = ("-classification", "-video-classification")
# alias -> (target, preset)
ALIASES = {
    "lfvila-base-model": ("lfvila-base", {}),
    "lfvila-tiny-model": ("lfvila-tiny", {}),
    "lfvila-base-how2qa": ("lfvila-base-multichoice", {}),
    "lfvila-base-actnet-qa": ("lfvila-base-classification", {"num_classes": 1654}),
    "lfvila-base-violin": ("lfvila-base-classification", {"num_classes": 2}),
    **{f"lfvila-{size}-{dataset}-cls": (f"lfvila-{size}-video-classification", {"num_classes": n})
       for size in SIZES
       for dataset, n in (("coin", 180), ("lvu-relationship", 4), ("lvu-scene", 6), ("lvu-wayspeaking", 5))},
}
NAMES = {f"lfvila-{size}{suffix}": cls for size in SIZES for suffix, cls in HEADS.items()}


def _build(name: str, **overrides):
    if name.startswith("lfvila-base"):
        with torch.device("meta"):
            return create_model(name, **overrides)
    return create_model(name, **overrides)


def test_the_registered_names_are_exactly_the_size_and_head_table():
    assert set(list_models()) == set(NAMES)
    assert list_aliases() == {alias: target for alias, (target, _) in sorted(ALIASES.items())}
    assert not set(list_models()) & set(list_aliases())
    for name in list_models():  # a dataset never names a variant
        assert not any(d in name for d in ("how2qa", "actnet", "violin", "coin", "lvu", "-model"))


@pytest.mark.parametrize("name", sorted(NAMES))
def test_every_name_builds_the_class_it_says(name):
    needs = name.endswith(NEEDS_CLASSES)
    model = _build(name, **({"num_classes": 7} if needs else {}))
    assert type(model) is NAMES[name]
    if needs:
        head = model.classifier if isinstance(model, LFVILAForVideoClassification) else model.text_encoder.classifier
        assert head.out_features == 7
    size = name.split("-")[1]
    width = {"base": 1024, "tiny": 256}[size]
    encoder = model if isinstance(model, VideoEncoder) else model.video_encoder
    assert encoder.num_features == width
    assert registry.resolve(name) == (name, {})


def test_the_video_encoder_is_the_full_models_encoder():
    for size in SIZES:
        full = model_config(f"lfvila-{size}")
        assert dataclasses.replace(full.video, compat_official=False) == model_config(f"lfvila-{size}-video")
    assert model_config("lfvila-base").text.hidden_size == 1024 and model_config("lfvila-base").stage == 1


@pytest.mark.parametrize("name", sorted(n for n in NAMES if n.endswith(NEEDS_CLASSES)))
def test_a_head_without_num_classes_fails_naming_the_key(name):
    assert model_config(name).num_classes == 0
    with pytest.raises(ValueError, match=r"num_classes is not set.*model\.overrides\.num_classes"):
        _build(name)
    with pytest.raises(ValueError, match=r"model\.overrides\.num_classes"):
        _build(name, num_classes=0)
    if name.startswith("lfvila-tiny"):  # through the configured path too
        with pytest.raises(ValueError, match=r"model\.overrides\.num_classes"):
            build_model(ModelConfig(name=name, attn_impl="torch"))


@pytest.mark.parametrize("alias", sorted(ALIASES))
def test_every_alias_resolves_to_its_target_with_its_preset(alias):
    target, preset = ALIASES[alias]
    info = registry.alias_info(alias)
    assert (info.target, info.overrides) == (target, preset) and info.description
    assert registry.resolve(alias) == (target, preset)
    assert model_config(alias) == model_config(target, **preset)
    model = _build(alias)
    assert type(model) is NAMES[target] and model.cfg == model_config(target, **preset)
    if "num_classes" in preset:  # the caller's overrides come after the preset
        assert model_config(alias, num_classes=3).num_classes == 3


def test_the_old_full_model_names_still_work():
    torch.manual_seed(0)
    old = create_model("lfvila-tiny-model")
    torch.manual_seed(0)
    new = create_model("lfvila-tiny")
    assert type(old) is type(new) is LFVILA and old.cfg == new.cfg
    assert all(torch.equal(a, b) for a, b in zip(old.state_dict().values(), new.state_dict().values()))
    assert type(lfvila.create_model("lfvila-tiny-model", stage=2)) is LFVILA
    with torch.device("meta"):
        assert type(create_model("lfvila-base-model")) is LFVILA
    configured = build_model(ModelConfig(name="lfvila-tiny-coin-cls", attn_impl="torch"))
    assert type(configured) is LFVILAForVideoClassification and configured.classifier.out_features == 180
    # registry.build (the unsharded copy of a sharded model) takes an alias and uses the config as given
    rebuilt = registry.build("lfvila-tiny-coin-cls", dataclasses.replace(configured.cfg, num_classes=4))
    assert type(rebuilt) is LFVILAForVideoClassification and rebuilt.classifier.out_features == 4


def test_lfvila_base_now_means_the_full_model():
    """The one breaking change: ``lfvila-base`` / ``lfvila-tiny`` were the video encoder; no alias keeps that."""
    for size in SIZES:
        assert type(_build(f"lfvila-{size}")) is LFVILA
        assert type(_build(f"lfvila-{size}-video")) is VideoEncoder


def test_registration_errors():
    with pytest.raises(ValueError, match="already registered"):
        registry.register_alias("lfvila-base", "lfvila-tiny")
    with pytest.raises(ValueError, match="already registered"):
        registry.register_alias("lfvila-base-model", "lfvila-tiny")
    with pytest.raises(ValueError, match="already registered"):
        registry.register_model("lfvila-base-violin", lambda: None, lambda cfg: None)
    with pytest.raises(ValueError, match="not a registered variant"):
        registry.register_alias("lfvila-nope-alias", "lfvila-base-model")  # an alias of an alias
    with pytest.raises(TypeError):
        registry.register_alias("lfvila-nope-alias", "lfvila-tiny", not_a_field=1)
    assert "lfvila-nope-alias" not in list_aliases()
    with pytest.raises(ValueError, match="unknown model 'lfvila-nope'.*aliases: .*lfvila-base-model"):
        model_config("lfvila-nope")
    with pytest.raises(ValueError, match=r"model\.name: unknown model.*aliases"):
        build_model(ModelConfig(name="lfvila-nope"))
