"""Tests of the benchmarks' skeleton (``benchmarks.suite``): rows from cells, the run over (problem, provider, mode)
with its skipped / failed rows and out-of-memory skipping, the peak-RSS protocol, the shared command line and the
summary pieces; and that every command of ``gpu_session.sh`` and ``run.py`` still parses. No timing is asserted."""

from __future__ import annotations

import argparse
import os

import pytest
import torch

from benchmarks import bench_attention as ba
from benchmarks import bench_contrastive as bc
from benchmarks import bench_data as bdata
from benchmarks import bench_decode as bdec
from benchmarks import bench_dropin as bdrop
from benchmarks import bench_train_step as bts
from benchmarks import contrastive_variants, harness, suite

CPU = torch.device("cpu")
TINY = {"reps": 1, "warmup": 0}


def _writer(tmp_path, name="out.csv"):
    return harness.ResultWriter(tmp_path / name, harness.environment(CPU), "test")


# --------------------------------------------------------------------------------------------------- cells, values
def test_cell_rows_fill_every_metric():
    fields = dict(kernel="k", provider="p", mode="fwd", x_name="N", x_value="8", shape="N=8", dtype="float32")
    metrics = [("time", "ms"), ("memory", "MB"), ("err", "abs")]
    cells = {"time": ("ok", suite.once(2.0), "a remark"), "memory": ("skipped", None, "CUDA only")}
    ok = suite.cell_rows(metrics, cells, **fields)
    assert [(r["metric"], r["unit"], r["status"], r["note"]) for r in ok] == [
        ("time", "ms", "ok", "a remark"), ("memory", "MB", "skipped", "CUDA only"), ("err", "abs", "skipped",
                                                                                     "not measured")]  # fmt: skip
    assert ok[0]["p50"] == ok[0]["p20"] == ok[0]["p80"] == 2.0 and ok[1]["p50"] == ""
    assert all(r["kernel"] == "k" and r["x_value"] == "8" and r["dtype"] == "float32" for r in ok)
    failed = suite.cell_rows(metrics, cells, "failed", "RuntimeError: boom", **fields)  # the cells do not count
    assert {(r["status"], r["note"], r["p50"]) for r in failed} == {("failed", "RuntimeError: boom", "")}
    skipped = suite.cell_rows(metrics, None, "skipped", "why", **fields)
    assert [r["metric"] for r in skipped] == ["time", "memory", "err"]


def test_values_helpers():
    assert suite.once(3.0) == {"p50": 3.0, "p20": 3.0, "p80": 3.0}
    assert suite.quantiles([1.0, 2.0, 3.0, 4.0, 5.0]) == pytest.approx({"p50": 3.0, "p20": 1.8, "p80": 4.2})
    rate = suite.per_second({"p50": 2.0, "p20": 1.0, "p80": 4.0}, 8.0, 1e3)  # 8 units in 2 ms: 4000 / s, / 1e3
    assert rate == pytest.approx({"p50": 4.0, "p20": 2.0, "p80": 8.0})  # the slow call (p80 time): the low rate
    assert suite.dtype_name(torch.bfloat16) == "bfloat16" and suite.dtype_flag(torch.bfloat16) == "bf16"
    assert suite.is_oom("OutOfMemoryError: CUDA out of memory. Tried to allocate 4 GiB")
    assert suite.is_oom("RuntimeError: [enforce fail at alloc_cpu.cpp] DefaultCPUAllocator: can't allocate memory")
    assert not suite.is_oom("RuntimeError: boom")


# --------------------------------------------------------------------------------------------------- run_grid
def _grid(metrics=(("time", "ms"), ("err", "abs"))):
    return suite.Grid("toy", "float32", lambda mode: list(metrics), lambda n: ("N", str(n), f"N={n}"),
                      lambda n: f"N={n}")  # fmt: skip


class _Provider:
    def __init__(self, refusal=None, fail_at=None, message="CUDA out of memory. Tried to allocate 2.00 GiB"):
        self.refusal, self.fail_at, self.message = refusal, fail_at, message


