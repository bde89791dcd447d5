"""Your own attention variant in the benchmark: ``--provider MODULE:ATTR`` loads it, it runs through the same grid as
ours (shapes, timing, error against the reference of the function it declares, determinism, CSV, markdown, plots)."""

import pytest

from benchmarks import attention_variants as av
from benchmarks import harness
from benchmarks import run as bench_run

MOD = "tests.benchmarks.own_provider"


def test_own_provider_runs_in_the_attention_suite(tmp_path):
    status = bench_run.main([
        "--suite", "attention", "--label", "own", "--out-dir", str(tmp_path), "--shapes", "tiny", "--device", "cpu",
        "--provider", f"{MOD}:make_masked_sdpa", "--provider", f"forgetful={MOD}:make_no_bias",
        "--", "--providers", "window-attention-torch,masked-sdpa,forgetful", "--modes", "fwd,fwd+bwd",
        "--cases", "tiny-pad", "--reps", "1", "--warmup", "0",
    ])  # fmt: skip
    assert status == 0
    rows = harness.read_rows(tmp_path / "attention-own.csv")
    got = {(r["provider"], r["mode"], r["metric"]): r for r in rows}
    for name in ("window-attention-torch", "masked-sdpa", "forgetful"):
        for metric in ("time", "tflops", "compile_time", "max_abs_err"):
            assert got[(name, "fwd", metric)]["status"] == "ok", got[(name, "fwd", metric)]
    assert float(got[("masked-sdpa", "fwd", "max_abs_err")]["p50"]) < 1e-5  # checked against the real reference
    assert float(got[("forgetful", "fwd", "max_abs_err")]["p50"]) > 1e-2  # ... which catches a wrong provider
    assert float(got[("masked-sdpa", "fwd+bwd", "bias_grad_deterministic")]["p50"]) == 1.0
    assert got[("forgetful", "fwd+bwd", "bias_grad_deterministic")]["status"] == "skipped"  # bias = False
    report = (tmp_path / "attention-own.md").read_text()
    assert "masked-sdpa" in report and "forgetful" in report
    assert list((tmp_path / "plots").glob("attention-*own.png"))


@pytest.mark.parametrize("spec, message", [
    (f"{MOD}", "expected"),
    (f"{MOD}:missing", "cannot load"),
    ("no_such_module_here:make", "cannot load"),
    (f"{MOD}:undeclared", "declaring `computes`"),
    (f"flex={MOD}:make_masked_sdpa", "taken"),
])  # fmt: skip
def test_bad_provider_specs_are_refused(spec, message):
    with pytest.raises(SystemExit, match=message):
        av.load_provider(spec)


def test_declared_function_must_be_known():
    def make(q, k, v, window, shift, table, scale):
        return lambda: q

    make.computes = "something-else"
    import sys
    import types

    module = types.ModuleType("own_provider_bad")
    module.make = make
    sys.modules["own_provider_bad"] = module
    try:
        with pytest.raises(SystemExit, match="computes must be one of"):
            av.load_provider("own_provider_bad:make")
    finally:
        del sys.modules["own_provider_bad"]
