"""Benchmark 3D shifted-window attention providers on the LF-VILA layer shapes; append rows to a CSV.

Commands (from the repository root)::

    python -m benchmarks.bench_attention --shapes lfvila --label h200-main             # CUDA: B=16, 32 frames, bf16
    python -m benchmarks.bench_attention --shapes lfvila --label cpu-reduced           # CPU: B=1, 8 frames, fp32
    python -m benchmarks.bench_attention --providers htwa-triton,videoswin-eager --modes fwd --dtype fp16 \
        --out benchmarks/results/_scratch/attention.csv --label try

Providers are in ``benchmarks/attention_variants.py``. Modes: ``fwd`` is an inference forward (inputs without grad, no
autograd graph); ``fwd+bwd`` is a training step: forward, then backward from a fixed random output gradient, producing
the gradients of q, k, v and the bias table. Per (layer, provider, mode) the CSV gets these rows:

    time         ms        median and 20th/80th percentiles (CUDA: triton.testing.do_bench, L2 flushed per call)
    tflops       TFLOP/s   useful FLOPs per second, see :func:`attention_flops`
    memory       MB        peak of one call above what was allocated before it (inputs, the fp32 reference output and
                           the output gradient excluded; the output and, in fwd+bwd, saved activations and the four
                           gradients included); CUDA only, empty (status skipped) on the CPU
    max_abs_err  abs       fwd only: max |output - fp32 reference| on the same inputs (a wrong kernel is not "fast")

A provider that raises (OOM, an unsupported shape, a kernel that does not build) gives ``failed`` rows with the
exception text and the run goes on; one that cannot run on this machine at all (the Triton kernel on a CPU without
TRITON_INTERPRET) gives ``skipped`` rows.

Shape set ``lfvila`` (head_dim 32; the shifted block of each layer, shift ``(0, wh//2, ww//2)``)::

    layer  grid (T,H,W)  heads  window (T,H,W)
    0      32x24x40      4      2x3x5
    1      32x12x20      8      4x3x5
    2      32x6x10       16     8x3x5
    3      32x6x10       16     16x3x5
    4      32x6x10       16     16x3x5
    5      32x3x5        32     32x3x5     (window = grid: no shift)

On the CPU the defaults shrink this to B=1, T=8 frames (temporal windows clipped to 8) and fp32, so that the whole run
takes minutes; ``--full`` keeps the real sizes. Video-Swin's rule applies everywhere: a window axis at least as large
as the grid axis is clipped to it and takes shift 0.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks import harness

KERNEL = "window_attention"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
METRICS = (("time", "ms"), ("tflops", "TFLOP/s"), ("memory", "MB"), ("max_abs_err", "abs"))
BASELINE = "videoswin-eager"


@dataclass(frozen=True)
class Case:
    """One benchmarked problem: q, k, v ``(batch, *grid, heads, head_dim)`` with ``(T, H, W)``-ordered triples."""

    name: str
    batch: int
    grid: tuple[int, int, int]
    heads: int
    head_dim: int
    window: tuple[int, int, int]
    shift: tuple[int, int, int]

    def describe(self) -> str:
        def x(t):
            return "x".join(map(str, t))

        T, H, W = self.grid
        return (
            f"B={self.batch} T={T} H={H} W={W} heads={self.heads} head_dim={self.head_dim} "
            f"window={x(self.window)} shift={x(self.shift)}"
        )


# (name, grid, heads, window) of the six LF-VILA video-encoder layers at 32 frames of 192x320.
LFVILA_LAYERS = (
    ("layer0", (32, 24, 40), 4, (2, 3, 5)),
    ("layer1", (32, 12, 20), 8, (4, 3, 5)),
    ("layer2", (32, 6, 10), 16, (8, 3, 5)),
    ("layer3", (32, 6, 10), 16, (16, 3, 5)),
    ("layer4", (32, 6, 10), 16, (16, 3, 5)),
    ("layer5", (32, 3, 5), 32, (32, 3, 5)),
)


def lfvila_cases(batch: int = 16, frames: int = 32, head_dim: int = 32) -> list[Case]:
    """The shifted block of each LF-VILA layer, at ``frames`` frames (windows clipped to the grid)."""
    from lfvila_kernels.modules import clip_window  # lazily: importing triton waits for --interpret-ok

    cases = []
    for name, (_, H, W), heads, window in LFVILA_LAYERS:
        grid = (frames, H, W)
        win, shift = clip_window(grid, window, (0, window[1] // 2, window[2] // 2))
        cases.append(Case(name, batch, grid, heads, head_dim, win, shift))
    return cases


def tiny_cases(batch: int = 1, frames: int = 4, head_dim: int = 16) -> list[Case]:
    """Two small problems for smoke tests: a divisible shifted one and a non-divisible shifted one."""
    return [
        Case("tiny-div", batch, (frames, 6, 10), 2, head_dim, (2, 3, 5), (0, 1, 2)),
        Case("tiny-pad", batch, (frames + 1, 5, 7), 2, head_dim, (2, 3, 5), (1, 1, 2)),
    ]


SHAPE_SETS = {"lfvila": lfvila_cases, "tiny": tiny_cases}


# --------------------------------------------------------------------------------------------------- FLOPs
def _axis_pairs(n: int, w: int, s: int) -> int:
    """Allowed (query, key) position pairs on one axis of length n: same window after rolling by -s and padding to a
    multiple of w, same side of the cyclic wrap (the last s positions of the rolled axis wrapped), both not padding."""
    total = 0
    for start in range(0, n, w):
        stop = min(start + w, n)  # valid positions of this window: [start, stop)
        wrapped = max(0, stop - max(start, n - s)) if s else 0
        total += wrapped**2 + (stop - start - wrapped) ** 2
    return total


def count_allowed_pairs(grid, window, shift) -> int:
    """Exact number of (query, key) token pairs that attend, per sample and head, on a ``(T, H, W)`` grid.

    A pair attends iff both tokens are real (not padding), fall into the same window after the cyclic roll and lie in
    the same shift region. Each of these conditions is a conjunction over the three axes, so the count is the product
    of per-axis counts (:func:`_axis_pairs`). Partial windows of non-divisible grids count only their real tokens.
    """
    count = 1
    for n, w, s in zip(grid, window, shift, strict=True):
        count *= _axis_pairs(n, w, s)
    return count


def attention_flops(case: Case, mode: str) -> float:
    """FLOPs of one call, flash-attention's convention, counting only allowed (query, key) pairs.

    Forward: ``4 * head_dim`` per allowed pair per (sample, head): ``QK^T`` and ``PV``, 2 FLOPs per multiply-add each.
    ``fwd+bwd``: 3.5x the forward (the backward is 2.5x: recomputed ``QK^T`` plus ``dV``, ``dP``, ``dQ``, ``dK``).
    Softmax, bias, masking and the bias-table gradient are not counted. Providers that compute masked or padded
    pairs do that work for free in this count, so TFLOP/s compares useful work per second.
    """
    fwd = 4.0 * case.head_dim * count_allowed_pairs(case.grid, case.window, case.shift) * case.batch * case.heads
    if mode == "fwd":
        return fwd
    if mode == "fwd+bwd":
        return 3.5 * fwd
    raise ValueError(f"unknown mode {mode!r}")


# --------------------------------------------------------------------------------------------------- running
def make_inputs(case: Case, dtype: torch.dtype, device: torch.device, seed: int = 0):
    """Random q, k, v ``(B, T, H, W, heads, head_dim)``, bias table ``((2wt-1)(2wh-1)(2ww-1), heads)`` and output
    gradient ``(B, T, H, W, heads, head_dim)``, all standard normal (never zeros), none requiring grad."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    shape = (case.batch, *case.grid, case.heads, case.head_dim)
    wt, wh, ww = case.window
    rows = (2 * wt - 1) * (2 * wh - 1) * (2 * ww - 1)

    def randn(*size):
        return torch.randn(*size, generator=gen).to(device=device, dtype=dtype)

    return randn(*shape), randn(*shape), randn(*shape), randn(rows, case.heads), randn(*shape)


