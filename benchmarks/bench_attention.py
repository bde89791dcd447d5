"""Benchmark 3D shifted-window attention providers on named shape sets; append rows to a CSV.

    python -m benchmarks.bench_attention --shapes lfvila --label h200-main             # CUDA: full sizes, bf16
    python -m benchmarks.bench_attention --shapes long-form --label cpu-reduced        # CPU: reduced sizes, fp32
    python -m benchmarks.bench_attention --providers window-attention-triton,videoswin-eager --modes fwd --dtype fp16 \
        --out benchmarks/results/_scratch/attention.csv --label try

Providers: ``benchmarks/attention_variants.py``; shape sets: ``benchmarks/attention_shapes.py``. Modes, rows,
metrics, shape sets and method: benchmarks/README.md, section "Suites", "attention".
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from benchmarks import harness, suite
from benchmarks.attention_shapes import SHAPE_SETS, Case

KERNEL = "window_attention"
METRICS = (
    ("time", "ms"),
    ("tflops", "TFLOP/s"),
    ("memory", "MB"),
    ("max_abs_err", "abs"),
    ("bias_grad_deterministic", "bool"),
    ("compile_time", "s"),
)
MODES = ("fwd", "bwd", "fwd+bwd")
MODE_FLOPS = {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}  # multiples of the forward (flash-attention's convention)
BASELINE = "videoswin-eager"


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


def pairs_per_sample_head(case: Case, computes: str = "window_attention") -> int:
    """(query, key) pairs that the function ``computes`` attends, per sample and head.

    ``window_attention`` and ``windows-no-bias``: the allowed pairs of the benchmarked windowed problem (the no-bias
    speed references do the same useful work, so their TFLOP/s compares time on an equal footing); ``neighborhood``:
    every query attends ``wt*wh*ww`` keys; ``full``: every query attends every token of its sample.
    """
    if computes in ("window_attention", "windows-no-bias"):
        return count_allowed_pairs(case.grid, case.window, case.shift)
    if computes == "neighborhood":
        return case.tokens * case.window[0] * case.window[1] * case.window[2]
    if computes == "full":
        return case.tokens**2
    raise ValueError(f"unknown function {computes!r}")


def attention_flops(case: Case, mode: str, computes: str = "window_attention") -> float:
    """FLOPs of one call, flash-attention's convention, counting only attended (unmasked) pairs.

    Forward: ``4 * head_dim`` per pair per (sample, head): ``QK^T`` and ``PV``, 2 FLOPs per multiply-add each.
    ``bwd``: 2.5x the forward (recomputed ``QK^T`` plus ``dV``, ``dP``, ``dQ``, ``dK``); ``fwd+bwd``: 3.5x.
    Softmax, bias, masking and the bias-table gradient are not counted. Providers that compute masked or padded
    pairs do that work for free in this count, so TFLOP/s compares useful work per second.
    """
    if mode not in MODE_FLOPS:
        raise ValueError(f"unknown mode {mode!r}")
    return MODE_FLOPS[mode] * 4.0 * case.head_dim * pairs_per_sample_head(case, computes) * case.batch * case.heads


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


def _full_attention_float64(q, k, v, scale: float, max_scores: int = 2**25) -> torch.Tensor:
    """Explicit softmax attention over all tokens of each sample in float64, in query chunks of at most
    ``max_scores`` scores: an oracle independent of SDPA. ``(B, T, H, W, heads, hd)`` in and out."""
    B, nh, hd = q.shape[0], q.shape[-2], q.shape[-1]

    def seq(x):  # (B, T, H, W, heads, hd) -> (B, heads, L, hd), float64
        return x.reshape(B, -1, nh, hd).transpose(1, 2).double()

    qs, ks, vs = seq(q), seq(k), seq(v)
    L = qs.shape[2]
    step = max(1, max_scores // (B * nh * L))
    out = torch.cat(
        [torch.softmax(qs[:, :, i : i + step] @ ks.transpose(-1, -2) * scale, dim=-1) @ vs for i in range(0, L, step)],
        dim=2,
    )  # (B, heads, L, hd)
    return out.transpose(1, 2).reshape(q.shape)


def reference_output(case: Case, computes: str, inputs) -> torch.Tensor | str:
    """The fp32 output of the function ``computes`` on these inputs, ``(B, T, H, W, heads, hd)``, or the reason there
    is none (a string): what ``max_abs_err`` is measured against."""

    from lfvila_kernels import window_attention_reference

    q, k, v, table, _ = (t.float() for t in inputs)
    scale = case.head_dim**-0.5
    with torch.no_grad():
        if computes == "window_attention":
            return window_attention_reference(q, k, v, case.window, case.shift, table, scale)
        if computes == "windows-no-bias":
            if any(n % w for n, w in zip(case.grid, case.window, strict=True)):
                return "the no-bias reference is defined on grids divisible by the window only"
            return window_attention_reference(q, k, v, case.window, (0, 0, 0), None, scale)
        if computes == "full":
            return _full_attention_float64(q, k, v, scale).float()
    return f"no reference for {computes} attention here (a speed reference computing another function)"


def metrics(mode: str) -> list[tuple[str, str]]:
    """The (metric, unit) rows of one (shape, provider, mode): the error in fwd only, the determinism in fwd+bwd."""
    only = {"max_abs_err": "fwd", "bias_grad_deterministic": "fwd+bwd"}
    return [(m, u) for m, u in METRICS if only.get(m, mode) == mode]


def _measure_one(variant, case, mode, inputs, reference, device, timing) -> dict[str, suite.Cell]:
    """Build, check and time one (provider, mode); return metric -> cell. Raises whatever the provider raises.

    ``reference``: the fp32 output of the provider's function, or the reason there is none.
    """
    from benchmarks.attention_variants import PrePartitioned

    q0, k0, v0, table0, grad_out = inputs
    grad = mode != "fwd"
    q, k, v = (t.detach().clone().requires_grad_(grad) for t in (q0, k0, v0))
    table = table0.detach().clone().requires_grad_(grad) if variant.bias else None
    if device.type == "cuda":  # the build's clock starts with no earlier work in flight
        torch.cuda.synchronize(device)
    built = time.perf_counter()
    forward = variant.make(q, k, v, case.window, case.shift, table, case.head_dim**-0.5)
    prepared = isinstance(forward, PrePartitioned)  # works on copies laid out in set-up: those get the gradients
    leaves = (list(forward.leaves) if prepared else [q, k, v]) + ([table] if table is not None else [])
    leaves = leaves if grad else []
    g = forward.from_tokens(grad_out) if prepared else grad_out

    if mode == "fwd":

        def step():
            with torch.no_grad():
                return forward()

    elif mode == "fwd+bwd":

        def step():
            out = forward()
            out.backward(g)
            return out

    else:  # bwd: the backward of one forward's graph, kept for every call
        graph_out = forward()

        def step():
            graph_out.backward(g, retain_graph=True)

    cells: dict[str, suite.Cell] = {}
    first = step()  # compiles / autotunes where the provider does; its output is checked in fwd mode
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    cells["compile_time"] = ("ok", suite.once(time.perf_counter() - built), "")
    if mode == "fwd":
        if isinstance(reference, torch.Tensor):
            got = forward.to_tokens(first) if prepared else first
            cells["max_abs_err"] = ("ok", suite.once((got.float() - reference).abs().max().item()), "")
        else:
            cells["max_abs_err"] = ("skipped", None, reference)
    del first
    t = harness.measure(step, device=device, grad_to_none=leaves, **timing)
    cells["time"] = ("ok", t, "")
    cells["tflops"] = ("ok", suite.per_second(t, attention_flops(case, mode, variant.computes), 1e12), "")

    if mode == "fwd+bwd":
        if table is None:
            cells["bias_grad_deterministic"] = ("skipped", None, "no relative-position bias in this provider")
        else:
            grads = []
            for _ in range(3):
                for leaf in leaves:
                    leaf.grad = None
                step()
                grads.append(table.grad.clone())
            same = float(all(torch.equal(grads[0], x) for x in grads[1:]))
            cells["bias_grad_deterministic"] = ("ok", suite.once(same), "")

    for leaf in leaves:  # the last call's gradients would otherwise count in the baseline, not the peak
        leaf.grad = None
    mem = harness.peak_memory(step, device)
    cells["memory"] = ("skipped", None, "peak memory is measured on CUDA only") if mem is None else \
        ("ok", suite.once(mem), "")  # fmt: skip
    return cells


def default_full_max_flops(device: torch.device) -> float:
    """FLOPs of one call above which full attention is skipped: 2e11 on the CPU (a few seconds per call on 2 cores),
    1e15 on CUDA (about a second at the H200's dense bf16 peak)."""
    return 1e15 if device.type == "cuda" else 2e11


def run(
    cases: Sequence[Case],
    variants: dict,
    modes: Sequence[str],
    dtype: torch.dtype,
    device: torch.device | str,
    writer: harness.ResultWriter,
    timing: dict | None = None,
    log=print,
    full_max_flops: float | None = None,
    compile_budget: float | None = None,
) -> list[dict]:
    """Benchmark every (case, provider, mode) (:func:`benchmarks.suite.run_grid`); append its rows to ``writer`` as
    soon as they exist; return all rows.

    ``variants``: provider name -> :class:`benchmarks.attention_variants.Variant`. ``timing``: keyword arguments of
    :func:`benchmarks.harness.measure` (``warmup``, ``reps``, ``warmup_ms``, ``rep_ms``). ``full_max_flops``: full
    attention is skipped (with the reason) where one call would exceed this many FLOPs (default
    :func:`default_full_max_flops`); it grows quadratically with T, so the long shapes would otherwise take hours.
    ``compile_budget``: seconds of compilation a provider with ``Variant.compiles`` may spend in this call (its
    ``compile_time`` values, or the whole wall time of a failed attempt); once over, its remaining (case, mode)s are
    skipped with the reason. None: no bound.
    """
    device = torch.device(device)
    timing = dict(timing or {})
    full_max_flops = default_full_max_flops(device) if full_max_flops is None else full_max_flops
    compiled_s: dict[str, float] = {}  # seconds of build + first call so far, per compiling provider

    def skip(case, provider, variant, mode):
        flops = attention_flops(case, mode, variant.computes)
        if variant.computes == "full" and flops > full_max_flops:
            return f"full attention: {flops:.3g} FLOPs per call exceeds the budget of {full_max_flops:.3g}"
        spent = compiled_s.get(provider, 0.0)
        if variant.compiles and compile_budget is not None and spent > compile_budget:
            return (f"compile budget: {provider} already spent {spent:.1f} s compiling in this run, over "
                    f"--compile-budget {compile_budget:g} s; not run for the remaining shapes")  # fmt: skip
        return None

    def setup(case):
        return make_inputs(case, dtype, device), {}  # the inputs; the references, made when first needed

    def measure(case, provider, variant, mode, state):
        inputs, references = state
        if mode == "fwd" and variant.computes not in references:
            references[variant.computes] = reference_output(case, variant.computes, inputs)
        started = time.perf_counter()
        try:
            cells = _measure_one(variant, case, mode, inputs, references.get(variant.computes), device, timing)
        except Exception:  # a failed attempt counts against the compile budget with its whole wall time
            if variant.compiles:
                compiled_s[provider] = compiled_s.get(provider, 0.0) + time.perf_counter() - started
            raise
        if variant.compiles:
            compiled_s[provider] = compiled_s.get(provider, 0.0) + cells["compile_time"][1]["p50"]
        return cells

    grid = suite.Grid(KERNEL, suite.dtype_name(dtype), metrics, lambda c: (c.x_name, c.name, c.describe()),
                      lambda c: c.name)  # fmt: skip
    return suite.run_grid(grid, cases, variants, modes, measure, writer, device=device,
                          refusal=suite.provider_refusal(device, dtype), skip=skip, setup=setup, log=log)  # fmt: skip


def markdown_summary(rows: Sequence[dict], baseline: str = BASELINE) -> str:
    """Per mode, a provider x shape table of median ms with the speed-up over ``baseline`` (its ms / this ms), peak
    memory where measured, and the issue's targets that these rows can answer (reported, not asserted)."""
    from benchmarks.plot import markdown_table

    parts = []
    for metric in ("time", "memory"):
        if any(r["metric"] == metric and r["status"] == "ok" for r in rows):
            parts += [markdown_table(rows, metric, mode, baseline) for mode in dict.fromkeys(r["mode"] for r in rows)]
    parts.append(suite.section(suite.TARGETS_TITLE, targets_report(rows)))
    parts.append(suite.section("**Build + first call** (compilation included)", compile_report(rows)))
    return suite.join(parts)


# The window-attention issue's targets for window-attention-triton, fwd+bwd on the lfvila set: at least this speed-up
# over each.
SPEEDUP_TARGETS = (("videoswin-eager", 3.0), ("sdpa-dense-bias", 2.0), ("flex", 1.5))
OURS = "window-attention-triton"
MEMORY_TARGET = ("videoswin-eager", 0.3)  # fwd+bwd peak memory of ours <= 0.3x eager's on every lfvila layer
TFLOPS_TARGET = (480, 200.0)  # forward >= 200 TFLOP/s on the layer whose windows hold 480 tokens (lfvila layer5)
LINEAR_MAX_EXPONENT = 1.2  # long-form: time ~ T^k with k at most this counts as linear growth


def target_heads() -> list[str]:
    """The first words of each target line of :func:`targets_report` (after ``"- "``), in report order: how a
    session summary finds a target's verdict, or knows that it was not run."""
    heads = [f"{OURS} fwd+bwd >= {target:g}x {other} on lfvila" for other, target in SPEEDUP_TARGETS]
    heads.append(f"{OURS} fwd+bwd peak memory <= {MEMORY_TARGET[1]:g}x {MEMORY_TARGET[0]} on lfvila")
    heads.append(f"{OURS} fwd >= {TFLOPS_TARGET[1]:g} TFLOP/s on the {TFLOPS_TARGET[0]}-token window layer")
    heads.append(f"long-form {OURS} fwd+bwd grows linearly in T")
    return heads


def _window_tokens(shape: str) -> int | None:
    """Tokens per window from a row's ``shape`` (``... window=32x3x5 ...`` -> 480), None if absent."""
    for part in shape.split():
        if part.startswith("window="):
            count = 1
            for w in part.removeprefix("window=").split("x"):
                count *= int(w)
            return count
    return None


def _growth_exponent(points: Sequence[tuple[float, float]]) -> float | None:
    """Least-squares slope of log(time) against log(T): 1 for linear growth, 2 for quadratic."""
    import math

    if len(points) < 2:
        return None
    xs = [math.log(t) for t, _ in points]
    ys = [math.log(ms) for _, ms in points]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / den if den else None


def _ok_values(rows: Sequence[dict], metric: str) -> dict[tuple[str, str, str, str], float]:
    return {(r["provider"], r["mode"], r["x_name"], r["x_value"]): float(r["p50"]) for r in rows
            if r["metric"] == metric and r["status"] == "ok" and r["p50"] != ""}  # fmt: skip


def targets_report(rows: Sequence[dict]) -> list[str]:
    """The issue's targets that these rows can answer (reported, never asserted): on ``layer`` rows (lfvila) the
    fwd+bwd speed-ups over eager Video-Swin, SDPA with a dense bias and FlexAttention, the fwd+bwd peak memory
    against eager's, and the forward TFLOP/s on the 480-token layer; on ``frames`` rows (long-form) the growth
    exponent in T of every provider, with a verdict (linear: k <= 1.2) for ours in fwd+bwd."""
    ok = _ok_values(rows, "time")
    heads = target_heads()
    lines = []
    layers = list(dict.fromkeys(r["x_value"] for r in rows if r["x_name"] == "layer"))
    for head, (other, target) in zip(heads, SPEEDUP_TARGETS):
        ratios = [ok[(other, "fwd+bwd", "layer", x)] / ok[(OURS, "fwd+bwd", "layer", x)] for x in layers
                  if (other, "fwd+bwd", "layer", x) in ok and (OURS, "fwd+bwd", "layer", x) in ok]  # fmt: skip
        if layers and not ratios:
            lines.append(f"- {head}: not measured here (needs ok rows of both)")
        elif ratios:
            low = min(ratios)
            verdict = "met" if low >= target else "not met"
            lines.append(f"- {head}: {low:.2f}x to {max(ratios):.2f}x over {len(ratios)} layers ({verdict})")
    if layers:
        mem = _ok_values(rows, "memory")
        other, bound = MEMORY_TARGET
        pairs = [(mem.get((OURS, "fwd+bwd", "layer", x)), mem.get((other, "fwd+bwd", "layer", x))) for x in layers]
        fractions = [ours / base for ours, base in pairs if ours is not None and base]
        if fractions:
            verdict = "met" if max(fractions) <= bound else "not met"
            lines.append(f"- {heads[3]}: {min(fractions):.3g}x to {max(fractions):.3g}x over {len(fractions)} layers "
                         f"(activations and the q, k, v, table gradients; {verdict})")  # fmt: skip
        else:
            lines.append(f"- {heads[3]}: not measured here (needs ok fwd+bwd memory rows of both; CUDA only)")
        tokens, floor = TFLOPS_TARGET
        wanted = {r["x_value"] for r in rows if r["x_name"] == "layer" and _window_tokens(r.get("shape", "")) == tokens}
        tf = [v for (p, m, xn, x), v in _ok_values(rows, "tflops").items()
              if p == OURS and m == "fwd" and xn == "layer" and x in wanted]  # fmt: skip
        if tf:
            lines.append(f"- {heads[4]}: {max(tf):.4g} TFLOP/s ({'met' if max(tf) >= floor else 'not met'})")
        else:
            why = "needs an ok fwd row of it" if wanted else f"no layer with {tokens}-token windows in these rows"
            lines.append(f"- {heads[4]}: not measured here ({why})")
    if any(r["x_name"] == "frames" for r in rows):
        for provider in dict.fromkeys(r["provider"] for r in rows if r["x_name"] == "frames"):
            for mode in ("fwd", "fwd+bwd"):
                pts = sorted((float(x), ms) for (p, m, xn, x), ms in ok.items()
                             if p == provider and m == mode and xn == "frames")  # fmt: skip
                k = _growth_exponent(pts)
                if k is None:
                    continue
                growth = (f"time ~ T^{k:.2f} over T = {', '.join(f'{t:g}' for t, _ in pts)} "
                          "(1 = linear, 2 = quadratic)")  # fmt: skip
                if provider == OURS and mode == "fwd+bwd":
                    verdict = "met" if k <= LINEAR_MAX_EXPONENT else "not met"
                    lines.append(f"- {heads[5]}: {growth}; target k <= {LINEAR_MAX_EXPONENT:g} ({verdict})")
                else:
                    lines.append(f"- long-form {provider} {mode}: {growth}")
        if not any(line.startswith(f"- {heads[5]}") for line in lines):
            lines.append(f"- {heads[5]}: not measured here (needs ok fwd+bwd rows of {OURS} at two T or more)")
    return lines


def compile_report(rows: Sequence[dict]) -> list[str]:
    """Per provider with ``compile_time`` rows: the seconds spent building and first-calling it, in total and at
    most per (shape, mode), and how many (shape, mode)s the compile budget skipped."""
    lines = []
    for provider in dict.fromkeys(r["provider"] for r in rows if r["metric"] == "compile_time"):
        mine = [r for r in rows if r["provider"] == provider and r["metric"] == "compile_time"]
        took = [float(r["p50"]) for r in mine if r["status"] == "ok" and r["p50"] != ""]
        over = sum(r["status"] == "skipped" and r["note"].startswith("compile budget") for r in mine)
        if not took and not over:
            continue
        text = f"- {provider} compile time: {sum(took):.1f} s over {len(took)} (shape, mode)s"
        text += f", at most {max(took):.1f} s" if took else ""
        lines.append(text + (f"; {over} skipped by the compile budget" if over else ""))
    return lines


# --------------------------------------------------------------------------------------------------- CLI
def _parse(argv):
    p = suite.parser("benchmarks.bench_attention", __doc__)
    p.add_argument("--shapes", default="lfvila", choices=list(SHAPE_SETS))
    suite.add_output(p, "benchmarks/results/attention-<cpu|cuda>.csv")
    p.add_argument("--providers", default=None, help="comma-separated subset of the providers (default: all but "
                   "full-sdpa, which the long-form set adds)")  # fmt: skip
    p.add_argument("--provider", action="append", default=[], metavar="[NAME=]MODULE:ATTR",
                   help="your own provider, loaded from MODULE (attention_variants.load_provider; repeatable): run "
                        "with the others, or alone with --providers NAME")  # fmt: skip
    p.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of " + ",".join(MODES))
    suite.add_device(p, suite.DTYPES)
    p.add_argument("--cases", default=None, help="comma-separated subset of the set's shapes by x value (e.g. "
                   "layer0,layer5 or 32,64); default: all")  # fmt: skip
    p.add_argument("--batch", type=int, default=None, help="batch of every shape (default: the set's)")
    p.add_argument("--frames", type=int, default=None, help="T of every shape (default: the set's)")
    p.add_argument("--full", action="store_true", help="on the CPU too, use the real sizes")
    p.add_argument("--full-max-flops", type=float, default=None, help="skip full attention above this many FLOPs "
                   "per call (default: 2e11 on the CPU, 1e15 on CUDA)")  # fmt: skip
    p.add_argument("--compile-budget", type=float, default=None, metavar="S", help="seconds a compiling provider "
                   "(flex) may spend compiling in this run before its remaining shapes are skipped (default: no "
                   "bound)")  # fmt: skip
    suite.add_timing(p, reps=10, warmup=2, cpu_budget_ms=3000.0)
    suite.add_interpret(p, "window-attention-triton")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> list[dict]:
    """Run the benchmark from command-line arguments; print progress and the summary; return the rows written."""
    args = _parse(argv)
    device = suite.resolve_device(args.device)
    cpu = device.type == "cpu"
    suite.use_interpreter(device, args.interpret_ok)  # before the kernels' module (and so triton.jit) is imported

    from benchmarks.attention_variants import DEFAULT_PROVIDERS, VARIANTS, load_provider

    shape_set = SHAPE_SETS[args.shapes]
    variants = dict(VARIANTS)
    for spec in args.provider:
        name, variant = load_provider(spec, taken=variants)
        variants[name] = variant
    own = [n for n in variants if n not in VARIANTS]
    default = list(DEFAULT_PROVIDERS) + [n for n in shape_set.extra_providers if n not in DEFAULT_PROVIDERS] + own
    names = suite.pick(args.providers, variants, "providers", default)
    modes = suite.pick(args.modes, MODES, "modes")
    for name in ("batch", "frames"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise SystemExit(f"--{name} must be >= 1, got {getattr(args, name)}")
    reduced = cpu and not args.full
    dtype = suite.DTYPES[args.dtype or ("fp32" if cpu else "bf16")]
    cases = (shape_set.reduced if reduced else shape_set.full)(args.batch, args.frames)
    if args.cases:
        wanted = args.cases.split(",")
        unknown = [c for c in wanted if c not in {case.name for case in cases}]
        if unknown:
            raise SystemExit(f"--cases: {unknown} not in the {args.shapes} set; choose from {[c.name for c in cases]}")
        cases = [case for case in cases if case.name in wanted]
    if args.compile_budget is not None and args.compile_budget < 0:
        raise SystemExit(f"--compile-budget must be >= 0, got {args.compile_budget}")
    session = suite.start(args, device, f"benchmarks/results/attention-{device.type}.csv")
    print(f"# {args.shapes}: {len(cases)} shapes, dtype {dtype}, providers {names}, modes {modes} -> {session.out}",
          flush=True)  # fmt: skip
    rows = run(cases, {n: variants[n] for n in names}, modes, dtype, device, session.writer, suite.timing(args),
               log=harness.log, full_max_flops=args.full_max_flops, compile_budget=args.compile_budget)  # fmt: skip
    return session.finish(rows, markdown_summary(rows))


if __name__ == "__main__":
    main()
