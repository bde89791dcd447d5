"""Tests of the attention-variant suite: shape sets, FLOP counts per function, the speed-reference providers against
their own functions, the determinism flag, full attention's budget, the targets report, compare, plots and
``benchmarks.run`` end to end. Tiny sizes; no timing is asserted (compare is fed planted numbers)."""

from __future__ import annotations

import csv
import math
import time

import pytest
import torch
import torch.nn.functional as F

from benchmarks import attention_shapes as shapes
from benchmarks import attention_variants as av
from benchmarks import bench_attention as ba
from benchmarks import compare, harness, plot
from benchmarks import run as bench_run
from lfvila_kernels import window_attention_reference

CPU = torch.device("cpu")
FAST = {"reps": 2, "warmup": 0}


def _writer(tmp_path, name="out.csv", label="test"):
    return harness.ResultWriter(tmp_path / name, harness.environment(CPU), label)


# --------------------------------------------------------------------------------------------------- shape sets
def test_shape_sets_full_and_reduced():
    full = {name: s.full() for name, s in shapes.SHAPE_SETS.items()}
    reduced = {name: s.reduced() for name, s in shapes.SHAPE_SETS.items()}
    assert set(shapes.PUBLIC_SHAPE_SETS) == {"lfvila", "video-swin-k400", "long-form", "window-sweep"}
    for cases in [*full.values(), *reduced.values()]:
        assert len({c.x_name for c in cases}) == 1 and len({c.name for c in cases}) == len(cases)
        for c in cases:
            assert all(0 < w <= n and 0 <= s < w for w, n, s in zip(c.window, c.grid, c.shift, strict=True)), c
    # Each public set has its own x axis, which is how plots and tables tell them apart.
    assert len({full[n][0].x_name for n in shapes.PUBLIC_SHAPE_SETS}) == len(shapes.PUBLIC_SHAPE_SETS)

    k400 = full["video-swin-k400"]
    assert [c.grid for c in k400] == [(16, 56, 56), (16, 28, 28), (16, 14, 14), (16, 7, 7)]
    assert [c.heads for c in k400] == [3, 6, 12, 24] and {c.head_dim for c in k400} == {32}
    assert k400[0].window == (8, 7, 7) and k400[0].shift == (4, 3, 3) and k400[0].batch == 8
    assert k400[3].window == (8, 7, 7) and k400[3].shift == (4, 0, 0)  # window = grid on H, W: no shift there

    long_form = full["long-form"]
    assert [c.grid[0] for c in long_form] == [32, 64, 128, 256]
    assert {(c.grid[1:], c.window, c.shift, c.heads) for c in long_form} == {((24, 40), (2, 3, 5), (0, 1, 2), 4)}
    assert [c.grid[0] for c in reduced["long-form"]] == [8, 16, 32, 64]
    assert [c.grid[0] for c in reduced["video-swin-k400"]] == [8] * 4

    sweep = full["window-sweep"]
    tokens = [math.prod(c.window) for c in sweep]
    assert tokens == [30, 60, 120, 240, 480, 1024] and [c.name for c in sweep] == [str(t) for t in tokens]
    assert {c.grid for c in sweep} == {(32, 24, 40)}
    assert [math.prod(c.window) for c in reduced["window-sweep"]] == tokens  # 16 frames still hold 16x8x8

    assert {c.batch for cases in reduced.values() for c in cases} == {1}
    assert [c.batch for c in shapes.SHAPE_SETS["lfvila"].full(batch_override=2)] == [2] * 6
    assert [c.grid[0] for c in shapes.SHAPE_SETS["long-form"].reduced(frames_override=4)] == [4]