def _rows(case, provider, mode, dtype_name, values: dict, status="ok", note=""):
    """The four metric rows of one (case, provider, mode); ``values`` maps metric -> {p50,p20,p80} or None."""
    out = []
    for metric, unit in METRICS:
        if metric == "max_abs_err" and mode != "fwd":
            continue
        vals = values.get(metric)
        row_status, row_note = status, note
        if status == "ok" and vals is None:
            row_status = "skipped"
            row_note = "peak memory is measured on CUDA only" if metric == "memory" else "not measured"
        out.append(
            harness.make_row(
                kernel=KERNEL, provider=provider, mode=mode, x_name="layer", x_value=case.name,
                shape=case.describe(), metric=metric, unit=unit, dtype=dtype_name, values=vals,
                status=row_status, note=row_note,
            )
        )  # fmt: skip
    return out


def _measure_one(variant, case, mode, inputs, reference, device, timing) -> dict:
    """Build, check and time one (provider, mode); raises whatever the provider raises."""
    q0, k0, v0, table0, grad_out = inputs
    train = mode == "fwd+bwd"
    q, k, v, table = (t.detach().clone().requires_grad_(train) for t in (q0, k0, v0, table0))
    scale = case.head_dim**-0.5
    forward = variant.make(q, k, v, case.window, case.shift, table, scale)
    leaves = [q, k, v, table] if train else []

    if train:

        def step():
            out = forward()
            out.backward(grad_out)
            return out

    else:

        def step():
            with torch.no_grad():
                return forward()

    values = {}
    first = step()  # compiles / autotunes where the provider does; its output is checked in fwd mode
    if not train:
        err = (first.float() - reference).abs().max().item()
        values["max_abs_err"] = {"p50": err, "p20": err, "p80": err}
    del first
    t = harness.measure(step, device=device, grad_to_none=leaves, **timing)
    values["time"] = t
    flops = attention_flops(case, mode)
    # The 20th percentile of throughput comes from the 80th percentile of time, and vice versa.
    pairs = (("p50", "p50"), ("p20", "p80"), ("p80", "p20"))
    values["tflops"] = {key: flops / (t[src] * 1e-3) / 1e12 for key, src in pairs}

    for leaf in leaves:  # the last timed call's gradients would otherwise count in the baseline, not the peak
        leaf.grad = None
    mem = harness.peak_memory(step, device)
    values["memory"] = None if mem is None else {"p50": mem, "p20": mem, "p80": mem}
    return values


