"""Tests of the contrastive-loss benchmark: rows and schema, failures and skips, the float64 reference, peak RSS.

No timing is asserted anywhere. Problems are tiny (N <= 2048, d = 16) so that the file runs in seconds; the
fresh-process RSS measurements start a Python interpreter each (a few seconds).
"""

from __future__ import annotations

import csv
import importlib.util

import pytest
import torch

from benchmarks import bench_contrastive as bc
from benchmarks import harness

CPU = torch.device("cpu")
TINY = {"reps": 1, "warmup": 0}


needs_hwm_reset = pytest.mark.skipif(not harness.can_reset_hwm(), reason="needs Linux /proc/self/clear_refs")


def _writer(tmp_path, name="out.csv"):
    return harness.ResultWriter(tmp_path / name, harness.environment(CPU), "test")


def _boom(a, b):
    raise RuntimeError("boom: unsupported shape")


def _chunked_reference(a, b):
    """The chunked reference through its low-level entry point (a provider built in the test, not the public op)."""
    from lfvila_kernels.reference import contrastive_ce_chunked

    scale = torch.tensor(bc.SCALE)

    def forward():
        row_ce, col_ce = contrastive_ce_chunked(a, b, scale, chunk=24)
        return 0.5 * (row_ce.mean() + col_ce.mean())

    return forward


def _by_provider(rows):
    out = {}
    for r in rows:
        out.setdefault(r["provider"], []).append(r)
    return out


# --------------------------------------------------------------------------------------------------- rows
def test_tiny_run_rows_schema_failures_and_skips(tmp_path):
    providers = {
        "naive": bc.PROVIDERS["naive"],
        "chunked-ref": bc.Provider(_chunked_reference),
        "boom": bc.Provider(_boom),
        "refused": bc.Provider(_boom, lambda device, dtype: "not on this machine"),
        "missing": bc.Provider(_boom, lambda d, t: harness.import_refusal("no_such_module_lfvila", "pip install it")),
    }
    rows = bc.run([64], 16, providers, bc.MODES, torch.float32, CPU, _writer(tmp_path), TINY, log=lambda m: None)
    assert rows == harness.read_rows(tmp_path / "out.csv")
    with open(tmp_path / "out.csv", newline="") as f:
        assert tuple(next(csv.reader(f))) == harness.SCHEMA
    per_mode = 4  # time, tflops, memory, max_abs_err (no peak_rss: rss=False)
    assert len(rows) == len(providers) * len(bc.MODES) * per_mode
    assert {(r["kernel"], r["x_name"], r["x_value"], r["dtype"]) for r in rows} == {
        ("contrastive_loss", "N", "64", "float32")
    }
    assert {r["shape"] for r in rows} == {"N=64 M=64 d=16 temperature=0.05"}
    by = _by_provider(rows)
    assert all(r["status"] == "failed" and r["note"] == "RuntimeError: boom: unsupported shape" for r in by["boom"])
    assert all(r["status"] == "skipped" and r["note"] == "not on this machine" for r in by["refused"])
    for r in by["missing"]:
        assert r["status"] == "skipped" and r["p50"] == ""
        assert r["note"].startswith("no_such_module_lfvila cannot be imported (ModuleNotFoundError")
        assert r["note"].endswith("pip install it")
    for name in ("naive", "chunked-ref"):
        for r in by[name]:
            if r["metric"] == "memory":  # CUDA only
                assert r["status"] == "skipped" and r["p50"] == "", r
            else:
                assert r["status"] == "ok" and float(r["p50"]) >= 0, r
        errs = {r["mode"]: float(r["p50"]) for r in by[name] if r["metric"] == "max_abs_err"}
        assert errs["fwd"] < 1e-5 and errs["fwd+bwd"] < 1e-6, errs  # fp32 loss ~4, gradients ~1e-2


