"""``train.frozen_eval``: which frozen modules keep dropout off after ``model.train()``. ``official`` (the default of
``pretrain_stage2.yaml``): only the video encoder, as the official ``SwinTransformer3D.train()``; the frozen BERT
embeddings, layers and ``sent_embedding`` keep their dropout. ``all``: every frozen module in eval mode."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn as nn

from lfvila.config import load_config
from lfvila.data.synthetic import make_dataset
from lfvila.models import create_model
from train.loop import Trainer
from train.optim import apply_frozen_eval, freeze, frozen_eval_patterns, stage2_frozen_patterns

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "..", "train", "configs")
# lfvila-tiny: BERT layers 0..3 are the stage-1 layers (frozen in stage 2), 4..5 the fusion layers
FROZEN_TEXT = ["text_encoder.bert.embeddings", *(f"text_encoder.bert.encoder.layer.{i}" for i in range(4)),
               "sent_embedding"]


def _training(model: nn.Module, prefix: str) -> set[bool]:
    return {m.training for n, m in model.named_modules() if n == prefix or n.startswith(prefix + ".")}


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = create_model("lfvila-tiny", stage=2)  # BERT dropout 0.1, drop path 0.2: the pre-trained recipe's
    freeze(m, stage2_frozen_patterns(4))
    return m


def test_official_keeps_dropout_in_frozen_bert_only(model):
    model.train()
    assert apply_frozen_eval(model, stage2_frozen_patterns(4), "official") == ["video_encoder"]
    assert _training(model, "video_encoder") == {False}
    for prefix in FROZEN_TEXT:
        assert _training(model, prefix) == {True}, prefix
    ids = torch.randint(5, model.text_encoder.config.vocab_size, (2, 12))
    emb = model.text_encoder.bert.embeddings
    assert not torch.equal(emb(input_ids=ids), emb(input_ids=ids))  # dropout draws: frozen, yet active
    x = torch.randn(2, 8, model.sent_embedding.norm.normalized_shape[0])
    assert not torch.equal(model.sent_embedding(x, 4), model.sent_embedding(x, 4))
    video = torch.randint(0, 256, (1, 8, 64, 96, 3), dtype=torch.uint8)
    with torch.no_grad():  # drop path 0.2 would differ between calls if the encoder were in train mode
        torch.testing.assert_close(model.encode_video(video)["global"], model.encode_video(video)["global"],
                                   rtol=0, atol=0)


def test_all_keeps_every_frozen_module_in_eval(model):
    model.train()
    done = apply_frozen_eval(model, stage2_frozen_patterns(4), "all")
    assert "video_encoder" in done and set(FROZEN_TEXT) <= set(done)
    for prefix in ("video_encoder", *FROZEN_TEXT):
        assert _training(model, prefix) == {False}, prefix
    for prefix in ("text_encoder.bert.encoder.layer.4", "text_encoder.cls", "video_token_pos"):
        assert _training(model, prefix) == {True}, prefix  # the trainable parts train
    x = torch.randn(2, 8, model.sent_embedding.norm.normalized_shape[0])
    torch.testing.assert_close(model.sent_embedding(x, 4), model.sent_embedding(x, 4), rtol=0, atol=0)


def test_none_and_regex_settings(model):
    model.train()
    assert apply_frozen_eval(model, stage2_frozen_patterns(4), "none") == []
    assert _training(model, "video_encoder") == {True}
    model.train()
    assert apply_frozen_eval(model, None, [r"^sent_embedding\."]) == ["sent_embedding"]
    assert frozen_eval_patterns("official", ["x"]) == (r"^video_encoder\.",)
    with pytest.raises(ValueError, match="train.frozen_eval"):
        frozen_eval_patterns("some", None)


def test_stage2_config_is_official_and_the_trainer_applies_it(tmp_path):
    assert load_config(os.path.join(CONFIGS, "pretrain_stage2.yaml")).train.frozen_eval == "official"
    assert load_config(None).train.frozen_eval == "all"  # other tasks: every frozen module in eval, as before
    root = tmp_path / "syn"
    summary = make_dataset(root, videos=6, seed=5, min_seconds=8.0, max_seconds=12.0)
    overrides = {"stage": 2, "text": {"vocab_size": summary["vocab_size"], "hidden_dropout_prob": 0.1}}
    common = ["--data.video_root", str(root), "--data.train", str(root / "train.json"), "--data.vocab",
              str(root / "vocab.txt"), "--data.num_workers", "0", "--train.batch_size", "2", "--train.task",
              "stage2", "--model.overrides", json.dumps(overrides), "--run.progress", "false",
              "--run.tensorboard", "false", "--train.frozen", json.dumps(list(stage2_frozen_patterns(4)))]
    for setting, text_training in (("official", {True}), ("all", {False})):
        cfg = load_config(os.path.join(CONFIGS, "demo_stage1.yaml"),
                          common + ["--train.frozen_eval", setting, "--run.dir", str(tmp_path / setting)])
        trainer = Trainer(cfg)
        trainer._train_mode()
        model = trainer.raw_model
        assert _training(model, "video_encoder") == {False}, setting
        for prefix in FROZEN_TEXT:
            assert _training(model, prefix) == text_training, (setting, prefix)
        assert _training(model, "text_encoder.bert.encoder.layer.4") == {True}
