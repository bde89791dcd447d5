"""The issue-floor report of ``python -m benchmarks.kernel_resources --issue-floor``: per (op, layer, pass, launch)
the SASS main loop's instructions per score element, the issue-only lower bound on the launch's time and the useful
TFLOP/s it allows, and a ``total`` row per pass. The model is ``benchmarks/sass_model.py``; the launches are
recorded and compiled by ``benchmarks.kernel_resources`` (meta tensors, no GPU)."""

from __future__ import annotations

import dataclasses
import subprocess
from pathlib import Path

import torch
import triton

from benchmarks import sass_model as sm
from benchmarks.kernel_resources import (
    CL_DIMS,
    CL_N,
    DEPTHS,
    _values,
    compile_launch,
    record_contrastive,
    record_window_attention,
)


def _cases(op: str, B: int, T: int, head_dim: int, names: set | None) -> list[dict]:
    """The problems of ``op``: lfvila-base's shifted block per layer (windows clipped to the grid as the model does)
    and its unshifted twin, or the contrastive (N, d) problems."""
    if op == "window_attention":
        from benchmarks.attention_shapes import lfvila_cases
        from benchmarks.bench_attention import attention_flops

        out = []
        for case in lfvila_cases(B, T, head_dim):
            layer = "L" + case.name.removeprefix("layer")
            if names and layer not in names and case.name not in names:
                continue
            plain = dataclasses.replace(case, shift=(0, 0, 0))
            out.append(dict(op=op, layer=layer, B=B, T=T, case=case, plain=plain,
                            flops={m: attention_flops(case, m) for m in ("fwd", "bwd")},
                            record=lambda dtype, c=case: record_window_attention(
                                (c.batch, *c.grid, c.heads, c.head_dim), c.window, c.shift, dtype)))
        return out
    from benchmarks.bench_contrastive import loss_flops

    out = []
    for d in CL_DIMS:
        layer = f"N{CL_N}-d{d}"
        if names and layer not in names and f"d{d}" not in names:
            continue
        fwd = loss_flops(CL_N, d, "fwd")
        out.append(dict(op=op, layer=layer, B=None, T=None, N=CL_N, d=d, flops={"fwd": fwd,
                        "bwd": loss_flops(CL_N, d, "fwd+bwd") - fwd},
                        record=lambda dtype, d=d: record_contrastive(CL_N, d, dtype)))
    return out


def _r(x, digits=3):
    return None if x is None else round(float(x), digits)


def pass_rows(base: dict, launches: list, torch_ops: list, useful_flops: float, arch: int) -> list[dict]:
    """One row per launch of a pass and its ``total`` row."""
    rows = []
    for index, launch in enumerate(launches):
        compiled, warps, rep = compile_launch(launch, arch)
        spec = sm.Launch(launch.name, launch.grid, warps, _values(launch))
        model = sm.kernel_model(spec)
        counts = sm.issue_counts(sm.parse_sass(rep["sass"], launch.name), model, launch.name, warps * 32)
        floor = sm.issue_floor_us(spec.programs * warps * counts["per_program"])
        useful = model.get("useful", 0.0) * useful_flops
        rows.append({
            **base, "kernel": launch.name, "launch": index, "grid": list(launch.grid), "programs": spec.programs,
            "warps": warps, "registers": rep["registers"], "stack_bytes": rep["stack"],
            "shared_bytes": compiled.metadata.shared,
            "ctas_per_sm": sm.ctas_per_sm(rep["registers"], compiled.metadata.shared, warps),
            "straight_instr": counts["straight"], "loops": [[d, n, _r(t)] for d, n, t in counts["loops"]],
            "main_loop_instr": counts["main_body"], "loop_instr_per_elem": _r(counts["loop_instr_per_elem"], 1),
            "issue_floor_us": _r(floor), "useful_tflops_bound": _r(useful / floor * 1e-6, 1) if useful else None,
        })
    floor = sum(r["issue_floor_us"] for r in rows)
    rows.append({
        **base, "kernel": "total", "launches": len(rows), "issue_floor_us": _r(floor),
        "useful_tflops_bound": _r(useful_flops / floor * 1e-6, 1) if floor else None, "useful_flops": useful_flops,
        "torch_ops_us": _r(sum(b for _, b in torch_ops) / sm.HBM_BYTES_PER_S * 1e6),
        "torch_op_launches": len(torch_ops), "torch_ops": sorted({name for name, _ in torch_ops}),
    })
    return rows