def test_reference_failure_is_recorded_in_the_error_rows(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise MemoryError("no room for the float64 reference")

    monkeypatch.setattr(bc, "reference_loss_and_grads", broken)
    rows = bc.run([32], 16, {"naive": bc.PROVIDERS["naive"]}, ["fwd"], torch.float32, CPU, _writer(tmp_path), TINY,
                  log=lambda m: None)  # fmt: skip
    err = [r for r in rows if r["metric"] == "max_abs_err"]
    assert len(err) == 1 and err[0]["status"] == "failed" and "no room" in err[0]["note"]
    assert [r["status"] for r in rows if r["metric"] == "time"] == ["ok"]


def test_optional_providers_without_their_package_are_skipped(tmp_path):
    providers = {name: bc.PROVIDERS[name] for name in ("open_clip", "inf-cl", "ours")}
    rows = bc.run([32], 16, providers, ["fwd"], torch.float32, CPU, _writer(tmp_path), TINY, log=lambda m: None)
    by = _by_provider(rows)
    # Inf-CL's kernels assert CUDA tensors: skipped on the CPU whether or not it is installed.
    assert all(r["status"] == "skipped" and "CUDA" in r["note"] for r in by["inf-cl"])
    if importlib.util.find_spec("open_clip") is None:
        assert all(r["status"] == "skipped" and r["note"].startswith("open_clip cannot be imported") for r in
                   by["open_clip"])  # fmt: skip
    # ours runs on the CPU only through Triton's interpreter (tests switch it on without CUDA; see conftest.py).
    from lfvila_kernels.dispatch import interpreting

    if not interpreting():
        assert all(r["status"] == "skipped" and "TRITON_INTERPRET" in r["note"] for r in by["ours"])
    else:
        errs = [float(r["p50"]) for r in by["ours"] if r["metric"] == "max_abs_err"]
        assert errs and errs[0] < 1e-4, by["ours"]


# --------------------------------------------------------------------------------------------------- reference
@pytest.mark.parametrize("n, block", [(7, 2**26), (33, 40)])  # one block; blocks of one row, last one partial
def test_float64_reference_matches_autograd_of_the_naive_loss(n, block):
    a, b = (t.double().requires_grad_(True) for t in bc.make_inputs(n, 5, torch.float64, CPU, seed=3))
    logits = (a @ b.t()) * bc.SCALE
    target = torch.arange(n)
    loss = 0.5 * (
        torch.nn.functional.cross_entropy(logits, target) + torch.nn.functional.cross_entropy(logits.t(), target)
    )
    da, db = torch.autograd.grad(loss, (a, b))
    ref_loss, ref_da, ref_db = bc.reference_loss_and_grads(a, b, block_elems=block)
    torch.testing.assert_close(ref_loss, loss.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ref_da, da, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ref_db, db, rtol=1e-10, atol=1e-12)


def test_inputs_are_normalised_and_correlated():
    a, b = bc.make_inputs(256, 64, torch.bfloat16, CPU)
    assert a.dtype == b.dtype == torch.bfloat16 and a.shape == b.shape == (256, 64)
    norms = torch.cat([a.float().norm(dim=1), b.float().norm(dim=1)])
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-2)
    cos = (a.float() * b.float()).sum(1)
    assert 0.6 < cos.mean() < 0.8  # positives
    assert (a.float() @ b.float().t()).fill_diagonal_(0).abs().mean() < 0.2  # negatives
    assert torch.equal(a, bc.make_inputs(256, 64, torch.bfloat16, CPU)[0])  # seeded


# --------------------------------------------------------------------------------------------------- peak RSS
@needs_hwm_reset
def test_rss_mode_end_to_end(tmp_path, capsys):
    """Each provider forward+backward in its own process: the naive loss holds several N x N fp32 matrices."""
    out, md = tmp_path / "rss.csv", tmp_path / "rss.md"
    rows = bc.main(["--rss", "--providers", "naive,inf-cl", "--sizes", "2048", "--dim", "16", "--out", str(out),
                    "--markdown", str(md), "--label", "rss-test"])  # fmt: skip
    assert rows == harness.read_rows(out)
    by = _by_provider(rows)
    (naive,) = by["naive"]
    assert naive["metric"] == "peak_rss" and naive["mode"] == "fwd+bwd" and naive["status"] == "ok", naive
    logits_mb = 2048**2 * 4 / 2**20
    assert float(naive["p50"]) >= 2 * logits_mb  # at least the logits and their gradient
    assert "clear_refs" in naive["note"]
    (infcl,) = by["inf-cl"]
    assert infcl["status"] == "skipped" and "CUDA" in infcl["note"]  # refused in the parent: no process started
    assert "peak RSS increase" in md.read_text() and md.read_text().strip() in capsys.readouterr().out


