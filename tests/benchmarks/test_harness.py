"""Tests of the benchmark plumbing: CSV rows, failure recording, the allowed-pair count, the providers' correctness.

No timing is asserted anywhere. Providers are checked against ``lfvila_kernels.window_attention_reference`` in fp32
on tiny grids (divisible and not), output and the gradients of q, k, v and the bias table.
"""

from __future__ import annotations

import csv
import itertools
import platform
import time

import pytest
import torch

from benchmarks import attention_shapes as shapes
from benchmarks import attention_variants as av
from benchmarks import bench_attention as ba
from benchmarks import harness
from lfvila_kernels import window_attention_reference

CPU = torch.device("cpu")


def _writer(tmp_path, name="out.csv"):
    return harness.ResultWriter(tmp_path / name, harness.environment(CPU), "test")


def _row(**overrides):
    base = dict(
        kernel="k", provider="p", mode="fwd", x_name="layer", x_value="layer0", shape="B=1", metric="time",
        unit="ms", dtype="float32", values={"p50": 1.5, "p20": 1.0, "p80": 2.0},
    )  # fmt: skip
    return harness.make_row(**{**base, **overrides})


# --------------------------------------------------------------------------------------------------- harness
def test_csv_schema_and_append(tmp_path):
    writer = _writer(tmp_path)
    writer.write([_row(), _row(metric="memory", unit="MB", values=None, status="skipped", note="cpu")])
    writer.write([_row(provider="q", status="failed", values=None, note="RuntimeError: x, with a comma")])
    with open(tmp_path / "out.csv", newline="") as f:
        lines = list(csv.reader(f))
    assert tuple(lines[0]) == harness.SCHEMA
    assert len(lines) == 4  # one header, then three rows, even across two writes
    rows = harness.read_rows(tmp_path / "out.csv")
    assert [r["status"] for r in rows] == ["ok", "skipped", "failed"]
    assert rows[0]["p50"] == "1.5" and rows[0]["p20"] == "1" and rows[0]["p80"] == "2"
    assert rows[1]["p50"] == rows[1]["p20"] == rows[1]["p80"] == ""
    assert rows[2]["note"] == "RuntimeError: x, with a comma"
    env = harness.environment(CPU)
    for r in rows:
        assert r["label"] == "test" and r["timestamp"]
        assert all(r[k] == env[k] for k in env)


def test_renamed_providers_read_under_their_new_names(tmp_path):
    """Results stored before the rename (``htwa-triton``, ``htwa-torch``) compare with runs after it: read_rows and
    ``--providers`` take the old names as the new ones; a name never used stays unknown."""
    from benchmarks import suite

    writer = _writer(tmp_path)
    writer.write([_row(provider="htwa-triton"), _row(provider="htwa-torch"), _row(provider="videoswin-eager")])
    got = [r["provider"] for r in harness.read_rows(tmp_path / "out.csv")]
    assert got == ["window-attention-triton", "window-attention-torch", "videoswin-eager"]
    assert suite.pick("htwa-torch,videoswin-eager", av.VARIANTS, "providers") == [
        "window-attention-torch", "videoswin-eager"]  # fmt: skip
    with pytest.raises(SystemExit, match="htwa"):
        suite.pick("htwa", av.VARIANTS, "providers")


def test_writer_refuses_a_foreign_header(tmp_path):
    (tmp_path / "old.csv").write_text("a,b,c\n1,2,3\n")
    with pytest.raises(ValueError, match="columns"):
        _writer(tmp_path, "old.csv")


def test_make_row_checks_status():
    with pytest.raises(ValueError, match="status"):
        _row(status="great")


def test_environment_is_complete_and_hostname_free():
    env = harness.environment(CPU)
    assert set(env) == {"device", "torch", "triton", "python", "commit"}
    assert all(isinstance(v, str) and v for v in env.values())
    node = platform.node()
    if node:
        assert all(node not in v for v in env.values())


def test_measure_cpu_quantiles_and_grad_reset():
    x = torch.randn(8, requires_grad=True)
    grads_seen = []

    def step():
        grads_seen.append(x.grad is None)
        (x * 2).sum().backward()

    t = harness.measure(step, device=CPU, warmup=1, reps=3, grad_to_none=[x])
    assert set(t) == {"p50", "p20", "p80"}
    assert 0 <= t["p20"] <= t["p50"] <= t["p80"]
    assert grads_seen == [True] * 4  # every call started from fresh gradients
    assert harness.peak_memory(step, CPU) is None


