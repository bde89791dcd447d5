"""Benchmark symmetric InfoNCE (contrastive loss) providers against the batch size N; append rows to a CSV.

    python -m benchmarks.bench_contrastive --label h200-main             # CUDA: N = 1k ... 256k, d = 512, bf16
    python -m benchmarks.bench_contrastive --label cpu-reduced           # CPU: N = 1k, 2k, 4k, d = 256, fp32
    python -m benchmarks.bench_contrastive --rss --label cpu-rss         # CPU: peak RSS at N = 32768, d = 256

Providers: ``benchmarks.contrastive_variants.PROVIDERS``. The loss, modes, rows, metrics, the peak-RSS method and
the targets: benchmarks/README.md, section "Suites", "contrastive".
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from benchmarks import harness, suite
from benchmarks.contrastive_variants import PROVIDERS, SCALE, TEMPERATURE, Forward, Provider

KERNEL = "contrastive_loss"
BASELINE = "naive"
MODES = ("fwd", "fwd+bwd")
CUDA_SIZES = tuple(1024 * 2**k for k in range(9))  # 1k ... 256k
CPU_SIZES = (1024, 2048, 4096)
RSS_SIZE, RSS_DIM = 32768, 256


# --------------------------------------------------------------------------------------------------- inputs, reference
def make_inputs(n: int, dim: int, dtype: torch.dtype, device, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """a, b ``(n, dim)`` of ``dtype`` on ``device``, rows L2-normalised (in fp32, then cast), b = normalise(a + noise),
    so that each positive pair has cosine ~0.7 and the negatives ~0; generated on the CPU from ``seed``."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    a = F.normalize(torch.randn(n, dim, generator=gen), dim=-1)
    b = F.normalize(a + torch.randn(n, dim, generator=gen) / dim**0.5, dim=-1)
    return a.to(device=device, dtype=dtype), b.to(device=device, dtype=dtype)


