"""Tests of the training-step benchmark: inputs, the impl switch, the CLI's rows (schema, failures, skips), the
markdown summary and the fresh-process peak RSS.

No timing is asserted. The model is ``lfvila-tiny`` at batch 2, 8 frames, 64 x 96 (a step takes ~0.1 s on
two idle cores); Triton never runs here (on the CPU the benchmark skips it unless ``--interpret-ok``).
"""

from __future__ import annotations

import csv
import sys

import pytest
import torch

from benchmarks import bench_train_step as bts
from benchmarks import harness

CPU = torch.device("cpu")
TINY = "lfvila-tiny"


# --------------------------------------------------------------------------------------------------- inputs
@pytest.mark.parametrize("name, batch, frames, size, vocab_range", [
    (TINY, 2, 8, (64, 96), (104, 128)),
    ("lfvila-base", 2, 32, (16, 24), (1000, 30000)),  # small video: only the shapes and the ids are checked
])  # fmt: skip
def test_make_inputs_shapes_dtypes_and_content(name, batch, frames, size, vocab_range):
    cfg = bts.model_config(name)
    m, length = cfg.text.num_sentences, cfg.text.max_len
    video, ids, mask = bts.make_inputs(cfg, batch, frames, *size, CPU, seed=0)
    assert video.shape == (batch, frames, *size, 3) and video.dtype == torch.uint8
    assert ids.shape == mask.shape == (batch, m, length) and ids.dtype == mask.dtype == torch.int64
    assert video.float().std() > 50 and video.min() == 0 and video.max() == 255  # uniform bytes, not zeros
    assert (ids[..., 0] == bts.CLS_ID).all() and (mask[..., 0] == 1).all()
    real = mask.sum(-1)
    assert (real >= 2).all() and (real < length).all()  # [CLS] .. [SEP], then at least one padding token
    assert ((ids == bts.PAD_ID) == (mask == 0)).all()
    assert (ids.gather(-1, (real - 1)[..., None]) == bts.SEP_ID).all()
    assert (mask[..., 1:] <= mask[..., :-1]).all()  # padding only at the end
    body = ids[(mask == 1) & (ids != bts.CLS_ID) & (ids != bts.SEP_ID)]
    assert body.numel() > 0 and body.min() >= vocab_range[0] and body.max() < vocab_range[1]
    assert body.unique().numel() > 5
    again = bts.make_inputs(cfg, batch, frames, *size, CPU, seed=0)
    assert all(torch.equal(a, b) for a, b in zip((video, ids, mask), again))  # deterministic from the seed


def test_make_inputs_rejects_frames_that_do_not_split_into_clips():
    with pytest.raises(ValueError, match="clips"):
        bts.make_inputs(bts.model_config(TINY), 1, 6, 64, 96)


def test_model_config_rejects_a_video_encoder_only_variant():
    with pytest.raises(ValueError, match="not a full LF-VILA model"):
        bts.model_config("lfvila-tiny-video")


# --------------------------------------------------------------------------------------------------- impl switch
def test_torch_provider_takes_the_torch_path_of_both_ops(monkeypatch):
    """Built with impl "torch", every window attention and the VPC loss resolve to torch (the test session runs
    Triton's interpreter, so "auto" alone would not decide it on the CPU), with nothing set in the environment."""
    from lfvila_kernels.modules import WindowAttention3D

    resolved = []
    for module, op in (("lfvila_kernels.window_attention", "attention"), ("lfvila_kernels.contrastive", "contrastive")):
        original = sys.modules[module].select_impl

        def spy(*args, _original=original, _op=op, **kwargs):
            out = _original(*args, **kwargs)
            resolved.append((_op, out))
            return out

        monkeypatch.setattr(sys.modules[module], "select_impl", spy)
    monkeypatch.delenv("LFVILA_KERNELS", raising=False)
    model = bts.build_model(TINY, "torch")
    attention = [m for m in model.modules() if isinstance(m, WindowAttention3D)]
    assert attention and {m.impl for m in attention} == {"torch"} and model.cfg.loss_impl == "torch"
    assert model.training
    step = bts.make_step(model, *bts.make_inputs(model.cfg, 2, 8, 64, 96), torch.float32)
    loss = step()
    assert torch.isfinite(loss) and set(step.last) >= {"loss", "vpc", "mtc"}
    assert all(p.grad is None for p in model.parameters())  # the step leaves no gradients behind
    assert {op for op, _ in resolved} == {"attention", "contrastive"}
    assert {impl for _, impl in resolved} == {"torch"}
    assert {m.impl for m in bts.build_model(TINY, "triton").modules() if isinstance(m, WindowAttention3D)} == {"triton"}


