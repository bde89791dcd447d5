"""Tests of the decoding benchmark: rows and schema of a tiny run, skips and failures with their reasons, and the
CPU-core accounting of child processes.

No timing is asserted. The inputs are two 3-second videos of 64x112 pixels at 10 fps (raw and prepared, H.264 and
VP9), generated into a temporary folder; spawned pool processes take a second or two to start.
"""

from __future__ import annotations

import csv
import importlib.util
import math
import subprocess
import sys
import time

import pytest
import torch

from benchmarks import bench_decode as bd
from benchmarks import harness

SRC = bd.Source(videos=2, seconds=3.0, fps=10.0, size=(64, 112), gop=250)
OPTS = bd.Options(procs=2, pyav_threads=1, batch=2)
HAS_DALI = importlib.util.find_spec("nvidia") is not None and importlib.util.find_spec("nvidia.dali") is not None


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return bd.make_inputs(SRC, bd.INPUTS, tmp_path_factory.mktemp("decode-inputs"), workers=2, log=lambda m: None)


def _writer(tmp_path):
    return harness.ResultWriter(tmp_path / "out.csv", harness.environment("cpu"), "test")


def _boom_open(opts):
    def decode_all(items):
        raise RuntimeError("boom: cannot decode")

    return bd.InProcess(decode_all)


def _by(rows, provider, **match):
    return [r for r in rows if r["provider"] == provider and all(r[k] == v for k, v in match.items())]


# --------------------------------------------------------------------------------------------------- rows
def test_inputs_are_generated_as_asked(inputs):
    from lfvila.data.decode import probe

    assert list(inputs) == list(bd.INPUTS) and all(len(paths) == 2 for paths in inputs.values())
    raw, prep = probe(inputs["raw-h264"][0]), probe(inputs["prep-vp9"][1])
    assert (raw.num_frames, raw.fps, raw.height, raw.width, raw.codec) == (30, 10.0, 64, 112, "h264")
    assert (prep.num_frames, prep.fps, prep.codec) == (9, 3.0, "vp9")


def test_tiny_run_rows_schema_skips_and_failures(inputs, tmp_path):
    names = ("pyav-1proc", "pyav-Nproc", "dali-cpu", "dali-gpu", "pyav-nvdec")
    providers = {name: bd.PROVIDERS[name] for name in names}
    providers["missing"] = bd.Provider(_boom_open, lambda c, b, o: bd.import_refusal("no_such_module_lfvila", "pip it"))
    providers["boom"] = bd.Provider(_boom_open, lambda c, b, o: None)
    rows = bd.run(inputs, providers, bd.WORKLOADS, OPTS, _writer(tmp_path), SRC, repeats=1, log=lambda m: None)

    assert rows == harness.read_rows(tmp_path / "out.csv")
    with open(tmp_path / "out.csv", newline="") as f:
        assert tuple(next(csv.reader(f))) == harness.SCHEMA
    assert len(rows) == len(providers) * len(bd.WORKLOADS) * len(bd.INPUTS) * len(bd.METRICS)
    assert {(r["kernel"], r["x_name"], r["dtype"]) for r in rows} == {("decode", "input", "uint8")}
    assert {r["mode"] for r in rows} == set(bd.WORKLOADS) and {r["x_value"] for r in rows} == set(bd.INPUTS)
    assert {(r["metric"], r["unit"]) for r in rows} == set(bd.METRICS)
    assert all("videos=2 frames=32 " in r["shape"] for r in rows)

    for name in ("pyav-1proc", "pyav-Nproc"):  # pyav against pyav: bit-exact, every frame code right
        assert all(r["status"] == "ok" for r in _by(rows, name)), _by(rows, name)
        assert all(float(r["p50"]) > 0 for r in _by(rows, name) if r["metric"] in ("clips_per_s", "cpu_cores"))
        assert {float(r["p50"]) for r in _by(rows, name, metric="max_abs_diff")} == {0.0}
        assert all(math.isinf(float(r["p50"])) for r in _by(rows, name, metric="psnr"))
        assert {float(r["p50"]) for r in _by(rows, name, metric="frame_code")} == {1.0}
    for r in _by(rows, "missing"):
        assert r["status"] == "skipped" and r["p50"] == "" and r["note"].endswith("pip it")
        assert r["note"].startswith("no_such_module_lfvila cannot be imported (ModuleNotFoundError")
    assert {(r["status"], r["note"]) for r in _by(rows, "boom")} == {("failed", "RuntimeError: boom: cannot decode")}
    if not torch.cuda.is_available():
        for name in ("dali-gpu", "pyav-nvdec"):
            assert {r["status"] for r in _by(rows, name)} == {"skipped"} and all(r["note"] for r in _by(rows, name))
    dali = _by(rows, "dali-cpu")
    if HAS_DALI:  # the CPU backend decodes VP9 only; it matches pyav
        assert {r["status"] for r in dali if "h264" in r["x_value"]} == {"skipped"}
        assert all("h264" in r["note"] for r in dali if "h264" in r["x_value"])
        assert {r["status"] for r in dali if "vp9" in r["x_value"]} == {"ok"}
        assert all(float(r["p50"]) > 40 for r in dali if r["metric"] == "psnr" and "vp9" in r["x_value"])
    else:
        assert {r["status"] for r in dali} == {"skipped"} and all("nvidia.dali" in r["note"] for r in dali)

    summary = bd.markdown_summary(rows)
    assert "**uniform32**" in summary and "**clips4x8**" in summary and "| pyav-Nproc |" in summary
    assert "missing skipped on raw-h264, raw-vp9, prep-h264, prep-vp9: no_such_module_lfvila" in summary
    assert "Target (issue)" in summary