def reference_loss_and_grads(a, b, scale: float = SCALE, block_elems: int = 2**26):
    """The symmetric InfoNCE of a, b ``(N, d)`` and its gradients, in float64, blocked over rows (no N x N tensor).

    With ``L = s a b^T`` (s = ``scale``), row and column log-sum-exps ``r_i``, ``c_j`` and positives ``p_i = L_ii``:
    ``loss = (mean_i (r_i - p_i) + mean_j (c_j - p_j)) / 2``; ``dloss/dL = (softmax_rows(L) - I + softmax_cols(L) - I)
    / (2N)``, ``da = s dL b``, ``db = s dL^T a``. Blocks of ``block_elems // N`` rows bound the memory to a few
    ``block_elems`` float64 values. Returns ``(loss 0-dim, da (N, d), db (N, d))``, all float64.
    """
    a, b = a.detach().double(), b.detach().double()
    n = a.shape[0]
    rows = max(1, block_elems // n)
    blocks = [(i, min(i + rows, n)) for i in range(0, n, rows)]
    lse_r = torch.cat([torch.logsumexp((a[i:j] @ b.t()) * scale, dim=1) for i, j in blocks])  # (N,)
    lse_c = torch.cat([torch.logsumexp((b[i:j] @ a.t()) * scale, dim=1) for i, j in blocks])  # (N,) columns of L
    pos = (a * b).sum(-1) * scale
    loss = 0.5 * ((lse_r - pos).mean() + (lse_c - pos).mean())
    da, db = torch.empty_like(a), torch.zeros_like(b)
    for i, j in blocks:
        logits = (a[i:j] @ b.t()) * scale  # (rows, N)
        g = torch.exp(logits - lse_r[i:j, None]) + torch.exp(logits - lse_c[None, :])
        g[torch.arange(j - i), torch.arange(i, j)] -= 2.0
        g /= 2 * n
        da[i:j] = (g @ b) * scale
        db += (g.t() @ a[i:j]) * scale
    return loss, da, db


def loss_flops(n: int, dim: int, mode: str) -> float:
    """Useful FLOPs of one call: ``2 N^2 d`` for the logits product; fwd+bwd adds da and db (3x in all).
    Recomputed logits, a second logits product (open_clip), softmax and exp are not counted."""
    fwd = 2.0 * n * n * dim
    return fwd if mode == "fwd" else 3.0 * fwd


# --------------------------------------------------------------------------------------------------- measuring
def _make_step(provider: Provider, a, b, mode: str) -> Forward:
    forward = provider.make(a, b)
    if mode == "fwd":
        return forward

    def step():
        loss = forward()
        loss.backward()
        return loss

    return step


def _measure_one(provider, n, dim, mode, inputs, reference, device, timing) -> dict[str, suite.Cell]:
    """Check and time one (provider, N, mode); return metric -> cell. Raises what the provider raises."""
    a = inputs[0].detach().clone().requires_grad_(True)
    b = inputs[1].detach().clone().requires_grad_(True)
    step = _make_step(provider, a, b, mode)
    cells: dict[str, suite.Cell] = {}
    first = step()  # compiles / autotunes where the provider does; checked against the float64 reference
    if reference is None:
        cells["max_abs_err"] = ("skipped", None, "no float64 reference (--no-check)")
    elif isinstance(reference, str):
        cells["max_abs_err"] = ("failed", None, f"float64 reference failed: {reference}")
    elif mode == "fwd":
        err = abs(first.double().item() - reference[0].item())
        cells["max_abs_err"] = ("ok", suite.once(err), f"|loss - float64 loss|, loss = {reference[0].item():.6g}")
    else:
        err = max(
            (g.double() - r.to(g.device)).abs().max().item()
            for g, r in ((a.grad, reference[1]), (b.grad, reference[2]))
        )
        top = max(reference[1].abs().max().item(), reference[2].abs().max().item())
        cells["max_abs_err"] = ("ok", suite.once(err), f"max |grad - float64 grad| over a and b; max |grad| = "
                                f"{top:.3g}")  # fmt: skip
    del first
    t = harness.measure(step, device=device, grad_to_none=[a, b], **timing)
    cells["time"] = ("ok", t, "")
    cells["tflops"] = ("ok", suite.per_second(t, loss_flops(n, dim, mode), 1e12), "")
    a.grad = b.grad = None  # the last timed call's gradients would otherwise count in the baseline
    mem = harness.peak_memory(step, device)
    if mem is None:
        cells["memory"] = ("skipped", None, "peak memory is measured on CUDA only (CPU: the peak_rss rows)")
    else:
        cells["memory"] = ("ok", suite.once(mem), "")
    return cells


def measure_rss(name: str, n: int, dim: int, dtype_name: str, max_mb: float | None = None, timeout: float = 3600.0):
    """Peak RSS increase (MB) of one CPU forward+backward of provider ``name`` at ``(n, dim)``, in a fresh process
    (which inherits this one's environment, TRITON_INTERPRET included): :func:`benchmarks.suite.measure_rss`."""
    argv = ["--sizes", str(n), "--dim", str(dim), "--dtype", dtype_name]
    return suite.measure_rss("benchmarks.bench_contrastive", name, argv, max_mb, timeout)


def _rss_child(args) -> None:
    """The child of :func:`measure_rss`: report one measurement (or the error) to the parent on stdout."""

    def prepare():
        provider = PROVIDERS[args.rss_child]
        dtype, cpu = suite.DTYPES[args.dtype or "fp32"], torch.device("cpu")
        refusal = provider.refusal(cpu, dtype) if provider.refusal else None
        if refusal:
            raise RuntimeError(refusal)
        n, dim = int(args.sizes.split(",")[0]), args.dim or RSS_DIM
        warm = [t.requires_grad_(True) for t in make_inputs(64, dim, dtype, cpu, seed=1)]
        _make_step(provider, *warm, "fwd+bwd")()  # lazy initialisation lands in the baseline, not in the peak
        a, b = (t.requires_grad_(True) for t in make_inputs(n, dim, dtype, cpu))
        return _make_step(provider, a, b, "fwd+bwd")

    harness.rss_child(prepare, args.rss_max_mb)


def _rss_cell(name, n, dim, dtype, rss_opts, log) -> suite.Cell:
    def note(result):
        return f"{suite.rss_note(result)}; one fwd+bwd took {result['seconds']:.1f} s"

    measure = functools.partial(measure_rss, name, n, dim, suite.dtype_flag(dtype), **rss_opts)
    return suite.rss_cell(measure, note, f"N={n:<7d} {name:10s}", log)


# --------------------------------------------------------------------------------------------------- running
def _grid(dim: int, dtype: torch.dtype, metrics) -> suite.Grid:
    return suite.Grid(KERNEL, suite.dtype_name(dtype), metrics,
                      lambda n: ("N", str(n), f"N={n} M={n} d={dim} temperature={TEMPERATURE}"), lambda n: f"N={n}")


def run(
    sizes: Sequence[int],
    dim: int,
    providers: dict[str, Provider],
    modes: Sequence[str],
    dtype: torch.dtype,
    device: torch.device | str,
    writer: harness.ResultWriter,
    timing: dict | None = None,
    check: bool = True,
    rss: bool = False,
    rss_opts: dict | None = None,
    log=print,
) -> list[dict]:
    """Benchmark every (N, provider, mode) (:func:`benchmarks.suite.run_grid`); append its rows to ``writer`` as soon
    as they exist; return all rows. After an out-of-memory failure at some N, a provider is skipped at every larger N.

    ``timing``: keyword arguments of :func:`benchmarks.harness.measure`. ``check``: compute the float64 reference
    once per N and record ``max_abs_err``. ``rss`` (CPU): a ``peak_rss`` row per (provider, N) for fwd+bwd, measured
    by :func:`measure_rss` (``rss_opts``: its keyword arguments), only for providers that ran in this process.
    """
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
        cells = _measure_one(provider, n, dim, mode, *state, device, timing)
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

    def describe(cells):  # the progress line: the increase, or why there is none
        status, values, note = cells["peak_rss"]
        return f"peak_rss {values['p50']:10.1f} MB" if status == "ok" else f"peak_rss {status}: {note}"

    grid = _grid(dim, dtype, lambda mode: [("peak_rss", "MB")])
    return suite.run_grid(grid, sorted(sizes), providers, ["fwd+bwd"], measure, writer,
                          refusal=suite.provider_refusal("cpu", dtype), describe=describe, log=log)  # fmt: skip


# --------------------------------------------------------------------------------------------------- summary
def _pick(rows, provider, metric, n, dtype=None, dim=None):
    for r in rows:
        if (r["provider"], r["metric"], r["mode"], r["x_value"]) != (provider, metric, "fwd+bwd", str(n)):
            continue
        if (dtype is None or r["dtype"] == dtype) and (dim is None or f" d={dim} " in r["shape"]):
            return r
    return None


# The ratio targets: (what, numerator (provider, metric), denominator, N, dtype, d, bound, "<=" or ">=").
RATIO_TARGETS = (
    ("CPU peak RSS chunked / naive", ("chunked", "peak_rss"), ("naive", "peak_rss"), RSS_SIZE, "float32", RSS_DIM,
     1 / 8, "<="),
    ("fwd+bwd time ours / naive", ("ours", "time"), ("naive", "time"), 32768, "bfloat16", 512, 1.0, "<="),
    ("fwd+bwd time Inf-CL / ours", ("inf-cl", "time"), ("ours", "time"), 32768, "bfloat16", 512, 2.0, ">="),
    ("fwd+bwd peak memory ours / naive", ("ours", "memory"), ("naive", "memory"), 32768, "bfloat16", 512, 1 / 50,
     "<="),
)  # fmt: skip


def target_heads(include_cpu: bool = True) -> list[str]:
    """The first words of each target line of :func:`targets_report` (after ``"- "``), in report order: how a
    session summary finds a target's verdict. ``include_cpu=False`` leaves out the CPU peak-RSS target."""
    heads = [f"{what} at N={n}, d={dim}, {dtype}" for what, _, _, n, dtype, dim, _, _ in RATIO_TARGETS
             if include_cpu or not what.startswith("CPU")]  # fmt: skip
    return heads + [f"N={CUDA_SIZES[-1]} (target: ours runs where naive runs out of memory)"]


def targets_report(rows: Sequence[dict]) -> list[str]:
    """The issue's targets, evaluated from whichever of the needed rows exist (reported, never asserted)."""
    lines = []
    for what, num, den, n, dtype, dim, bound, sign in RATIO_TARGETS:
        pair = [_pick(rows, provider, metric, n, dtype, dim) for provider, metric in (num, den)]
        if not any(pair):
            continue
        head = f"- {what} at N={n}, d={dim}, {dtype} (target {sign} {bound:.4g}):"
        bad = [r for r in pair if r is None or r["status"] != "ok"]
        if bad:
            why = ", ".join("a row is missing" if r is None else f"{r['provider']} {r['status']}: {r['note'][:120]}"
                            for r in bad)  # fmt: skip
            lines.append(f"{head} not measured ({why})")
            continue
        ratio = float(pair[0]["p50"]) / float(pair[1]["p50"])
        met = suite.meets(ratio, sign, bound)
        lines.append(f"{head} {ratio:.4g}, {'met' if met else 'NOT met'}")
    big = CUDA_SIZES[-1]
    ours, naive = _pick(rows, "ours", "time", big), _pick(rows, "naive", "time", big)
    if ours or naive:
        ours_ok = ours is not None and ours["status"] == "ok"
        naive_oom = naive is not None and naive["status"] != "ok" and suite.is_oom(naive["note"])
        lines.append(
            f"- N={big} (target: ours runs where naive runs out of memory): ours "
            f"{ours['status'] if ours else 'not run'}, naive {naive['status'] if naive else 'not run'}"
            f"{' (out of memory)' if naive_oom else ''}: {'met' if ours_ok and naive_oom else 'NOT met'}"
        )
    return lines


def largest_n_report(rows: Sequence[dict]) -> list[str]:
    """Per provider with fwd+bwd ``time`` rows: the largest N it ran at, and the smallest N where it did not run (why:
    the note's first words), e.g. ``- largest N, fwd+bwd: naive 65536 (131072 failed: OutOfMemoryError: ...)``."""
    lines = []
    for provider in dict.fromkeys(r["provider"] for r in rows):
        mine = [r for r in rows if r["provider"] == provider and r["metric"] == "time" and r["mode"] == "fwd+bwd"]
        if not mine:
            continue
        ran = [int(r["x_value"]) for r in mine if r["status"] == "ok"]
        best = max(ran) if ran else None
        above = [r for r in mine if r["status"] != "ok" and (best is None or int(r["x_value"]) > best)]
        text = f"- largest N, fwd+bwd: {provider} {best if best is not None else 'none'}"
        if above:
            r = min(above, key=lambda r: int(r["x_value"]))
            text += f" ({r['x_value']} {r['status']}: {r['note'][:100]})"
        lines.append(text)
    return lines


SUMMARY_TABLES = (  # (metric, mode, title, relation to the baseline in parentheses)
    ("time", "fwd", "fwd time (median ms; speedup vs {})", "baseline/value"),
    ("time", "fwd+bwd", "fwd+bwd time (median ms; speedup vs {})", "baseline/value"),
    ("memory", "fwd+bwd", "fwd+bwd peak CUDA memory (MB; fraction of {})", "value/baseline"),
    ("peak_rss", "fwd+bwd", "fwd+bwd peak RSS increase, fresh process (MB; fraction of {})", "value/baseline"),
    ("max_abs_err", "fwd", "|loss - float64 loss|", None),
    ("max_abs_err", "fwd+bwd", "max |gradient - float64 gradient| over a and b", None),
)


def markdown_summary(rows: Sequence[dict], baseline: str = BASELINE) -> str:
    """Time per mode (median ms, speedup vs ``baseline``), peak memory, errors, and the targets that apply."""
    from benchmarks.plot import markdown_table

    parts = [markdown_table(rows, m, mode, baseline, rel, title.format(baseline))
             for m, mode, title, rel in SUMMARY_TABLES]  # fmt: skip
    parts.append(suite.section(suite.TARGETS_TITLE, targets_report(rows)))
    parts.append(suite.section("**Largest N** (the sizes of this run)", largest_n_report(rows)))
    return suite.join(parts)


# --------------------------------------------------------------------------------------------------- CLI
def _parse(argv):
    p = suite.parser("benchmarks.bench_contrastive", __doc__)
    suite.add_output(p, "benchmarks/results/contrastive-<device>.csv (--rss: contrastive-cpu-rss.csv)")
    p.add_argument("--providers", default=None, help=f"comma-separated subset of {','.join(PROVIDERS)} (default: all;"
                   " --rss: naive,chunked)")  # fmt: skip
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

    names = suite.pick(args.providers, PROVIDERS, "providers", ["naive", "chunked"] if rss_mode else None)
    modes = suite.pick(args.modes, MODES, "modes")
    default_sizes = (RSS_SIZE,) if rss_mode else CPU_SIZES if cpu else CUDA_SIZES
    sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else list(default_sizes)
    dim = args.dim or (256 if cpu else 512)
    dtype = suite.DTYPES[args.dtype or ("fp32" if cpu else "bf16")]
    session = suite.start(args, device, f"benchmarks/results/contrastive-{'cpu-rss' if rss_mode else device.type}.csv")
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
