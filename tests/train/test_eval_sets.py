"""Evaluation during training (``train.eval_sets``) on lfvila-tiny with synthetic videos: several named eval sets in
their own formats, validation losses, MLM / VTM accuracy, selection on a moving metric (max or min), and the step-0
evaluation, once, not repeated by a resume."""

from __future__ import annotations

import json
import math
import os
import signal
import socket

import pytest
import torch
import torch.multiprocessing as mp

from lfvila.config import ConfigError, EvalConfig, load_config
from lfvila.data.synthetic import make_dataset
from lfvila.models.factory import build_model
from train import data as tdata
from train import eval_sets
from train.dist import DistEnv
from train.loop import Trainer

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "..", "train", "configs")
STAGE2_FROZEN = '["^video_encoder\\\\.", "^sent_embedding\\\\."]'


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """16 synthetic videos (12 / 2 / 2), the test split rewritten as official LF-VILA retrieval jsonl, and five
    training rows as ``five.json``."""
    root = tmp_path_factory.mktemp("syn")
    summary = make_dataset(root, videos=16, seed=3, min_seconds=8.0, max_seconds=12.0)
    rows = json.loads((root / "test.json").read_text())
    with open(root / "test_ret.jsonl", "w") as f:
        for vid, row in rows.items():
            f.write(json.dumps({"clip_id": vid, "text": row["sentences"]}) + "\n")
    train = json.loads((root / "train.json").read_text())
    (root / "five.json").write_text(json.dumps(dict(list(train.items())[:5])))
    return root, summary


def _cfg(data, run_dir, *extra, stage=1):
    root, summary = data
    overrides = {"stage": stage, "text": {"vocab_size": summary["vocab_size"]}}
    args = ["--data.video_root", str(root), "--data.train", str(root / "train.json"),
            "--data.val", str(root / "val.json"), "--data.test", str(root / "test.json"),
            "--data.vocab", str(root / "vocab.txt"), "--data.num_workers", "0",
            "--train.batch_size", "4", "--train.log_every", "1", "--train.ckpt_every", "1000",
            "--run.dir", str(run_dir), "--run.progress", "false", "--run.tensorboard", "false",
            "--train.max_steps", "3", "--eval.test_split", "null", "--model.overrides", json.dumps(overrides)]
    if stage == 2:
        args += ["--train.task", "stage2", "--train.frozen", STAGE2_FROZEN, "--train.lr", "1e-3"]
    return load_config(os.path.join(CONFIGS, "demo_stage1.yaml"), args + list(extra))