def test_measure_cpu_budget_cuts_slow_calls_to_three():
    calls = []

    def slow():  # ~20 ms per call: a 1 ms budget leaves the minimum of 3 timed calls
        calls.append(1)
        time.sleep(0.02)

    harness.measure(slow, device=CPU, warmup=1, reps=10, cpu_budget_ms=1.0)
    assert len(calls) == 1 + 3
    calls.clear()
    harness.measure(lambda: calls.append(1), device=CPU, warmup=1, reps=10, cpu_budget_ms=1e6)
    assert len(calls) == 1 + 10  # fast calls: every rep
    calls.clear()
    harness.measure(slow, device=CPU, warmup=1, reps=2, cpu_budget_ms=1.0)
    assert len(calls) == 1 + 2  # never more than asked


def test_guarded_and_exception_chain():
    def fails():
        try:
            raise NotImplementedError("the real reason")
        except NotImplementedError as exc:
            raise RuntimeError("wrapper\nwith more lines") from exc

    result, note = harness.guarded(fails, CPU)
    assert result is None
    assert note == "NotImplementedError: the real reason [raised as RuntimeError: wrapper]"
    assert harness.guarded(lambda: 3, CPU) == (3, None)


# --------------------------------------------------------------------------------------------------- peak RSS
needs_hwm_reset = pytest.mark.skipif(not harness.can_reset_hwm(), reason="needs Linux /proc/self/clear_refs")


@needs_hwm_reset
def test_peak_rss_of_a_known_allocation_in_a_fresh_process():
    code = (
        "import torch\n"
        "from benchmarks import harness\n"
        "harness.report_to_parent(harness.peak_rss_increase(lambda: torch.ones(64 * 2**20)))\n"  # 256 MiB, written
    )
    result = harness.run_fresh_process(["-c", code], timeout=120)
    assert result["method"] == "clear_refs" and result["exact"]
    assert 256 <= result["increase_mb"] < 256 + 16, result
    assert result["peak_mb"] >= result["baseline_mb"] + 256


@needs_hwm_reset
def test_peak_rss_with_an_address_space_cap():
    """In a fresh process, as peak_rss_increase asks: in a long-lived one (an xdist worker after hundreds of tests) the
    allocator may serve the 64 MiB from pages it already holds, and the increase reads 0."""
    code = (
        "import torch\n"
        "from benchmarks import harness\n"
        "capped = harness.peak_rss_increase(lambda: torch.ones(16 * 2**20), limit_mb=4096)\n"  # 64 MiB
        "try:\n"  # the cap refuses a 1 GiB allocation instead of waking the OOM killer
        "    harness.peak_rss_increase(lambda: torch.ones(256 * 2**20), limit_mb=128)\n"
        "    refused = None\n"
        "except (RuntimeError, MemoryError) as exc:\n"
        "    refused = type(exc).__name__\n"
        "lifted = harness.peak_rss_increase(lambda: torch.ones(256 * 2**20))\n"  # and is lifted afterwards
        "harness.report_to_parent({'capped': capped, 'refused': refused, 'lifted': lifted})\n"
    )
    result = harness.run_fresh_process(["-c", code], timeout=120)
    assert 64 <= result["capped"]["increase_mb"] < 64 + 16, result
    assert result["refused"] in ("RuntimeError", "MemoryError"), result
    assert result["lifted"]["increase_mb"] >= 256, result


def test_fresh_process_failures_are_reported():
    with pytest.raises(RuntimeError, match=r"exit status 3\): ValueError: bad"):
        harness.run_fresh_process(["-c", "import sys; sys.stderr.write('ValueError: bad\\n'); sys.exit(3)"])
    with pytest.raises(RuntimeError, match="killed by SIGKILL"):
        harness.run_fresh_process(["-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"])
    with pytest.raises(RuntimeError, match="the child's own reason"):
        code = f"import json; print({harness.RESULT_PREFIX!r} + json.dumps({{'error': \"the child's own reason\"}}))"
        harness.run_fresh_process(["-c", code])


# --------------------------------------------------------------------------------------------------- run()
def _boom(*args):
    raise RuntimeError("boom: unsupported shape")


