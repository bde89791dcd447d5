"""Benchmark the data path at pretraining scale: annotation loading, DataLoader workers' memory, decode per core.

    python -m benchmarks.bench_data --label cpu-amd-epyc --rows 10000,30000,100000,200000,1000000 \
        --out benchmarks/results/data-cpu.csv --markdown benchmarks/results/data-cpu.md \
        --plot benchmarks/results/plots/data-scaling-cpu.png

Inputs, parts (annotations, workers, decode), rows, metrics, how memory is measured and the targets:
benchmarks/README.md, section "Suites", "data".
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

KERNEL = "data"
MODES = ("jsonl-first", "jsonl-cached", "lmdb-open", "objects")
WORKER_MODES = ("jsonl-cached", "lmdb-open", "objects")
PARTS = ("annotations", "workers", "decode")
ASSUMED_SAMPLES_PER_S = 16 * 2  # official per-GPU batch 16 at an assumed 2 steps/s
TARGETS = {("jsonl-first", "load_s"): 15.0, ("jsonl-first", "peak_rss_mb"): 150.0,
           ("jsonl-cached", "load_s"): 2.0, ("jsonl-cached", "peak_rss_mb"): 50.0,
           ("lmdb-open", "load_s"): 2.0, ("lmdb-open", "peak_rss_mb"): 50.0}  # fmt: skip
TARGET_ROWS, TARGET_WORKER_MB = 200_000, 100.0
_WORDS = ("the a man woman dog cat runs jumps cooks pan oil onion slowly quickly then after before outside inside "
          "kitchen garden ball car drives river mountain shows explains how to make cut add stir").split()
_ALPHA = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_"


# --------------------------------------------------------------------------------------------------- inputs
def official_row(rng: np.random.Generator) -> list[dict]:
    vid = "".join(_ALPHA[i] for i in rng.integers(0, len(_ALPHA), 11))
    return [{"clip_id": f"{vid}.{k}.mp4", "text": " ".join(_WORDS[w] for w in rng.integers(0, len(_WORDS),
                                                                                           rng.integers(8, 21)))}
            for k in range(int(rng.integers(4, 9)))]


def make_inputs(n: int, root, seed: int = 0) -> tuple[Path, Path]:
    """``(rows.jsonl, rows.lmdb)`` of ``n`` official rows under ``root``, generated when missing (each written to a
    temporary name and renamed, so a file present is complete)."""
    import lmdb

    folder = Path(root) / f"official-{n}-seed{seed}"
    folder.mkdir(parents=True, exist_ok=True)
    jsonl, db = folder / "rows.jsonl", folder / "rows.lmdb"
    if jsonl.exists() and db.exists():
        return jsonl, db
    rng = np.random.default_rng(seed)
    rows = (official_row(rng) for _ in range(n))
    tmp_db = folder / f".rows.lmdb.{os.getpid()}"
    env = lmdb.open(str(tmp_db), map_size=max(1 << 26, n * 4096))
    tmp = folder / f".rows.jsonl.{os.getpid()}"
    with open(tmp, "w") as f:
        txn = env.begin(write=True)
        for i, row in enumerate(rows):
            f.write(json.dumps(row) + "\n")
            txn.put(str(i).encode(), repr(row).encode())
            if i % 50_000 == 49_999:
                txn.commit()
                txn = env.begin(write=True)
        txn.commit()
    env.close()
    os.replace(tmp, jsonl)
    if db.exists():
        import shutil

        shutil.rmtree(db)
    os.replace(tmp_db, db)
    return jsonl, db


# --------------------------------------------------------------------------------------------------- children
def _load(mode: str, jsonl: str, db: str, cache: str):
    from lfvila.data.formats import build_dataset

    if mode == "lmdb-open":
        return build_dataset("lfvila_pretrain", db, "videos")
    ds = build_dataset("lfvila_pretrain", jsonl, "videos", cache_dir=cache)
    if mode == "jsonl-cached" and not ds.cached:
        raise RuntimeError("jsonl-cached: the index was not read from the cache")
    if mode == "objects":
        return ds, [ds[i] for i in range(len(ds))]
    return ds


def child_annotations(mode: str, jsonl: str, db: str, cache: str) -> None:
    """Fresh process: imports, then one measured load (harness.rss_child reports peak RSS and seconds)."""
    from benchmarks import harness
    from lfvila.data import formats  # noqa: F401  (the imports are part of the baseline, not of the load)

    harness.rss_child(lambda: (lambda: _load(mode, jsonl, db, cache)))


MEMORY = {"Rss": "rss_growth_mb", "RssFile": "rss_file_growth_mb", "RssAnon": "rss_anon_growth_mb",
          "Pss": "pss_growth_mb", "Private_Dirty": "private_growth_mb"}  # field -> metric of the workers part
_MEMORY_NOTES = {"Rss": "", "RssFile": "RssFile: file-backed pages mapped (page cache, shared)",
                 "RssAnon": "RssAnon: anonymous pages (heap, copied on write)",
                 "Pss": "Pss: shared pages split among the processes mapping them",
                 "Private_Dirty": "Private_Dirty: pages copied on write and allocated"}  # fmt: skip


def _rss() -> dict[str, int]:
    """This process's memory in bytes: ``Rss``, ``Pss`` and ``Private_Dirty`` from ``/proc/self/smaps_rollup``,
    ``RssFile`` and ``RssAnon`` (the parts of Rss: file-backed and anonymous) from ``/proc/self/status``. A forked
    worker's Rss already counts the parent's pages it shares, so copy-on-write does not raise it; Rss grows with the
    file pages it maps (a memory-mapped index or LMDB: shared, clean page cache: RssFile). ``Private_Dirty`` grows
    with what the worker really adds: pages copied on write (reference counts of shared Python objects) and its own
    allocations."""
    got = {}
    for path, keys in (("/proc/self/smaps_rollup", ("Rss", "Pss", "Private_Dirty")),
                       ("/proc/self/status", ("RssFile", "RssAnon"))):
        with open(path) as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in keys:
                    got[key] = int(rest.split()[0]) * 1024
    return got


class _Probe:
    """Reads samples of ``source`` (a dataset, or a list of sample dicts) and answers each with this worker's
    resident set after the read and how many it read so far."""

    def __init__(self, source):
        self.source, self.calls = source, 0

    def __len__(self):
        return len(self.source)

    def __getitem__(self, i):
        sample = self.source[i]
        self.calls += 1
        import torch.utils.data as tud

        return tud.get_worker_info().id, self.calls, _rss(), len(sample["text"])


def child_workers(mode: str, jsonl: str, db: str, cache: str, workers: int, samples: int, seed: int) -> None:
    from benchmarks import harness
    from lfvila.data.loader import SeededDataLoader

    try:
        loaded = _load(mode, jsonl, db, cache)
        source = loaded[1] if mode == "objects" else loaded
        order = np.random.default_rng(seed).permutation(len(source))[: workers * samples].tolist()
        loader = SeededDataLoader(_Probe(source), batch_size=None, sampler=order, num_workers=workers,
                                  multiprocessing_context="fork", prefetch_factor=2, seed=seed)
        first, last = {}, {}
        for wid, calls, rss, _ in loader:
            if calls == 1:
                first[wid] = rss
            last[wid] = (calls, rss)
        if any(last[w][0] != samples for w in last) or len(last) != workers:
            raise RuntimeError(f"workers read {sorted(c for c, _ in last.values())}, expected {samples} each")
        growth = {k: [(last[w][1][k] - first[w][k]) / 2**20 for w in sorted(last)] for k in MEMORY}
        harness.report_to_parent({"growth_mb": {k: sum(v) for k, v in growth.items()}, "per_worker_mb": growth["Rss"]})
    except Exception as exc:
        harness.report_to_parent({"error": harness.describe_exception(exc)})
        raise SystemExit(1) from None


# --------------------------------------------------------------------------------------------------- parts
def _row(provider, part, n, metric, unit, values=None, status="ok", note=""):
    from benchmarks import harness

    return harness.make_row(kernel=KERNEL, provider=provider, mode=part, x_name="rows", x_value=str(n),
                            shape=f"rows={n}", metric=metric, unit=unit, dtype="-", values=values, status=status,
                            note=note)


def run_annotations(n: int, jsonl: Path, db: Path, repeats: int, scratch: Path, log,
                    objects_max_rows: int = 200_000) -> list[dict]:
    from benchmarks import harness
    from benchmarks.suite import quantiles

    rows = []
    with tempfile.TemporaryDirectory(dir=scratch, prefix="cache-") as warm:
        for mode in MODES:
            if mode == "objects" and n > objects_max_rows:
                rows += [_row(mode, "annotations", n, m, u, status="skipped", note=f"rows > --objects-max-rows "
                              f"{objects_max_rows}") for m, u in (("load_s", "s"), ("peak_rss_mb", "MB"))]
                continue
            seconds, peaks, note = [], [], ""
            try:
                for r in range(repeats):
                    with tempfile.TemporaryDirectory(dir=scratch, prefix="cache-") as cold:
                        cache = warm if mode == "jsonl-cached" else cold
                        if mode == "jsonl-cached" and r == 0 and not any(Path(warm).iterdir()):
                            _load("jsonl-first", str(jsonl), str(db), warm)  # fill the warm cache once
                        got = harness.run_fresh_process(["-m", "benchmarks.bench_data", "--child", "annotations",
                                                         "--mode", mode, "--jsonl", str(jsonl), "--lmdb", str(db),
                                                         "--cache", cache])
                    seconds.append(got["seconds"])
                    peaks.append(got["increase_mb"])
                    note = "" if got["exact"] else "peak is a lower bound (VmHWM not reset)"
            except Exception as exc:  # a child's failure (RuntimeError) or the cache fill's own: a failed row
                rows += [_row(mode, "annotations", n, m, u, status="failed", note=str(exc)[:200])
                         for m, u in (("load_s", "s"), ("peak_rss_mb", "MB"))]
                log(f"  {mode:13s} failed: {exc}")
                continue
            rows.append(_row(mode, "annotations", n, "load_s", "s", quantiles(seconds),
                             note=f"{repeats} fresh processes"))
            rows.append(_row(mode, "annotations", n, "peak_rss_mb", "MB", quantiles(peaks), note=note))
            log(f"  {mode:13s} {statistics.median(seconds):8.3f} s  {statistics.median(peaks):8.1f} MB")
    return rows


def run_workers(n: int, jsonl: Path, db: Path, workers: int, samples: int, scratch: Path, seed: int, log) -> list:
    from benchmarks import harness

    rows = []
    with tempfile.TemporaryDirectory(dir=scratch, prefix="cache-") as cache:
        for mode in WORKER_MODES:
            try:
                if mode == "jsonl-cached" and not any(Path(cache).iterdir()):
                    _load("jsonl-first", str(jsonl), str(db), cache)
                got = harness.run_fresh_process(["-m", "benchmarks.bench_data", "--child", "workers", "--mode", mode,
                                                 "--jsonl", str(jsonl), "--lmdb", str(db), "--cache", cache,
                                                 "--workers", str(workers), "--worker-samples", str(samples),
                                                 "--seed", str(seed)])
            except Exception as exc:
                rows.append(_row(mode, "workers", n, "rss_growth_mb", "MB", status="failed", note=str(exc)[:200]))
                log(f"  {mode:13s} failed: {exc}")
                continue
            per = ", ".join(f"{v:.1f}" for v in got["per_worker_mb"])
            what = f"{workers} workers x {samples} samples"
            for key, metric in MEMORY.items():
                rows.append(_row(mode, "workers", n, metric, "MB", {"p50": got["growth_mb"][key]},
                                 note=f"{what}; " + (_MEMORY_NOTES[key] or f"per worker MB: {per}")))
            log(f"  {mode:13s} {what}: " + ", ".join(f"{k} {v:+.1f} MB" for k, v in got["growth_mb"].items())
                + f" (Rss per worker {per})")
    return rows


def run_decode(scratch: Path, videos: int, seconds: float, repeats: int, log) -> list[dict]:
    """bench_decode's clips4x8 on raw-h264 and prep-h264, one process with one FFmpeg thread."""
    from benchmarks import bench_decode as bd

    class _Keep:  # collects bench_decode's rows instead of writing them to its own CSV
        def write(self, rows):
            return list(rows)

    src = bd.Source(videos=videos, seconds=seconds)
    files = bd.make_inputs(src, ["raw-h264", "prep-h264"], scratch / "decode-inputs", log=log)
    opts = bd.Options(procs=1, pyav_threads=1)
    got = bd.run(files, {"pyav-Nproc": bd.PROVIDERS["pyav-Nproc"]}, ["clips4x8"], opts, _Keep(), src, repeats,
                 log=log)
    cell = {(r["x_value"], r["metric"]): r for r in got}
    rows = []
    for name in ("raw-h264", "prep-h264"):
        rate, cores = cell.get((name, "clips_per_s")), cell.get((name, "cpu_cores"))
        if not rate or not cores or rate["status"] != "ok" or cores["status"] != "ok":
            why = (rate or cores or {}).get("note", "not measured")
            rows.append(_row(name, "decode", 0, "samples_per_core_s", "samples/s", status="failed", note=why))
            continue
        per_core = {k: float(rate[k]) / float(cores["p50"]) for k in ("p20", "p50", "p80")}
        note = (f"clips4x8 (32 frames) of {seconds:g} s videos, pyav 1 process x 1 thread: "
                f"{float(rate['p50']):.3g} samples/s on {float(cores['p50']):.2f} cores")
        rows.append(_row(name, "decode", 0, "samples_per_core_s", "samples/s", per_core, note=note))
        need = {k: ASSUMED_SAMPLES_PER_S / v for k, v in per_core.items()}
        need["p20"], need["p80"] = need["p80"], need["p20"]
        rows.append(_row(name, "decode", 0, "cores_per_gpu", "cores", need,
                         note=f"ASSUMED input rate {ASSUMED_SAMPLES_PER_S} samples/s (batch 16 x 2 steps/s)"))
        log(f"  {name:10s} {per_core['p50']:.2f} samples/s per core -> {need['p50']:.1f} cores per GPU (assumed rate)")
    return rows


