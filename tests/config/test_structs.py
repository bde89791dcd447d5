"""The one dict <-> dataclass converter (``lfvila.config.from_dict`` / ``to_dict``): the run config from YAML, model
configs from ``config.json`` and ``model.overrides`` onto a variant's config all go through it."""

from __future__ import annotations

import json

import pytest

from lfvila.config import Config, ConfigError, from_dict, load_config, to_dict
from lfvila.models import convert, model_config
from lfvila.models.registry import with_overrides


def test_run_config_round_trips_through_json():
    cfg = load_config(None, ["--train.lr", "5e-5", "--data.size", "[64, 96]", "--model.overrides", '{"stage": 2}'])
    assert cfg.train.lr == 5e-5 and cfg.data.size == (64, 96) and isinstance(cfg.data.size, tuple)
    assert from_dict(Config, json.loads(json.dumps(to_dict(cfg)))) == cfg


def test_errors_name_the_dotted_key():
    with pytest.raises(ConfigError, match=r"^train\.lr: expected float"):
        from_dict(Config, {"train": {"lr": "fast"}})
    with pytest.raises(ConfigError, match=r"^data\.nope: unknown key"):
        from_dict(Config, {"data": {"nope": 1}})
    with pytest.raises(ConfigError, match=r"^data\.size: expected 2 values"):
        from_dict(Config, {"data": {"size": [1, 2, 3]}})


def test_overrides_change_only_the_keys_given_nested_too():
    base = model_config("lfvila-tiny")
    out = with_overrides(base, {"text": {"vocab_size": 300}, "video": {"window_size": [[1, 2, 3]] * 6}}, "m")
    assert out.text.vocab_size == 300 and out.text.hidden_size == base.text.hidden_size
    assert out.video.window_size == ((1, 2, 3),) * 6 and out.video.embed_dim == base.video.embed_dim
    assert out.embed_dim == base.embed_dim and base.text.vocab_size != 300
    with pytest.raises(ValueError, match=r"^m\.text\.vocab_size: expected int"):
        with_overrides(base, {"text": {"vocab_size": "big"}}, "m")
    with pytest.raises(ValueError, match=r"^m\.nope: unknown key"):
        with_overrides(base, {"nope": 1}, "m")


def test_model_config_round_trips_with_its_bert_config_and_tuples_in_dicts():
    from transformers import BertConfig

    cfg = model_config("lfvila-tiny")
    cfg = with_overrides(cfg, {"text": {"bert_config": None}}, "m")
    bert = BertConfig(hidden_size=64, num_attention_heads=2, intermediate_size=128)
    import dataclasses

    cfg = dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, bert_config=bert))
    data = json.loads(json.dumps(convert.config_to_dict(cfg)))
    back = convert.config_from_dict(type(cfg), data)
    assert back.text.bert_config.to_dict() == bert.to_dict()
    assert back.video.extra == cfg.video.extra and isinstance(back.video.extra["input"], tuple)
    assert dataclasses.replace(back, text=cfg.text) == cfg
    with pytest.raises(TypeError, match="cannot serialise"):
        to_dict({"x": object()})