def run(
    cases: Sequence[Case],
    variants: dict,
    modes: Sequence[str],
    dtype: torch.dtype,
    device: torch.device | str,
    writer: harness.ResultWriter,
    timing: dict | None = None,
    log=print,
) -> list[dict]:
    """Benchmark every (case, provider, mode); append its rows to ``writer`` as soon as they exist; return all rows.

    ``variants``: provider name -> :class:`benchmarks.attention_variants.Variant`. ``timing``: keyword arguments of
    :func:`benchmarks.harness.measure` (``warmup``, ``reps``, ``warmup_ms``, ``rep_ms``).
    """
    from lfvila_kernels import window_attention_reference

    device = torch.device(device)
    dtype_name = str(dtype).replace("torch.", "")
    timing = dict(timing or {})
    written: list[dict] = []
    for case in cases:
        inputs = make_inputs(case, dtype, device)
        q, k, v, table, _ = inputs
        with torch.no_grad():
            reference = window_attention_reference(
                q.float(), k.float(), v.float(), case.window, case.shift, table.float(), case.head_dim**-0.5
            )
        for provider, variant in variants.items():
            refusal = variant.refusal(device, dtype) if variant.refusal else None
            for mode in modes:
                if refusal:
                    rows = _rows(case, provider, mode, dtype_name, {}, "skipped", refusal)
                    log(f"{case.name:8s} {provider:16s} {mode:8s} skipped: {refusal}")
                else:
                    job = functools.partial(_measure_one, variant, case, mode, inputs, reference, device, timing)
                    values, note = harness.guarded(job, device)
                    if note is None:
                        rows = _rows(case, provider, mode, dtype_name, values)
                        log(f"{case.name:8s} {provider:16s} {mode:8s} {values['time']['p50']:10.3f} ms")
                    else:
                        rows = _rows(case, provider, mode, dtype_name, {}, "failed", note)
                        log(f"{case.name:8s} {provider:16s} {mode:8s} failed: {note}")
                written.extend(writer.write(rows))
        inputs = q = k = v = table = reference = None  # drop this case's tensors before the next one
        harness.free_memory(device)
    return written


def markdown_summary(rows: Sequence[dict], baseline: str = BASELINE) -> str:
    """Per mode, a provider x layer table of median ms and the speedup over ``baseline`` (its ms / this ms)."""
    times = [r for r in rows if r["metric"] == "time"]
    layers = list(dict.fromkeys(r["x_value"] for r in times))
    providers = list(dict.fromkeys(r["provider"] for r in times))
    tables = []
    for mode in dict.fromkeys(r["mode"] for r in times):
        cell = {(r["provider"], r["x_value"]): r for r in times if r["mode"] == mode}
        lines = [
            f"**{mode}** (median ms; speedup vs {baseline})",
            "",
            "| provider | " + " | ".join(layers) + " |",
            "|---|" + "---|" * len(layers),
        ]
        for provider in providers:
            cells = []
            for layer in layers:
                r = cell.get((provider, layer))
                if r is None:
                    cells.append("")
                elif r["status"] != "ok":
                    cells.append(r["status"])
                else:
                    ms = float(r["p50"])
                    base = cell.get((baseline, layer))
                    speed = f" ({float(base['p50']) / ms:.2f}x)" if base and base["status"] == "ok" else ""
                    cells.append(f"{ms:.3g}{speed}")
            lines.append(f"| {provider} | " + " | ".join(cells) + " |")
        tables.append("\n".join(lines))
    return "\n\n".join(tables)