# --------------------------------------------------------------------------------------------------- report
def _p50(rows, provider, part, metric, n=None):
    for r in reversed(rows):  # the newest row of a metric
        if (r["provider"], r["mode"], r["metric"]) == (provider, part, metric) and r["status"] == "ok" and \
                (n is None or str(r["x_value"]) == str(n)):
            return float(r["p50"])
    return None


def markdown_summary(rows: Sequence[dict]) -> str:
    sizes = sorted({int(r["x_value"]) for r in rows if r["mode"] == "annotations"})
    out = []
    if sizes:
        out += ["**annotations**: load seconds / peak MB above the interpreter's baseline (median of fresh processes)",
                "", "| mode | " + " | ".join(f"{n:,}" for n in sizes) + " |", "|---|" + "---|" * len(sizes)]
        for mode in MODES:
            cells = []
            for n in sizes:
                s, m = _p50(rows, mode, "annotations", "load_s", n), _p50(rows, mode, "annotations", "peak_rss_mb", n)
                status = next((r["status"] for r in reversed(rows) if (r["provider"], r["mode"], str(r["x_value"]))
                               == (mode, "annotations", str(n))), "not run")
                cells.append(status if s is None else f"{s:.2f} s / {m:.0f} MB")
            out.append(f"| {mode} | " + " | ".join(cells) + " |")
    work = [r for r in rows if r["mode"] == "workers"]
    if work:
        out += ["", "**workers**: growth summed over the workers while they read their samples: Rss (every mapped "
                "page, file pages of a memory-mapped index or LMDB included), its parts RssFile (file-backed: "
                "shared page cache) and RssAnon (anonymous), Pss (shared pages split among the processes mapping "
                "them) and Private_Dirty (pages copied on write or allocated: the memory the workers really add)",
                "", "| mode | metric | growth | note |", "|---|---|---|---|"]
        for r in work:
            cell = "failed" if r["status"] != "ok" else f"{float(r['p50']):.1f} MB"
            out.append(f"| {r['provider']} | {r['metric']} | {cell} | {r['note']} |")
    dec = [r for r in rows if r["mode"] == "decode"]
    if dec:
        out += ["", "**decode** (32 frames a sample, one core)", "", "| input | metric | median | note |",
                "|---|---|---|---|"]
        for r in dec:
            cell = "failed" if r["status"] != "ok" else format(float(r["p50"]), ".3g")
            out.append(f"| {r['provider']} | {r['metric']} | {cell} | {r['note']} |")
    out += ["", "**targets**", ""] + targets_report(rows)
    return "\n".join(out)


