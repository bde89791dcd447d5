"""The skeleton of every ``benchmarks/bench_*.py``: command line, the run over (problem, provider, mode), rows from
measured cells, the fresh-process peak-RSS protocol, the pieces of the markdown summary.

A benchmark keeps what is its own: its problems, its providers (``<op>_variants.py`` where there are several), how one
(problem, provider, mode) is measured, its metrics, targets and summary. What every benchmark does the same way is
here, on top of :mod:`benchmarks.harness` (timing, memory, the CSV writer):

- **Cells.** ``measure`` returns, per metric, a cell ``(status, values, note)``: ``("ok", {"p50", "p20", "p80"},
  remark)``, or ``("skipped" | "failed", None, why)``. :func:`cell_rows` turns the cells of one point into its rows
  (a metric without a cell is ``skipped``, "not measured"); :func:`once`, :func:`quantiles` and :func:`per_second`
  make the values.
- **The run.** :func:`run_grid` goes over problems x providers x modes: a provider refused here (``refusal``), one that
  ran out of memory at a smaller problem (``oom_skip``) or a point a benchmark's own rule leaves out (``skip``) gives
  ``skipped`` rows with the reason; a ``measure`` that raises gives ``failed`` rows with the exception text and the run
  goes on; rows are appended to the CSV as soon as they exist. :class:`Grid` says what the rows of a benchmark share.
- **The command line.** :func:`parser` and the ``add_*`` groups give every benchmark the same flags with the same
  meaning (``--label``, ``--out``, ``--markdown``, ``--device``, ``--dtype``, ``--reps``/``--warmup``/``--rep-ms``/
  ``--warmup-ms``/``--cpu-budget-ms``, ``--interpret-ok``, ``--rss``/``--no-rss``/``--rss-max-mb``/``--rss-timeout``
  and the internal ``--rss-child``); :func:`resolve_device` and :func:`use_interpreter` act on them, :func:`start`
  opens the CSV and prints the run's header, :meth:`Session.finish` prints and writes the summary.
- **Peak RSS** (CPU, one fresh process per measurement): the parent calls :func:`measure_rss` (``python -m MODULE
  --rss-child PROVIDER ...``) through :func:`rss_cell`; the child, in the benchmark's ``main``, builds the step and
  hands it to :func:`benchmarks.harness.rss_child`, which reports to the parent.
- **Summary.** :func:`section` and :func:`join` assemble the markdown, :data:`TARGETS_TITLE` heads the targets
  (reported, never asserted), :func:`meets` decides a ``<=`` / ``>=`` bound, :func:`find` and :func:`is_ok` look rows
  up.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch

from benchmarks import harness

Values = dict[str, float]
Cell = tuple[str, "Values | None", str]  # (status, values or None, note)
NOT_MEASURED: Cell = ("skipped", None, "not measured")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}  # --dtype value -> torch dtype
OOM_MARKS = ("out of memory", "outofmemoryerror", "can't allocate memory", "cannot allocate memory", "memoryerror")
TARGETS_TITLE = "**Targets** (measured, not asserted)"


# --------------------------------------------------------------------------------------------------- values, cells
def once(value: float) -> Values:
    """The values of a metric measured once: the same number as median and both percentiles."""
    return {"p50": value, "p20": value, "p80": value}


def quantiles(samples: Sequence[float]) -> Values:
    """Median, 20th and 80th percentiles (linear interpolation) of repeated measurements."""
    import numpy as np

    p50, p20, p80 = np.percentile(np.asarray(samples, np.float64), [50, 20, 80])
    return {"p50": float(p50), "p20": float(p20), "p80": float(p80)}


def per_second(time_ms: Values, amount: float, scale: float = 1.0) -> Values:
    """``amount / time / scale`` per second from a time's values in ms: the rate's p20 comes from the time's p80 and
    the other way round (a slow call is a low rate)."""
    pairs = (("p50", "p50"), ("p20", "p80"), ("p80", "p20"))
    return {key: amount / (time_ms[src] * 1e-3) / scale for key, src in pairs}


def cell_rows(metrics: Iterable[tuple[str, str]], cells: Mapping[str, Cell] | None = None, status: str = "ok",
              note: str = "", **fields) -> list[dict]:  # fmt: skip
    """The rows of one point, one per ``(metric, unit)``: its cell when ``status`` is ok (no cell: skipped, "not
    measured"), else every metric with ``status`` and ``note``. ``fields``: the other columns of
    :func:`benchmarks.harness.make_row` (kernel, provider, mode, x_name, x_value, shape, dtype)."""
    rows = []
    for metric, unit in metrics:
        cell = (cells or {}).get(metric, NOT_MEASURED) if status == "ok" else (status, None, note)
        row_status, values, row_note = cell
        rows.append(harness.make_row(**fields, metric=metric, unit=unit, values=values, status=row_status,
                                     note=row_note))  # fmt: skip
    return rows


def is_oom(note: str) -> bool:
    """Whether a failure's note says that memory ran out (CUDA, the CPU allocator, an address-space cap)."""
    return any(mark in note.lower() for mark in OOM_MARKS)


# --------------------------------------------------------------------------------------------------- the run
@dataclass(frozen=True)
class Grid:
    """What the rows of one benchmark's points share.

    ``kernel`` and ``dtype`` (the rows' ``dtype`` column, e.g. "float32") are the same in every row; ``metrics(mode)``
    gives the ``(metric, unit)`` rows of a point; ``place(problem)`` the problem's ``(x_name, x_value, shape)``;
    ``name(problem)`` how progress lines and the out-of-memory note call it (e.g. ``N=4096``)."""

    kernel: str
    dtype: str
    metrics: Callable[[str], Sequence[tuple[str, str]]]
    place: Callable[[object], tuple[str, str, str]]
    name: Callable[[object], str] = str

    def rows(self, problem, provider: str, mode: str, cells: Mapping[str, Cell] | None = None, status: str = "ok",
             note: str = "", metrics: Sequence[tuple[str, str]] | None = None) -> list[dict]:  # fmt: skip
        """:func:`cell_rows` of one point (``metrics``: other rows than ``self.metrics(mode)``)."""
        x_name, x_value, shape = self.place(problem)
        metrics = self.metrics(mode) if metrics is None else metrics
        return cell_rows(metrics, cells, status, note, kernel=self.kernel, provider=provider, mode=mode,
                         x_name=x_name, x_value=x_value, shape=shape, dtype=self.dtype)  # fmt: skip


class Outcome(NamedTuple):
    """What one point came to (:func:`run_grid`'s ``outcomes``): ``cells`` when ``status`` is ok, else ``note``."""

    problem: object
    provider: str
    mode: str
    status: str
    cells: dict
    note: str


def provider_refusal(device, dtype) -> Callable[[str, object], str | None]:
    """``refusal`` of :func:`run_grid` for providers with an optional ``refusal(device, dtype) -> reason or None``
    (``attention_variants.Variant``, ``contrastive_variants.Provider``)."""
    device = torch.device(device)
    return lambda name, provider: provider.refusal(device, dtype) if provider.refusal else None


def time_line(cells: Mapping[str, Cell]) -> str:
    """The progress line of a point that ran: its median time."""
    return f"{cells['time'][1]['p50']:10.3f} ms"


def run_grid(
    grid: Grid,
    problems: Iterable,
    providers: Mapping[str, object],
    modes: Sequence[str],
    measure: Callable[[object, str, object, str, object], dict[str, Cell]],
    writer: harness.ResultWriter,
    *,
    device="cpu",
    refusal: Callable[[str, object], str | None] | None = None,
    skip: Callable[[object, str, object, str], str | None] | None = None,
    setup: Callable[[object], object] | None = None,
    oom_skip: bool = False,
    outcomes: list[Outcome] | None = None,
    describe: Callable[[Mapping[str, Cell]], str] = time_line,
    log=print,
) -> list[dict]:
    """Every (problem, provider, mode), in that nesting; append each point's rows to ``writer`` as soon as they exist;
    return all rows.

    Per problem, ``setup(problem)`` (inputs, references) gives the ``state`` handed to ``measure``; it is dropped and
    CUDA memory freed before the next problem. A point is ``skipped`` with the reason when ``refusal(name, provider)``
    (asked once per problem and provider) gives one, when the provider failed with an out-of-memory error at an
    earlier problem and ``oom_skip`` is set (problems in increasing size), or when ``skip(problem, name, provider,
    mode)`` gives one. Otherwise ``measure(problem, name, provider, mode, state)`` returns the point's cells, under
    :func:`benchmarks.harness.guarded`: whatever it raises becomes ``failed`` rows with the exception text.
    ``outcomes``: a list that gets each point's :class:`Outcome`. ``describe(cells)``: the progress line of a point
    that ran.
    """
    written: list[dict] = []
    oom_at: dict[str, str] = {}  # provider -> the problem where it ran out of memory
    for problem in problems:
        state = setup(problem) if setup else None
        for name, provider in providers.items():
            refused = refusal(name, provider) if refusal else None
            for mode in modes:
                head = f"{grid.name(problem):10s} {name:16s} {mode:8s}"
                reason = refused or (f"not run: out of memory at {oom_at[name]}" if name in oom_at else None)
                reason = reason or (skip(problem, name, provider, mode) if skip else None)
                if reason:
                    cells, status, note = {}, "skipped", reason
                    log(f"{head} skipped: {reason}")
                else:
                    cells, note = harness.guarded(functools.partial(measure, problem, name, provider, mode, state),
                                                  device)  # fmt: skip
                    status = "ok" if note is None else "failed"
                    if note is None:
                        log(f"{head} {describe(cells)}")
                    else:
                        cells = {}
                        log(f"{head} failed: {note}")
                        if oom_skip and is_oom(note):
                            oom_at[name] = grid.name(problem)
                if outcomes is not None:
                    outcomes.append(Outcome(problem, name, mode, status, cells, note or ""))
                written.extend(writer.write(grid.rows(problem, name, mode, cells, status, note or "")))
        state = None  # drop this problem's tensors before the next one
        harness.free_memory(device)
    return written


# --------------------------------------------------------------------------------------------------- peak RSS
def measure_rss(module: str, provider: str, argv: Sequence[str] = (), max_mb: float | None = None,
                timeout: float = 3600.0) -> dict:  # fmt: skip
    """Peak RSS increase of one measured call in a fresh process: ``python -m MODULE --rss-child PROVIDER *argv
    [--rss-max-mb MAX_MB]``, whose ``main`` builds the call and hands it to :func:`benchmarks.harness.rss_child`.

    Returns :func:`benchmarks.harness.peak_rss_increase`'s dict plus ``"seconds"`` (the measured call); raises
    RuntimeError with the child's reason if it failed (refused, allocation refused, killed, timed out)."""
    cap = [] if max_mb is None else ["--rss-max-mb", str(max_mb)]
    return harness.run_fresh_process(["-m", module, "--rss-child", provider, *argv, *cap], timeout=timeout)


def rss_note(result: dict) -> str:
    """How a peak-RSS result was measured: ``VmHWM increase over VmRSS <baseline> MB (<method>[, lower bound])``."""
    bound = "" if result["exact"] else ", lower bound"
    return f"VmHWM increase over VmRSS {result['baseline_mb']:.0f} MB ({result['method']}{bound})"


def rss_cell(measure: Callable[[], dict], note: Callable[[dict], str] = rss_note, head: str = "", log=print) -> Cell:
    """The ``peak_rss`` cell of ``measure()`` (a :func:`measure_rss` call): ok with the increase in MB and
    ``note(result)``, or failed with the reason."""
    result, failure = harness.guarded(measure, "cpu")
    if failure is not None:
        log(f"{head} peak_rss failed: {failure}")
        return ("failed", None, failure)
    log(f"{head} peak_rss {result['increase_mb']:10.1f} MB")
    return ("ok", once(result["increase_mb"]), note(result))


# --------------------------------------------------------------------------------------------------- command line
def parser(module: str, doc: str) -> argparse.ArgumentParser:
    """``python -m MODULE``'s parser, described by the first line of ``doc`` (the module's docstring)."""
    return argparse.ArgumentParser(prog=f"python -m {module}", description=doc.strip().split("\n")[0])


def add_output(p: argparse.ArgumentParser, out: str, out_default: str | None = None) -> None:
    """``--label``, ``--out`` (``out``: what its default is, in words; ``out_default``: the path, if fixed) and
    ``--markdown``."""
    p.add_argument("--label", default="local", help="free text stored in every row (which run this is)")
    p.add_argument("--out", default=out_default, help=f"CSV to append to; default {out}")
    p.add_argument("--markdown", default=None, help="also write the summary to this file")


def add_device(p: argparse.ArgumentParser, dtypes: Mapping[str, torch.dtype] | None = None,
               dtype_help: str = "default: bf16 on CUDA, fp32 on the CPU") -> None:  # fmt: skip
    """``--device`` (auto: cuda if available) and, with ``dtypes`` (flag -> torch dtype), ``--dtype``."""
    p.add_argument("--device", default="auto", help="auto (cuda if available), cuda, cuda:N or cpu")
    if dtypes is not None:
        p.add_argument("--dtype", default=None, choices=sorted(dtypes), help=dtype_help)


def add_timing(p: argparse.ArgumentParser, *, reps: int, warmup: int, rep_ms: float | None = 100.0,
               warmup_ms: float | None = 25.0, cpu_budget_ms: float | None = None, calls: str = "calls",
               reps_help: str | None = None, warmup_help: str | None = None) -> None:  # fmt: skip
    """The timing flags of :func:`benchmarks.harness.measure`, with this benchmark's defaults: ``--reps`` and
    ``--warmup`` (CPU), ``--rep-ms`` and ``--warmup-ms`` (CUDA, unless None), ``--cpu-budget-ms`` (if given)."""
    p.add_argument("--reps", type=int, default=reps, help=reps_help or f"CPU: timed {calls} per measurement")
    p.add_argument("--warmup", type=int, default=warmup, help=warmup_help or f"CPU: untimed {calls} before timing")
    if cpu_budget_ms is not None:
        p.add_argument("--cpu-budget-ms", type=float, default=cpu_budget_ms, help=f"CPU: time fewer {calls} (at "
                       "least 3) where --reps of them would take longer than this (0: always --reps)")  # fmt: skip
    if rep_ms is not None:
        p.add_argument("--rep-ms", type=float, default=rep_ms, help="CUDA: do_bench's timed budget in ms")
    if warmup_ms is not None:
        p.add_argument("--warmup-ms", type=float, default=warmup_ms, help="CUDA: do_bench's warm-up budget in ms")


def timing(args: argparse.Namespace) -> dict:
    """The keyword arguments of :func:`benchmarks.harness.measure` from :func:`add_timing`'s flags."""
    out = {key: getattr(args, key) for key in ("warmup", "reps", "warmup_ms", "rep_ms") if hasattr(args, key)}
    if hasattr(args, "cpu_budget_ms"):
        out["cpu_budget_ms"] = args.cpu_budget_ms or None
    return out


def add_interpret(p: argparse.ArgumentParser, what: str) -> None:
    """``--interpret-ok``: on the CPU, run ``what`` through Triton's interpreter (see :func:`use_interpreter`)."""
    p.add_argument("--interpret-ok", action="store_true", help=f"on the CPU, run {what} through TRITON_INTERPRET=1 "
                   "(slow)")  # fmt: skip


def add_rss(p: argparse.ArgumentParser, rss_mode: bool = False) -> None:
    """The peak-RSS flags: ``--no-rss``, ``--rss`` (with ``rss_mode``: only peak-RSS rows), ``--rss-max-mb``,
    ``--rss-timeout``, and the child's own ``--rss-child PROVIDER`` (hidden)."""
    p.add_argument("--no-rss", action="store_true", help="CPU: no peak_rss rows (no fresh process per provider)")
    if rss_mode:
        p.add_argument("--rss", action="store_true", help="RSS mode: only peak_rss rows, CPU, one fresh process each")
    p.add_argument("--rss-max-mb", type=float, default=None, help="RSS child's memory cap (MB, default: free - 1024)")
    p.add_argument("--rss-timeout", type=float, default=3600.0, help="seconds before an RSS child is given up")
    p.add_argument("--rss-child", default=None, help=argparse.SUPPRESS)


def rss_options(args: argparse.Namespace) -> dict:
    """``max_mb`` and ``timeout`` of :func:`measure_rss` from :func:`add_rss`'s flags."""
    return {"max_mb": args.rss_max_mb, "timeout": args.rss_timeout}


def pick(text: str | None, allowed: Iterable[str], what: str, default: Sequence[str] | None = None) -> list[str]:
    """The comma-separated names of ``text`` (None: ``default``, else all of ``allowed``); SystemExit naming
    the unknown ones (``what``: "providers", "modes", ...). A provider's name from before a rename
    (``harness.RENAMED_PROVIDERS``) picks the provider under its current name."""
    allowed = list(allowed)
    names = [n for n in text.split(",") if n] if text is not None else list(allowed if default is None else default)
    names = [harness.RENAMED_PROVIDERS.get(n, n) for n in names]
    unknown = [n for n in names if n not in allowed]
    if unknown or not names:
        raise SystemExit(f"unknown {what} {unknown}; choose from {allowed}")
    return names


def resolve_device(spec: str = "auto") -> torch.device:
    """``--device``: ``auto`` is cuda when a GPU is there, else cpu."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(spec)


def use_interpreter(device, interpret_ok: bool) -> None:
    """With ``--interpret-ok`` on the CPU, switch on Triton's interpreter (``TRITON_INTERPRET=1``), which must happen
    before triton (and so ``@triton.jit`` in ``lfvila_kernels``) is first imported; warns when it is too late."""
    if torch.device(device).type != "cpu" or not interpret_ok:
        return
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        print("warning: triton is already imported, TRITON_INTERPRET=1 may not take effect", file=sys.stderr)
    os.environ["TRITON_INTERPRET"] = "1"


def dtype_name(dtype: torch.dtype) -> str:
    """The rows' ``dtype`` column: ``torch.bfloat16`` -> ``"bfloat16"``."""
    return str(dtype).replace("torch.", "")


def dtype_flag(dtype: torch.dtype) -> str:
    """The ``--dtype`` value of a torch dtype: ``torch.bfloat16`` -> ``"bf16"``."""
    return next(flag for flag, d in DTYPES.items() if d == dtype)


@dataclass
class Session:
    """One benchmark run's output: the CSV (``out``, ``writer``), the environment of every row, the ``--markdown``
    file, and when the run started (``started``, ``time.perf_counter()``; reset it where set-up should not count)."""

    out: Path
    env: dict
    writer: harness.ResultWriter
    markdown: str | None = None
    started: float = 0.0

    def finish(self, rows: list, summary: str) -> list:
        """:func:`benchmarks.harness.finish`: how many rows went where, in how long; the summary, printed and
        written to ``--markdown``."""
        return harness.finish(rows, self.out, self.started, summary, self.markdown)


def start(args: argparse.Namespace, device, out: str) -> Session:
    """Open the run's CSV (``--out``, else ``out``) with this machine's environment and ``--label``, and print the
    header line (device, torch, triton, commit)."""
    path = Path(args.out or out)
    env = harness.environment(device)
    writer = harness.ResultWriter(path, env, args.label)
    print(f"# {env['device']} | torch {env['torch']} | triton {env['triton']} | commit {env['commit']}", flush=True)
    return Session(path, env, writer, getattr(args, "markdown", None), time.perf_counter())


# --------------------------------------------------------------------------------------------------- summary
def section(title: str, lines: Sequence[str]) -> str:
    """``title``, a blank line and ``lines``; empty when there are no lines."""
    return f"{title}\n\n" + "\n".join(lines) if lines else ""


def join(parts: Iterable[str]) -> str:
    """The non-empty parts of a summary, a blank line between two."""
    return "\n\n".join(p for p in parts if p)


def meets(value: float, sign: str, bound: float) -> bool:
    """Whether ``value`` satisfies a target ``<= bound`` or ``>= bound``."""
    if sign not in ("<=", ">="):
        raise ValueError(f"sign must be '<=' or '>=', got {sign!r}")
    return value <= bound if sign == "<=" else value >= bound


def find(rows: Iterable[dict], **match) -> dict | None:
    """The first row whose columns equal ``match``, or None."""
    return next((r for r in rows if all(r.get(k) == v for k, v in match.items())), None)


def is_ok(row: dict | None) -> bool:
    """Whether a row exists, is ok and has a value."""
    return row is not None and row["status"] == "ok" and row["p50"] != ""
