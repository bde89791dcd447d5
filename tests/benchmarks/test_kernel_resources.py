"""The Triton kernels compile for Hopper (sm_90) with the real backend, no GPU needed: catches compile errors that
Triton's interpreter never sees (layouts, shared memory, dot shapes) in CPU-only CI; and the issue-floor model
(``--issue-floor``): its JSON rows on one real compile, its SASS loop finder on a hand-written listing."""

import json
import math
import os
import subprocess
import sys

import pytest

from benchmarks import sass_model as sm


@pytest.mark.parametrize(
    "op, dtype, extra, cases, kernels",
    [
        # every window attention: the tile (forward), then the bias-gradient fold (backward). bf16 windows <= 64
        # tokens: forward; transposed tile, fused backward computing delta itself. Longer: forward; delta, plain and
        # transposed tiles, dk/dv, dq, bias-gradient partials (windows of 128 tokens: delta, fused backward).
        ("window_attention", "bf16", ["--head-dim", "32"], "layer0,layer3", (2 + 3) + (2 + 7)),
        # fp32 windows > 32 tokens take the split backward (the fused one spills on FFMA)
        ("window_attention", "fp32", ["--head-dim", "64"], "layer2", 2 + 7),
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
        if not any(name in cells[1] for name in ("delta", "tile_kernel", "bias_grad")):  # elementwise / gathers
            # half types use the tensor cores; fp32 keeps IEEE products (no tf32)
            assert cells[7] in (("FFMA only",) if dtype == "fp32" else ("HMMA", "HGMMA")), row
        if op == "window_attention":  # the config tables keep every kernel out of local memory
            assert int(cells[5]) <= 16, row


def test_issue_floor_json(tmp_path):
    """One layer, one pass (lfvila-base L0 forward at B=16, T=32: recorded on meta tensors, one compile)."""
    out = tmp_path / "floor.json"
    cmd = [sys.executable, "-m", "benchmarks.kernel_resources", "--issue-floor", "--op", "window_attention",
           "--layers", "L0", "--passes", "fwd", "--B", "16", "--T", "32", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, TRITON_INTERPRET="0"),
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())
    kernels, totals = [r for r in rows if r["kernel"] != "total"], [r for r in rows if r["kernel"] == "total"]
    assert kernels and len(totals) == 1, rows
    for r in rows:
        assert (r["op"], r["layer"], r["B"], r["T"], r["pass"]) == ("window_attention", "L0", 16, 32, "fwd"), r
        assert r["issue_floor_us"] > 0, r
        assert r["useful_tflops_bound"] is None or r["useful_tflops_bound"] > 0, r
    for r in kernels:
        assert r["kernel"].startswith("_window_attention_") and r["programs"] == math.prod(r["grid"]) > 0, r
        assert r["warps"] > 0 and r["registers"] > 0 and 1 <= r["ctas_per_sm"] <= 32, r
        assert r["straight_instr"] > 0 and r["main_loop_instr"] > 0, r
        if r["kernel"] == "_window_attention_fwd_kernel":  # the tile kernel is elementwise: no score elements
            assert r["loop_instr_per_elem"] > 0, r
    total = totals[0]
    assert total["issue_floor_us"] == pytest.approx(sum(r["issue_floor_us"] for r in kernels), abs=1e-2)
    assert total["useful_tflops_bound"] > 0 and total["torch_ops_us"] >= 0
    # useful FLOPs / floor: the bound is 4 x allowed pairs x head_dim x B x heads over the summed floor
    from benchmarks.bench_attention import count_allowed_pairs

    flops = 4 * count_allowed_pairs((32, 24, 40), (2, 3, 5), (0, 1, 2)) * 32 * 16 * 4
    assert total["useful_tflops_bound"] == pytest.approx(flops / total["issue_floor_us"] * 1e-6, rel=1e-2)


# A hand-written nvdisasm listing: an outer loop (.L_x_0) holding an inner loop with the matrix instruction
# (.L_x_1) and a forward branch; then the end-of-kernel trap and NOP padding, which are not instructions.
TOY_SASS = """\
//--------------------- .text.toy               --------------------------
\t.section\t.text.toy,"ax",@progbits
toy:
.text.toy:
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   S2R R0, SR_TID.X ;
.L_x_0:
        /*0020*/                   IADD3 R2, R2, 0x1, RZ ;
.L_x_1:
        /*0030*/                   LDS R4, [R3] ;
        /*0040*/                   HMMA.16816.F32.BF16 R8, R4, R6, R8 ;
        /*0050*/                   ISETP.GE.AND P1, PT, R5, R7, PT ;
        /*0060*/              @!P1 BRA `(.L_x_1) ;
        /*0070*/                   FADD R9, R9, R8 ;
        /*0080*/               @P0 BRA `(.L_x_2) ;
        /*0090*/                   FMUL R9, R9, R9 ;
.L_x_2:
        /*00a0*/                   ISETP.GE.AND P0, PT, R2, R3, PT ;
        /*00b0*/              @!P0 BRA `(.L_x_0) ;
        /*00c0*/                   STG.E desc[UR4][R10.64], R9 ;
        /*00d0*/                   EXIT ;
.L_x_3:
        /*00e0*/                   BRA `(.L_x_3);
        /*00f0*/                   NOP;
        /*0100*/                   NOP;
.L_x_4:
\t.section\t.nv.shared.toy,"aw",@nobits
"""


def test_sass_loop_finder_on_a_nested_loop():
    sass = sm.parse_sass(TOY_SASS, "toy")
    assert len(sass.instructions) == 14  # trap and padding dropped
    (outer,) = sass.loops
    (inner,) = outer.children
    assert (outer.start, outer.end, outer.size, outer.own, outer.depth) == (2, 11, 10, 6, 0)
    assert (inner.start, inner.end, inner.size, inner.depth, inner.matrix) == (3, 6, 4, 1, 1)
    assert sass.straight == 4 and sass.depth == 2 and sass.main_loop() is inner
    # 3 outer trips, 5 inner trips each; one warp (32 threads), 64 score elements per inner trip
    counts = sm.issue_counts(sass, {"elements": 64, "trips": [3, sm.Static(5)]}, "toy", 32)
    assert counts["per_program"] == 4 + 6 * 3 + 4 * 3 * 5
    assert counts["main_body"] == 4 and counts["loop_instr_per_elem"] == pytest.approx(4 * 32 / 64)
    # a compile-time level the compiler unrolled away: dropped, its trips multiply the elements
    unrolled = sm.issue_counts(sass, {"elements": 64, "trips": [3, sm.Static(5), sm.Static(2)]}, "toy", 32)
    assert unrolled["per_program"] == counts["per_program"] and unrolled["loop_instr_per_elem"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="toy"):  # a model that does not match the SASS names the kernel
        sm.issue_counts(sass, {"elements": 64, "trips": [3]}, "toy", 32)
    with pytest.raises(KeyError, match="_new_kernel"):  # so does a kernel without a model
        sm.kernel_model(sm.Launch("_new_kernel", (1,), 4, {}))
    assert sm.issue_floor_us(sm.SMS * sm.SCHEDULERS * sm.CLOCK_HZ * 1e-6) == pytest.approx(1.0)


def test_sass_sibling_loops_take_one_trip_count_each():
    listing = "\n".join([".text.two:", "        /*0000*/      MOV R1, R2 ;", ".L_x_0:",
                          "        /*0010*/      HMMA.16816.F32.BF16 R8, R4, R6, R8 ;",
                          "        /*0020*/  @P0 BRA `(.L_x_0) ;", ".L_x_1:", "        /*0030*/      FADD R9, R9, R8 ;",
                          "        /*0040*/      FADD R9, R9, R8 ;", "        /*0050*/  @P1 BRA `(.L_x_1) ;",
                          "        /*0060*/      EXIT ;"])
    sass = sm.parse_sass(listing)
    assert [(lp.start, lp.size, lp.depth) for lp in sass.loops] == [(1, 2, 0), (3, 3, 0)]
    counts = sm.issue_counts(sass, {"elements": 32, "trips": [[2, 7]]}, "two", 32)
    assert counts["per_program"] == 2 + 2 * 2 + 3 * 7 and counts["main_body"] == 2
    with pytest.raises(ValueError, match="two"):
        sm.issue_counts(sass, {"elements": 32, "trips": [[2, 7, 1]]}, "two", 32)


def test_ctas_per_sm():
    assert sm.ctas_per_sm(168, 10496, 2) == 6  # registers: 168 x 32 -> 5376 per warp, 65536 // 10752
    assert sm.ctas_per_sm(32, 256, 4) == 16  # warps: 64 // 4
    assert sm.ctas_per_sm(192, 73728, 8) == 1  # both registers and shared memory
    assert sm.ctas_per_sm(16, 0, 1) == 32  # the CTA limit


def test_replicated_dots_finds_a_chained_tile():
    ttgir = "\n".join([
        "#mma = #ttg.nvidia_mma<{versionMajor = 3, versionMinor = 0, warpsPerCTA = [8, 1], instrShape = [16, 64, 16]}>",
        "#mma1 = #ttg.nvidia_mma<{versionMajor = 3, versionMinor = 0, warpsPerCTA = [4, 2], instrShape = [16, 32, 8]}>",
        "    %s = ttng.warp_group_dot %a, %b, %c : !ttg.memdesc<64x32xbf16> * !ttg.memdesc<32x64xbf16> -> "
        "tensor<64x64xf32, #mma>",
        "    %t = ttng.warp_group_dot %a, %b, %c : !ttg.memdesc<64x32xbf16> * !ttg.memdesc<32x64xbf16> -> "
        "tensor<64x64xf32, #mma1>",
        "    %u = ttng.warp_group_dot %a, %b, %c : !ttg.memdesc<128x32xbf16> * !ttg.memdesc<32x64xbf16> -> "
        "tensor<128x64xf32, #mma>"])
    (hit,) = sm.replicated_dots(ttgir)
    assert hit.startswith("64x64 result with warpsPerCTA [8, 1]"), hit


_NO_REPLICATION = """
import sys, torch
from benchmarks import kernel_resources as kr, sass_model as sm
from benchmarks.attention_shapes import lfvila_cases
records = [kr.record_contrastive(4096, d, torch.bfloat16) for d in (256, 512, 1024)]
records += [kr.record_window_attention((c.batch, *c.grid, c.heads, c.head_dim), c.window, c.shift, torch.bfloat16)
            for c in lfvila_cases(2, 32, 32)]
bad = []
for rec in records:
    for launches, _ in rec.values():
        for launch in launches:
            compiled, _, _ = kr.compile_launch(launch, 90)
            bad += [f"{launch.name}: {hit}" for hit in sm.replicated_dots(compiled.asm["ttgir"])]
print("\\n".join(bad))
sys.exit(1 if bad else 0)
"""


def test_no_warpgroup_repeats_another():
    """Every matrix product of the window-attention (lfvila-base's layers) and contrastive (d = 256 ... 1024) kernels,
    bf16 on sm_90, splits its rows between the warps: none computes rows another computes (``replicated_dots``)."""
    proc = subprocess.run([sys.executable, "-c", _NO_REPLICATION], capture_output=True, text=True,
                          env=dict(os.environ, TRITON_INTERPRET="0"), timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
