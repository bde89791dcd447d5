"""The pieces the training loop is built from: the model factory (``lfvila.models.factory``), the task table
(``train.tasks``) and the logged rows (``train.metrics``)."""

from __future__ import annotations

import json

import pytest
import torch

from lfvila.config import InitStep, ModelConfig
from lfvila.models.factory import build_model, model_config_from
from train import tasks
from train.metrics import LogWindow, MetricsWriter, batch_tokens, step_terms

CPU = torch.device("cpu")


def test_factory_puts_every_switch_in_the_model_config():
    mc = ModelConfig(name="lfvila-tiny", overrides={"stage": 2, "text": {"vocab_size": 300}},
                     attn_impl="torch", loss_impl="torch", grad_checkpointing=True)
    cfg = model_config_from(mc)
    assert (cfg.stage, cfg.text.vocab_size, cfg.loss_impl) == (2, 300, "torch")
    assert (cfg.video.attn_impl, cfg.video.grad_checkpointing) == ("torch", True)
    video_only = model_config_from(ModelConfig(name="lfvila-tiny-video", attn_impl="torch"))
    assert video_only.attn_impl == "torch" and not hasattr(video_only, "loss_impl")
    model = build_model(mc)
    assert model.cfg == cfg and model.text_encoder.config.vocab_size == 300


def test_factory_errors_name_the_key(tmp_path):
    with pytest.raises(ValueError, match=r"model\.overrides\.text\.nope"):
        build_model(ModelConfig(name="lfvila-tiny", overrides={"text": {"nope": 1}}))
    with pytest.raises(ValueError, match="model.name"):
        build_model(ModelConfig(name="no-such-model"))
    with pytest.raises(Exception, match="missing.safetensors"):
        missing = InitStep("checkpoint", str(tmp_path / "missing.safetensors"))
        build_model(ModelConfig(name="lfvila-tiny", init=[missing]))


def test_factory_init_chain_loads_in_order(tmp_path):
    from lfvila.models import convert

    source = build_model(ModelConfig(name="lfvila-tiny"))
    convert.save_pretrained(source, tmp_path / "src")
    torch.manual_seed(1)
    loaded = build_model(ModelConfig(name="lfvila-tiny", init=[InitStep("pretrained", str(tmp_path / "src"))]))
    for (k, a), b in zip(source.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), k


@pytest.mark.parametrize("name, fits", [
    ("lfvila-tiny", {"stage1", "retrieval"}),
    ("lfvila-tiny-model", {"stage1", "retrieval"}),  # the old name, an alias
    ("lfvila-tiny-retrieval", {"retrieval"}),
    ("lfvila-tiny-multichoice", {"multichoice"}),
    ("lfvila-tiny-classification", {"classification"}),
    ("lfvila-tiny-video-classification", {"video_classification"}),
])
def test_task_table_says_which_models_fit(name, fits):
    overrides = {"num_classes": 5} if name.endswith("classification") else {}
    model = build_model(ModelConfig(name=name, overrides=overrides))
    assert {t.name for t in tasks.TASKS.values() if t.fits(model)} == fits


def test_task_table_stage2_and_errors():
    stage2 = build_model(ModelConfig(name="lfvila-tiny", overrides={"stage": 2}))
    assert {t.name for t in tasks.TASKS.values() if t.fits(stage2)} == {"stage2"}
    assert tasks.QA_TASKS == ("multichoice", "classification")
    assert all(tasks.get_task(n).select == "acc" and tasks.get_task(n).evaluate is tasks.evaluate_qa
               for n in tasks.QA_TASKS)
    with pytest.raises(ValueError, match="unknown task"):
        tasks.get_task("captioning")


def test_log_window_means_and_rates():
    w = LogWindow()
    state = {"step": 2, "epoch": 0, "bad_steps": 1, "skipped_batches": 0}
    assert w.row(state=state, lr=1e-4, flops_per_step=None, device=CPU, world_size=1) is None
    w.add(1.0, 0.25, 4, torch.tensor(100), {"loss": torch.tensor(2.0)})
    w.add(3.0, 0.75, 4, torch.tensor(300), {"loss": torch.tensor(4.0)})
    row = w.row(state=state, lr=1e-4, flops_per_step=2e12, device=CPU, world_size=1)
    assert row["loss"] == 3.0 and row["clips_per_s"] == 2.0 and row["tokens_per_s"] == 100.0
    assert row["data_wait_pct"] == 25.0 and row["step_time_s"] == 2.0 and row["tflops_per_s"] == 1.0
    assert row["mfu"] is None and row["bad_steps"] == 1
    assert w.steps == 0 and w.terms == {}


def test_step_terms_and_tokens():
    out = {"loss": torch.tensor(1.0, requires_grad=True), "vpc": torch.tensor(0.5), "video": torch.zeros(2, 3),
           "other": torch.tensor(9.0)}
    terms = step_terms(out)
    assert set(terms) == {"loss", "vpc"} and not terms["loss"].requires_grad
    batch = {"video": torch.zeros(2, 3, 8, 64, 96), "text_mask": torch.ones(2, 4, 5)}
    assert int(batch_tokens(batch, (32, 32))) == 40 + 2 * 8 * 2 * 3
    assert batch_tokens({"video": batch["video"]}, (32, 32)) == 2 * 8 * 2 * 3  # a batch without text


def test_metrics_writer_main_rank_only(tmp_path):
    MetricsWriter(tmp_path, enabled=False, tensorboard=False).write({"step": 1})
    assert not (tmp_path / "metrics.jsonl").exists()
    w = MetricsWriter(tmp_path, enabled=True, tensorboard=False)
    w.write({"step": 1, "loss": 2.0})
    w.write({"step": 2, "loss": 1.0})
    w.close()
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows == [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.0}]


def test_default_train_config_leaves_the_pooler_out_of_the_optimizer():
    """The official optimizer drops every parameter named ``pooler`` in every task: ``train.exclude``'s default."""
    from lfvila.config import Config
    from train.optim import build_optimizer

    model = build_model(ModelConfig(name="lfvila-tiny-multichoice"))
    opt = build_optimizer(model, 1e-4, 0.05, exclude=tuple(Config().train.exclude))
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    pooler = [p for n, p in model.named_parameters() if "pooler" in n]
    assert pooler and not any(id(p) in in_opt for p in pooler)
    assert len(in_opt) == sum(1 for n, p in model.named_parameters() if "pooler" not in n and p.requires_grad)
