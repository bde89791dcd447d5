"""Tests of the drop-in benchmark: rows and schema, failures recorded as rows, the summary. Tiny sizes, no timing
asserted."""

from __future__ import annotations

import contextlib
import csv
import importlib.util

import pytest
import torch

from benchmarks import bench_dropin as bd
from benchmarks import harness

# MONAI writes os.environ["CUBLAS_WORKSPACE_CONFIG"] when imported (monai/utils/misc.py): imported here, at
# collection, so that the swin-monai workload's import inside a test changes no process state (tests/conftest.py).
if importlib.util.find_spec("monai") is not None:
    importlib.import_module("monai.networks.nets")

CPU = torch.device("cpu")
TINY = {"reps": 1, "warmup": 0}
TINY_SIZES = bd.Sizes("swin_tiny_patch4_window7_224", 64, 1, {"embed_dim": 16, "depths": [2, 2], "num_heads": [2, 4],
                      "window_size": 4}, loss_n=96, loss_dim=16, num_classes=10)  # fmt: skip


def _writer(tmp_path, name="out.csv"):
    return harness.ResultWriter(tmp_path / name, harness.environment(CPU), "test")


def _no_prepare(sizes, device, impl="auto"):
    raise RuntimeError("boom: cannot build this model")


def _one_provider_fails(sizes, device, impl="auto"):
    def bad():
        raise RuntimeError("boom: step failed")

    steps = {"base": (contextlib.nullcontext, lambda: torch.ones(2).sum()), "cand": (contextlib.nullcontext, bad)}
    return bd.Prepared("toy", steps, lambda: (0.5, "toy error"))


def _by(rows, kernel):
    return {(r["provider"], r["metric"]): r for r in rows if r["kernel"] == kernel}


def test_tiny_run_rows_schema_and_failures(tmp_path):
    workloads = {"swin-hf": bd.prepare_swin_hf, "clip-loss": bd.prepare_clip_loss, "broken": _no_prepare,
                 "half-broken": _one_provider_fails}  # fmt: skip
    providers = {**bd.PROVIDERS, "broken": ("base", "cand"), "half-broken": ("base", "cand")}
    rows = bd.run(workloads, TINY_SIZES, CPU, _writer(tmp_path), TINY, providers=providers, log=lambda m: None)
    assert rows == harness.read_rows(tmp_path / "out.csv")
    with open(tmp_path / "out.csv", newline="") as f:
        assert tuple(next(csv.reader(f))) == harness.SCHEMA
    assert len(rows) == 4 * 5  # per workload: time + memory for two providers, max_abs_err for the candidate

    hf = _by(rows, "swin-hf")
    assert {r["mode"] for r in hf.values()} == {"train-step"} and {r["x_value"] for r in hf.values()} == {"1"}
    for name in ("unpatched", "patched"):
        assert hf[(name, "time")]["status"] == "ok" and float(hf[(name, "time")]["p50"]) > 0
        assert hf[(name, "memory")]["status"] == "skipped"  # CUDA only
    assert ("unpatched", "max_abs_err") not in hf
    assert hf[("patched", "max_abs_err")]["status"] == "ok" and float(hf[("patched", "max_abs_err")]["p50"]) < 1e-4
    assert "window=4" in hf[("patched", "time")]["shape"]

    loss = _by(rows, "clip-loss")
    assert loss[("ours", "time")]["status"] == "ok" and loss[("ours", "time")]["shape"].startswith("N=96 d=16")
    if loss[("open_clip", "time")]["status"] == "ok":  # open_clip_torch installed
        assert float(loss[("ours", "max_abs_err")]["p50"]) < 1e-5
    else:
        assert "open_clip_torch is not installed" in loss[("open_clip", "time")]["note"]

    broken = _by(rows, "broken")
    assert len(broken) == 5 and all(r["status"] == "failed" for r in broken.values())
    assert {r["note"] for r in broken.values()} == {"RuntimeError: boom: cannot build this model"}
    half = _by(rows, "half-broken")
    assert half[("base", "time")]["status"] == "ok"
    assert half[("cand", "time")]["status"] == half[("cand", "memory")]["status"] == "failed"
    assert half[("cand", "time")]["note"] == "RuntimeError: boom: step failed"
    assert half[("cand", "max_abs_err")]["p50"] == "0.5" and half[("cand", "max_abs_err")]["note"] == "toy error"

    summary = bd.markdown_summary(rows)
    assert "**swin-hf** (train-step, float32, model=transformers-swin(embed=16 depths=2-2 window=4)" in summary
    assert "| patched | " in summary and "x) | skipped | " in summary
    assert "failed: RuntimeError: boom: cannot build this model" in summary
    assert "| cand | failed | failed | 0.5 |" in summary