def issue_floor(ops, B, T, dtype, arch, head_dim=32, names=None, passes=("fwd", "bwd"), unshifted=False):
    """Rows of every (op, layer, pass); with ``unshifted``, also {layer: {pass: total}} of the unshifted blocks."""
    rows, plain_totals = [], {}
    for op in ops:
        for c in _cases(op, B, T, head_dim, names):
            base = {k: c[k] for k in ("op", "layer", "B", "T", "N", "d") if k in c}
            if "case" in c:
                base.update(token_grid=list(c["case"].grid), heads=c["case"].heads, window=list(c["case"].window),
                            shift=list(c["case"].shift))
            recorded = c["record"](dtype)
            for p in passes:
                rows += pass_rows({**base, "pass": p}, *recorded[p], c["flops"][p], arch)
            if unshifted and "case" in c:
                pc = c["plain"]
                plain = (recorded if pc.shift == c["case"].shift else
                         record_window_attention((pc.batch, *pc.grid, pc.heads, pc.head_dim), pc.window, pc.shift,
                                                 dtype))
                plain_totals[c["layer"]] = {
                    p: pass_rows({**base, "pass": p}, *plain[p], c["flops"][p], arch)[-1] for p in passes}
    return rows, plain_totals


def _provenance(modules) -> str:
    """The git commit of this checkout and, per kernel module, the commit whose blob it is (or 'uncommitted')."""
    root = Path(__file__).resolve().parents[1]

    def git(*args):
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True).stdout.strip()

    parts = [f"checkout at git {git('rev-parse', '--short=12', 'HEAD') or '?'}"]
    for module in modules:
        path, rel = Path(module.__file__), f"kernels/lfvila_kernels/{Path(module.__file__).name}"
        blob = git("hash-object", str(path))
        commit = next((c for c in git("log", "--format=%h", "-n", "200", "--", rel).split()
                       if git("rev-parse", f"{c}:{rel}") == blob), None)
        parts.append(f"`{rel}` {'as committed in ' + commit if commit else 'with uncommitted changes'}"
                     + ("" if path.is_relative_to(root) else f" (read from {path.parent})"))
    return "; ".join(parts)


def _fmt(x, digits=1):
    return "-" if x is None else (f"{x:.{digits}f}" if isinstance(x, float) else str(x))


