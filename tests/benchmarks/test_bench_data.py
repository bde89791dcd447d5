"""benchmarks.bench_data at tiny sizes: the inputs are official rows in both formats, every part writes its rows in
the harness schema, the summary states the targets, and a failing child becomes a failed row."""

import json
import re

import pytest

pytest.importorskip("lmdb")

from benchmarks import bench_data as bdata  # noqa: E402
from benchmarks import harness  # noqa: E402


def test_inputs_are_the_same_official_rows_in_jsonl_and_lmdb(tmp_path):
    import lmdb

    from lfvila.data.official_formats import LFVILAPretrainFormat

    jsonl, db = bdata.make_inputs(50, tmp_path, seed=3)
    assert bdata.make_inputs(50, tmp_path, seed=3) == (jsonl, db)  # generated once
    lines = jsonl.read_text().splitlines()
    assert len(lines) == 50
    env = lmdb.open(str(db), readonly=True, lock=False)
    with env.begin() as txn:
        assert env.stat()["entries"] == 50
        for i in (0, 49):
            assert LFVILAPretrainFormat.parse_value(txn.get(str(i).encode())) == json.loads(lines[i])
    env.close()
    row = json.loads(lines[7])
    assert 4 <= len(row) <= 8 and all(8 <= len(c["text"].split()) <= 20 for c in row)
    assert len({c["clip_id"].split(".")[0] for c in row}) == 1


def test_tiny_run_rows_summary_and_plot(tmp_path):
    out = tmp_path / "data.csv"
    rows = bdata.main(["--label", "t", "--parts", "annotations,workers", "--rows", "300", "--repeats", "1",
                       "--worker-rows", "300", "--workers", "2", "--worker-samples", "20", "--scratch",
                       str(tmp_path / "s"), "--out", str(out), "--markdown", str(tmp_path / "d.md"), "--plot",
                       str(tmp_path / "p.png")])
    stored = harness.read_rows(out)
    assert len(stored) == len(rows) == 2 * len(bdata.MODES) + len(bdata.MEMORY) * len(bdata.WORKER_MODES)
    work = {(r["provider"], r["metric"]) for r in stored if r["mode"] == "workers"}
    assert work == {(m, k) for m in bdata.WORKER_MODES for k in ("rss_growth_mb", "rss_file_growth_mb",
                                                                  "rss_anon_growth_mb", "pss_growth_mb",
                                                                  "private_growth_mb")}
    assert {r["status"] for r in stored} == {"ok"}, [r["note"] for r in stored if r["status"] != "ok"]
    assert all(r["kernel"] == "data" and r["x_value"] == "300" for r in stored)
    load = {r["provider"]: float(r["p50"]) for r in stored if r["metric"] == "load_s"}
    assert set(load) == set(bdata.MODES) and all(v > 0 for v in load.values())
    text = (tmp_path / "d.md").read_text()
    assert "| jsonl-first |" in text and "jsonl-first load_s at 200,000 rows <= 15: not run" in text
    for mode in ("jsonl-cached", "lmdb-open"):
        assert re.search(rf"- {mode} workers' total RSS growth <= 100 MB: (met|missed) \(\d", text), text
        assert f"| {mode} | rss_file_growth_mb |" in text and f"| {mode} | pss_growth_mb |" in text
    assert (tmp_path / "p.png").stat().st_size > 1000


def test_a_failing_load_is_a_failed_row(tmp_path):
    jsonl, db = bdata.make_inputs(20, tmp_path)
    jsonl.write_text("{not a row\n" * 20)  # every row bad: the load raises in the child
    rows = bdata.run_annotations(20, jsonl, db, 1, tmp_path, log=lambda m: None)
    failed = {r["provider"] for r in rows if r["status"] == "failed"}
    assert {"jsonl-first", "jsonl-cached", "objects"} <= failed and "lmdb-open" not in failed
    assert any("line 1" in r["note"] for r in rows if r["status"] == "failed")


def test_targets_report_verdicts():
    def row(provider, part, metric, value, n=200_000):
        return {"provider": provider, "mode": part, "metric": metric, "status": "ok", "x_value": str(n),
                "p50": str(value)}

    lines = bdata.targets_report([row("jsonl-first", "annotations", "load_s", 9.0),
                                  row("jsonl-first", "annotations", "peak_rss_mb", 151.0),
                                  row("lmdb-open", "workers", "rss_growth_mb", 40.0)])
    assert "- jsonl-first load_s at 200,000 rows <= 15: met (9)" in lines
    assert "- jsonl-first peak_rss_mb at 200,000 rows <= 150: missed (151)" in lines
    assert "- lmdb-open workers' total RSS growth <= 100 MB: met (40.0 MB)" in lines
    assert "- jsonl-cached load_s at 200,000 rows <= 2: not run" in lines