def test_flops_per_function_and_mode():
    case = shapes.Case("c", 2, (4, 6, 10), 3, 32, (2, 3, 5), (0, 1, 2))
    allowed = ba.count_allowed_pairs(case.grid, case.window, case.shift)
    per_pair = 4 * 32 * 2 * 3  # head_dim, batch, heads
    assert ba.attention_flops(case, "fwd") == per_pair * allowed
    assert ba.attention_flops(case, "fwd", "windows-no-bias") == per_pair * allowed
    assert ba.attention_flops(case, "fwd", "full") == per_pair * 240**2
    assert ba.attention_flops(case, "fwd", "neighborhood") == per_pair * 240 * 30
    assert ba.attention_flops(case, "bwd") == 2.5 * ba.attention_flops(case, "fwd")
    assert ba.attention_flops(case, "fwd+bwd", "full") == 3.5 * ba.attention_flops(case, "fwd", "full")
    with pytest.raises(ValueError, match="unknown mode"):
        ba.attention_flops(case, "train")
    with pytest.raises(ValueError, match="unknown function"):
        ba.attention_flops(case, "fwd", "sparse")


# --------------------------------------------------------------------------------------------------- speed references
def _inputs(case, grad=True, device=CPU):
    q, k, v, table, grad_out = ba.make_inputs(case, torch.float32, device, seed=3)
    for t in (q, k, v):
        t.requires_grad_(grad)
    return q, k, v, table, grad_out


@pytest.mark.parametrize(
    "device", [CPU, pytest.param(torch.device("cuda"), marks=pytest.mark.gpu)], ids=lambda d: d.type
)
@pytest.mark.parametrize("name", ["sdpa-no-bias", "full-sdpa"])
def test_speed_references_match_their_own_function(name, device):
    case = shapes.tiny_cases()[0]  # divisible grid
    q, k, v, table, grad_out = _inputs(case, device=device)
    scale = case.head_dim**-0.5
    variant = av.VARIANTS[name]
    assert not variant.bias and variant.computes in ("windows-no-bias", "full")
    forward = variant.make(q, k, v, case.window, case.shift, None, scale)
    if variant.computes == "windows-no-bias":
        expected = window_attention_reference(q, k, v, case.window, (0, 0, 0), None, scale)
    else:
        expected = ba._full_attention_float64(q, k, v, scale).float()
    out = forward()
    prepared = isinstance(forward, av.PrePartitioned)
    assert prepared == (name == "sdpa-no-bias")
    got = forward.to_tokens(out) if prepared else out
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)
    # Gradients: on a divisible grid the window layout is a permutation, so the leaves' gradients are the reference's
    # gradients laid out the same way.
    want = torch.autograd.grad(expected, (q, k, v), grad_out)
    if prepared:
        got_grads = torch.autograd.grad(out, forward.leaves, forward.from_tokens(grad_out))
        want = [forward.from_tokens(w) for w in want]
    else:
        got_grads = torch.autograd.grad(out, (q, k, v), grad_out)
    for g, w in zip(got_grads, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)


def test_full_attention_oracle_is_exact_and_chunked():
    q, k, v = (torch.randn(2, 3, 4, 5, 2, 8, dtype=torch.float64) for _ in range(3))
    seq = lambda x: x.reshape(2, 60, 2, 8).transpose(1, 2)  # noqa: E731
    want = F.scaled_dot_product_attention(seq(q), seq(k), seq(v), scale=0.3).transpose(1, 2).reshape(q.shape)
    for max_scores in (2**25, 2 * 2 * 60 * 7):  # one chunk; chunks of 7 queries (the last one shorter)
        torch.testing.assert_close(ba._full_attention_float64(q, k, v, 0.3, max_scores), want)


def test_optional_baselines_are_refused_on_the_cpu_with_a_reason():
    for name in ("xformers", "flash-attn", "natten"):
        reason = av.VARIANTS[name].refusal(CPU, torch.float32)
        if name == "natten" and reason is None:  # natten has a CPU path: installed here, it is allowed to run
            continue
        assert reason and ("not installed" in reason or "no CPU" in reason), (name, reason)
    with pytest.raises(ValueError, match="computes must be one of"):
        av.Variant(av.make_window_attention_torch, computes="other")


# --------------------------------------------------------------------------------------------------- run()
def _nondeterministic(q, k, v, window, shift, table, scale):
    """The reference with a bias-table gradient that changes from call to call (a planted non-determinism)."""

    def forward():
        wobble = table * (1 + 1e-3 * torch.rand(()))  # a different scale of the table, hence of its gradient, per call
        return window_attention_reference(q, k, v, window, shift, wobble, scale)

    return forward


