"""Benchmark plumbing shared by every ``benchmarks/bench_*.py``: timing, peak memory, environment, CSV rows.

Nothing here knows about a particular op. A benchmark builds zero-argument callables, hands them to :func:`measure` and
:func:`peak_memory` (through :func:`guarded`, so that a provider that raises becomes a ``failed`` row instead of ending
the run) and appends long-format rows to one CSV through :class:`ResultWriter`.

Long format, one row per (kernel, provider, mode, metric, x): the columns are :data:`SCHEMA`. ``p50/p20/p80`` are the
median and the 20th/80th percentiles of the metric over the timed repetitions (one value in all three for metrics
measured once, empty when the row is ``failed`` or ``skipped``; ``note`` then says why).

CPU memory: :func:`peak_rss_increase` measures the peak resident set of one call (``VmHWM`` reset through
``/proc/self/clear_refs``), and :func:`run_fresh_process` runs such a measurement in a new interpreter, so that what
ran before does not shape the allocator's state; the child answers with :func:`report_to_parent`.
"""

from __future__ import annotations

import csv
import datetime
import gc
import json
import math
import os
import platform
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from importlib import metadata
from pathlib import Path

import torch

SCHEMA: tuple[str, ...] = (
    "timestamp",  # UTC, ISO 8601, when the row was written
    "label",  # free text from the command line: which run this is (e.g. "h200-main", "cpu-reduced")
    "kernel",  # the op, e.g. "window_attention"
    "provider",  # the implementation, e.g. "window-attention-triton", "videoswin-eager"
    "mode",  # "fwd" | "fwd+bwd"
    "x_name",  # what varies along the x axis, e.g. "layer"
    "x_value",  # its value, e.g. "layer0"
    "shape",  # the full problem, e.g. "B=16 T=32 H=24 W=40 heads=4 head_dim=32 window=2x3x5 shift=0x1x2"
    "metric",  # "time" | "tflops" | "memory" | "max_abs_err"
    "unit",  # "ms" | "TFLOP/s" | "MB" | "abs"
    "p50",
    "p20",
    "p80",
    "status",  # "ok" | "failed" | "skipped"
    "note",  # why a row failed or was skipped (exception type and message), or a remark
    "dtype",
    "device",  # GPU name, or CPU model and core count
    "torch",
    "triton",
    "python",
    "commit",  # git rev-parse --short HEAD, "-dirty" with changed or untracked files outside benchmarks/results/
)
STATUSES = ("ok", "failed", "skipped")
_NOTE_CHARS = 500


