"""Benchmark SigLIP (pairwise sigmoid) loss providers against the batch size N; append rows to a CSV.

    python -m benchmarks.bench_siglip --label h200-main             # CUDA: N = 1k ... 256k, d = 512, bf16
    python -m benchmarks.bench_siglip --label cpu-reduced           # CPU: N = 1k, 2k, 4k, d = 256, fp32
    python -m benchmarks.bench_siglip --rss --label cpu-rss         # CPU: peak RSS at N = 32768, d = 256

Providers: ``benchmarks.siglip_variants.PROVIDERS`` (baseline ``open_clip``). The skeleton, modes, metrics and the
peak-RSS method are the contrastive benchmark's (``benchmarks.bench_contrastive``, whose measuring code this module
reuses): benchmarks/README.md, section "Suites", "siglip".
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from benchmarks import bench_contrastive as bc
from benchmarks import harness, suite
from benchmarks.siglip_variants import BIAS, PROVIDERS, SCALE, Provider

KERNEL = "sigmoid_loss"
BASELINE = "open_clip"
MODES = bc.MODES
CUDA_SIZES, CPU_SIZES = bc.CUDA_SIZES, bc.CPU_SIZES
RSS_SIZE, RSS_DIM = bc.RSS_SIZE, bc.RSS_DIM
make_inputs = bc.make_inputs  # unit rows, positives with cosine ~0.7, negatives ~0


def reference_loss_and_grads(a, b, scale: float = SCALE, bias: float = BIAS, block_elems: int = 2**26):
    """The SigLIP loss of a, b ``(N, d)`` and its feature gradients in float64, blocked over rows (no N x N tensor).

    ``z = s a b^T + c``, ``y = 2 I - 1``: ``loss = -sum logsigmoid(y z) / N``; ``dloss/dz = -y sigmoid(-y z) / N``,
    ``da = s dz b``, ``db = s dz^T a``. Returns ``(loss 0-dim, da (N, d), db (N, d))``, float64."""
    a, b = a.detach().double(), b.detach().double()
    n = a.shape[0]
    rows = max(1, block_elems // n)
    loss = torch.zeros((), dtype=torch.float64, device=a.device)
    da, db = torch.empty_like(a), torch.zeros_like(b)
    for i in range(0, n, rows):
        j = min(i + rows, n)
        z = (a[i:j] @ b.t()) * scale + bias  # (rows, N)
        y = -torch.ones_like(z)
        y[torch.arange(j - i), torch.arange(i, j)] = 1.0
        loss -= F.logsigmoid(y * z).sum()
        g = -y * torch.sigmoid(-y * z) / n
        da[i:j] = (g @ b) * scale
        db += (g.t() @ a[i:j]) * scale
    return loss / n, da, db


def measure_rss(name: str, n: int, dim: int, dtype_name: str, max_mb: float | None = None, timeout: float = 3600.0):
    """Peak RSS increase (MB) of one CPU forward+backward of provider ``name`` at ``(n, dim)``, in a fresh process."""
    argv = ["--sizes", str(n), "--dim", str(dim), "--dtype", dtype_name]
    return suite.measure_rss("benchmarks.bench_siglip", name, argv, max_mb, timeout)


def _rss_child(args) -> None:
    def prepare():
        provider = PROVIDERS[args.rss_child]
        dtype, cpu = suite.DTYPES[args.dtype or "fp32"], torch.device("cpu")
        refusal = provider.refusal(cpu, dtype) if provider.refusal else None
        if refusal:
            raise RuntimeError(refusal)
        n, dim = int(args.sizes.split(",")[0]), args.dim or RSS_DIM
        warm = [t.requires_grad_(True) for t in make_inputs(64, dim, dtype, cpu, seed=1)]
        bc._make_step(provider, *warm, "fwd+bwd")()  # lazy initialisation lands in the baseline, not in the peak
        a, b = (t.requires_grad_(True) for t in make_inputs(n, dim, dtype, cpu))
        return bc._make_step(provider, a, b, "fwd+bwd")

    harness.rss_child(prepare, args.rss_max_mb)


def _rss_cell(name, n, dim, dtype, rss_opts, log) -> suite.Cell:
    def note(result):
        return f"{suite.rss_note(result)}; one fwd+bwd took {result['seconds']:.1f} s"

    measure = functools.partial(measure_rss, name, n, dim, suite.dtype_flag(dtype), **rss_opts)
    return suite.rss_cell(measure, note, f"N={n:<7d} {name:10s}", log)


def _grid(dim: int, dtype: torch.dtype, metrics) -> suite.Grid:
    return suite.Grid(KERNEL, suite.dtype_name(dtype), metrics,
                      lambda n: ("N", str(n), f"N={n} M={n} d={dim} scale={SCALE:g} bias={BIAS:g}"),
                      lambda n: f"N={n}")  # fmt: skip


def run(sizes: Sequence[int], dim: int, providers: dict[str, Provider], modes: Sequence[str], dtype: torch.dtype,
        device, writer: harness.ResultWriter, timing: dict | None = None, check: bool = True, rss: bool = False,
        rss_opts: dict | None = None, log=print) -> list[dict]:  # fmt: skip
    """Every (N, provider, mode): time, TFLOP/s, CUDA memory, ``max_abs_err`` against the float64 reference (and
    on the CPU with ``rss`` a fresh-process ``peak_rss`` row for fwd+bwd); rows appended to ``writer``, returned."""
    device = torch.device(device)
    timing = dict(timing or {})
    rss = rss and device.type == "cpu"

    def metrics(mode):
        out = [("time", "ms"), ("tflops", "TFLOP/s"), ("memory", "MB"), ("max_abs_err", "abs")]
        return out + ([("peak_rss", "MB")] if rss and mode == "fwd+bwd" else [])

    def setup(n):
        inputs = make_inputs(n, dim, dtype, device)
        if not check:
            return inputs, None
        reference, note = harness.guarded(functools.partial(reference_loss_and_grads, *inputs), device)
        return inputs, reference if note is None else note

    def measure(n, name, provider, mode, state):
        cells = bc._measure_one(provider, n, dim, mode, *state, device, timing)  # the logits' 2 N^2 d FLOPs, 3x
        if rss and mode == "fwd+bwd":
            cells["peak_rss"] = _rss_cell(name, n, dim, dtype, rss_opts or {}, log)
        return cells

    return suite.run_grid(_grid(dim, dtype, metrics), sorted(sizes), providers, modes, measure, writer,
                          device=device, refusal=suite.provider_refusal(device, dtype), setup=setup, oom_skip=True,
                          log=log)  # fmt: skip


def run_rss(sizes, dim, providers: dict[str, Provider], dtype, writer, rss_opts=None, log=print) -> list[dict]:
    """RSS mode: one ``peak_rss`` row per (N, provider), each from a fresh CPU process, one process at a time."""

    def measure(n, name, provider, mode, state):
        return {"peak_rss": _rss_cell(name, n, dim, dtype, rss_opts or {}, lambda message: None)}

    def describe(cells):
        status, values, note = cells["peak_rss"]
        return f"peak_rss {values['p50']:10.1f} MB" if status == "ok" else f"peak_rss {status}: {note}"

    grid = _grid(dim, dtype, lambda mode: [("peak_rss", "MB")])
    return suite.run_grid(grid, sorted(sizes), providers, ["fwd+bwd"], measure, writer,
                          refusal=suite.provider_refusal("cpu", dtype), describe=describe, log=log)  # fmt: skip


RATIOS = (  # (what, numerator provider, denominator provider, metric): measured, no bound set by the issue
    ("fwd+bwd time ours / open_clip", "ours", "open_clip", "time"),
    ("fwd+bwd time chunked / open_clip", "chunked", "open_clip", "time"),
    ("fwd+bwd peak CUDA memory ours / open_clip", "ours", "open_clip", "memory"),
    ("CPU peak RSS chunked / open_clip", "chunked", "open_clip", "peak_rss"),
)


def ratios_report(rows: Sequence[dict]) -> list[str]:
    """Per ratio of :data:`RATIOS` and per (N, dtype, shape) where both rows exist: the ratio of their medians, or
    why it is missing (``- CPU peak RSS chunked / open_clip at N=32768 float32: 0.01``)."""
    lines = []
    for what, num, den, metric in RATIOS:
        points = dict.fromkeys((r["x_value"], r["dtype"], r["shape"]) for r in rows
                               if r["metric"] == metric and r["mode"] == "fwd+bwd")  # fmt: skip
        for x, dtype, shape in points:
            pick = [suite.find(rows, provider=p, metric=metric, mode="fwd+bwd", x_value=x, dtype=dtype, shape=shape)
                    for p in (num, den)]  # fmt: skip
            if not any(suite.is_ok(r) for r in pick):  # neither measured here (e.g. CUDA memory on a CPU)
                continue
            head = f"- {what} at N={x} {dtype}:"
            bad = [f"{r['provider']} {r['status']}: {r['note'][:100]}" if r else "a row is missing" for r in pick
                   if not suite.is_ok(r)]  # fmt: skip
            ratio = None if bad else float(pick[0]["p50"]) / float(pick[1]["p50"])
            lines.append(f"{head} not measured ({', '.join(bad)})" if bad else f"{head} {ratio:.4g}")
    return lines


SUMMARY_TABLES = (
    ("time", "fwd", "fwd time (median ms; speedup vs {})", "baseline/value"),
    ("time", "fwd+bwd", "fwd+bwd time (median ms; speedup vs {})", "baseline/value"),
    ("memory", "fwd+bwd", "fwd+bwd peak CUDA memory (MB; fraction of {})", "value/baseline"),
    ("peak_rss", "fwd+bwd", "fwd+bwd peak RSS increase, fresh process (MB; fraction of {})", "value/baseline"),
    ("max_abs_err", "fwd", "|loss - float64 loss|", None),
    ("max_abs_err", "fwd+bwd", "max |gradient - float64 gradient| over a and b", None),
)


def markdown_summary(rows: Sequence[dict], baseline: str = BASELINE) -> str:
    """Time per mode (median ms, speedup vs ``baseline``), peak memory, errors, the ratios to open_clip."""
    from benchmarks.plot import markdown_table

    parts = [markdown_table(rows, m, mode, baseline, rel, title.format(baseline))
             for m, mode, title, rel in SUMMARY_TABLES]  # fmt: skip
    parts.append(suite.section("**Ratios to open_clip** (measured)", ratios_report(rows)))
    parts.append(suite.section("**Largest N** (the sizes of this run)", bc.largest_n_report(rows)))
    return suite.join(parts)


def _parse(argv):
    p = suite.parser("benchmarks.bench_siglip", __doc__)
    suite.add_output(p, "benchmarks/results/siglip-<device>.csv (--rss: siglip-cpu-rss.csv)")
    p.add_argument("--providers", default=None, help=f"comma-separated subset of {','.join(PROVIDERS)} (default: all;"
                   " --rss: open_clip,chunked)")  # fmt: skip
    p.add_argument("--modes", default="fwd,fwd+bwd", help="comma-separated: fwd, fwd+bwd")
    p.add_argument("--sizes", default=None, help="comma-separated N; default: 1024..262144 (x2) on CUDA, "
                   "1024,2048,4096 on the CPU, 32768 with --rss")  # fmt: skip
    p.add_argument("--dim", type=int, default=None, help="feature dim d; default: 512 on CUDA, 256 on the CPU")
    suite.add_device(p, suite.DTYPES)
    suite.add_timing(p, reps=5, warmup=1)
    p.add_argument("--no-check", action="store_true", help="skip the float64 reference and the max_abs_err rows")
    suite.add_rss(p, rss_mode=True)
    suite.add_interpret(p, "ours")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> list[dict]:
    """Run the benchmark from command-line arguments; print progress and the summary; return the rows written."""
    args = _parse(argv)
    if args.rss_child:
        _rss_child(args)
        return []
    rss_mode = args.rss
    device = torch.device("cpu") if rss_mode else suite.resolve_device(args.device)
    cpu = device.type == "cpu"
    suite.use_interpreter(device, args.interpret_ok)  # before lfvila_kernels (and so triton.jit) is imported
    names = suite.pick(args.providers, PROVIDERS, "providers", ["open_clip", "chunked"] if rss_mode else None)
    modes = suite.pick(args.modes, MODES, "modes")
    default_sizes = (RSS_SIZE,) if rss_mode else CPU_SIZES if cpu else CUDA_SIZES
    sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else list(default_sizes)
    dim = args.dim or (256 if cpu else 512)
    dtype = suite.DTYPES[args.dtype or ("fp32" if cpu else "bf16")]
    session = suite.start(args, device, f"benchmarks/results/siglip-{'cpu-rss' if rss_mode else device.type}.csv")
    providers = {n: PROVIDERS[n] for n in names}
    print(f"# N={sizes} d={dim} dtype {dtype}, providers {names}" + ("" if rss_mode else f", modes {modes}")
          + f" -> {session.out}", flush=True)  # fmt: skip
    if rss_mode:
        rows = run_rss(sizes, dim, providers, dtype, session.writer, suite.rss_options(args), log=harness.log)
    else:
        rows = run(sizes, dim, providers, modes, dtype, device, session.writer, suite.timing(args),
                   check=not args.no_check, rss=cpu and not args.no_rss, rss_opts=suite.rss_options(args),
                   log=harness.log)  # fmt: skip
    return session.finish(rows, markdown_summary(rows))


if __name__ == "__main__":
    main()