def test_run_modes_determinism_references_and_budget(tmp_path):
    variants = {n: av.VARIANTS[n] for n in ("window-attention-torch", "sdpa-no-bias", "full-sdpa")}
    variants["wobbly"] = av.Variant(_nondeterministic)
    cases = shapes.tiny_cases()
    rows = ba.run(cases, variants, ba.MODES, torch.float32, CPU, _writer(tmp_path), FAST, log=lambda m: None,
                  full_max_flops=ba.attention_flops(cases[1], "fwd+bwd", "full"))  # fmt: skip
    cell = {(r["provider"], r["x_value"], r["mode"], r["metric"]): r for r in rows}
    metrics = {m for (_, _, mode, m) in cell if mode == "bwd"}
    assert metrics == {"time", "tflops", "memory", "compile_time"}
    assert all(float(cell[(p, x, m, "compile_time")]["p50"]) > 0 for p in ("window-attention-torch", "wobbly") for x in
               ("tiny-div", "tiny-pad") for m in ba.MODES)  # fmt: skip
    for mode in ba.MODES:
        assert cell[("window-attention-torch", "tiny-div", mode, "time")]["status"] == "ok"
    assert float(cell[("window-attention-torch", "tiny-div", "fwd+bwd", "bias_grad_deterministic")]["p50"]) == 1.0
    assert float(cell[("wobbly", "tiny-div", "fwd+bwd", "bias_grad_deterministic")]["p50"]) == 0.0
    det = cell[("sdpa-no-bias", "tiny-div", "fwd+bwd", "bias_grad_deterministic")]
    assert det["status"] == "skipped" and "no relative-position bias" in det["note"]
    assert float(cell[("sdpa-no-bias", "tiny-div", "fwd", "max_abs_err")]["p50"]) < 1e-5
    pad = cell[("sdpa-no-bias", "tiny-pad", "fwd", "max_abs_err")]
    assert pad["status"] == "skipped" and "divisible" in pad["note"]
    assert float(cell[("full-sdpa", "tiny-pad", "fwd", "max_abs_err")]["p50"]) < 1e-5
    # The budget admits full attention on tiny-pad (175 tokens; its fwd+bwd is the budget), not on tiny-div (240).
    assert cell[("full-sdpa", "tiny-pad", "fwd+bwd", "time")]["status"] == "ok"
    over = cell[("full-sdpa", "tiny-div", "fwd+bwd", "time")]
    assert over["status"] == "skipped" and "exceeds the budget" in over["note"]
    flops = ba.attention_flops(cases[1], "bwd", "full")
    tflops = cell[("full-sdpa", "tiny-pad", "bwd", "tflops")]
    assert float(tflops["p50"]) == pytest.approx(flops / float(cell[("full-sdpa", "tiny-pad", "bwd", "time")]["p50"])
                                                 / 1e9, rel=1e-4)  # fmt: skip


def test_targets_report_speedups_and_growth():
    def row(provider, mode, x_name, x, ms):
        return {"provider": provider, "mode": mode, "x_name": x_name, "x_value": str(x), "metric": "time",
                "status": "ok", "p50": str(ms)}  # fmt: skip

    ours = "window-attention-triton"
    rows = [row(p, "fwd+bwd", "layer", "layer0", ms)
            for p, ms in ((ours, 1.0), ("videoswin-eager", 4.0), ("sdpa-dense-bias", 1.5))]  # fmt: skip
    rows += [row(ours, "fwd", "frames", t, 0.1 * t) for t in (32, 64, 128, 256)]
    rows += [row("full-sdpa", "fwd", "frames", t, 0.01 * t * t) for t in (32, 64, 128)]
    text = "\n".join(ba.targets_report(rows))
    assert ">= 3x videoswin-eager on lfvila: 4.00x to 4.00x over 1 layers (met)" in text
    assert ">= 2x sdpa-dense-bias on lfvila: 1.50x to 1.50x over 1 layers (not met)" in text
    assert ">= 1.5x flex on lfvila: not measured here" in text
    assert "long-form window-attention-triton fwd: time ~ T^1.00" in text
    assert "long-form full-sdpa fwd: time ~ T^2.00" in text
    assert "peak memory <= 0.3x videoswin-eager on lfvila: not measured here" in text
    assert "480-token window layer: not measured here (no layer with 480-token windows" in text
    assert "long-form window-attention-triton fwd+bwd grows linearly in T: not measured here" in text
    heads = ba.target_heads()
    assert all(any(line.startswith(f"- {h}") for line in ba.targets_report(rows)) for h in heads)