def test_run_grid_rows_skips_failures_and_out_of_memory(tmp_path):
    providers = {
        "fine": _Provider(),
        "refused": _Provider(lambda device, dtype: "not on this machine"),
        "oom": _Provider(fail_at=64),
        "boom": _Provider(fail_at=64, message="boom: unsupported shape"),
    }
    setups, calls, lines = [], [], []

    def setup(n):
        setups.append(n)
        return {"n": n}

    def measure(n, name, provider, mode, state):
        assert state == {"n": n}
        calls.append((n, name, mode))
        if provider.fail_at is not None and n >= provider.fail_at:
            raise RuntimeError(provider.message)
        return {"time": ("ok", suite.once(float(n)), "")}

    def skip(n, name, provider, mode):
        return "fwd+bwd is left out at N=128" if n == 128 and mode == "fwd+bwd" else None

    outcomes: list[suite.Outcome] = []
    rows = suite.run_grid(_grid(), [32, 64, 128], providers, ["fwd", "fwd+bwd"], measure, _writer(tmp_path),
                          refusal=suite.provider_refusal(CPU, torch.float32), skip=skip, setup=setup, oom_skip=True,
                          outcomes=outcomes, log=lines.append)  # fmt: skip
    assert rows == harness.read_rows(tmp_path / "out.csv")
    assert setups == [32, 64, 128] and len(rows) == 3 * 4 * 2 * 2 and len(outcomes) == 3 * 4 * 2
    cell = {(r["x_value"], r["provider"], r["mode"], r["metric"]): (r["status"], r["note"]) for r in rows}
    assert cell[("32", "fine", "fwd", "time")] == ("ok", "")
    assert cell[("32", "fine", "fwd", "err")] == ("skipped", "not measured")
    refused = {v for (x, p, m, k), v in cell.items() if p == "refused"}
    assert refused == {("skipped", "not on this machine")}
    oom = "RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB"
    assert cell[("64", "oom", "fwd", "time")] == cell[("64", "oom", "fwd", "err")] == ("failed", oom)
    # Out of memory at N=64: every later point of that provider is skipped, the mode after it included ...
    for key in (("64", "oom", "fwd+bwd", "time"), ("128", "oom", "fwd", "err")):
        assert cell[key] == ("skipped", "not run: out of memory at N=64")
    # ... but another failure is not, and the benchmark's own rule applies to every provider.
    assert cell[("128", "boom", "fwd", "time")] == ("failed", "RuntimeError: boom: unsupported shape")
    assert cell[("128", "fine", "fwd+bwd", "time")] == ("skipped", "fwd+bwd is left out at N=128")
    assert (128, "oom", "fwd") not in calls and (128, "fine", "fwd+bwd") not in calls
    assert not any(name == "refused" for _, name, _ in calls)
    first = outcomes[0]
    assert (first.problem, first.provider, first.mode, first.status, first.note) == (32, "fine", "fwd", "ok", "")
    assert first.cells["time"][1]["p50"] == 32.0
    assert any(line.startswith("N=64") and "oom" in line and "failed: RuntimeError: CUDA out of memory" in line
               for line in lines)  # fmt: skip


def test_out_of_memory_skips_larger_sizes(tmp_path):
    """The skeleton's out-of-memory skip as bench_contrastive uses it (sizes in increasing order)."""

    def make(a, b):
        if a.shape[0] >= 64:
            raise RuntimeError("CUDA out of memory. Tried to allocate 4.00 GiB")
        return contrastive_variants.make_naive(a, b)

    rows = bc.run([32, 64, 128], 8, {"big": bc.Provider(make)}, bc.MODES, torch.float32, CPU, _writer(tmp_path),
                  TINY, check=False, log=lambda m: None)  # fmt: skip
    status = {(r["x_value"], r["mode"]): (r["status"], r["note"]) for r in rows if r["metric"] == "time"}
    assert status[("32", "fwd")][0] == status[("32", "fwd+bwd")][0] == "ok"
    assert status[("64", "fwd")] == ("failed", "RuntimeError: CUDA out of memory. Tried to allocate 4.00 GiB")
    for key in (("64", "fwd+bwd"), ("128", "fwd"), ("128", "fwd+bwd")):
        assert status[key] == ("skipped", "not run: out of memory at N=64")
    no_check = [r for r in rows if r["metric"] == "max_abs_err" and r["x_value"] == "32"]
    assert {r["status"] for r in no_check} == {"skipped"}


# --------------------------------------------------------------------------------------------------- peak RSS
def test_rss_cell_and_note():
    result = {"increase_mb": 12.5, "baseline_mb": 300.2, "peak_mb": 312.7, "method": "clear_refs", "exact": True,
              "seconds": 0.25}  # fmt: skip
    lines = []
    cell = suite.rss_cell(lambda: result, log=lines.append, head="N=8")
    assert cell == ("ok", suite.once(12.5), "VmHWM increase over VmRSS 300 MB (clear_refs)")
    assert lines == ["N=8 peak_rss       12.5 MB"]
    assert suite.rss_note(dict(result, method="hwm-no-reset", exact=False)).endswith("(hwm-no-reset, lower bound)")

    def refused():
        raise RuntimeError("Triton kernels need a CUDA device")

    assert suite.rss_cell(refused, log=lines.append) == ("failed", None, "RuntimeError: Triton kernels need a CUDA "
                                                                         "device")  # fmt: skip