def _evals(run_dir, key):
    """{step: row} of the evaluation rows of ``metrics.jsonl`` (those with ``key``)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if key in r}


def test_stage1_two_eval_sets_in_their_own_formats(data, tmp_path):
    root = data[0]
    sets = [{"name": "actnet", "annotations": str(root / "test_ret.jsonl"), "metrics": ["retrieval"],
             "data": {"format": "lfvila_retrieval", "video_root": str(root / "videos"), "sampling": "uniform"}},
            {"name": "val", "split": "val", "metrics": ["retrieval", "losses"], "batch_size": 2}]
    cfg = _cfg(data, tmp_path, "--eval.sets", json.dumps(sets), "--eval.select", "val/t2v_R@1",
               "--train.max_steps", "1")
    result = Trainer(cfg).fit()
    rows = _evals(tmp_path, "val/val_loss")
    assert sorted(rows) == [1]  # one row: every set's metrics of that evaluation
    row = rows[1]
    assert row["actnet/t2v_n"] == 2 and row["val/t2v_n"] == 2  # each set's own rows, every one once
    assert 0 <= row["actnet/t2v_R@1"] <= 100 and "actnet/val_loss" not in row
    for term in ("val_loss", "val_vpc", "val_mtc"):
        assert math.isfinite(row[f"val/{term}"])
    assert row["val/val_loss"] == pytest.approx(row["val/val_vpc"] + 0.25 * row["val/val_mtc"], rel=1e-5)
    assert result["best"] == max(r["val/t2v_R@1"] for r in rows.values())


def test_validation_losses_are_deterministic_and_leave_the_training_stream_alone(data, tmp_path):
    cfg = _cfg(data, tmp_path, "--eval.sets", json.dumps([{"name": "val", "metrics": ["losses"]}]),
               "--eval.select", "val/val_loss", "--eval.batch_size", "2")
    trainer = Trainer(cfg)
    state = torch.random.get_rng_state()
    with eval_sets.unsharded(trainer.model) as model:
        first = eval_sets.evaluate_all(model, trainer.eval_sets, trainer.task, trainer.tok, trainer.env)
        second = eval_sets.evaluate_all(model, trainer.eval_sets, trainer.task, trainer.tok, trainer.env)
    assert first == second and set(first) == {"val/val_loss", "val/val_vpc", "val/val_mtc"}
    assert torch.equal(torch.random.get_rng_state(), state)
    assert model.training  # put back in training mode


def test_stage2_mlm_vtm_accuracy_and_selection_on_a_loss(data, tmp_path):
    cfg = _cfg(data, tmp_path, "--eval.sets", json.dumps([{"name": "val", "metrics": ["losses"]}]),
               "--eval.select", "val/val_loss", "--train.eval_every", "1", stage=2)
    trainer = Trainer(cfg)
    assert trainer.select == ("val/val_loss", "min")  # a loss: minimised
    result = trainer.fit()
    rows = _evals(tmp_path, "val/val_loss")
    assert sorted(rows) == [1, 2, 3]
    for row in rows.values():
        assert 0 <= row["val/mlm_acc"] <= 100 and 0 <= row["val/vtm_acc"] <= 100
        assert math.isfinite(row["val/val_mlm"]) and math.isfinite(row["val/val_vtm"])
    losses = [rows[s]["val/val_loss"] for s in (1, 2, 3)]
    assert len(set(losses)) == 3  # the selected metric moves with the fusion weights
    assert result["best"] == min(losses) and result["best_step"] == 1 + losses.index(min(losses))


def test_mlm_vtm_accuracy_counts_every_token_and_pair(data, tmp_path):
    """mlm_acc / vtm_acc are hits over all masked tokens / pairs of the set, not a mean of batch accuracies."""
    cfg = _cfg(data, tmp_path, "--eval.sets", json.dumps([{"name": "val", "data": {"val": str(data[0] / "five.json")},
                                                           "metrics": ["losses"], "batch_size": 2}]),
               "--eval.select", "val/vtm_acc", stage=2)
    trainer = Trainer(cfg)
    s = trainer.eval_sets[0]
    with eval_sets.unsharded(trainer.model) as model:
        got = eval_sets.evaluate_losses(model, s.cfg, trainer.tok, s.split, trainer.env)
        model.eval()
        generator = torch.Generator().manual_seed(cfg.train.seed)  # the rule of evaluate_losses on rank 0
        sums = torch.zeros(4, dtype=torch.float64)
        with torch.no_grad():
            for batch in tdata.eval_loader(s.cfg, trainer.tok, s.split, 0, 1):  # 5 rows: batches of 2, 2, 1
                out = trainer.task.loss(model, tdata.to_device(batch, trainer.device), trainer.tok, generator)
                sums += torch.tensor([float(out["mlm_hits"]), float(out["mlm_tokens"]), float(out["vtm_hits"]),
                                      batch["video"].shape[0]], dtype=torch.float64)
        model.train()
    assert sums[3] == 5
    assert got["mlm_acc"] == pytest.approx(100 * float(sums[0] / sums[1]), rel=1e-12)
    assert got["vtm_acc"] == pytest.approx(100 * float(sums[2] / sums[3]), rel=1e-12)


def _stop_after(trainer, n):
    original = trainer._step

    def step(micro):
        out = original(micro)
        if trainer.state["step"] == n - 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return out

    trainer._step = step


def test_step0_evaluation_once_and_not_again_after_resume(data, tmp_path):
    args = ("--eval.at_start", "true", "--train.eval_every", "1000")
    first = Trainer(_cfg(data, tmp_path, *args))
    _stop_after(first, 1)
    assert first.fit()["preempted"]
    assert sorted(_evals(tmp_path, "val/t2v_R@1")) == [0]
    resumed = Trainer(_cfg(data, tmp_path, *args))
    assert resumed.state["last_eval"] == 0
    result = resumed.fit()
    assert result["step"] == 3 and sorted(_evals(tmp_path, "val/t2v_R@1")) == [0, 3]


def test_selection_rule_and_config_errors():
    cfg = load_config(None, {"eval": {"sets": [{"name": "a"}, {"name": "b"}], "select": "acc"}})
    sets = [eval_sets.EvalSetRun(s.name, cfg, "val", ("task",)) for s in cfg.eval.sets]
    assert eval_sets.selection(cfg, sets) == ("a/acc", "max")
    for select, mode in (("b/val_vtm", "min"), ("b/t2v_MdR", "min"), ("b/vtm_acc", "max"), ("b/val_loss", "min")):
        cfg.eval.select = select
        assert eval_sets.selection(cfg, sets) == (select, mode)
    cfg.eval.select_mode = "max"
    assert eval_sets.selection(cfg, sets) == ("b/val_loss", "max")
    assert eval_sets.better(1.0, None, "min") and eval_sets.better(0.5, 1.0, "min") and not eval_sets.better(
        1.5, 1.0, "min") and not eval_sets.better(float("nan"), None, "max")
    assert load_config(None).eval.sets == [] and not EvalConfig().at_start  # the old configs run unchanged
    bad = [({"sets": [{"name": "a", "bogus": 1}]}, r"^eval\.sets\[0\]\.bogus: unknown key"),
           ({"sets": [{"name": "a", "data": {"sampling": "x"}}]}, r"^eval\.sets\[0\]\.data\.sampling"),
           ({"sets": [{"name": "a", "data": {"bogus": 1}}]}, r"^eval\.sets\[0\]\.data\.bogus: unknown key"),
           ({"sets": [{"name": "a", "metrics": ["bleu"]}]}, r"^eval\.sets\[0\]\.metrics"),
           ({"sets": [{"name": "a"}, {"name": "a"}]}, r"^eval\.sets: names must be unique"),
           ({"sets": [{"name": "a"}], "select": "b/t2v_R@1"}, r"^eval\.select: 'b/t2v_R@1' names no eval set"),
           ({"select_mode": "up"}, r"^eval\.select_mode")]
    for section, match in bad:
        with pytest.raises(ConfigError, match=match):
            load_config(None, {"eval": section})


def test_a_set_without_a_file_names_the_key(data, tmp_path):
    cfg = _cfg(data, tmp_path, "--eval.sets", json.dumps([{"name": "held", "split": "test"}]),
               "--data.test", "null", "--eval.select", "held/t2v_R@1")
    with pytest.raises(ValueError, match=r"^eval\.sets\[0\]\.annotations: eval set 'held' has no file"):
        Trainer(cfg)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _losses_worker(rank, world, port, cfg, out_path):
    import torch.distributed as tdist

    torch.set_num_threads(1)
    tdist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = build_model(cfg.model)
    env = DistEnv(rank, world, rank, torch.device("cpu"))
    metrics = eval_sets.evaluate_losses(model, cfg, tdata.tokenizer(cfg), "val", env)
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(metrics, f)
    tdist.barrier()
    tdist.destroy_process_group()


@pytest.mark.slow  # two spawned processes
def test_losses_on_two_gloo_ranks_sum_the_counts_of_each_part(data, tmp_path):
    """5 rows, batches of 2: rank 0 holds 3 rows (2 batches), rank 1 2 rows (1 batch); the 2-rank result is the
    metrics of the summed per-rank sums (every masked token and pair once), and the uneven batch counts do not hang."""
    cfg = _cfg(data, tmp_path, "--eval.sets", json.dumps([{"name": "val", "data": {"val": str(data[0] / "five.json")},
                                                           "metrics": ["losses"], "batch_size": 2}]),
               "--eval.select", "val/vtm_acc", stage=2)
    set_cfg = eval_sets.resolve(cfg)[0].cfg
    torch.manual_seed(0)
    model = build_model(set_cfg.model)
    tok = tdata.tokenizer(set_cfg)
    parts = [eval_sets.loss_sums(model, set_cfg, tok, "val", DistEnv(r, 2, r, torch.device("cpu"))) for r in (0, 1)]
    want = eval_sets.loss_metrics(parts[0] + parts[1])
    out_path = tmp_path / "metrics.json"
    mp.start_processes(_losses_worker, args=(2, _free_port(), set_cfg, str(out_path)), nprocs=2, join=True,
                       start_method="spawn")
    got = json.loads(out_path.read_text())
    assert set(got) == set(want) == {"val_loss", "val_mlm", "val_vtm", "mlm_acc", "vtm_acc"}
    for k in want:
        assert got[k] == pytest.approx(want[k], rel=1e-6), k
    assert (float(parts[0][-1]), float(parts[1][-1])) == (3, 2)  # vtm_pairs: each rank's rows
    assert want["vtm_acc"] == pytest.approx(100 * float(parts[0][-2] + parts[1][-2]) / 5)