# --------------------------------------------------------------------------------------------------- CLI rows
def test_cli_rows_schema_failure_and_skip(tmp_path, monkeypatch):
    monkeypatch.setitem(bts.PROVIDERS, "planted", bts.Provider("bogus", "a provider that fails"))
    out, md = tmp_path / "train.csv", tmp_path / "train.md"
    rows = bts.main(["--device", "cpu", "--label", "test", "--model", TINY, "--batch", "2", "--frames", "8",
                     "--size", "64x96", "--dtype", "fp32", "--impls", "triton,torch,planted", "--warmup", "2",
                     "--reps", "1", "--no-rss", "--out", str(out), "--markdown", str(md)])  # fmt: skip
    assert rows == harness.read_rows(out)
    with open(out, newline="") as f:
        assert tuple(next(csv.reader(f))) == harness.SCHEMA
    metrics = [m for m, _ in bts.METRICS + bts.DERIVED]
    assert len(rows) == 3 * len(metrics)
    by = {(r["provider"], r["metric"]): r for r in rows}
    assert set(by) == {(p, m) for p in ("triton", "torch", "planted") for m in metrics}
    assert {(r["kernel"], r["mode"], r["x_name"], r["x_value"], r["dtype"], r["label"]) for r in rows} == {
        ("train_step", "fwd+bwd", "batch", "2", "float32", "test")
    }
    assert {r["shape"] for r in rows} == {
        "model=lfvila-tiny B=2 T=8 H=64 W=96 M=4 L=12 precision=fp32 optimizer=none grad_ckpt=off"
    }
    units = {r["metric"]: r["unit"] for r in rows}
    assert units == {"time": "ms", "clips_per_s": "clips/s", "memory": "MB", "memory_total": "MB", "loss": "value",
                     "step_flops": "TFLOP", "tflops": "TFLOP/s", "mfu": "fraction"}  # fmt: skip

    for m in metrics:  # triton on the CPU: skipped with the reason
        r = by[("triton", m)]
        assert r["status"] == "skipped" and r["p50"] == "" and "CUDA" in r["note"] and "--interpret-ok" in r["note"]
    for m in metrics:  # the planted provider: failed with the exception text
        r = by[("planted", m)]
        assert r["status"] == "failed" and r["p50"] == "" and "bogus" in r["note"] and "Error" in r["note"]
    for m in ("time", "clips_per_s", "loss", "step_flops", "tflops"):
        r = by[("torch", m)]
        assert r["status"] == "ok" and float(r["p20"]) <= float(r["p50"]) <= float(r["p80"]), r
        assert float(r["p50"]) > 0
    time_ms, clips = float(by[("torch", "time")]["p50"]), float(by[("torch", "clips_per_s")]["p50"])
    assert clips == pytest.approx(2 / (time_ms * 1e-3), rel=1e-3)
    assert "vpc" in by[("torch", "loss")]["note"] and "mtc" in by[("torch", "loss")]["note"]
    for m in ("memory", "memory_total"):  # CUDA only
        assert by[("torch", m)]["status"] == "skipped" and "CUDA" in by[("torch", m)]["note"]
    model_tflop = float(by[("torch", "step_flops")]["p50"])
    assert float(by[("torch", "tflops")]["p50"]) == pytest.approx(model_tflop / (time_ms * 1e-3), rel=1e-3)
    assert "counted on the torch provider's step" in by[("torch", "tflops")]["note"]
    assert by[("torch", "mfu")]["status"] == "skipped" and "CPU" in by[("torch", "mfu")]["note"]

    summary = md.read_text()
    assert "| metric | triton | torch | planted | triton vs torch |" in summary
    assert "| throughput (clips/s) | skipped |" in summary
    assert ">= 1.5x the clips/s" in summary and "<= 0.7x" in summary and "not measured" in summary
    assert "not the target configuration" in summary


# --------------------------------------------------------------------------------------------------- summary
def _row(provider, metric, unit, value, status="ok", note=""):
    row = harness.make_row(kernel=bts.KERNEL, provider=provider, mode="fwd+bwd", x_name="batch", x_value="16",
                           shape="model=lfvila-base B=16 T=32 H=192 W=320 M=4 L=50 precision=bf16-autocast/"
                           "fp32-params optimizer=none grad_ckpt=off", metric=metric, unit=unit, dtype="bfloat16",
                           values=None if value is None else {"p50": value, "p20": value, "p80": value},
                           status=status, note=note)  # fmt: skip
    return {
        **row,
        "label": "h200",
        "device": "NVIDIA H200",
        "torch": "2.x",
        **{k: str(row[k]) for k in ("p50", "p20", "p80")},
    }