def test_rss_child_command_lines(monkeypatch):
    """What the parents start: ``python -m MODULE --rss-child PROVIDER ...``, parsed again by the child."""
    started = []
    monkeypatch.setattr(harness, "run_fresh_process", lambda argv, timeout: started.append((argv, timeout)) or {})
    bc.measure_rss("naive", 4096, 16, "fp32", max_mb=512.0, timeout=60.0)
    problem = bts.Problem("lfvila-tiny", 1, 4, 64, 96, torch.float32, optimizer=True)
    bts.measure_rss("torch", problem, interpret_ok=True)
    (con, con_timeout), (train, train_timeout) = started
    assert con == ["-m", "benchmarks.bench_contrastive", "--rss-child", "naive", "--sizes", "4096", "--dim", "16",
                   "--dtype", "fp32", "--rss-max-mb", "512.0"] and con_timeout == 60.0  # fmt: skip
    assert train[:4] == ["-m", "benchmarks.bench_train_step", "--rss-child", "torch"] and train_timeout == 3600.0
    assert "--rss-max-mb" not in train and train[-2:] == ["--optimizer", "--interpret-ok"]
    args = bts._parse(train[2:])
    assert (args.rss_child, args.device, args.model, args.batch, args.frames, args.size, args.dtype, args.optimizer,
            args.interpret_ok) == ("torch", "cpu", "lfvila-tiny", 1, 4, (64, 96), "fp32", True, True)  # fmt: skip
    args = bc._parse(con[2:])
    assert (args.rss_child, args.sizes, args.dim, args.dtype, args.rss_max_mb) == ("naive", "4096", 16, "fp32", 512.0)


# --------------------------------------------------------------------------------------------------- command line
def _full_parser():
    p = suite.parser("benchmarks.toy", "A toy benchmark.\n\nMore text.")
    suite.add_output(p, "benchmarks/results/toy-<device>.csv")
    suite.add_device(p, suite.DTYPES)
    suite.add_timing(p, reps=7, warmup=2, cpu_budget_ms=500.0)
    suite.add_interpret(p, "the toy kernel")
    suite.add_rss(p, rss_mode=True)
    return p


def test_common_flags_defaults_and_values(capsys):
    p = _full_parser()
    args = p.parse_args([])
    assert (args.label, args.out, args.markdown, args.device, args.dtype) == ("local", None, None, "auto", None)
    assert suite.timing(args) == {"warmup": 2, "reps": 7, "warmup_ms": 25.0, "rep_ms": 100.0, "cpu_budget_ms": 500.0}
    assert (args.interpret_ok, args.rss, args.no_rss, args.rss_child) == (False, False, False, None)
    assert suite.rss_options(args) == {"max_mb": None, "timeout": 3600.0}
    args = p.parse_args(["--label", "x", "--out", "o.csv", "--markdown", "o.md", "--device", "cpu", "--dtype", "bf16",
                         "--reps", "3", "--warmup", "0", "--rep-ms", "5", "--warmup-ms", "1", "--cpu-budget-ms", "0",
                         "--interpret-ok", "--rss", "--no-rss", "--rss-max-mb", "256", "--rss-timeout", "9",
                         "--rss-child", "naive"])  # fmt: skip
    assert suite.timing(args) == {"warmup": 0, "reps": 3, "warmup_ms": 1.0, "rep_ms": 5.0, "cpu_budget_ms": None}
    assert suite.rss_options(args) == {"max_mb": 256.0, "timeout": 9.0} and args.rss_child == "naive"
    with pytest.raises(SystemExit):
        p.parse_args(["--dtype", "fp8"])
    capsys.readouterr()
    with pytest.raises(SystemExit):
        p.parse_args(["--help"])
    text = capsys.readouterr().out
    assert text.startswith("usage: python -m benchmarks.toy") and "A toy benchmark." in text
    assert "--rss-timeout" in text and "--rss-child" not in text  # the child's flag is internal
    q = suite.parser("benchmarks.toy", "x")
    suite.add_timing(q, reps=1, warmup=1, rep_ms=None, warmup_ms=None)
    assert suite.timing(q.parse_args([])) == {"warmup": 1, "reps": 1}