def test_failed_variant_is_recorded_and_the_run_goes_on(tmp_path):
    variants = {
        "boom": av.Variant(_boom),
        "refused": av.Variant(av.make_window_attention_torch, lambda device, dtype: "not on this machine"),
        "window-attention-torch": av.VARIANTS["window-attention-torch"],
    }
    cases = shapes.tiny_cases()
    rows = ba.run(cases, variants, ["fwd", "fwd+bwd"], torch.float32, CPU, _writer(tmp_path), {"reps": 1, "warmup": 0},
                  log=lambda msg: None)  # fmt: skip
    assert rows == harness.read_rows(tmp_path / "out.csv")
    per_case_mode = 5 + 5  # fwd: time, tflops, memory, max_abs_err, compile_time; fwd+bwd: determinism for the error
    assert len(rows) == len(cases) * len(variants) * per_case_mode
    by = {}
    for r in rows:
        by.setdefault(r["provider"], []).append(r)
    assert all(r["status"] == "failed" and r["note"] == "RuntimeError: boom: unsupported shape" for r in by["boom"])
    assert all(r["status"] == "skipped" and r["note"] == "not on this machine" for r in by["refused"])
    for r in by["window-attention-torch"]:
        if r["metric"] == "memory":  # not measured on the CPU
            assert r["status"] == "skipped" and r["p50"] == ""
        else:
            assert r["status"] == "ok" and float(r["p50"]) >= 0, r
    errs = [float(r["p50"]) for r in by["window-attention-torch"] if r["metric"] == "max_abs_err"]
    assert errs and max(errs) < 1e-5


def test_main_end_to_end(tmp_path, capsys):
    out, md = tmp_path / "a.csv", tmp_path / "a.md"
    rows = ba.main([
        "--shapes", "tiny", "--device", "cpu", "--providers", "window-attention-torch,videoswin-eager,sdpa-dense-bias",
        "--reps", "1", "--warmup", "0", "--out", str(out), "--markdown", str(md), "--label", "e2e",
    ])  # fmt: skip
    assert rows == harness.read_rows(out)
    assert {r["label"] for r in rows} == {"e2e"}
    summary = md.read_text()
    assert "| videoswin-eager |" in summary and "(1x)" in summary and "**fwd+bwd: time (ms)" in summary
    assert summary.strip() in capsys.readouterr().out


# --------------------------------------------------------------------------------------------------- pair count
def _brute_force_pairs(grid, window, shift) -> int:
    """Count (query, key) pairs from original coordinates: the roll by -shift maps x to (x - s) mod n, so the window
    is ((x - s) mod n) // w and the token was wrapped iff x < s; pairs attend iff both agree on every axis."""

    def key(x):
        return tuple(((c - s) % n // w, c < s) for c, n, w, s in zip(x, grid, window, shift, strict=True))

    tokens = [key(x) for x in itertools.product(*(range(n) for n in grid))]
    return sum(a == b for a in tokens for b in tokens)


@pytest.mark.parametrize(
    "grid, window, shift",
    [
        ((4, 6, 10), (2, 3, 5), (0, 0, 0)),  # divisible, no shift: every window full
        ((4, 6, 10), (2, 3, 5), (0, 1, 2)),  # divisible, LF-VILA's spatial shift
        ((4, 6, 10), (2, 3, 5), (1, 1, 2)),  # shifted on all axes
        ((5, 5, 7), (2, 3, 5), (1, 1, 2)),  # not divisible on any axis, shifted
        ((3, 4, 6), (2, 3, 4), (0, 0, 0)),  # not divisible, no shift: partial windows only
        ((3, 3, 5), (3, 3, 5), (0, 0, 0)),  # window = grid
        ((7, 1, 4), (4, 1, 4), (3, 0, 1)),  # unit axis, large shift
    ],
)
def test_count_allowed_pairs_matches_brute_force(grid, window, shift):
    expected = _brute_force_pairs(grid, window, shift)
    assert ba.count_allowed_pairs(grid, window, shift) == expected
    # The providers' own mask agrees: allowed pairs with a real query.
    layout = av.window_layout(grid, window, shift)
    allowed = av.allowed_pairs_mask(layout) & (layout.region >= 0)[:, :, None]
    assert int(allowed.sum()) == expected
    if any(shift):
        assert expected < ba.count_allowed_pairs(grid, window, (0, 0, 0))  # the shift mask removes pairs


def test_flop_convention_and_lfvila_cases():
    full = shapes.Case("c", 2, (4, 6, 10), 3, 32, (2, 3, 5), (0, 0, 0))
    n_windows, tokens = 2 * 2 * 2, 30
    assert ba.attention_flops(full, "fwd") == 4 * 32 * n_windows * tokens**2 * 2 * 3
    assert ba.attention_flops(full, "fwd+bwd") == 3.5 * ba.attention_flops(full, "fwd")
    cases = shapes.lfvila_cases()
    assert [c.name for c in cases] == [f"layer{i}" for i in range(6)]
    assert [c.shift for c in cases] == [(0, 1, 2)] * 5 + [(0, 0, 0)]
    assert cases[0].grid == (32, 24, 40) and cases[0].batch == 16 and cases[5].window == (32, 3, 5)
    reduced = shapes.lfvila_cases(batch=1, frames=8)
    assert [c.window[0] for c in reduced] == [2, 4, 8, 8, 8, 8]


# --------------------------------------------------------------------------------------------------- providers
def _check_provider(name, case, device=CPU, bias=True, grads=True):
    q, k, v, table, grad_out = ba.make_inputs(case, torch.float32, device, seed=1)
    table = table if bias else None
    leaves = [t for t in (q, k, v, table) if t is not None]
    for t in leaves:
        t.requires_grad_(grads)
    scale = case.head_dim**-0.5
    expected = window_attention_reference(q, k, v, case.window, case.shift, table, scale)
    expected_grads = torch.autograd.grad(expected, leaves, grad_out) if grads else []
    out = av.VARIANTS[name].make(q, k, v, case.window, case.shift, table, scale)()
    assert out.shape == q.shape
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=1e-4)
    if grads:
        for got, want, what in zip(torch.autograd.grad(out, leaves, grad_out), expected_grads, "qkvb", strict=False):
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4, msg=lambda m, w=what: f"d{w}: {m}")