def test_targets_report_memory_tflops_and_linear_growth():
    def row(provider, mode, x_name, x, metric, value, shape="B=16 T=32 H=3 W=5 heads=32 head_dim=32 window=32x3x5"):
        return {"provider": provider, "mode": mode, "x_name": x_name, "x_value": str(x), "metric": metric,
                "status": "ok", "p50": str(value), "shape": shape}  # fmt: skip

    rows = [row("window-attention-triton", "fwd+bwd", "layer", "layer5", "memory", 100.0),
            row("videoswin-eager", "fwd+bwd", "layer", "layer5", "memory", 500.0),
            row("window-attention-triton", "fwd+bwd", "layer", "layer0", "memory", 150.0, "window=2x3x5"),
            row("videoswin-eager", "fwd+bwd", "layer", "layer0", "memory", 300.0, "window=2x3x5"),
            row("window-attention-triton", "fwd", "layer", "layer5", "tflops", 250.0),
            row("window-attention-triton", "fwd", "layer", "layer0", "tflops", 900.0, "window=2x3x5")]  # fmt: skip
    rows += [row("window-attention-triton", "fwd+bwd", "frames", t, "time", 0.01 * t**1.5, "window=2x3x5")
             for t in (32, 64, 128)]  # fmt: skip
    text = "\n".join(ba.targets_report(rows))
    assert "peak memory <= 0.3x videoswin-eager on lfvila: 0.2x to 0.5x over 2 layers (activations" in text
    assert "not met)" in text.split("peak memory")[1].splitlines()[0]
    assert "fwd >= 200 TFLOP/s on the 480-token window layer: 250 TFLOP/s (met)" in text  # layer0's 900 not counted
    assert "grows linearly in T: time ~ T^1.50 over T = 32, 64, 128 (1 = linear, 2 = quadratic); target k <= 1.2 " \
           "(not met)" in text  # fmt: skip


def _slow_compiler(q, k, v, window, shift, table, scale):
    """A provider that takes 50 ms to build, as a compiling one would (the compile budget's test)."""
    time.sleep(0.05)
    return av.make_window_attention_torch(q, k, v, window, shift, table, scale)


def test_compile_budget_skips_a_compiling_provider_once_spent(tmp_path):
    variants = {"slow": av.Variant(_slow_compiler, compiles=True), "plain": av.Variant(_slow_compiler)}
    cases = shapes.tiny_cases()
    rows = ba.run(cases, variants, ["fwd", "fwd+bwd"], torch.float32, CPU, _writer(tmp_path), {"reps": 1, "warmup": 0},
                  log=lambda m: None, compile_budget=0.01)  # fmt: skip
    times = {(r["provider"], r["x_value"], r["mode"]): r for r in rows if r["metric"] == "time"}
    assert times[("slow", "tiny-div", "fwd")]["status"] == "ok"  # the first compile always runs
    for key in [("slow", "tiny-div", "fwd+bwd"), ("slow", "tiny-pad", "fwd"), ("slow", "tiny-pad", "fwd+bwd")]:
        assert times[key]["status"] == "skipped" and times[key]["note"].startswith("compile budget: slow already")
    assert all(r["status"] == "ok" for k, r in times.items() if k[0] == "plain")  # not a compiling provider
    first = next(r for r in rows if r["metric"] == "compile_time" and r["provider"] == "slow")
    assert float(first["p50"]) >= 0.05
    (line,) = [x for x in ba.compile_report(rows) if x.startswith("- slow")]
    assert "over 1 (shape, mode)s" in line and "3 skipped by the compile budget" in line
    assert av.VARIANTS["flex"].compiles and not av.VARIANTS["window-attention-triton"].compiles


