"""The data section's shapes are checked against the model's when the config is loaded, naming both keys."""

from __future__ import annotations

import os

import pytest

from lfvila.config import ConfigError, load_config

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "..", "train", "configs")


def _load(name, *args):
    return load_config(os.path.join(CONFIGS, name), list(args))


@pytest.mark.parametrize("name", sorted(f for f in os.listdir(CONFIGS) if f.endswith(".yaml")))
def test_every_shipped_config_passes(name):
    _load(name)


@pytest.mark.parametrize("args, keys", [
    (("--data.clips", "3", "--data.frames_per_clip", "3"), ("data.clips x data.frames_per_clip", "num_clips")),
    (("--data.max_len", "600"), ("data.max_len", "model.overrides.text.max_position_embeddings")),
    (("--data.sentences", "4", "--data.max_len", "200"), ("data.sentences x data.max_len",
                                                          "model.overrides.text.max_position_embeddings")),
])
def test_retrieval_shapes(args, keys):
    with pytest.raises(ConfigError) as err:
        _load("actnet_ret.yaml", *args)
    assert all(k in str(err.value) for k in keys), str(err.value)


def test_fused_frames_and_sentence_embeddings():
    with pytest.raises(ConfigError, match=r"data\.clips x data\.frames_per_clip = 4 x 16 = 64 frames exceed the "
                                          r"model's 32 frame positions \(model\.overrides\.text\.num_frames\)"):
        _load("how2qa.yaml", "--data.frames_per_clip", "16")
    _load("how2qa.yaml", "--data.frames_per_clip", "16", "--model.overrides", '{"text": {"num_frames": 64}}')
    with pytest.raises(ConfigError, match=r"data\.sentences = 9 .*model\.overrides\.text\.sent_type_vocab"):
        _load("how2qa.yaml", "--data.sentences", "9", "--data.max_len", "40")
    _load("coin_cls.yaml", "--data.sentences", "20")  # no text tower: the text shapes do not apply