# --------------------------------------------------------------------------------------------------- CLI
def _parse(argv):
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_attention", description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default="lfvila", choices=sorted(SHAPE_SETS))
    p.add_argument("--label", default="local", help="free text stored in every row (which run this is)")
    p.add_argument("--providers", default=None, help="comma-separated subset of the providers (default: all)")
    p.add_argument("--modes", default="fwd,fwd+bwd", help="comma-separated: fwd, fwd+bwd")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cuda, cuda:N or cpu")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default: bf16 on CUDA, fp32 on the CPU")
    p.add_argument("--batch", type=int, default=None, help="default: 16 on CUDA, 1 on the CPU")
    p.add_argument("--frames", type=int, default=None, help="T of every layer; default: 32 on CUDA, 8 on the CPU")
    p.add_argument("--full", action="store_true", help="on the CPU too, use B=16 and 32 frames")
    p.add_argument("--out", default=None, help="CSV to append to; default benchmarks/results/attention-<cpu|cuda>.csv")
    p.add_argument("--markdown", default=None, help="also write the summary table to this file")
    p.add_argument("--reps", type=int, default=10, help="CPU: timed calls per measurement")
    p.add_argument("--warmup", type=int, default=2, help="CPU: untimed calls before timing")
    p.add_argument("--rep-ms", type=float, default=100.0, help="CUDA: do_bench's timed budget in ms")
    p.add_argument("--warmup-ms", type=float, default=25.0, help="CUDA: do_bench's warm-up budget in ms")
    p.add_argument(
        "--interpret-ok", action="store_true", help="on the CPU, run htwa-triton through TRITON_INTERPRET=1 (slow)"
    )
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> list[dict]:
    """Run the benchmark from command-line arguments; print progress and the summary; return the rows written."""
    args = _parse(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else None
    device = device or torch.device(args.device)
    cpu = device.type == "cpu"
    if cpu and args.interpret_ok:
        if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
            print("warning: triton is already imported, TRITON_INTERPRET=1 may not take effect", file=sys.stderr)
        os.environ["TRITON_INTERPRET"] = "1"  # before the kernels' module (and so triton.jit) is imported

    from benchmarks.attention_variants import VARIANTS

    names = args.providers.split(",") if args.providers else list(VARIANTS)
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown providers {unknown}; choose from {list(VARIANTS)}")
    modes = args.modes.split(",")
    if any(m not in ("fwd", "fwd+bwd") for m in modes):
        raise SystemExit(f"--modes must be a comma-separated subset of fwd,fwd+bwd; got {args.modes!r}")
    reduced = cpu and not args.full
    dtype = DTYPES[args.dtype or ("fp32" if cpu else "bf16")]
    batch = args.batch or (1 if reduced else 16)
    make_cases = SHAPE_SETS[args.shapes]
    if args.shapes == "lfvila":
        cases = make_cases(batch=batch, frames=args.frames or (8 if reduced else 32))
    else:
        cases = make_cases(batch=batch, frames=args.frames or 4)
    out = Path(args.out or f"benchmarks/results/attention-{device.type}.csv")
    env = harness.environment(device)
    writer = harness.ResultWriter(out, env, args.label)
    timing = {"warmup": args.warmup, "reps": args.reps, "warmup_ms": args.warmup_ms, "rep_ms": args.rep_ms}

    print(f"# {env['device']} | torch {env['torch']} | triton {env['triton']} | commit {env['commit']}", flush=True)
    print(f"# {args.shapes}: {len(cases)} shapes, dtype {dtype}, providers {names}, modes {modes} -> {out}", flush=True)
    start = time.perf_counter()
    rows = run(cases, {n: VARIANTS[n] for n in names}, modes, dtype, device, writer, timing, log=harness.log)
    return harness.finish(rows, out, start, markdown_summary(rows), args.markdown)


if __name__ == "__main__":
    main()