def test_markdown_summary_reports_speedup_memory_ratio_and_target():
    rows = [
        _row("triton", "time", "ms", 500.0), _row("torch", "time", "ms", 1000.0),
        _row("triton", "clips_per_s", "clips/s", 32.0), _row("torch", "clips_per_s", "clips/s", 16.0),
        _row("triton", "memory_total", "MB", 80000.0), _row("torch", "memory_total", "MB", 100000.0),
        _row("triton", "loss", "value", 2.5), _row("torch", "loss", "value", 2.5),
    ]  # fmt: skip
    summary = bts.markdown_summary(rows)
    assert "| step time (median ms) | 500 | 1000 | 2x faster |" in summary
    assert "| throughput (clips/s) | 32 | 16 | 2x |" in summary
    assert "| peak allocated memory (MB) | 80000 | 100000 | 0.8x |" in summary
    assert "clips/s triton / torch (target >= 1.5): 2, met" in summary
    assert "peak memory triton / torch (target <= 0.7): 0.8, NOT met" in summary
    assert "not the target configuration" not in summary

    oom = [
        _row("triton", "clips_per_s", "clips/s", 32.0),
        _row("torch", "clips_per_s", "clips/s", None, "failed", "OutOfMemoryError: CUDA out of memory"),
    ]
    text = bts.markdown_summary(oom)
    assert "| throughput (clips/s) | 32 | failed |  |" in text
    assert "not measured (torch failed: OutOfMemoryError: CUDA out of memory)" in text
    assert "- torch failed (clips_per_s): OutOfMemoryError" in text


def test_flop_count_and_mfu_cells():
    model = torch.nn.Linear(64, 32)
    x = torch.randn(8, 64, requires_grad=True)

    def step():
        model(x).sum().backward()

    assert bts.count_step_flops(step) == 3 * 2 * 8 * 64 * 32  # forward, grad of the input, grad of the weight
    times = {"time": ("ok", {"p50": 100.0, "p20": 90.0, "p80": 125.0}, "")}
    cells = bts.throughput_cells(times, (50.0, "counted on the torch provider's step"), (1000.0, "H200"),
                                 torch.bfloat16)  # fmt: skip
    assert cells["tflops"][1] == pytest.approx({"p50": 500.0, "p20": 400.0, "p80": 50.0 / 0.09})
    assert cells["mfu"][0] == "ok" and cells["mfu"][1]["p50"] == pytest.approx(0.5)
    fp32 = bts.throughput_cells(times, (50.0, "own"), (1000.0, "H200"), torch.float32)
    assert fp32["mfu"][0] == "skipped" and "bf16" in fp32["mfu"][2]
    unknown = bts.throughput_cells(times, (50.0, "own"), (None, "no dense bf16 peak known for X"), torch.bfloat16)
    assert unknown["mfu"] == ("skipped", None, "no dense bf16 peak known for X")
    failed = bts.throughput_cells({"time": ("failed", None, "OutOfMemoryError")}, (50.0, "own"), (1000.0, ""),
                                  torch.bfloat16)  # fmt: skip
    assert failed["tflops"] == failed["mfu"] == ("failed", None, "OutOfMemoryError")
    assert bts.peak_tflops(CPU)[0] is None


def test_peak_table_is_the_training_loops_and_imports_no_pyav():
    """bench_train_step uses train.metrics' table; importing that loads neither PyAV nor the training loop."""
    import subprocess

    from train.metrics import PEAK_BF16_TFLOPS

    assert bts.PEAK_BF16_TFLOPS is PEAK_BF16_TFLOPS
    code = "import sys, benchmarks.bench_train_step; print(sorted(m for m in ('av', 'train.loop') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"

def test_target_heads_start_the_target_lines():
    rows = [_row("triton", "clips_per_s", "clips/s", 32.0), _row("torch", "clips_per_s", "clips/s", 16.0)]
    lines = bts.target_report(rows)
    assert [line.split(":")[0] for line in lines] == [f"- {h}" for h in bts.target_heads()]


# --------------------------------------------------------------------------------------------------- peak RSS
@pytest.mark.skipif(not harness.can_reset_hwm(), reason="needs Linux /proc/self/clear_refs")
def test_peak_rss_in_a_fresh_process():
    problem = bts.Problem(TINY, 1, 4, 64, 96, torch.float32, optimizer=True)
    result = bts.measure_rss("torch", problem, timeout=600)
    assert result["method"] == "clear_refs" and result["exact"]
    assert result["increase_mb"] > 0 and result["baseline_mb"] > 50 and result["seconds"] > 0
    with pytest.raises(RuntimeError, match="interpret-ok"):  # refused in the child: the reason comes back
        bts.measure_rss("triton", problem, timeout=600)