def targets_report(rows: Sequence[dict]) -> list[str]:
    lines = []
    for (mode, metric), limit in TARGETS.items():
        got = _p50(rows, mode, "annotations", metric, TARGET_ROWS)
        verdict = "not run" if got is None else ("met" if got <= limit else "missed")
        lines.append(f"- {mode} {metric} at {TARGET_ROWS:,} rows <= {limit:g}: {verdict}"
                     + ("" if got is None else f" ({got:.3g})"))
    for mode in ("jsonl-cached", "lmdb-open"):
        for metric, what in (("rss_growth_mb", "RSS"), ("private_growth_mb", "private (Private_Dirty)")):
            got = _p50(rows, mode, "workers", metric)
            verdict = "not run" if got is None else ("met" if got <= TARGET_WORKER_MB else "missed")
            lines.append(f"- {mode} workers' total {what} growth <= {TARGET_WORKER_MB:g} MB: {verdict}"
                         + ("" if got is None else f" ({got:.1f} MB)"))
    return lines


def plot(rows: Sequence[dict], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, (metric, unit) in zip(axes, (("load_s", "s"), ("peak_rss_mb", "MB"))):
        for mode in MODES:
            pts = sorted((int(r["x_value"]), float(r["p50"])) for r in rows if r["mode"] == "annotations"
                         and r["provider"] == mode and r["metric"] == metric and r["status"] == "ok")
            if pts:
                ax.plot(*zip(*pts), marker="o", label=mode)
        ax.set(xscale="log", yscale="symlog" if metric == "load_s" else "log", xlabel="official rows",
               ylabel=f"{metric} ({unit})", title=f"lfvila_pretrain annotations: {metric}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------------------------------- CLI
def _parse(argv):
    from benchmarks import suite

    p = suite.parser("benchmarks.bench_data", __doc__)
    suite.add_output(p, "benchmarks/results/data-cpu.csv", "benchmarks/results/data-cpu.csv")
    arg = p.add_argument
    arg("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    arg("--rows", default="10000,30000,100000,200000", help="row counts of the annotations part")
    arg("--repeats", type=int, default=3, help="fresh-process loads per (rows, mode); decode: timed passes")
    arg("--objects-max-rows", type=int, default=200_000, help="largest row count of the objects mode (4.4 KB a row)")
    arg("--worker-rows", type=int, default=200_000)
    arg("--workers", type=int, default=8)
    arg("--worker-samples", type=int, default=1000)
    arg("--decode-videos", type=int, default=4)
    arg("--decode-seconds", type=float, default=60.0)
    arg("--seed", type=int, default=0)
    arg("--scratch", default="benchmarks/results/_scratch/data-inputs", help="where generated inputs are kept")
    arg("--plot", default=None, help="PNG of the annotation scaling")
    arg("--summarize", action="store_true", help="run nothing: the markdown and plot from the rows in --out")
    # a fresh child process (internal)
    arg("--child", choices=("annotations", "workers"), help=argparse.SUPPRESS)
    arg("--mode", help=argparse.SUPPRESS)
    arg("--jsonl", help=argparse.SUPPRESS)
    arg("--lmdb", help=argparse.SUPPRESS)
    arg("--cache", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if min(args.repeats, args.workers, args.worker_samples, args.worker_rows, args.decode_videos) < 1:
        p.error("--repeats, --workers, --worker-samples, --worker-rows and --decode-videos must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> list[dict]:
    args = _parse(argv)
    if args.child == "annotations":
        child_annotations(args.mode, args.jsonl, args.lmdb, args.cache)
        return []
    if args.child == "workers":
        child_workers(args.mode, args.jsonl, args.lmdb, args.cache, args.workers, args.worker_samples, args.seed)
        return []
    from benchmarks import harness, suite

    if args.summarize:
        rows = harness.read_rows(args.out)
        if args.plot:
            plot(rows, args.plot)
        return harness.finish(rows, args.out, time.perf_counter(), markdown_summary(rows), args.markdown)
    parts = suite.pick(args.parts, PARTS, "parts")
    sizes = [int(x) for x in args.rows.split(",") if x]
    scratch = Path(args.scratch)
    scratch.mkdir(parents=True, exist_ok=True)
    session = suite.start(args, "cpu", args.out)
    writer = session.writer
    print(f"# parts {parts}", flush=True)
    log = harness.log
    rows: list[dict] = []
    if "annotations" in parts:
        for n in sizes:
            log(f"# annotations: {n:,} rows")
            jsonl, db = make_inputs(n, scratch, args.seed)
            rows += writer.write(run_annotations(n, jsonl, db, args.repeats, scratch, log, args.objects_max_rows))
    if "workers" in parts:
        log(f"# workers: {args.worker_rows:,} rows")
        jsonl, db = make_inputs(args.worker_rows, scratch, args.seed)
        rows += writer.write(run_workers(args.worker_rows, jsonl, db, args.workers, args.worker_samples, scratch,
                                         args.seed, log))
    if "decode" in parts:
        log("# decode")
        rows += writer.write(run_decode(scratch, args.decode_videos, args.decode_seconds, args.repeats, log))
    if args.plot and "annotations" in parts:
        plot(rows, args.plot)
    return session.finish(rows, markdown_summary(rows))


if __name__ == "__main__":
    sys.exit(0 if main() is not None else 1)
