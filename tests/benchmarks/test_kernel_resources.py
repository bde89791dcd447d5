"""The Triton kernels compile for Hopper (sm_90) with the real backend, no GPU needed: catches compile errors that
Triton's interpreter never sees (layouts, shared memory, dot shapes) in CPU-only CI."""

import os
import subprocess
import sys

import pytest


@pytest.mark.parametrize("dtype, head_dim, layers", [("bf16", 32, "layer0,layer3"), ("fp32", 64, "layer2")])
def test_kernels_compile_for_sm90(dtype, head_dim, layers):
    env = dict(os.environ, TRITON_INTERPRET="0")
    cmd = [sys.executable, "-m", "benchmarks.kernel_resources", "--dtype", dtype, "--head-dim", str(head_dim),
           "--layers", layers]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| layer") and "| kernel |" not in line]
    assert len(rows) == 4 * len(layers.split(",")), proc.stdout
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[4].isdigit() and int(cells[4]) > 0, row  # registers were read from the cubin
        if "delta" not in cells[1]:  # half types use the tensor cores; fp32 keeps IEEE products (no tf32)
            assert cells[7] in (("FFMA only",) if dtype == "fp32" else ("HMMA", "HGMMA")), row
