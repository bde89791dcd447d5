"""Tests of the SigLIP-loss benchmark: rows and errors of every provider at a tiny size, the float64 reference, the
ratio report, peak RSS in a fresh process. No timing is asserted; problems are tiny (N <= 1024, d = 16)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from benchmarks import bench_siglip as bs
from benchmarks import harness

CPU = torch.device("cpu")
TINY = {"reps": 1, "warmup": 0}
needs_hwm_reset = pytest.mark.skipif(not harness.can_reset_hwm(), reason="needs Linux /proc/self/clear_refs")


def _by_provider(rows):
    out = {}
    for r in rows:
        out.setdefault(r["provider"], []).append(r)
    return out


def test_tiny_run_every_provider_matches_the_float64_reference(tmp_path):
    writer = harness.ResultWriter(tmp_path / "out.csv", harness.environment(CPU), "test")
    rows = bs.run([48], 16, bs.PROVIDERS, bs.MODES, torch.float32, CPU, writer, TINY, log=lambda m: None)
    assert rows == harness.read_rows(tmp_path / "out.csv")
    assert {(r["kernel"], r["x_value"], r["shape"]) for r in rows} == {("sigmoid_loss", "48",
                                                                        "N=48 M=48 d=16 scale=10 bias=-10")}
    by = _by_provider(rows)
    from lfvila_kernels.dispatch import interpreting

    ran = ["open_clip", "chunked"] + (["ours"] if interpreting() else [])  # conftest.py interprets without CUDA
    for name in ran:
        errs = {r["mode"]: float(r["p50"]) for r in by[name] if r["metric"] == "max_abs_err" and r["status"] == "ok"}
        assert errs["fwd"] < 1e-5 and errs["fwd+bwd"] < 1e-6, (name, errs)  # loss ~0.7, gradients ~1e-2
        assert all(r["status"] == "ok" for r in by[name] if r["metric"] in ("time", "tflops")), by[name]
    assert all(r["status"] == "skipped" for r in rows if r["metric"] == "memory")  # CUDA only


@pytest.mark.parametrize("n, block", [(7, 2**26), (33, 40)])  # one block; one-row blocks
def test_float64_reference_matches_autograd_of_the_definition(n, block):
    a, b = (t.double().requires_grad_(True) for t in bs.make_inputs(n, 5, torch.float64, CPU, seed=3))
    labels = 2 * torch.eye(n, dtype=torch.float64) - 1
    loss = -F.logsigmoid(labels * (bs.SCALE * a @ b.t() + bs.BIAS)).sum() / n
    da, db = torch.autograd.grad(loss, (a, b))
    ref_loss, ref_da, ref_db = bs.reference_loss_and_grads(a, b, block_elems=block)
    torch.testing.assert_close(ref_loss, loss.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ref_da, da, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(ref_db, db, rtol=1e-10, atol=1e-14)


def test_ratios_report_from_rows():
    def row(provider, metric, p50, status="ok", note=""):
        return {"provider": provider, "metric": metric, "mode": "fwd+bwd", "x_value": "32768", "p50": str(p50),
                "status": status, "note": note, "dtype": "float32", "shape": "N=32768 M=32768 d=256", "x_name": "N",
                "unit": "MB"}  # fmt: skip

    rows = [row("open_clip", "peak_rss", 16000.0), row("chunked", "peak_rss", 800.0), row("open_clip", "time", 10.0),
            row("ours", "time", "", "skipped", "needs CUDA"), row("chunked", "time", 20.0),
            row("ours", "memory", "", "skipped"), row("open_clip", "memory", "", "skipped")]  # fmt: skip
    assert bs.ratios_report(rows) == [
        "- fwd+bwd time ours / open_clip at N=32768 float32: not measured (ours skipped: needs CUDA)",
        "- fwd+bwd time chunked / open_clip at N=32768 float32: 2",
        "- CPU peak RSS chunked / open_clip at N=32768 float32: 0.05",
    ]
    assert "**Ratios to open_clip**" in bs.markdown_summary(rows)


@needs_hwm_reset
def test_rss_mode_end_to_end(tmp_path, capsys):
    """open_clip holds several N x N fp32 matrices (logits, labels, their product, the gradients); chunked far less."""
    out, md = tmp_path / "rss.csv", tmp_path / "rss.md"
    rows = bs.main(["--rss", "--providers", "open_clip,chunked", "--sizes", "2048", "--dim", "16", "--out", str(out),
                    "--markdown", str(md), "--label", "rss-test"])  # fmt: skip
    assert rows == harness.read_rows(out)
    by = {r["provider"]: r for r in rows}
    assert all(r["metric"] == "peak_rss" and r["status"] == "ok" for r in rows), rows
    logits_mb = 2048**2 * 4 / 2**20
    assert float(by["open_clip"]["p50"]) >= 3 * logits_mb
    assert float(by["chunked"]["p50"]) < float(by["open_clip"]["p50"])
    assert "peak RSS increase" in md.read_text() and md.read_text().strip() in capsys.readouterr().out
