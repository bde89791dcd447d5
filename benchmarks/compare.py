"""Compare two benchmark runs row by row: IMPROVED / REGRESSED / SAME, and an exit status for CI.

Command (from the repository root)::

    python -m benchmarks.compare --baseline h200-main --current h200-pr123 [--csv benchmarks/results/*.csv]
        [--threshold 0.10]

Rows of the two labels are matched on (kernel, provider, mode, x_name, x_value, shape, metric, dtype). Compared
metrics (:data:`DIRECTION`): times and memories (lower is better), throughputs (higher is better) and the bias-gradient
determinism flag (1 is better). A change counts when the median moved by more than ``threshold`` (relative) **and**
the two runs' spreads do not overlap (for a lower-is-better metric, the current 20th percentile above the baseline's
80th, or the reverse), so that timing noise on a shared machine is not called a regression. A provider that ran in the
baseline but fails now is REGRESSED; one that runs now and did not before is NEW. ``tflops`` is not compared (it is
time restated) nor ``max_abs_err`` (tests own correctness).

Exit status: 1 when anything REGRESSED, else 0 (2 for bad arguments, as argparse does).
"""

from __future__ import annotations

import argparse
import glob
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

KEY = ("kernel", "provider", "mode", "x_name", "x_value", "shape", "metric", "dtype")
# +1: higher is better; -1: lower is better.
DIRECTION = {
    "time": -1, "memory": -1, "memory_total": -1, "peak_rss": -1, "clips_per_s": 1, "bias_grad_deterministic": 1,
}  # fmt: skip
VERDICTS = ("REGRESSED", "IMPROVED", "NEW", "SAME")


@dataclass(frozen=True)
class Change:
    """The verdict on one matched (or unmatched) key; ``ratio``: current / baseline median (None if not both ok)."""

    verdict: str
    key: tuple[str, ...]
    unit: str
    baseline: dict | None
    current: dict
    ratio: float | None
    why: str

    def line(self) -> str:
        kernel, provider, mode, _x_name, x_value, _shape, metric, dtype = self.key
        what = f"{kernel} {provider} {mode} {x_value} {metric} ({dtype})"
        return f"{self.verdict:9s} {what}: {self.why}"


def _latest(rows: Iterable[dict], label: str) -> dict[tuple, dict]:
    """The newest row per key among the rows of ``label`` (a label re-run later supersedes its older rows)."""
    out: dict[tuple, dict] = {}
    for r in rows:
        if r["label"] != label or r["metric"] not in DIRECTION:
            continue
        key = tuple(r[k] for k in KEY)
        if key not in out or r["timestamp"] >= out[key]["timestamp"]:
            out[key] = r
    return out


def _value(row: dict, which: str) -> float:
    return float(row[which])


def judge(base: dict | None, cur: dict, threshold: float) -> Change:
    """The verdict on one current row against its baseline row (None when the baseline has no such row)."""
    key = tuple(cur[k] for k in KEY)
    unit = cur["unit"]
    if base is None:
        return Change("NEW", key, unit, None, cur, None, "not in the baseline")
    if base["status"] != "ok":
        if cur["status"] == "ok":
            return Change("NEW", key, unit, base, cur, None, f"runs now; was {base['status']}: {base['note']}")
        return Change("SAME", key, unit, base, cur, None, f"{cur['status']} in both")
    if cur["status"] != "ok":
        return Change("REGRESSED", key, unit, base, cur, None, f"now {cur['status']}: {cur['note']}")
    direction = DIRECTION[cur["metric"]]
    b50, c50 = _value(base, "p50"), _value(cur, "p50")
    if cur["metric"] == "bias_grad_deterministic":
        verdict = "SAME" if c50 == b50 else ("IMPROVED" if c50 > b50 else "REGRESSED")
        return Change(verdict, key, unit, base, cur, None, f"{b50:g} -> {c50:g}")
    ratio = c50 / b50 if b50 else float("inf") if c50 else 1.0
    change = f"{b50:.4g} -> {c50:.4g} {unit} ({(ratio - 1) * 100:+.1f} %)"
    worse = ratio > 1 + threshold if direction < 0 else ratio < 1 / (1 + threshold)
    better = ratio < 1 / (1 + threshold) if direction < 0 else ratio > 1 + threshold
    # Separated spreads: the whole current interval [p20, p80] lies on the worse (better) side of the baseline's.
    if direction < 0:
        apart_worse = _value(cur, "p20") > _value(base, "p80")
        apart_better = _value(cur, "p80") < _value(base, "p20")
    else:
        apart_worse = _value(cur, "p80") < _value(base, "p20")
        apart_better = _value(cur, "p20") > _value(base, "p80")
    if worse and apart_worse:
        return Change("REGRESSED", key, unit, base, cur, ratio, change)
    if better and apart_better:
        return Change("IMPROVED", key, unit, base, cur, ratio, change)
    if worse or better:
        change += ", within the runs' spread"
    return Change("SAME", key, unit, base, cur, ratio, change)


