"""``benchmarks/gpu_session.sh all --dry-run`` end to end on the CPU, and the summary builder on planted stage records.

The dry run is the GPU session itself at tiny sizes (about 1-2 minutes on two cores): it must exit 0, leave at most
8 files in $OUT (summary.md and the archives, which the device tool brings back), name every stage with a status,
report every target, and archive CSVs that ``benchmarks.harness.read_rows`` reads. Nothing about time is asserted.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from benchmarks import gpu_summary, harness

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_session.sh"
STAGE_ROW = re.compile(r"^\| (\w+) \| ([a-z ]+) \| (\d*) \| ([\d.]*) \| (\d*) \|")


def _stage_table(summary: str) -> dict[str, str]:
    """stage -> status from the summary's stage table."""
    return {m.group(1): m.group(2) for line in summary.splitlines() if (m := STAGE_ROW.match(line))}


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-session-out")
    env = dict(os.environ, OUT=str(out), PYTHON=sys.executable, TMPDIR=str(tmp_path_factory.mktemp("work")))
    proc = subprocess.run(["bash", str(SCRIPT), "all", "--dry-run"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=420)  # fmt: skip
    return proc, out


def test_dry_run_files_stages_and_targets(dry_run, tmp_path):
    proc, out = dry_run
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8 and "summary.md" in files, files
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", f) and (out / f).is_file() for f in files), files
    summary = (out / "summary.md").read_text()
    assert "DRY RUN on a CPU" in summary and "- commit: " in summary and "- torch " in summary
    assert summary in proc.stdout  # printed last: the device call's output tail carries it

    statuses = _stage_table(summary)
    assert list(statuses) == [s.name for s in gpu_summary.STAGES]
    assert set(statuses.values()) <= set(gpu_summary.STATUSES), statuses
    assert statuses["install"] == "not run"  # no pip install in a dry run
    assert "failed" not in statuses.values(), summary  # a stage command broken on the CPU is a bug (a timeout on a
    assert statuses["tests"] == "ok", summary  # loaded machine is not); the tests stage always has time

    targets = re.findall(r"^- \*\*(met|missed|not run|measured)\*\* \((\w+)\) (.+)$", summary, re.M)
    stages_with_targets = {stage for _, stage, _ in targets}
    assert {"tests", "attention", "train", "contrastive", "longform"} <= stages_with_targets, targets
    assert any("window-attention-triton fwd+bwd >= 3x videoswin-eager on lfvila" in text for _, _, text in targets)
    assert any(text.startswith("gpu tests: ") and "passed" in text for _, _, text in targets)
    for stage in gpu_summary.STAGES:
        assert f"### {stage.title}" in summary

    archives = [f for f in files if f.endswith(".tar.gz")]
    assert archives and set(archives) <= {f"{a}.tar.gz" for a in gpu_summary.ARCHIVES}
    csvs = []
    for name in archives:
        with tarfile.open(out / name) as tar:
            tar.extractall(tmp_path / name, filter="data")
        csvs += sorted((tmp_path / name).rglob("*.csv"))
    assert {p.parent.name for p in csvs} >= {"attention", "train", "contrastive", "dropin", "longform"}, csvs
    for path in csvs:
        rows = harness.read_rows(path)
        assert rows and set(rows[0]) == set(harness.SCHEMA), path
        assert {r["label"] for r in rows} == {"dry-run-cpu"}
    attention = harness.read_rows(next(p for p in csvs if p.parent.name == "attention"))
    flex = [r for r in attention if r["provider"] == "flex" and r["metric"] == "time"]
    assert any(r["status"] == "skipped" and r["note"].startswith("compile budget") for r in flex)
    assert any(r["metric"] == "compile_time" and r["status"] == "ok" for r in attention)
    assert (tmp_path / "extra.tar.gz" / "stages.tsv").exists() and (tmp_path / "tests.tar.gz" / "tests").is_dir()


# --------------------------------------------------------------------------------------------------- the builder
def _rows(provider, pairs, shape="model=lfvila-base B=16 T=32 H=192 W=320 M=4 L=50 precision=bf16"):
    return [harness.make_row(kernel="train_step", provider=provider, mode="fwd+bwd", x_name="batch", x_value="16",
                             shape=shape, metric=metric, unit="", dtype="bfloat16",
                             values={"p50": value, "p20": value, "p80": value})
            for metric, value in pairs]  # fmt: skip


def _planted_work(work: Path) -> None:
    """A session where the tests failed, attention timed out, train ran, contrastive was not run (no time left) and
    the session ended before the last stages."""
    (work / "session.env").write_text("label=h200-test\nmode=full\ncommit=abc1234-dirty\ncommit_source=git\n"
                                      "budget_s=540\nstarted_utc=2026-11-23 10:00:00 UTC\n")  # fmt: skip
    records = [("install", "ok", "0", "12.0", "45", ""), ("tests", "failed", "1", "140.2", "150", ""),
               ("attention", "timeout", "124", "110.0", "110", "stopped at its cap of 110 s"),
               ("train", "ok", "0", "80.5", "90", ""),
               ("contrastive", "not run", "", "0", "60", "no time left: 3 s of the budget remained")]  # fmt: skip
    (work / "stages.tsv").write_text("stage\tstatus\trc\tseconds\tcap_s\tnote\n"
                                     + "".join("\t".join(r) + "\n" for r in records))  # fmt: skip
    (work / "tests").mkdir()
    (work / "tests" / "tests.log").write_text(
        "collecting ... collected 61 items / 2 deselected / 59 selected\n"
        "tests/kernels/test_window_attention_gpu.py::test_a[bf16-layer0] PASSED [  1%]\n"
        "tests/kernels/test_window_attention_gpu.py::test_a[bf16-layer1] FAILED [  2%]\n"
        "tests/kernels/test_contrastive_gpu.py::test_b SKIPPED (no inf-cl) [  3%]\n"
        "tests/kernels/test_contrastive_gpu.py::test_c PASSED [  4%]\n"
        "tests/kernels/test_contrastive_gpu.py::test_c ERROR [  4%]\n"
        "FAILED tests/kernels/test_window_attention_gpu.py::test_a[bf16-layer1] - AssertionError: out\n"
        "collecting ... collected 2 items / 1 deselected / 1 selected\n"
    )  # fmt: skip
    (work / "attention").mkdir()
    (work / "attention" / "attention.log").write_text("".join(f"line {i}\n" for i in range(100)) + "Terminated\n")
    (work / "train").mkdir()
    writer = harness.ResultWriter(work / "train" / "train-h200-test.csv", harness.environment("cpu"), "h200-test")
    writer.write(_rows("triton", [("time", 500.0), ("clips_per_s", 32.0), ("memory_total", 90000.0),
                                  ("tflops", 400.0), ("mfu", 0.404)]))  # fmt: skip
    writer.write(_rows("torch", [("time", 1000.0), ("clips_per_s", 16.0), ("memory_total", 100000.0),
                                 ("tflops", 200.0), ("mfu", 0.202)]))  # fmt: skip
    (work / "train" / "train.log").write_text("ok\n")


def test_summary_of_failed_timed_out_and_not_run_stages(tmp_path):
    work, out = tmp_path / "work", tmp_path / "out"
    work.mkdir()
    _planted_work(work)
    counts = gpu_summary.test_counts(work / "tests")
    assert (counts["passed"], counts["failed"], counts["errors"], counts["skipped"], counts["selected"]) == (
        1, 1, 1, 1, 60)  # fmt: skip
    assert gpu_summary.main(["--work", str(work), "--out", str(out), "--no-plots"]) == 0
    summary = (out / "summary.md").read_text()

    statuses = _stage_table(summary)
    assert statuses == {"install": "ok", "tests": "failed", "attention": "timeout", "train": "ok",
                        "contrastive": "not run", "dropin": "no record", "decode": "no record", "longform": "no record",
                        "resources": "no record"}  # fmt: skip
    assert "| attention | timeout | 124 | 110.0 | 110 | stopped at its cap of 110 s |" in summary
    assert "- commit: abc1234-dirty (from git)" in summary and "DRY RUN" not in summary
    assert "- **missed** (tests) gpu tests: 1 passed, 1 failed, 1 errors, 1 skipped (60 selected), 56 not reached" \
        in summary  # fmt: skip
    assert "  - failed: tests/kernels/test_window_attention_gpu.py::test_a[bf16-layer1]" in summary
    assert "- **met** (train) clips/s triton / torch (target >= 1.5): 2, met" in summary
    assert "- **missed** (train) peak memory triton / torch (target <= 0.7): 0.9, NOT met" in summary
    assert ("- **not run** (attention) window-attention-triton fwd+bwd >= 3x videoswin-eager on lfvila: stage "
            "attention timeout (exit 124)") in summary  # fmt: skip
    assert ("- **not run** (contrastive) fwd+bwd time ours / naive at N=32768, d=512, bfloat16: stage contrastive "
            "not run: no time left: 3 s of the budget remained") in summary  # fmt: skip
    assert ("- **not run** (longform) long-form window-attention-triton fwd+bwd grows linearly in T: stage longform "
            "has no record") in summary  # fmt: skip
    assert "- train step MFU (model FLOPs / dense bf16 peak): triton 40.4 % vs torch 20.2 %" in summary
    assert "triton 32 clips/s vs torch 16 clips/s" in summary and "triton 90000 MB vs torch 100000 MB" in summary
    # The log tails of the failed and the timed-out stage, nothing of the stages that went well.
    assert "### attention: timeout, last 25 lines of attention.log" in summary and "line 76\n" in summary
    assert "line 75\n" not in summary and "Terminated" in summary
    assert "### tests: failed" in summary and "### train:" not in summary

    assert sorted(p.name for p in out.iterdir()) == ["attention.tar.gz", "extra.tar.gz", "summary.md",
                                                      "tests.tar.gz", "train.tar.gz"]  # fmt: skip
    with tarfile.open(out / "train.tar.gz") as tar:
        assert {"train/train-h200-test.csv", "train/report.md", "train/train.log"} <= set(tar.getnames())
    with tarfile.open(out / "extra.tar.gz") as tar:
        assert set(tar.getnames()) == {"session.env", "stages.tsv"}  # install has no folder here


def test_verdicts_of_target_lines():
    assert gpu_summary.verdict("- x >= 3x y: 3.2x to 4x over 6 layers (met)") == "met"
    assert gpu_summary.verdict("- clips/s a / b (target >= 1.5): 1.2, NOT met") == "missed"
    assert gpu_summary.verdict("- uniform32: 2x (not met: the CPU path is competitive here)") == "missed"
    assert gpu_summary.verdict("- a / b (target <= 0.7): not measured (b failed: OutOfMemoryError)") == "not run"
    assert gpu_summary.verdict("- long-form full-sdpa fwd: time ~ T^2.00") == "measured"
