"""``train.resume.resume_changes``: which config differences refuse a resume."""

from __future__ import annotations

import json

from lfvila.config import Config, load_config, to_dict
from train.resume import _ABSENT, resume_changes


def _tree(*overrides) -> dict:
    return json.loads(json.dumps(to_dict(load_config(None, list(overrides)))))


def test_a_field_the_checkpoint_predates_is_no_change_at_its_default():
    saved = _tree()
    del saved["data"]["shard_order"], saved["data"]["on_error"]  # written before these fields existed
    assert resume_changes(saved, to_dict(Config())) == []
    assert resume_changes(saved, _tree("--data.on_error", "skip")) == [("data.on_error", _ABSENT, "skip")]


def test_changed_and_free_keys():
    assert resume_changes(_tree(), _tree("--train.lr", "1e-3")) == [("train.lr", 5e-5, 1e-3)]
    assert resume_changes(_tree(), _tree("--train.log_every", "7", "--eval.split", "test")) == []
    extra = _tree()
    extra["data"]["gone"] = 1  # a key only the checkpoint has is a change
    assert resume_changes(extra, _tree()) == [("data.gone", 1, _ABSENT)]
