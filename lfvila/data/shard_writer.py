"""Write the prepared clips of an annotation file into WebDataset tar shards, with their annotation rows and an index.

    python -m lfvila.data.prepare SRC DST --shards --annotations ANN --format FMT [--format-kwargs JSON]
        [--shard-samples N | --shard-size BYTES] [--on-error raise|skip] [--fps 3 --gop 8 --max-height 240
        --codec h264 --crf 18 --workers N --timeout S] [--force] [--report FILE]

The annotation file is read with ``build_dataset(FMT, ANN, SRC, on_error=..., **format_kwargs)``, so every
``lfvila.data.formats`` format works and the annotation indices are that dataset's. Each sample's video file(s)
(``sample["clips"]`` for rows with one file per clip, else ``sample["video"]``) are re-encoded with
:func:`lfvila.data.prepare.prepare_one` (the same fps / GOP / height / codec options, ``--workers`` processes, a
bounded window of samples prepared ahead) into a temporary folder under DST, and the sample is written as one
WebDataset sample (``webdataset.TarWriter``; layout and ``index.json``: :mod:`lfvila.data.shard_index`). A sample whose
video failed (or whose row could not be read) is left out, never written in part; each video gets a report row as
``lfvila.data.prepare`` writes (path, output = ``<shard>/<member>`` or ``""``, status, reason, in/out frames, seconds)
plus ``index``, ``key`` and ``sample`` (``written`` / ``left out``); the exit code is 1 when any video failed.

Shard sizes: ``--shard-samples N`` (default 1000) splits the N_ann annotation samples into ``ceil(N_ann / N)`` equal
ranges (sizes differ by at most one before failures: the reader's equal-work rule drops less when shards are equal);
``--shard-size BYTES`` (``512M``, ``2G``, ...) starts a new shard when the next sample would take it past BYTES.

Atomic and resumable: a shard is written under a temporary name and renamed when complete, then its record
(``DST/.shards/shard-NNNNNN.json``: samples, indices, report rows) is written the same way. A rerun with the same
annotation file (size and mtime) and options keeps every shard whose tar and record are complete and continues after
the last one; other options are refused (``--force`` rewrites everything). ``index.json`` and the report are written
when the last shard is done.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import tempfile
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

from . import rowstore
from .formats import build_dataset
from .loader import sample_mode
from .prepare import OUT_EXTS, prepare_one
from .shard_index import (
    INDEX_FORMAT,
    INDEX_VERSION,
    KEY_DIGITS,
    READ_VERSIONS,
    ShardError,
    expand_runs,
    index_runs,
    sample_key,
    sample_offsets,
    sample_to_json,
)

PROGRESS = ".shards"  # records of finished shards, for resuming
DEFAULT_SHARD_SAMPLES = 1000
_MTIME = 946684800.0  # fixed member mtime (2000-01-01): the same inputs give the same tar bytes


def parse_size(text: str) -> int:
    """``"1000"``, ``"512K"``, ``"64M"``, ``"2G"``, ``"1T"`` (powers of 1024) -> bytes; ValueError otherwise."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    t = str(text).strip().upper().removesuffix("B")
    try:
        value = float(t[:-1]) * units[t[-1]] if t and t[-1] in units else float(t)
    except ValueError:
        raise ValueError(f"not a size in bytes: {text!r} (e.g. 1000000, 512M, 2G)") from None
    if value < 1:
        raise ValueError(f"size must be at least one byte, got {text!r}")
    return int(value)