def test_main_end_to_end_and_summary(tmp_path, capsys):
    out, md = tmp_path / "a.csv", tmp_path / "a.md"
    rows = bc.main(["--device", "cpu", "--providers", "naive,inf-cl", "--sizes", "64,128", "--dim", "16",
                    "--reps", "1", "--warmup", "0", "--no-rss", "--out", str(out), "--markdown", str(md),
                    "--label", "e2e"])  # fmt: skip
    assert rows == harness.read_rows(out)
    assert {r["label"] for r in rows} == {"e2e"} and {r["x_value"] for r in rows} == {"64", "128"}
    summary = md.read_text()
    assert "**fwd+bwd time" in summary and "| naive | " in summary and "(1x)" in summary
    assert "| inf-cl | skipped | skipped |" in summary
    assert summary.strip() in capsys.readouterr().out
    assert "peak_rss" not in {r["metric"] for r in rows}


def test_targets_report_from_rows():
    def row(provider, metric, x, p50, status="ok", note="", dtype="bfloat16", dim=512):
        return {
            "provider": provider,
            "metric": metric,
            "mode": "fwd+bwd",
            "x_value": str(x),
            "p50": str(p50),
            "status": status,
            "note": note,
            "dtype": dtype,
            "shape": f"N={x} M={x} d={dim} temperature=0.05",
        }

    rows = [
        row("naive", "time", 32768, 10.0), row("ours", "time", 32768, 8.0), row("inf-cl", "time", 32768, 12.0),
        row("naive", "memory", 32768, 5000.0), row("ours", "memory", 32768, 50.0),
        row("naive", "time", 262144, "", "failed", "OutOfMemoryError: CUDA out of memory"),
        row("ours", "time", 262144, 400.0),
        row("naive", "peak_rss", 32768, 16000.0, dtype="float32", dim=256),
        row("chunked", "peak_rss", 32768, 1000.0, dtype="float32", dim=256),
    ]  # fmt: skip
    lines = bc.targets_report(rows)
    assert len(lines) == 5
    assert "chunked / naive" in lines[0] and "0.0625, met" in lines[0]
    assert "ours / naive" in lines[1] and "0.8, met" in lines[1]
    assert "Inf-CL / ours" in lines[2] and "1.5, NOT met" in lines[2]
    assert "peak memory" in lines[3] and "0.01, met" in lines[3]
    assert "N=262144" in lines[4] and "(out of memory): met" in lines[4]
    (only,) = bc.targets_report(rows[:1])
    assert "ours / naive" in only and only.endswith("not measured (a row is missing)")
    assert bc.targets_report([]) == []
    heads = bc.target_heads()
    assert [next(h for h in heads if line.startswith(f"- {h}")) for line in lines] == heads


def test_largest_n_and_target_heads():
    def row(provider, x, status="ok", note="", metric="time"):
        return {"provider": provider, "metric": metric, "mode": "fwd+bwd", "x_value": str(x), "status": status,
                "note": note, "p50": "1" if status == "ok" else ""}  # fmt: skip

    rows = [row("ours", n) for n in (32768, 262144)] + [row("naive", 32768), row("naive", 65536),
            row("naive", 131072, "failed", "OutOfMemoryError: CUDA out of memory. Tried to allocate 64 GiB"),
            row("naive", 262144, "skipped", "not run: out of memory at N=131072"),
            row("inf-cl", 32768, "skipped", "inf_cl cannot be imported"), row("ours", 32768, metric="memory")]
    assert bc.largest_n_report(rows) == [
        "- largest N, fwd+bwd: ours 262144",
        "- largest N, fwd+bwd: naive 65536 (131072 failed: OutOfMemoryError: CUDA out of memory. Tried to allocate 64"
        " GiB)",
        "- largest N, fwd+bwd: inf-cl none (32768 skipped: inf_cl cannot be imported)",
    ]  # fmt: skip
    heads = bc.target_heads(include_cpu=False)
    assert len(heads) == len(bc.RATIO_TARGETS) and not any("CPU" in h for h in heads)
    assert len(bc.target_heads()) == len(bc.RATIO_TARGETS) + 1