def issue_floor_markdown(rows, plain_totals, B, T, dtype_name, arch, modules, command) -> str:
    totals = {(r["op"], r["layer"], r["pass"]): r for r in rows if r["kernel"] == "total"}
    kernels = [r for r in rows if r["kernel"] != "total"]
    short = lambda name: name.removeprefix("_window_attention_").removeprefix("_").removesuffix("_kernel")  # noqa: E731
    main = lambda op, layer, p: " / ".join(  # noqa: E731
        f"{short(r['kernel'])} {_fmt(r['loop_instr_per_elem'])}"
        for r in kernels if (r["op"], r["layer"], r["pass"]) == (op, layer, p) and r["loop_instr_per_elem"])
    out = [
        f"# Issue floor of the Triton kernels: sm_{arch}, {dtype_name}, B={B}, T={T}",
        "",
        "An **issue-only lower bound**, from the compiled code, no GPU involved (`benchmarks/sass_model.py`): every "
        "warp instruction takes one issue slot, so a launch needs at least (warp-instructions executed) / (132 SMs x "
        "4 schedulers x 1.8e9 /s); warp-instructions = programs x warps x (straight-line SASS + loop bodies x trip "
        "counts, from the recorded launch). It cannot see memory stalls and bandwidth, latency, tensor-core "
        "occupancy and throughput, dependency stalls, L2 behaviour or wave quantisation: real kernels are slower. "
        "`instr/elem`: SASS instructions of the main loop (the innermost loop holding HGMMA/HMMA; without one, the "
        "whole kernel) x threads / score elements one iteration computes. Useful FLOPs count only allowed pairs "
        "(window attention: 4 x pairs x head_dim forward, 10 x backward; contrastive: 2 N^2 d forward, 4 N^2 d "
        "backward). `torch ops` are the torch calls the launchers make between kernels (bias-gradient reductions, "
        "column-statistics merges, fills), estimated memory-bound at bytes / 4.8e12 B/s, kept out of the floor.",
        "",
        f"triton {triton.__version__}, torch {torch.__version__}; {_provenance(modules)}.",
        f"Generated by `{command}`.",
    ]
    wa = [(layer, r) for (op, layer, p), r in totals.items() if op == "window_attention" and p == "fwd"]
    if wa and all((("window_attention", layer, "bwd") in totals) for layer, _ in wa):
        out += ["", "## Window attention, lfvila-base (head_dim 32; the shifted block of each layer)", "",
                "| layer | grid | heads | window | shift | fwd µs | bwd µs | torch ops µs (fwd+bwd) | "
                "fwd bound TFLOP/s | bwd bound TFLOP/s | instr/elem fwd | instr/elem bwd | unshifted fwd+bwd µs | "
                "blocks |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        sums = {"fwd": 0.0, "bwd": 0.0, "torch": 0.0}
        for layer, f in wa:
            b = totals[("window_attention", layer, "bwd")]
            plain = plain_totals.get(layer)
            plain_us = None if plain is None else plain["fwd"]["issue_floor_us"] + plain["bwd"]["issue_floor_us"]
            depth = DEPTHS.get(layer, 0)
            half = depth // 2
            for p, r in (("fwd", f), ("bwd", b)):
                sums[p] += half * r["issue_floor_us"] + (depth - half) * (
                    r["issue_floor_us"] if plain is None else plain[p]["issue_floor_us"])
            sums["torch"] += depth * (f["torch_ops_us"] + b["torch_ops_us"])
            out.append(f"| {layer} | {'x'.join(map(str, f['token_grid']))} | {f['heads']} | "
                       f"{'x'.join(map(str, f['window']))} | {'x'.join(map(str, f['shift']))} | "
                       f"{_fmt(f['issue_floor_us'])} | {_fmt(b['issue_floor_us'])} | "
                       f"{_fmt(f['torch_ops_us'] + b['torch_ops_us'])} | {_fmt(f['useful_tflops_bound'])} | "
                       f"{_fmt(b['useful_tflops_bound'])} | {main('window_attention', layer, 'fwd')} | "
                       f"{main('window_attention', layer, 'bwd')} | {_fmt(plain_us)} | {depth} |")
        if set(DEPTHS) <= {layer for layer, _ in wa}:
            out += ["", f"**lfvila-base, 24 blocks** (depths 2, 2, 14, 2, 2, 2; even blocks unshifted, odd shifted): "
                    f"issue floor fwd {sums['fwd'] / 1e3:.2f} ms + bwd {sums['bwd'] / 1e3:.2f} ms = "
                    f"**{(sums['fwd'] + sums['bwd']) / 1e3:.2f} ms** per forward + backward at B={B}, T={T} "
                    f"(+ {sums['torch'] / 1e3:.2f} ms of torch ops, memory-bound estimate)."]
    cl = [(layer, r) for (op, layer, p), r in totals.items() if op == "contrastive" and p == "fwd"]
    if cl:
        out += ["", "## Contrastive loss (square, symmetric)", "",
                "| problem | fwd µs | bwd µs | torch ops µs (fwd+bwd) | fwd bound TFLOP/s | bwd bound TFLOP/s | "
                "instr/elem fwd | instr/elem bwd |", "|---|---|---|---|---|---|---|---|"]
        for layer, f in cl:
            b = totals.get(("contrastive", layer, "bwd"), {})
            out.append(f"| {layer} | {_fmt(f['issue_floor_us'])} | {_fmt(b.get('issue_floor_us'))} | "
                       f"{_fmt(f['torch_ops_us'] + b.get('torch_ops_us', 0.0))} | {_fmt(f['useful_tflops_bound'])} | "
                       f"{_fmt(b.get('useful_tflops_bound'))} | {main('contrastive', layer, 'fwd')} | "
                       f"{main('contrastive', layer, 'bwd')} |")
    out += ["", "## Per launch", "",
            "loops: `depth:instructions x trips` per SASS loop (its own instructions, nested loops excluded; trips "
            "per entry, a mean over programs where programs differ).", "",
            "| op | layer | pass | kernel | grid | programs | warps | registers | shared B | CTAs/SM | straight | "
            "loops | main loop | instr/elem | issue floor µs | useful TFLOP/s bound |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["kernel"] == "total":
            out.append(f"| {r['op']} | {r['layer']} | {r['pass']} | **total** | | | | | | | | | | | "
                       f"**{_fmt(r['issue_floor_us'])}** (+ torch ops {_fmt(r['torch_ops_us'])}, "
                       f"{r['torch_op_launches']} launches) | **{_fmt(r['useful_tflops_bound'])}** |")
            continue
        loops = ", ".join(f"{d}:{n}x{_fmt(t, 2) if isinstance(t, float) and t != int(t) else int(t)}"
                          for d, n, t in r["loops"]) or "-"
        out.append(f"| {r['op']} | {r['layer']} | {r['pass']} | {r['kernel']} | {'x'.join(map(str, r['grid']))} | "
                   f"{r['programs']} | {r['warps']} | {r['registers']} | {r['shared_bytes']} | {r['ctas_per_sm']} | "
                   f"{r['straight_instr']} | {loops} | {r['main_loop_instr']} | {_fmt(r['loop_instr_per_elem'])} | "
                   f"{_fmt(r['issue_floor_us'])} | {_fmt(r['useful_tflops_bound'])} |")
    return "\n".join(out) + "\n"
