"""The Triton kernels compile for Hopper (sm_90) with the real backend, no GPU needed: catches compile errors that
Triton's interpreter never sees (layouts, shared memory, dot shapes) in CPU-only CI."""

import os
import subprocess
import sys

import pytest


@pytest.mark.parametrize(
    "op, dtype, extra, cases, kernels",
    [
        # windows <= 128 tokens: forward, delta, fused backward; longer: forward, delta, dk/dv, dq
        ("window_attention", "bf16", ["--head-dim", "32"], "layer0,layer3", 3 + 4),
        ("window_attention", "fp32", ["--head-dim", "64"], "layer2", 3),
        ("contrastive", "bf16", [], "d512,d2048", 3 * 2),
        ("contrastive", "fp32", [], "d256", 3),
    ],
)
def test_kernels_compile_for_sm90(op, dtype, extra, cases, kernels):
    env = dict(os.environ, TRITON_INTERPRET="0")
    cmd = [sys.executable, "-m", "benchmarks.kernel_resources", "--op", op, "--dtype", dtype, "--layers", cases, *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ") and "| kernel |" not in line]
    assert len(rows) == kernels, proc.stdout
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[4].isdigit() and int(cells[4]) > 0, row  # registers were read from the cubin
        if "delta" not in cells[1]:  # half types use the tensor cores; fp32 keeps IEEE products (no tf32)
            assert cells[7] in (("FFMA only",) if dtype == "fp32" else ("HMMA", "HGMMA")), row