def test_cli_cases_subset(tmp_path):
    out = tmp_path / "c.csv"
    rows = ba.main(["--shapes", "tiny", "--cases", "tiny-pad", "--device", "cpu", "--providers",
                    "window-attention-torch", "--modes", "fwd", "--reps", "1", "--warmup", "0",
                    "--out", str(out)])  # fmt: skip
    assert {r["x_value"] for r in rows} == {"tiny-pad"} and rows == harness.read_rows(out)
    with pytest.raises(SystemExit, match="not in the tiny set"):
        ba.main(["--shapes", "tiny", "--cases", "layer0", "--device", "cpu", "--out", str(out)])


# --------------------------------------------------------------------------------------------------- compare
def _timed(label, provider, x, p50, spread=0.02, metric="time", status="ok", note=""):
    base = {"timestamp": "2026-11-22T00:00:00+00:00", "label": label, "kernel": "window_attention",
            "provider": provider, "mode": "fwd", "x_name": "layer", "x_value": x, "shape": "B=1", "metric": metric,
            "unit": "ms", "status": status, "note": note, "dtype": "float32", "device": "cpu"}  # fmt: skip
    if status == "ok":
        base.update(p50=str(p50), p20=str(p50 * (1 - spread)), p80=str(p50 * (1 + spread)))
    else:
        base.update(p50="", p20="", p80="")
    return base


def test_compare_finds_a_planted_regression_and_nothing_in_noise():
    base = [_timed("base", "a", "l0", 1.0), _timed("base", "b", "l0", 1.0), _timed("base", "c", "l0", 1.0),
            _timed("base", "d", "l0", 1.0), _timed("base", "e", "l0", 1.0, spread=0.3),
            _timed("base", "f", "l0", 1.0, metric="clips_per_s")]  # fmt: skip
    new = [_timed("new", "a", "l0", 1.5), _timed("new", "b", "l0", 0.5), _timed("new", "c", "l0", 1.05),
           _timed("new", "d", "l0", 0, status="failed", note="RuntimeError: OOM"), _timed("new", "e", "l0", 1.2, 0.3),
           _timed("new", "f", "l0", 0.5, metric="clips_per_s"), _timed("new", "g", "l0", 1.0)]  # fmt: skip
    verdicts = {c.key[1]: c.verdict for c in compare.compare(base + new, "base", "new", threshold=0.10)}
    assert verdicts == {"a": "REGRESSED", "b": "IMPROVED", "c": "SAME", "d": "REGRESSED",
                        "e": "SAME",  # +20 % but the spreads overlap: noise, not a regression
                        "f": "REGRESSED", "g": "NEW"}  # fmt: skip
    changes = compare.compare(base + new, "base", new)  # the current run given as rows
    assert changes[0].verdict == "REGRESSED"
    text = compare.report(changes, "base", "new", 0.10)
    assert "2 REGRESSED" not in text and "3 REGRESSED" in text and "now failed: RuntimeError: OOM" in text
    # Only the newest rows of a label count: a re-run of the baseline that matches the new run clears the regression.
    rerun = dict(_timed("base", "a", "l0", 1.5), timestamp="2026-11-23T00:00:00+00:00")
    verdicts = {c.key[1]: c.verdict for c in compare.compare(base + [rerun] + new, "base", "new")}
    assert verdicts["a"] == "SAME"


def test_compare_cli_exit_status(tmp_path, capsys):
    path = tmp_path / "runs.csv"
    rows = [_timed("base", "a", "l0", 1.0), _timed("ok", "a", "l0", 1.0), _timed("slow", "a", "l0", 2.0)]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=harness.SCHEMA)
        writer.writeheader()
        writer.writerows({k: r.get(k, "") for k in harness.SCHEMA} for r in rows)
    assert compare.main(["--baseline", "base", "--current", "ok", "--csv", str(path)]) == 0
    assert compare.main(["--baseline", "base", "--current", "slow", "--csv", str(path)]) == 1
    assert "REGRESSED window_attention a fwd l0 time" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        compare.main(["--baseline", "nope", "--current", "ok", "--csv", str(path)])
    assert "no rows with that label" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------- run + plot