def test_missing_optional_provider_is_skipped_with_reason(inputs, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "decord", None)  # import decord now raises ImportError
    monkeypatch.setitem(sys.modules, "torchcodec.decoders", None)
    for name, module in (("decord", "decord"), ("torchcodec", "torchcodec.decoders")):
        reason = bd.PROVIDERS[name].refusal("h264", 8, OPTS)
        assert reason.startswith(f"{module} cannot be imported (ModuleNotFoundError") and "pip install" in reason
    providers = {"decord": bd.PROVIDERS["decord"]}
    rows = bd.run({"prep-h264": inputs["prep-h264"]}, providers, ["uniform32"], OPTS, _writer(tmp_path), SRC,
                  repeats=1, log=lambda m: None)  # fmt: skip
    assert len(rows) == len(bd.METRICS)
    assert all(r["status"] == "skipped" and r["note"].startswith("decord cannot be imported") for r in rows)


# --------------------------------------------------------------------------------------------------- CPU accounting
BURN_S = 0.4


def _burn(seconds: float) -> float:
    start = time.process_time()
    while time.process_time() - start < seconds:
        pass
    return time.process_time() - start


def _pool_init(threads):
    pass


def _pool_task(item):  # what bench_decode's pool workers do: work, then report the process's own CPU time
    start = bd.cpu_seconds(children=False)
    _burn(item[1])
    return None, bd.cpu_seconds(children=False) - start


def test_cpu_accounting_counts_exited_children():
    code = f"import time\nt = time.process_time()\nwhile time.process_time() - t < {BURN_S}: pass"

    def decode_all(items):
        for _ in items:
            subprocess.run([sys.executable, "-c", code], check=True)
        return [None] * len(items)

    own = bd.cpu_seconds(children=False)
    _, wall, cpu = bd.timed_pass(bd.InProcess(decode_all), [("a", [0]), ("b", [0])])
    assert bd.cpu_seconds(children=False) - own < 0.5 * BURN_S  # the parent only waited
    assert cpu >= 2 * BURN_S * 0.9 and cpu / wall > 0.3


def test_cpu_accounting_counts_live_pool_workers():
    session = bd.PoolSession(2, init=_pool_init, task=_pool_task)
    try:
        session.run([("warm", 0.0), ("warm", 0.0)])  # the workers start (and import) before the measurement
        own = bd.cpu_seconds(children=False)
        frames, wall, cpu = bd.timed_pass(session, [("a", BURN_S), ("b", BURN_S)])
        assert bd.cpu_seconds(children=False) - own < 0.5 * BURN_S
    finally:
        session.close()
    assert frames == [None, None]
    assert cpu >= 2 * BURN_S * 0.9  # RUSAGE_CHILDREN alone would miss both: the workers had not exited


def test_target_heads_start_the_target_lines():
    rows = [{"provider": "pyav-Nproc", "mode": w, "x_value": "prep-h264", "metric": "clips_per_s", "status": "ok",
             "p50": "10"} for w in bd.WORKLOADS]  # fmt: skip
    lines = bd.targets_report(rows)[1:]  # after the heading: one line per workload, not measured without a GPU row
    assert [line.split(":")[0] for line in lines] == [f"- {h}" for h in bd.target_heads()]
    assert all("not measured" in line for line in lines)
