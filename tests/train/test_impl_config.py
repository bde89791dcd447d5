"""The implementation choice is configuration, never the environment: ``model.loss_impl`` reaches the losses as
``impl=`` and nothing else (the window attention keeps ``model.attn_impl``), and training leaves ``os.environ`` as it
found it. (A Trainer once wrote ``LFVILA_KERNELS`` to pass ``loss_impl`` on, which moved every ``impl="auto"``
dispatch, the window attention's included, and outlived the Trainer.)"""

from __future__ import annotations

import json
import os
import sys

import pytest

from lfvila.config import load_config
from lfvila.data.synthetic import make_dataset
from train.loop import Trainer

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "..", "train", "configs")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("syn")
    return root, make_dataset(root, videos=6, seed=5, min_seconds=8.0, max_seconds=9.0)


def test_loss_impl_reaches_the_loss_only_and_the_environment_is_untouched(data, tmp_path, monkeypatch):
    from lfvila_kernels.dispatch import ENV_VAR

    monkeypatch.delenv(ENV_VAR, raising=False)
    calls = []  # (op, impl asked for, the variable at the call)
    for module, op in (("lfvila_kernels.window_attention", "attention"), ("lfvila_kernels.contrastive", "loss")):
        original = sys.modules[module].select_impl

        def spy(impl, *args, _original=original, _op=op, **kwargs):
            calls.append((_op, impl, os.environ.get(ENV_VAR)))
            return _original(impl, *args, **kwargs)

        monkeypatch.setattr(sys.modules[module], "select_impl", spy)
    root, summary = data
    cfg = load_config(os.path.join(CONFIGS, "demo_stage1.yaml"), [
        "--data.video_root", str(root), "--data.train", str(root / "train.json"), "--data.val", str(root / "val.json"),
        "--data.vocab", str(root / "vocab.txt"), "--data.num_workers", "0", "--train.batch_size", "2",
        "--train.max_steps", "2", "--train.eval_every", "1000", "--train.ckpt_every", "1000", "--eval.split", "val",
        "--eval.test_split", "null", "--run.dir", str(tmp_path), "--run.progress", "false",
        "--run.tensorboard", "false", "--model.attn_impl", "auto", "--model.loss_impl", "torch",
        "--model.overrides", json.dumps({"stage": 1, "text": {"vocab_size": summary["vocab_size"]}})])
    before = dict(os.environ)
    trainer = Trainer(cfg)
    assert trainer.raw_model.cfg.loss_impl == "torch"
    assert {m.impl for m in trainer.raw_model.modules() if hasattr(m, "impl")} == {"auto"}
    result = trainer.fit()
    assert result["step"] == 2
    assert dict(os.environ) == before
    ops = {op for op, _, _ in calls}
    assert ops == {"attention", "loss"}, ops
    assert {impl for op, impl, _ in calls if op == "attention"} == {"auto"}
    assert {impl for op, impl, _ in calls if op == "loss"} == {"torch"}
    assert {env for _, _, env in calls} == {None}