def test_run_end_to_end_with_plots_and_compare(tmp_path, capsys):
    args = ["--suite", "attention", "--shapes", "tiny", "--device", "cpu", "--out-dir", str(tmp_path)]
    extra = ["--", "--providers", "window-attention-torch,videoswin-eager,xformers", "--reps", "2", "--warmup", "0"]
    assert bench_run.main([*args, "--label", "first", *extra]) == 0
    first = harness.read_rows(tmp_path / "attention-first.csv")
    assert {r["label"] for r in first} == {"first"} and {r["provider"] for r in first} == {
        "window-attention-torch", "videoswin-eager", "xformers"}  # fmt: skip
    assert all(r["status"] == "skipped" and r["note"] for r in first if r["provider"] == "xformers")
    assert (tmp_path / "plots" / "attention-case-first.png").stat().st_size > 10_000
    md = (tmp_path / "attention-first.md").read_text()
    assert "![attention-case](plots/attention-case-first.png)" in md and "| videoswin-eager |" in md
    assert "`xformers` skipped (tiny-div, tiny-pad)" in md

    # Plant a regression: a stored run that was 10x faster than anything this machine can do.
    with open(tmp_path / "attention-fast.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=harness.SCHEMA)
        writer.writeheader()
        for r in first:
            r = dict(r, label="fast")
            if r["status"] == "ok" and r["metric"] == "time":
                r.update({k: str(float(r[k]) / 10) for k in ("p50", "p20", "p80")})
            writer.writerow(r)
    capsys.readouterr()
    assert bench_run.main([*args, "--label", "second", "--compare", "fast", "--no-plot", *extra]) == 1
    out = capsys.readouterr().out
    assert "REGRESSED window_attention window-attention-torch fwd tiny-div time" in out
    assert not (tmp_path / "plots" / "attention-case-second.png").exists()
    assert bench_run.main([*args, "--label", "third", "--compare", "missing", "--no-plot", *extra]) == 2
    with pytest.raises(SystemExit):
        bench_run.main([*args, "--label", "a b", *extra])


def test_plot_report_groups_and_reasons(tmp_path):
    rows = [_timed("r", "a", x, 1.0 + i) for i, x in enumerate(("8", "16", "32"))]
    rows += [dict(_timed("r", "b", x, 0.5), metric="memory", unit="MB") for x in ("8", "16", "32")]
    rows += [_timed("r", "c", "8", 0, status="failed", note="RuntimeError: boom")]
    rows = [dict(r, x_name="frames", mode=m, commit="abc", torch="2.13", triton="3.9", python="3.11")
            for r in rows for m in ("fwd", "fwd+bwd")]  # fmt: skip
    images = plot.plot_all(rows, tmp_path / "plots", relative_to=tmp_path)
    assert images == {("r", "window_attention", "frames"): "plots/attention-long-form-r.png"}
    text = plot.markdown_report(rows, images)
    assert "### attention-long-form (`r`)" in text and "**fwd+bwd: memory (MB)" in text
    assert "| a | 1 | 2 | 3 |" in text and "- `c` failed (8): RuntimeError: boom" in text


def test_markdown_table_ratios():
    rows = [_timed("r", "videoswin-eager", "l0", 2.0), _timed("r", "fast", "l0", 1.0)]
    speed = plot.markdown_table(rows, "time", "fwd", "videoswin-eager")
    assert "| fast | 1 (2x) |" in speed and "| videoswin-eager | 2 (1x) |" in speed
    assert "| fast | 1 (0.5x) |" in plot.markdown_table(rows, "time", "fwd", "videoswin-eager", "value/baseline")
    assert "| fast | 1 |" in plot.markdown_table(rows, "time", "fwd", "videoswin-eager", None, title="t")
    assert plot.markdown_table(rows, "memory", "fwd", "videoswin-eager") == ""
    with pytest.raises(ValueError, match="relation"):
        plot.markdown_table(rows, "time", "fwd", "videoswin-eager", "speedup")