def test_timm_workload_runs_or_records_why_not(tmp_path):
    """timm imports here without torchvision, through bench_dropin's inert stand-in (as on the GPU machine, which
    has timm but maybe no usable torchvision); the stand-in is gone afterwards."""
    import sys

    try:
        bd.import_timm()
    except ImportError as exc:  # timm missing, or broken beyond its torchvision import
        reason = harness.describe_exception(exc)
    else:
        reason = None
    assert not any(type(m).__name__ == "_InertModule" for m in sys.modules.values())
    rows = bd.run({"swin-timm": bd.prepare_swin_timm}, TINY_SIZES, CPU, _writer(tmp_path), TINY, log=lambda m: None)
    assert [(r["provider"], r["metric"]) for r in rows] == [("unpatched", "time"), ("unpatched", "memory"),
                                                          ("patched", "time"), ("patched", "memory"),
                                                          ("patched", "max_abs_err")]  # fmt: skip
    if reason is None:
        assert rows[0]["status"] == rows[2]["status"] == rows[4]["status"] == "ok"
        assert float(rows[4]["p50"]) < 1e-4
    else:
        assert {r["status"] for r in rows} == {"failed"}
        assert all(r["note"].startswith("ImportError: timm cannot be imported") for r in rows)


def test_comparison_report():
    def row(kernel, provider, metric, value, status="ok", note=""):
        return {"kernel": kernel, "provider": provider, "metric": metric, "status": status, "note": note,
                "p50": "" if value is None else str(value)}  # fmt: skip

    rows = [row("swin-timm", "unpatched", "time", 200.0), row("swin-timm", "unpatched", "memory", 1000.0),
            row("swin-timm", "patched", "time", 100.0), row("swin-timm", "patched", "memory", 600.0),
            row("swin-timm", "patched", "max_abs_err", 0.01),
            row("swin-hf", "unpatched", "time", None, "failed", "ImportError: no transformers"),
            row("swin-hf", "patched", "time", None, "failed", "ImportError: no transformers")]  # fmt: skip
    timm, hf = bd.comparison_report(rows)
    assert timm == ("- swin-timm: patched vs unpatched: time 100 vs 200 ms (2x faster); memory 600 vs 1000 MB (0.6x "
                    "of the memory); max abs err 0.01")  # fmt: skip
    assert hf.startswith("- swin-hf: patched vs unpatched: time not measured (patched failed: ImportError")


def test_cli_writes_csv_and_markdown(tmp_path, capsys):
    out, md = tmp_path / "cli.csv", tmp_path / "summary.md"
    rows = bd.main(["--label", "cli", "--out", str(out), "--markdown", str(md), "--workloads", "clip-loss",
                    "--loss-batch", "64", "--reps", "1", "--warmup", "0", "--device", "cpu"])  # fmt: skip
    assert {r["label"] for r in rows} == {"cli"} and {r["x_value"] for r in rows} == {"64"}
    assert md.read_text().startswith("**clip-loss** (fwd+bwd, float32, N=64 d=256")
    assert "rows appended to" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="unknown workloads"):
        bd.main(["--workloads", "resnet", "--out", str(out)])


def test_donut_and_monai_workloads(tmp_path):
    """The Swin-copy (Donut) and MONAI SwinUNETR rows at tiny sizes (a 2-D SwinUNETR on 64 x 64 images), or the
    reason they failed where the library is missing."""
    sizes = bd.Sizes(**{**TINY_SIZES.__dict__, "donut_config": {"embed_dim": 16, "depths": [2, 2], "num_heads": [2, 4],
                                                                "window_size": 4},
                        "monai": {"image": 64, "feature_size": 12, "depths": (2, 2, 2, 2), "num_heads": (1, 1, 2, 2),
                                  "window_size": 4, "spatial_dims": 2}})  # fmt: skip
    workloads = {"swin-donut": bd.prepare_swin_donut, "swin-monai": bd.prepare_swin_monai}
    rows = bd.run(workloads, sizes, CPU, _writer(tmp_path), TINY, log=lambda m: None)
    assert len(rows) == 2 * 5
    donut = _by(rows, "swin-donut")
    assert donut[("patched", "time")]["status"] == "ok" and float(donut[("patched", "max_abs_err")]["p50"]) < 1e-4
    assert donut[("patched", "time")]["shape"].startswith("model=transformers-donut-swin(embed=16 depths=2-2 window=4) "
                                                          "image=64x64 batch=1")
    monai = _by(rows, "swin-monai")
    if importlib.util.find_spec("monai") is None:
        assert {r["status"] for r in monai.values()} == {"failed"}
        assert all("monai" in r["note"] for r in monai.values())
        return
    assert {r["x_value"] for r in monai.values()} == {"1"}
    assert monai[("unpatched", "time")]["status"] == monai[("patched", "time")]["status"] == "ok"
    assert float(monai[("patched", "max_abs_err")]["p50"]) < 1e-4
    shape = "model=monai-swin-unetr(feature=12 window=4) image=64x64 batch=1 classes=2"
    assert monai[("patched", "time")]["shape"] == shape