def _tar_bytes(sizes) -> int:
    """Tar bytes of members of ``sizes`` bytes: a 512-byte header each, the data padded to 512."""
    return sum(512 + -(-int(n) // 512) * 512 for n in sizes)


def _index_text(index: dict) -> str:
    """``index.json`` with one top-level key, and one shard, per line (readable, and compact for many shards)."""
    lines = [f" {json.dumps(k)}: {json.dumps(v)}" for k, v in index.items() if k != "shards"]
    shards = ",\n".join(f"  {json.dumps(s)}" for s in index["shards"])
    return "{\n" + ",\n".join(lines) + f',\n "shards": [\n{shards}\n ]\n}}\n'


def _atomic_json(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(_index_text(obj) if path.name == "index.json" else json.dumps(obj))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _stamp(path: Path) -> list[int]:
    return list(rowstore.file_stamp(path / "data.mdb" if path.is_dir() else path))


class _Job:
    """One source video being prepared into ``out``; ``refs``: samples of the window that need it."""

    def __init__(self, src: str, out: Path, future=None, run=None):
        self.src, self.out, self.future, self.run, self.row, self.refs = src, out, future, run, None, 0

    def result(self) -> dict:
        if self.row is None:
            try:
                self.row = self.future.result() if self.future is not None else self.run()
            except BrokenProcessPool:
                self.row = {"path": self.src, "output": str(self.out), "status": "failed", "in_frames": 0,
                            "out_frames": 0, "seconds": 0.0,
                            "reason": "a worker process died (decoder crash on this or another video); rerun with "
                                      "--force"}
        return self.row


class _Preparer:
    """Prepares the videos of the samples ``[start, stop)`` ahead of the writer (``workers`` processes, a window of
    ``ahead`` samples) and gives them back in sample order (:meth:`samples`)."""

    def __init__(self, src: Path, tmp: Path, workers: int, kwargs: dict):
        self.src, self.tmp, self.workers, self.kwargs = src, tmp, workers, kwargs
        self.ahead = max(8, 4 * workers)
        self.pool = None
        self.jobs: dict[str, _Job] = {}
        self.count = 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)

    def _new_pool(self):
        # spawn: workers must not inherit the parent's threads (FFmpeg, torch) through fork
        self.pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"))

    def _job(self, path: str) -> _Job:
        job = self.jobs.get(path)
        if job is None:
            self.count += 1
            out = self.tmp / f"{self.count}{OUT_EXTS[self.kwargs['codec']]}"
            if self.workers <= 1:
                job = _Job(path, out, run=lambda: prepare_one(path, out, force=True, **self.kwargs))
            else:
                if self.pool is None:
                    self._new_pool()
                try:
                    future = self.pool.submit(prepare_one, path, out, force=True, **self.kwargs)
                except BrokenProcessPool:  # a crashed worker broke the pool: later videos get a fresh one
                    self._new_pool()
                    future = self.pool.submit(prepare_one, path, out, force=True, **self.kwargs)
                job = _Job(path, out, future=future)
            self.jobs[path] = job
        job.refs += 1
        return job

    def _release(self, job: _Job) -> None:
        job.refs -= 1
        if job.refs == 0:
            del self.jobs[job.src]
            job.out.unlink(missing_ok=True)

    def _rel(self, path: str) -> str:
        try:
            return str(Path(path).relative_to(self.src))
        except ValueError:
            return str(path)

    def samples(self, annotations, start: int, stop: int):
        """Yield ``(index, sample, outputs, rows)`` in index order: ``outputs`` the prepared files of the sample's
        videos (valid until the next item), or None when a video failed or the row could not be read."""
        window: deque = deque()
        nxt = start
        while window or nxt < stop:
            while nxt < stop and len(window) < self.ahead:
                try:
                    sample = annotations[nxt]
                except ValueError as e:  # a stored row that does not parse (an LMDB row's AnnotationError)
                    window.append((nxt, None, [], str(e)))
                else:
                    files = list(sample["clips"]) if sample.get("clips") else [sample["video"]]
                    window.append((nxt, sample, [self._job(f) for f in files], None))
                nxt += 1
            index, sample, jobs, error = window.popleft()
            key = sample_key(index)
            if sample is None:
                row = {"path": f"{getattr(annotations, 'annotation_path', 'annotations')} (index {index})",
                       "output": "", "status": "failed", "reason": error, "in_frames": 0, "out_frames": 0,
                       "seconds": 0.0}
                yield index, None, None, [{**row, "index": index, "key": key, "sample": "left out"}]
                continue
            results = [job.result() for job in jobs]
            ok = all(r["status"] == "ok" for r in results)
            rows = [{**r, "path": self._rel(job.src), "output": "", "index": index, "key": key,
                     "sample": "written" if ok else "left out"} for r, job in zip(results, jobs)]
            yield index, sample, [job.out for job in jobs] if ok else None, rows
            for job in jobs:
                self._release(job)


class _ShardOut:
    """Shard ``number`` being written: a ``webdataset.TarWriter`` on a temporary file, renamed when closed."""

    def __init__(self, dst: Path, number: int, start: int):
        self.dst, self.number, self.start = dst, number, start
        self.name = f"shard-{number:06d}.tar"
        self.tmp = dst / f".{self.name}.tmp-{os.getpid()}"
        self.file = self.writer = None
        self.indices, self.failed, self.rows, self.labels, self.modes = [], [], [], [], []
        self.bytes = 0

    @property
    def count(self) -> int:
        return len(self.indices)

    def fail(self, index: int, rows: list[dict]) -> None:
        self.failed.append(index)
        self.rows.extend(rows)

    def add(self, index: int, sample: dict, outputs: list[Path], rows: list[dict], ext: str) -> None:
        import webdataset as wds

        key = sample_key(index)
        clips = bool(sample.get("clips"))
        exts = [f"{k}{ext}" for k in range(len(outputs))] if clips else [ext.lstrip(".")]
        members = {e: Path(p).read_bytes() for e, p in zip(exts, outputs)}
        meta = sample_to_json(sample, index, [f"{key}.{e}" for e in exts], key)
        members["json"] = json.dumps(meta).encode()
        if self.writer is None:
            self.file = open(self.tmp, "wb")
            self.writer = wds.TarWriter(self.file, encoder=False, mtime=_MTIME)
        self.writer.write({"__key__": key, **members})
        self.bytes += _tar_bytes(len(v) for v in members.values())
        self.indices.append(index)
        self.labels.append(sample.get("label"))
        self.modes.append(sample_mode(sample))
        self.rows.extend({**r, "output": f"{self.name}/{key}.{e}"} for r, e in zip(rows, exts))

    def close(self, stop: int) -> dict:
        """Finish the tar (fsync, rename) and its record; returns the record (``name`` None for an empty shard)."""
        name = None
        if self.writer is not None:
            self.writer.close()
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
            os.replace(self.tmp, self.dst / self.name)
            name = self.name
        record = {"shard": self.number, "name": name, "samples": self.count,
                  "bytes": (self.dst / name).stat().st_size if name else 0, "start": self.start, "stop": stop,
                  "indices": index_runs(self.indices), "failed": self.failed, "rows": self.rows,
                  "offsets": sample_offsets(self.dst / name, self.indices) if name else [0],
                  "mode": self.modes[0] if self.modes else None,
                  "labels": self.labels if self.modes and self.modes[0] == "classification" else None}
        _atomic_json(self.dst / PROGRESS / f"shard-{self.number:06d}.json", record)
        return record


def _numbered(path: Path) -> int | None:
    stem = path.name.split(".")[0]
    return int(stem[6:]) if stem.startswith("shard-") and stem[6:].isdigit() else None


def _resume(dst: Path, options: dict, force: bool) -> list[dict]:
    """The records of the shards an earlier run finished with these ``options`` (in order); stale later shards,
    records and temporary files removed. ``force``: start over."""
    prog = dst / PROGRESS
    for tmp in dst.glob(".shard-*.tar.tmp-*"):
        tmp.unlink()
    if force:
        shutil.rmtree(prog, ignore_errors=True)
        for p in [*dst.glob("shard-*.tar"), dst / "index.json"]:
            p.unlink(missing_ok=True)
    opts = prog / "options.json"
    if opts.is_file():
        old = json.loads(opts.read_text())
        if old.get("version") in READ_VERSIONS:  # an older index version: the same tars, offsets added below
            old = {**old, "version": options["version"]}
        if old != options:
            diff = ", ".join(f"{k}: {old.get(k)!r} -> {options.get(k)!r}" for k in sorted(set(old) | set(options))
                             if old.get(k) != options.get(k))
            raise ValueError(f"{dst} holds shards written from other inputs or options ({diff}); rerun with --force "
                             f"to rewrite them, or choose another DST")
    elif any(dst.glob("shard-*.tar")):
        raise ValueError(f"{dst} holds shard-*.tar files but no {PROGRESS}/options.json (not written by this tool, "
                         f"or by an older run); rerun with --force to rewrite them, or choose another DST")
    prog.mkdir(parents=True, exist_ok=True)
    _atomic_json(opts, options)
    records: list[dict] = []
    while (rec := prog / f"shard-{len(records):06d}.json").is_file():
        r = json.loads(rec.read_text())
        tar = dst / r["name"] if r["name"] else None
        if tar is not None and (not tar.is_file() or tar.stat().st_size != r["bytes"]):
            break
        if "offsets" not in r:  # recorded by a version-1 writer
            try:
                r["offsets"] = sample_offsets(tar, expand_runs(r["indices"])) if tar is not None else [0]
            except ShardError:
                break
        records.append(r)
    for p in [*prog.glob("shard-*.json"), *dst.glob("shard-*.tar")]:
        if (n := _numbered(p)) is not None and n >= len(records):
            p.unlink()
    return records


def write_shards(src, dst, annotations, format_name: str, *, format_kwargs: dict | None = None,
                 on_error: str = "raise", shard_samples: int | None = None, shard_size: int | None = None,
                 fps: float = 3.0, gop: int = 8, max_height: int | None = 240, codec: str = "h264", crf: int = 18,
                 workers: int = 1, timeout: float = 600.0, force: bool = False, report=None) -> dict:
    """Shard the samples of ``annotations`` (format ``format_name``, videos under ``src``) into ``dst`` (module
    docstring); returns ``{"index": the index dict, "rows": report rows, "kept": shards kept from an earlier run}``.
    Bad arguments are ValueErrors naming them."""
    if codec not in OUT_EXTS:
        raise ValueError(f"codec must be one of {sorted(OUT_EXTS)}, got {codec!r}")
    if shard_samples is not None and shard_size is not None:
        raise ValueError("give --shard-samples or --shard-size, not both")
    if shard_samples is None and shard_size is None:
        shard_samples = DEFAULT_SHARD_SAMPLES
    if (shard_samples is not None and shard_samples < 1) or (shard_size is not None and shard_size < 1):
        raise ValueError(f"--shard-samples / --shard-size must be positive, got {shard_samples or shard_size}")
    src, dst, ann_path = Path(src), Path(dst), Path(annotations)
    if not src.is_dir():
        raise ValueError(f"SRC {src} is not a folder")
    ann = build_dataset(format_name, ann_path, src, on_error=on_error, **(format_kwargs or {}))
    n = len(ann)
    dst.mkdir(parents=True, exist_ok=True)
    prepare = {"fps": fps, "gop": gop, "max_height": max_height, "codec": codec, "crf": crf}
    rule = {"samples": shard_samples} if shard_samples is not None else {"bytes": shard_size}
    options = {"format": INDEX_FORMAT, "version": INDEX_VERSION, "annotation_format": format_name,
               "annotations": str(ann_path.resolve()), "annotation_stamp": _stamp(ann_path),
               "video_root": str(src.resolve()), "format_kwargs": format_kwargs or {}, "on_error": on_error,
               "annotation_samples": n, "prepare": prepare, "shard_rule": rule}
    options = json.loads(json.dumps(options))  # as it reads back from options.json (tuples become lists)
    records = _resume(dst, options, force)
    kept = len(records)
    bounds = None
    if shard_samples is not None:
        k = -(-n // shard_samples)
        bounds = [j * n // k for j in range(k + 1)] if n else [0]
    start = records[-1]["stop"] if records else 0
    kwargs = dict(fps=fps, gop=gop, max_height=max_height, codec=codec, crf=crf, timeout=timeout)
    tmp = Path(tempfile.mkdtemp(prefix=".prepare-", dir=dst))
    try:
        with _Preparer(src, tmp, workers, kwargs) as prep:
            shard = _ShardOut(dst, len(records), start) if start < n else None
            for index, sample, outputs, rows in prep.samples(ann, start, n):
                if bounds is not None and index >= bounds[shard.number + 1]:
                    records.append(shard.close(index))
                    shard = _ShardOut(dst, len(records), index)
                if outputs is None:
                    shard.fail(index, rows)
                    continue
                # the json member (not encoded yet) counted as one header and one block
                need = _tar_bytes(os.path.getsize(p) for p in outputs) + 1024
                if shard_size is not None and shard.count and shard.bytes + need > shard_size:
                    records.append(shard.close(index))
                    shard = _ShardOut(dst, len(records), index)
                shard.add(index, sample, outputs, rows, OUT_EXTS[codec])
            if shard is not None:
                records.append(shard.close(n))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    mode = next((r["mode"] for r in records if r["mode"]), "paragraph")
    index = {
        "format": INDEX_FORMAT, "version": INDEX_VERSION, "annotation_format": format_name,
        "annotations": options["annotations"], "video_root": options["video_root"], "annotation_samples": n,
        "annotation_rows_skipped": ann.skipped, "mode": mode, "key_digits": KEY_DIGITS, "ext": OUT_EXTS[codec],
        "prepare": prepare, "shard_rule": rule, "samples": sum(r["samples"] for r in records),
        "failed": sorted(i for r in records for i in r["failed"]),
        "shards": [{"name": r["name"], "samples": r["samples"], "bytes": r["bytes"], "indices": r["indices"],
                    **({"labels": r["labels"]} if r["labels"] is not None else {}), "offsets": r["offsets"]}
                   for r in records if r["name"]],
    }
    _atomic_json(dst / "index.json", index)
    rows = [row for r in records for row in r["rows"]]
    report = Path(report) if report else dst / "prepare_report.jsonl"
    tmp_report = report.with_name(f".{report.name}.tmp-{os.getpid()}")
    tmp_report.write_text("".join(json.dumps(row) + "\n" for row in rows))
    os.replace(tmp_report, report)
    return {"index": index, "rows": rows, "kept": kept}


def summary(result: dict) -> str:
    index, rows = result["index"], result["rows"]
    failed = sum(r["status"] == "failed" for r in rows)
    kept = f" ({result['kept']} kept from an earlier run)" if result["kept"] else ""
    return (f"{index['samples']} of {index['annotation_samples']} samples in {len(index['shards'])} shards{kept}; "
            f"{len(rows)} videos, {failed} failed; {len(index['failed'])} samples left out")