# --------------------------------------------------------------------------------------------------- measurement
def sync(device: torch.device) -> None:
    """Wait for the work queued on a CUDA ``device`` (nothing on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(
    fn: Callable[[], object],
    *,
    device: torch.device | str,
    warmup: int = 2,
    reps: int = 10,
    warmup_ms: float = 25.0,
    rep_ms: float = 100.0,
    grad_to_none: Sequence[torch.Tensor] | None = None,
    cpu_budget_ms: float | None = None,
) -> dict[str, float]:
    """Time ``fn()``; return ``{"p50", "p20", "p80"}`` in milliseconds.

    CUDA: ``triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5, 0.2, 0.8])``, which times each
    call with CUDA events, flushes the L2 cache before every timed call and picks the number of calls so that the
    warm-up and the timed runs last about ``warmup_ms`` and ``rep_ms`` milliseconds (``warmup``/``reps`` unused).
    CPU: ``warmup`` untimed calls, then ``reps`` calls timed one by one with ``time.perf_counter``
    (``warmup_ms``/``rep_ms`` unused). Percentiles are linearly interpolated. ``cpu_budget_ms``: on the CPU, time
    fewer calls where they are slow: ``reps`` is cut to ``ceil(cpu_budget_ms / t)`` (at least 3) for a call that took
    ``t`` ms in the last warm-up, so that a reduced-size run of many shapes stays within minutes.
    ``grad_to_none``: tensors whose ``.grad`` is reset to None before every call (outside the timed region on the CPU),
    so that a backward pass allocates fresh gradients each time instead of accumulating.
    """
    device = torch.device(device)
    if device.type == "cuda":
        import triton.testing  # only on CUDA: importing triton on the CPU would fix TRITON_INTERPRET too early

        p50, p20, p80 = triton.testing.do_bench(
            fn, warmup=warmup_ms, rep=rep_ms, grad_to_none=list(grad_to_none or []), quantiles=[0.5, 0.2, 0.8]
        )
        return {"p50": float(p50), "p20": float(p20), "p80": float(p80)}
    if reps < 1:
        raise ValueError(f"reps must be >= 1, got {reps}")

    def reset_grads():
        for t in grad_to_none or ():
            t.grad = None

    last = None
    for _ in range(warmup):
        reset_grads()
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        last = (time.perf_counter() - start) * 1e3
    if cpu_budget_ms is not None and last is not None and last > 0:
        reps = max(min(3, reps), min(reps, math.ceil(cpu_budget_ms / last)))
    times = []
    for _ in range(reps):
        reset_grads()
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    q = torch.tensor(times, dtype=torch.float64).quantile(torch.tensor([0.5, 0.2, 0.8], dtype=torch.float64))
    return {"p50": float(q[0]), "p20": float(q[1]), "p80": float(q[2])}


def peak_memory(fn: Callable[[], object], device: torch.device | str) -> float | None:
    """Peak memory in MB (2**20 bytes) allocated by one call of ``fn`` above what was allocated before it.

    CUDA only (``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``); the result of ``fn`` counts
    while it is alive. Returns None on any other device: the caller writes the row with empty values.
    """
    device = torch.device(device)
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    baseline = torch.cuda.memory_allocated(device)
    result = fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    del result
    return (peak - baseline) / 2**20


def free_memory(device: torch.device | str) -> None:
    """Drop unreachable tensors and return cached CUDA blocks (after an OOM, so that the next provider starts clean)."""
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def describe_exception(exc: BaseException) -> str:
    """``"Type: message"`` on one line, at most 500 characters: the ``note`` of a failed row.

    When the exception wraps another (``raise ... from``, as torch.compile does with errors raised while tracing),
    the innermost cause comes first, then ``[raised as Type: first line]`` of the outer one.
    """
    chain = [exc]
    while chain[-1].__cause__ is not None and len(chain) < 8:
        chain.append(chain[-1].__cause__)
    root = chain[-1]
    text = f"{type(root).__name__}: {root}"
    if root is not exc:
        first = (str(exc).strip().splitlines() or [""])[0]
        text += f" [raised as {type(exc).__name__}: {first}]"
    text = " ".join(text.split())
    return text if len(text) <= _NOTE_CHARS else text[: _NOTE_CHARS - 3] + "..."


def guarded(fn: Callable[[], object], device: torch.device | str) -> tuple[object, str | None]:
    """Run ``fn()``; return ``(result, None)``, or ``(None, note)`` if it raised any Exception (OOM included).

    After a failure the exception and its traceback (which hold the failed call's tensors) are dropped and CUDA memory
    is freed before returning. KeyboardInterrupt still stops the run.
    """
    note = None
    try:
        return fn(), None
    except Exception as exc:  # a provider may fail in any way; the run goes on and records why
        note = describe_exception(exc)
    free_memory(device)
    return None, note


# --------------------------------------------------------------------------------------------------- CPU peak RSS
RESULT_PREFIX = "BENCH_CHILD_RESULT "  # marks the one stdout line of a fresh process that carries its JSON result
_MB = 2**20


def _proc_status_bytes() -> dict[str, int]:
    """``VmRSS``, ``VmHWM`` and ``VmSize`` of this process in bytes, from ``/proc/self/status`` (Linux)."""
    out = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("VmRSS", "VmHWM", "VmSize"):
                    out[key] = int(rest.split()[0]) * 1024  # the kernel writes kB
    except OSError as exc:
        raise RuntimeError(f"peak RSS needs Linux /proc/self/status ({exc})") from exc
    if len(out) != 3:
        raise RuntimeError(f"/proc/self/status lacks VmRSS/VmHWM/VmSize (found {sorted(out)})")
    return out


def mem_available_mb() -> float:
    """``MemAvailable`` of ``/proc/meminfo`` in MB (2**20 bytes): what can be allocated without swapping or OOM."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024 / _MB
    raise RuntimeError("/proc/meminfo has no MemAvailable")


def peak_rss_increase(fn: Callable[[], object], limit_mb: float | None = None) -> dict[str, object]:
    """By how much one call of ``fn`` raises this process's peak resident set size, in MB (2**20 bytes).

    Method (Linux): drop unreachable objects, reset the resident high-water mark ``VmHWM`` to the current RSS by
    writing ``5`` to ``/proc/self/clear_refs`` (Linux >= 4.0), read the baseline ``VmRSS``, call ``fn``, read
    ``VmHWM`` again. ``increase_mb = VmHWM_after - VmRSS_before``: the largest resident set during the call above the
    resident set before it (pages actually touched, not reserved; the kernel updates the high-water mark before any
    page is unmapped or dropped, so a short-lived peak counts). The result of ``fn`` is alive while ``VmHWM`` is read.
    Where the reset is refused, the mark is not reset (``method`` says ``"hwm-no-reset"``) and, when the call did not
    exceed an earlier peak of the process, ``exact`` is False and ``increase_mb`` is only a lower bound.

    ``limit_mb``: if given, the soft ``RLIMIT_AS`` is lowered to the current virtual size plus this many MB during the
    call, so that an op needing more fails with an allocation error instead of waking the kernel's OOM killer.

    Returns ``{"increase_mb", "baseline_mb", "peak_mb", "method", "exact"}``.
    Run it in a fresh process (:func:`run_fresh_process`) so that other work does not shape the allocator's state.
    """
    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        method = "clear_refs"
    except OSError:
        method = "hwm-no-reset"
    before = _proc_status_bytes()
    restore = None
    if limit_mb is not None:
        import resource

        restore = resource.getrlimit(resource.RLIMIT_AS)
        cap = before["VmSize"] + int(limit_mb * _MB)
        if restore[1] != resource.RLIM_INFINITY:
            cap = min(cap, restore[1])
        resource.setrlimit(resource.RLIMIT_AS, (cap, restore[1]))
    try:
        result = fn()
        after = _proc_status_bytes()
        del result
    finally:
        if restore is not None:
            resource.setrlimit(resource.RLIMIT_AS, restore)
    exact = method == "clear_refs" or after["VmHWM"] > before["VmHWM"]
    return {
        "increase_mb": (after["VmHWM"] - before["VmRSS"]) / _MB,
        "baseline_mb": before["VmRSS"] / _MB,
        "peak_mb": after["VmHWM"] / _MB,
        "method": method,
        "exact": exact,
    }


def can_reset_hwm() -> bool:
    """Whether this process may reset its resident high-water mark (``/proc/self/clear_refs``, Linux)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def rss_child(prepare: Callable[[], Callable[[], object]], limit_mb: float | None = None) -> None:
    """The body of a fresh-process peak-RSS child: ``prepare()`` builds the inputs, warms up and returns the step to
    measure; its :func:`peak_rss_increase` (under ``limit_mb``, default MemAvailable - 1 GiB, at least 256 MB) plus
    ``seconds`` go to the parent, or the exception as ``{"error": ...}`` with exit status 1."""
    try:
        step = prepare()
        limit = limit_mb if limit_mb is not None else max(256.0, mem_available_mb() - 1024)
        start = time.perf_counter()
        result = peak_rss_increase(step, limit_mb=limit)
        result["seconds"] = time.perf_counter() - start
    except Exception as exc:  # everything the parent must record as a failed row
        report_to_parent({"error": describe_exception(exc)})
        raise SystemExit(1) from None
    report_to_parent(result)


def report_to_parent(result: dict) -> None:
    """In a process started by :func:`run_fresh_process`: print ``result`` (JSON-serialisable) for the parent."""
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def run_fresh_process(argv: Sequence[str], timeout: float = 3600.0, env: dict[str, str] | None = None) -> dict:
    """Run ``python *argv`` (this interpreter) in a new process from the repository root; return its result.

    The child reports with :func:`report_to_parent`; the last such line of its stdout is parsed. A result with an
    ``"error"`` key, or a child that ends without a result (a crash, a signal such as the OOM killer's SIGKILL, a
    timeout), raises RuntimeError naming the exit status and the last line of its stderr, so that :func:`guarded`
    turns it into a ``failed`` row. ``env``: the child's environment (default: this process's).
    """
    cmd = [sys.executable, *argv]
    root = Path(__file__).resolve().parent.parent
    try:
        proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired as exc:
        raise RuntimeError(f"child process timed out after {timeout:.0f} s: {' '.join(argv)}") from exc
    result = None
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            result = json.loads(line[len(RESULT_PREFIX) :])
            break
    if result is not None and "error" in result:
        raise RuntimeError(result["error"])
    if result is None or proc.returncode != 0:
        code = proc.returncode
        how = f"exit status {code}"
        if code < 0:
            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = f"signal {-code}"
            how = f"killed by {name}" + (" (out of memory?)" if code == -signal.SIGKILL else "")
        last = (proc.stderr.strip().splitlines() or ["no stderr"])[-1]
        raise RuntimeError(f"child process ended without a result ({how}): {last}")
    return result


# --------------------------------------------------------------------------------------------------- environment
def _git_commit(root: Path) -> str:
    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=root, capture_output=True, text=True, check=True, timeout=30
        ).stdout.strip()

    try:
        commit = git("rev-parse", "--short", "HEAD")
        # Untracked (not ignored) files count too, they may be the code run; results written under
        # benchmarks/results/ do not, so that a run appending there does not mark its own later rows dirty.
        dirty = bool(git("status", "--porcelain", "--", ".", ":(exclude)benchmarks/results"))
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return commit + ("-dirty" if dirty else "")


def _cpu_name() -> str:
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{name} ({os.cpu_count()} cores)"


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def environment(device: torch.device | str = "cpu") -> dict[str, str]:
    """What produced a result: ``{"device", "torch", "triton", "python", "commit"}``; no host names or user names.

    ``device``: the GPU name (``torch.cuda.get_device_name``) for a CUDA device, else the CPU model from
    ``/proc/cpuinfo`` with the core count. ``triton`` is read from the installed distribution's metadata, so calling
    this does not import triton.
    """
    device = torch.device(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name()
    return {
        "device": name,
        "torch": torch.__version__,
        "triton": _version("triton"),
        "python": platform.python_version(),
        "commit": _git_commit(Path(__file__).resolve().parent.parent),
    }


# --------------------------------------------------------------------------------------------------- CSV rows
def make_row(
    *,
    kernel: str,
    provider: str,
    mode: str,
    x_name: str,
    x_value: str,
    shape: str,
    metric: str,
    unit: str,
    dtype: str,
    values: dict[str, float] | None = None,
    status: str = "ok",
    note: str = "",
) -> dict[str, object]:
    """One result row without the run-wide columns (label, environment, timestamp), which the writer adds.

    ``values``: ``{"p50", "p20", "p80"}``, or None for a failed/skipped row or a metric not measured here (the three
    cells are then empty).
    """
    if status not in STATUSES:
        raise ValueError(f"status must be one of {STATUSES}, got {status!r}")
    values = values or {}
    return {
        "kernel": kernel,
        "provider": provider,
        "mode": mode,
        "x_name": x_name,
        "x_value": x_value,
        "shape": shape,
        "metric": metric,
        "unit": unit,
        "p50": values.get("p50", ""),
        "p20": values.get("p20", ""),
        "p80": values.get("p80", ""),
        "status": status,
        "note": note,
        "dtype": dtype,
    }


class ResultWriter:
    """Appends rows with the fixed :data:`SCHEMA` to a CSV file, writing the header when the file is new or empty.

    ``env`` (from :func:`environment`) and ``label`` fill the run-wide columns. Appending to a file whose header is not
    :data:`SCHEMA` raises ValueError rather than mixing two layouts in one file. Every :meth:`write` flushes, so an
    interrupted run keeps the rows it finished.
    """

    def __init__(self, path: str | os.PathLike, env: dict[str, str], label: str):
        self.path = Path(path)
        self.env = dict(env)
        self.label = label
        if self.path.exists() and self.path.stat().st_size > 0:
            with open(self.path, newline="") as f:
                header = next(csv.reader(f), [])
            if tuple(header) != SCHEMA:
                raise ValueError(f"{self.path} has columns {header}, not this harness's {list(SCHEMA)}; use a new file")

    def write(self, rows: Iterable[dict[str, object]]) -> list[dict[str, object]]:
        """Complete ``rows`` (from :func:`make_row`) with timestamp, label and environment; append; return them."""
        stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        full = []
        for row in rows:
            out = {"timestamp": stamp, "label": self.label, **self.env, **row}
            unknown = set(out) - set(SCHEMA)
            if unknown:
                raise ValueError(f"row has columns outside the schema: {sorted(unknown)}")
            full.append({k: _cell(out.get(k, "")) for k in SCHEMA})
        self.path.parent.mkdir(parents=True, exist_ok=True)
        new = not self.path.exists() or self.path.stat().st_size == 0
        with open(self.path, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=SCHEMA)
            if new:
                writer.writeheader()
            writer.writerows(full)
        return full


def _cell(value: object) -> object:
    if isinstance(value, float):
        return f"{value:.6g}"
    return value


# Providers renamed since results were first committed (old name -> new): the issue-17 rename put ``window_attention``
# in every name (op, kernel, test, benchmark). Stored CSVs keep the names they were written with; :func:`read_rows`
# and ``suite.pick`` (the ``--providers`` flag) read the old names as the new ones, so ``--compare`` and the plots
# match a run from before the rename with one from after.
RENAMED_PROVIDERS = {"htwa-triton": "window-attention-triton", "htwa-torch": "window-attention-torch"}


def read_rows(path: str | os.PathLike) -> list[dict[str, str]]:
    """All rows of a results CSV as dicts keyed by :data:`SCHEMA` (for plots, summaries and tests); a provider named
    as before a rename (:data:`RENAMED_PROVIDERS`) is read under its current name."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        if r.get("provider") in RENAMED_PROVIDERS:
            r["provider"] = RENAMED_PROVIDERS[r["provider"]]
    return rows


