"""One command for every benchmark suite: run, store, plot, compare.

Commands (from the repository root; ``make bench`` runs the first with ``--label local``)::

    python -m benchmarks.run --suite all --label h200-2026-11-22                   # everything, real sizes on CUDA
    python -m benchmarks.run --suite attention --shapes long-form --label cpu-try   # one shape set
    python -m benchmarks.run --suite attention --label pr-123 --compare h200-main  # exit 1 on a regression
    python -m benchmarks.run --suite contrastive --label try -- --sizes 1024,2048  # arguments after -- go to the suite
    python -m benchmarks.run --suite attention --label mine --provider my_pkg.my_mod:make_provider  # your own variant

Suites: ``attention`` (``bench_attention``, one call per shape set of ``--shapes``: a name, a comma-separated list or
``all``), ``contrastive`` (``bench_contrastive``), ``siglip`` (``bench_siglip``), ``decode`` (``bench_decode``),
``train`` (``bench_train_step``), ``dropin`` (``bench_dropin``: timm / transformers Swin and CLIP's loss, patched vs
unpatched), ``data``
(``bench_data``: annotation loading at 10k-1M rows, workers' memory, decode rate per core); ``all`` runs them in
that order. Each suite appends to ``<out-dir>/<suite>-<label>.csv`` (long format,
``harness.SCHEMA``: machine, versions and commit in every row) and writes ``<suite>-<label>.md`` (the suite's own
summary and targets); then ``benchmarks.plot`` draws ``<out-dir>/plots/<suite>-<set>-<label>.png`` and appends the
tables to the markdown. On a CPU every suite runs at its reduced sizes.

``--compare LABEL``: after the run, compare its rows with the newest rows labelled LABEL in ``<out-dir>/*.csv``,
``benchmarks/results/*.csv`` (the committed runs) and ``--baseline-csv`` files, print IMPROVED / REGRESSED
(``benchmarks.compare``) and exit with status 1 when anything regressed beyond ``--threshold``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from collections.abc import Sequence
from pathlib import Path

SUITES = ("attention", "contrastive", "siglip", "decode", "train", "dropin", "data")
MODULES = {"attention": "benchmarks.bench_attention", "contrastive": "benchmarks.bench_contrastive",
           "siglip": "benchmarks.bench_siglip",
           "decode": "benchmarks.bench_decode", "train": "benchmarks.bench_train_step",
           "dropin": "benchmarks.bench_dropin", "data": "benchmarks.bench_data"}  # fmt: skip
TAKES_DEVICE = {"attention", "contrastive", "siglip", "train", "dropin"}  # bench_decode picks its devices per provider


def _shape_sets(spec: str) -> list[str]:
    from benchmarks.attention_shapes import PUBLIC_SHAPE_SETS, SHAPE_SETS

    names = list(PUBLIC_SHAPE_SETS) if spec == "all" else spec.split(",")
    unknown = [n for n in names if n not in SHAPE_SETS]
    if unknown or not names:
        raise SystemExit(f"--shapes: unknown shape sets {unknown}; choose from {list(SHAPE_SETS)} or all")
    return names


def run_suite(suite: str, label: str, out_dir: Path, shapes: str, device: str, extra: Sequence[str],
              providers: Sequence[str] = ()) -> list[dict]:
    """Run one suite through its module's ``main``; return its rows (also appended to ``<suite>-<label>.csv``).
    ``providers``: ``--provider`` specs for the attention suite."""
    module = importlib.import_module(MODULES[suite])
    csv_path = out_dir / f"{suite}-{label}.csv"
    common = ["--label", label, "--out", str(csv_path)]
    if suite in TAKES_DEVICE:
        common += ["--device", device]
    summaries, rows = [], []
    calls = [["--shapes", s] for s in _shape_sets(shapes)] if suite == "attention" else [[]]
    if suite == "attention":
        calls = [[*call, *(a for spec in providers for a in ("--provider", spec))] for call in calls]
    for call in calls:
        print(f"\n## {suite} {' '.join(call)}".rstrip(), flush=True)
        got = module.main([*call, *common, *extra])
        rows.extend(got)
        title = f"### {suite}" + (f" {call[1]}" if call else "")
        summaries.append(f"{title}\n\n{module.markdown_summary(got)}")
    (out_dir / f"{suite}-{label}.md").write_text("\n\n".join(summaries) + "\n")
    return rows


def _parse(argv):
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n")[0])
    p.add_argument("--suite", required=True, choices=[*SUITES, "all"])
    p.add_argument("--label", required=True, help="names this run in every row and in the file names")
    p.add_argument("--shapes", default="all", help="attention shape sets: a name, a comma-separated list, or all")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cuda, cuda:N or cpu")
    p.add_argument("--out-dir", default="benchmarks/results", help="where the CSVs, markdown and plots go")
    p.add_argument("--compare", default=None, metavar="LABEL", help="compare with the stored run of this label")
    p.add_argument("--baseline-csv", nargs="*", default=[], help="more CSVs to search for the --compare label")
    p.add_argument("--threshold", type=float, default=0.10, help="relative change that counts in --compare")
    p.add_argument("--no-plot", action="store_true", help="skip the PNGs (the markdown still gets the tables)")
    p.add_argument("--provider", action="append", default=[], metavar="[NAME=]MODULE:ATTR",
                   help="attention suite: your own provider (bench_attention --provider; repeatable)")
    p.add_argument("extra", nargs=argparse.REMAINDER, help="after --: arguments passed to every suite's CLI")
    args = p.parse_args(argv)
    if args.extra and args.extra[0] == "--":
        args.extra = args.extra[1:]
    if any(ch in args.label for ch in "/\\ ") or not args.label:
        p.error(f"--label {args.label!r}: use a non-empty name without spaces or slashes (it names files)")
    if args.compare == args.label:
        p.error("--compare must name another run than --label")
    if args.threshold < 0:
        p.error(f"--threshold must be >= 0, got {args.threshold}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the suites; return the exit status (1 when ``--compare`` found a regression)."""
    args = _parse(argv)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    suites = list(SUITES) if args.suite == "all" else [args.suite]
    if args.suite != "attention" and args.shapes != "all" and "attention" not in suites:
        print(f"note: --shapes {args.shapes} applies to the attention suite only", file=sys.stderr)
    if args.provider and "attention" not in suites:
        print("note: --provider applies to the attention suite only", file=sys.stderr)
    started = time.perf_counter()
    rows: list[dict] = []
    for suite in suites:
        rows.extend(run_suite(suite, args.label, out_dir, args.shapes, args.device, args.extra, args.provider))
    print(f"\n# {len(rows)} rows from {', '.join(suites)} in {time.perf_counter() - started:.0f} s", flush=True)

    from benchmarks import plot

    images = {}
    if not args.no_plot:
        try:
            images = plot.plot_all(rows, out_dir / "plots", relative_to=out_dir)
        except ImportError as exc:  # matplotlib is an extra ("bench", "test"); the run's data is already stored
            print(f"warning: no plots ({exc}); pip install matplotlib", file=sys.stderr)
    for suite in suites:
        mine = [r for r in rows if plot.SUITES.get(r["kernel"], r["kernel"]) == suite]
        with open(out_dir / f"{suite}-{args.label}.md", "a") as f:
            f.write("\n## Tables and plots\n\n" + plot.markdown_report(mine, images) + "\n")
    for path in images.values():
        print(f"# plot: {out_dir / path}")

    if args.compare is None:
        return 0
    from benchmarks import compare

    stored = compare.read_csvs([str(out_dir / "*.csv"), "benchmarks/results/*.csv", *args.baseline_csv])
    if not any(r["label"] == args.compare for r in stored):
        print(f"error: --compare {args.compare!r}: no rows with that label in {out_dir}/*.csv, "
              "benchmarks/results/*.csv or --baseline-csv", file=sys.stderr)  # fmt: skip
        return 2
    changes = compare.compare(stored, args.compare, rows, args.threshold)
    print(compare.report(changes, args.compare, args.label, args.threshold))
    return 1 if any(c.verdict == "REGRESSED" for c in changes) else 0


if __name__ == "__main__":
    raise SystemExit(main())