def compare(
    rows: Iterable[dict], baseline: str, current: str | Sequence[dict], threshold: float = 0.10
) -> list[Change]:
    """Every compared key of the ``current`` run (a label among ``rows``, or the rows themselves) against the
    newest rows labelled ``baseline``; REGRESSED first, then IMPROVED, NEW, SAME."""
    if threshold < 0:
        raise ValueError(f"threshold must be >= 0, got {threshold}")
    rows = list(rows)
    base = _latest(rows, baseline)
    if isinstance(current, str):
        cur = _latest(rows, current)
    else:
        current = list(current)
        cur = _latest(current, current[0]["label"]) if current else {}
    changes = [judge(base.get(key), row, threshold) for key, row in cur.items()]
    return sorted(changes, key=lambda c: VERDICTS.index(c.verdict))


def report(changes: Sequence[Change], baseline: str, current: str, threshold: float) -> str:
    """Text report: the counts, then one line per change (SAME lines only counted)."""
    counts = {v: sum(c.verdict == v for c in changes) for v in VERDICTS}
    head = (f"# {current} vs {baseline} (threshold {threshold:.0%}, spreads must not overlap): "
            + ", ".join(f"{n} {v}" for v, n in counts.items()))  # fmt: skip
    devices = {(c.baseline or {}).get("device") for c in changes} | {c.current["device"] for c in changes}
    devices.discard(None)
    lines = [head]
    if len(devices) > 1:
        lines.append(f"# warning: the runs were made on different devices ({', '.join(sorted(devices))})")
    lines += [c.line() for c in changes if c.verdict != "SAME"]
    return "\n".join(lines)


def read_csvs(paths: Sequence[str]) -> list[dict]:
    """All rows of the given results CSVs (glob patterns allowed)."""
    from benchmarks.harness import read_rows

    files = sorted({f for p in paths for f in (glob.glob(p) or [p])})
    rows = []
    for f in files:
        rows.extend(read_rows(f))
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.compare", description=__doc__.split("\n")[0])
    p.add_argument("--baseline", required=True, help="label of the stored run to compare against")
    p.add_argument("--current", required=True, help="label of the new run")
    p.add_argument("--csv", nargs="+", default=["benchmarks/results/*.csv"], help="results files (globs allowed)")
    p.add_argument("--threshold", type=float, default=0.10, help="relative change that counts (default 0.10)")
    args = p.parse_args(argv)
    rows = read_csvs(args.csv)
    labels = {r["label"] for r in rows}
    for name in ("baseline", "current"):
        if getattr(args, name) not in labels:
            p.error(f"--{name} {getattr(args, name)!r}: no rows with that label in {args.csv}")
    changes = compare(rows, args.baseline, args.current, args.threshold)
    print(report(changes, args.baseline, args.current, args.threshold))
    return 1 if any(c.verdict == "REGRESSED" for c in changes) else 0


if __name__ == "__main__":
    raise SystemExit(main())