def log(message: str) -> None:
    """Progress line, flushed at once (benchmarks run for minutes; output must not wait in a buffer)."""
    print(message, flush=True)


def finish(rows: list, out, started: float, summary: str, markdown=None) -> list:
    """End of a benchmark CLI: report how many rows went to ``out`` and how long the run took (``started``: a
    ``time.perf_counter()`` reading), print the markdown ``summary`` and write it to ``markdown`` when given."""
    print(f"\n# {len(rows)} rows appended to {out} in {time.perf_counter() - started:.0f} s\n")
    print(summary)
    if markdown:
        Path(markdown).write_text(summary + "\n")
    return rows


def interpreting() -> bool:
    """Whether Triton's interpreter is on (``TRITON_INTERPRET``), read without importing triton."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def triton_refusal(device: torch.device, dtype: torch.dtype | None = None) -> str | None:
    """Why a Triton provider cannot run on ``device`` (a ``skipped`` row), or None."""
    if torch.device(device).type == "cpu" and not interpreting():
        return "Triton kernels need a CUDA device; on the CPU they run only under TRITON_INTERPRET=1 (--interpret-ok)"
    return None


def import_refusal(module: str, install: str) -> str | None:
    """None if ``module`` imports, else ``"<module> cannot be imported (Type: message); <install>"``."""
    try:
        __import__(module)
    except Exception as exc:  # ImportError, or a broken dependency raising anything else (e.g. torchvision)
        return f"{module} cannot be imported ({describe_exception(exc)}); {install}"
    return None