def test_pick_device_and_interpreter(monkeypatch, capsys):
    assert suite.pick(None, ["a", "b", "c"], "providers") == ["a", "b", "c"]
    assert suite.pick(None, ["a", "b", "c"], "providers", ["b"]) == ["b"]
    assert suite.pick("c,a", ["a", "b", "c"], "providers") == ["c", "a"]
    with pytest.raises(SystemExit, match=r"unknown providers \['x'\]; choose from \['a', 'b', 'c'\]"):
        suite.pick("a,x", ["a", "b", "c"], "providers")
    with pytest.raises(SystemExit, match="unknown modes"):
        suite.pick("", ["fwd"], "modes")  # an empty list is no choice
    assert suite.resolve_device("cpu") == CPU
    assert suite.resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    suite.use_interpreter(CPU, False)
    suite.use_interpreter(torch.device("cuda"), True)  # a CUDA run never interprets
    assert "TRITON_INTERPRET" not in os.environ
    suite.use_interpreter(CPU, True)
    assert os.environ["TRITON_INTERPRET"] == "1"
    capsys.readouterr()


@pytest.mark.parametrize("main, argv, message", [
    (bc.main, ["--providers", "naive,nope"], "unknown providers"),
    (bts.main, ["--device", "cpu", "--impls", "torch,nope"], "unknown impls"),
    (ba.main, ["--shapes", "tiny", "--device", "cpu", "--providers", "nope"], "unknown providers"),
    (ba.main, ["--shapes", "tiny", "--device", "cpu", "--modes", "fwd,train"], "unknown modes"),
    (bdata.main, ["--parts", "annotations,everything"], "unknown parts"),
])  # fmt: skip
def test_cli_rejects_unknown_names(main, argv, message, tmp_path):
    with pytest.raises(SystemExit, match=message):
        main([*argv, "--out", str(tmp_path / "x.csv")])
    assert not (tmp_path / "x.csv").exists()


def test_start_and_finish(tmp_path, capsys):
    args = argparse.Namespace(out=None, label="lbl", markdown=str(tmp_path / "s.md"))
    session = suite.start(args, CPU, str(tmp_path / "r.csv"))
    assert session.out == tmp_path / "r.csv" and session.writer.label == "lbl" and session.env["device"]
    rows = session.writer.write(harness.make_row(kernel="k", provider="p", mode="fwd", x_name="x", x_value="1",
                                                 shape="", metric="time", unit="ms", dtype="-", values=suite.once(1.0))
                                for _ in range(2))  # fmt: skip
    assert session.finish(rows, "the summary") == rows
    out = capsys.readouterr().out
    assert out.startswith(f"# {session.env['device']} | torch ") and "2 rows appended to" in out
    assert (tmp_path / "s.md").read_text() == "the summary\n"


def test_summary_pieces():
    assert suite.section("**T**", ["- a", "- b"]) == "**T**\n\n- a\n- b" and suite.section("**T**", []) == ""
    assert suite.join(["a", "", "b"]) == "a\n\nb"
    assert suite.meets(0.5, "<=", 0.5) and not suite.meets(0.6, "<=", 0.5) and suite.meets(2, ">=", 1.5)
    with pytest.raises(ValueError, match="sign"):
        suite.meets(1, "<", 2)
    rows = [{"provider": "a", "metric": "time", "status": "ok", "p50": "1"},
            {"provider": "b", "metric": "time", "status": "failed", "p50": ""}]  # fmt: skip
    assert suite.find(rows, provider="b")["status"] == "failed" and suite.find(rows, provider="c") is None
    assert suite.is_ok(rows[0]) and not suite.is_ok(rows[1]) and not suite.is_ok(None)