TINY = shapes.tiny_cases() + [shapes.Case("tiny-full", 2, (2, 3, 5), 3, 8, (2, 3, 5), (0, 0, 0))]


@pytest.mark.parametrize("case", TINY, ids=lambda c: c.name)
@pytest.mark.parametrize("name", ["window-attention-torch", "videoswin-eager", "sdpa-dense-bias"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_eager_providers_match_reference(name, case, bias):
    _check_provider(name, case, bias=bias)


@pytest.mark.parametrize("case", TINY[:2], ids=lambda c: c.name)
def test_window_attention_triton_provider_matches_reference(case):
    from lfvila_kernels.dispatch import interpreting

    if not interpreting():
        pytest.skip("the Triton kernel runs on the CPU only under TRITON_INTERPRET=1")
    _check_provider("window-attention-triton", case)


@pytest.mark.slow
@pytest.mark.parametrize("case", TINY[:2], ids=lambda c: c.name)
def test_flex_provider_forward_matches_reference(case):
    """FlexAttention compiles for ~10-30 s per shape on the CPU, where it has no backward (forward checked only)."""
    _check_provider("flex", case, grads=False)


@pytest.mark.gpu
@pytest.mark.parametrize("case", TINY[:2], ids=lambda c: c.name)
@pytest.mark.parametrize("name", [n for n, v in av.VARIANTS.items() if v.computes == "window_attention"])
def test_providers_match_reference_on_cuda(name, case):
    reason = av.VARIANTS[name].refusal(torch.device("cuda"), torch.float32) if av.VARIANTS[name].refusal else None
    if reason:
        pytest.skip(reason)
    _check_provider(name, case, device=torch.device("cuda"))


def test_commit_is_dirty_for_code_changes_but_not_for_results(tmp_path):
    import subprocess

    def git(*args):
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path, check=True,
                       capture_output=True)  # fmt: skip

    git("init", "-q")
    (tmp_path / "code.py").write_text("x = 1\n")
    (tmp_path / "benchmarks" / "results").mkdir(parents=True)
    (tmp_path / "benchmarks" / "results" / "old.csv").write_text("a\n")
    git("add", ".")
    git("commit", "-q", "-m", "init")
    clean = harness._git_commit(tmp_path)
    assert clean and not clean.endswith("-dirty")
    (tmp_path / "benchmarks" / "results" / "new.csv").write_text("a\n")  # a run's output, new or appended
    (tmp_path / "benchmarks" / "results" / "old.csv").write_text("a\nb\n")
    assert harness._git_commit(tmp_path) == clean
    (tmp_path / "code.py").write_text("x = 2\n")
    assert harness._git_commit(tmp_path) == clean + "-dirty"