# --------------------------------------------------------------------------------------------------- compatibility
# The benchmark command lines of benchmarks/gpu_session.sh (dry run and full), benchmarks/run.py (its common flags),
# the Makefile, README.md and benchmarks/results/README.md: each must still parse, flags and values unchanged.
RUN = ["--label", "L", "--out", "x.csv"]
COMMANDS = {
    "attention": (ba, [
        [*RUN, "--device", "auto", "--shapes", "tiny", "--frames", "2", "--interpret-ok", "--reps", "1", "--warmup",
         "0", "--cases", "tiny-div", "--providers", "window-attention-triton,videoswin-eager,sdpa-dense-bias",
         "--modes", "fwd,fwd+bwd"],
        [*RUN, "--shapes", "lfvila", "--providers", "flex", "--modes", "fwd+bwd", "--compile-budget", "60"],
        [*RUN, "--shapes", "long-form", "--modes", "fwd,fwd+bwd", "--cases", "8,16", "--providers",
         "videoswin-eager,full-sdpa", "--full-max-flops", "1e10", "--reps", "1", "--warmup", "0"],
        ["--shapes", "lfvila", "--label", "cpu-reduced", "--out", "a.csv", "--markdown", "a.md", "--dtype", "fp16",
         "--batch", "2", "--full", "--cpu-budget-ms", "0", "--rep-ms", "100", "--warmup-ms", "25"],
    ]),
    "contrastive": (bc, [
        [*RUN, "--device", "auto", "--dim", "32", "--interpret-ok", "--no-rss", "--reps", "1", "--warmup", "0",
         "--sizes", "128", "--providers", "ours,naive,inf-cl"],
        [*RUN, "--sizes", "65536,131072,262144", "--dim", "512", "--providers", "ours,naive", "--no-check"],
        ["--rss", "--label", "cpu-rss", "--out", "r.csv", "--markdown", "r.md", "--rss-max-mb", "4096",
         "--rss-timeout", "60", "--modes", "fwd+bwd", "--dtype", "bf16"],
    ]),
    "train": (bts, [
        [*RUN, "--device", "auto", "--batch", "1", "--frames", "4", "--size", "32x48", "--warmup", "2", "--reps", "1",
         "--no-rss"],
        ["--label", "h200-adamw", "--optimizer", "--warmup", "3", "--reps", "15", "--out", "t.csv", "--markdown",
         "t.md", "--grad-checkpointing", "--impls", "triton,torch", "--seed", "1", "--model", "lfvila-base",
         "--dtype", "bf16", "--interpret-ok", "--rss-max-mb", "100", "--rss-timeout", "5"],
    ]),
    "dropin": (bdrop, [
        [*RUN, "--device", "auto", "--workloads", "swin-timm", "--reduced", "--batch", "1", "--reps", "1",
         "--warmup", "0"],
        [*RUN, "--workloads", "swin-timm", "--rep-ms", "1000", "--warmup-ms", "250", "--impl", "torch",
         "--loss-batch", "64", "--markdown", "d.md"],
    ]),
    "decode": (bdec, [
        [*RUN, "--scratch", "s", "--videos", "1", "--seconds", "2", "--size", "48x96", "--inputs", "raw-vp9",
         "--workloads", "uniform32", "--providers", "pyav-1proc,dali-cpu", "--repeats", "1", "--procs", "1"],
        ["--label", "h200", "--size", "360x640", "--seconds", "60", "--repeats", "2", "--markdown", "d.md",
         "--out", "d.csv", "--gop", "250", "--fps", "30", "--seed", "0", "--clip-seconds", "4", "--pyav-threads",
         "1", "--dali-batch", "8", "--gpu", "cuda:0"],
    ]),
    "data": (bdata, [
        [*RUN, "--rows", "10000,30000,100000,200000,1000000", "--markdown", "d.md", "--plot", "p.png"],
        [*RUN, "--parts", "annotations,workers", "--rows", "300", "--repeats", "1", "--worker-rows", "300",
         "--workers", "2", "--worker-samples", "20", "--scratch", "s", "--objects-max-rows", "100",
         "--decode-videos", "1", "--decode-seconds", "2", "--seed", "0"],
        ["--summarize", "--out", "d.csv", "--markdown", "d.md"],
    ]),
}  # fmt: skip


@pytest.mark.parametrize("suite_name", list(COMMANDS))
def test_documented_command_lines_still_parse(suite_name):
    module, commands = COMMANDS[suite_name]
    for argv in commands:
        args = module._parse(argv)
        for flag, value in zip(argv, argv[1:]):
            if flag.startswith("--") and not value.startswith("--") and flag != "--size":
                got = getattr(args, flag[2:].replace("-", "_"))
                assert str(got) == value or got == type(got)(value), (flag, value, got)
    assert module._parse([]).label == "local"  # every suite labels its rows, "local" by default


def test_data_and_decode_defaults_unchanged():
    assert bdata._parse([]).out == "benchmarks/results/data-cpu.csv"
    assert bdec._parse([]).out is None and bdec._parse([]).size == (180, 320)
    args = ba._parse([])
    assert (args.reps, args.warmup, args.cpu_budget_ms, args.rep_ms, args.warmup_ms) == (10, 2, 3000.0, 100.0, 25.0)
    args = bc._parse([])
    assert (args.reps, args.warmup, args.rep_ms, args.warmup_ms, args.modes) == (5, 1, 100.0, 25.0, "fwd,fwd+bwd")
    args = bdrop._parse([])
    assert (args.reps, args.warmup, args.rep_ms, args.warmup_ms) == (5, 1, 2000.0, 500.0)
    args = bts._parse([])
    assert (args.reps, args.warmup, args.rss_timeout) == (10, 3, 3600.0) and not hasattr(args, "rep_ms")
