"""Re-encode a folder of videos for fast random access: the HD-VILA / LF-VILA recipe (a constant 3 fps, height at most
240) plus a short keyframe interval, so any frame is at most ``gop - 1`` decoded frames away from a keyframe.

    python -m lfvila.data.prepare SRC DST --fps 3 --gop 8 --max-height 240 [--codec h264] [--workers N]

Every video under SRC (recursively, by extension) becomes ``DST/<same relative path>.mp4`` (``.webm`` for
``--codec vp9``). Per video: decode with PyAV the video stream the decoders read (FFmpeg's best stream,
:func:`lfvila.data.decode.video_stream`; with several video streams not necessarily the first) -> resample to ``fps``
by timestamps (output frame k, at ``k / fps`` s after the first frame, is the latest source frame shown at that time;
frames are repeated when the source is slower) -> scale to ``max-height`` keeping the aspect ratio (area filter; even
width and height; never upscaled) -> encode with a keyframe every ``gop`` frames
(:func:`lfvila.data.encode.write_video`). Videos run in parallel processes.

``--shards``: the samples of an annotation file instead of a folder, each sample's videos prepared the same way and
written with its annotation row into WebDataset tar shards plus an index (:mod:`lfvila.data.shard_writer`)::

    python -m lfvila.data.prepare SRC DST --shards --annotations ANN --format FMT [--shard-samples N | --shard-size B]

Resumable: outputs are written under a temporary name and renamed when complete, so an existing output that probes
is skipped (``--force`` redoes it). A JSON-lines report (``DST/prepare_report.jsonl`` unless ``--report``) gets one row
per video: path, output, status (ok / skipped / failed), reason, in_frames, out_frames, seconds. Bad inputs (corrupt,
truncated, audio-only, decoder errors, over ``--timeout`` seconds) are reported, never crash the batch, and write no
output; the exit code is 1 when any video failed. Truncated includes a file cut after its header (an MP4 with its index
first), which demuxes cleanly but ends before the frames the header declares: it fails by the rule that makes the
decoders refuse it (:func:`lfvila.data.decode.truncation`).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

VIDEO_EXTS = {".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".flv", ".wmv", ".mpg", ".mpeg", ".ts", ".3gp",
              ".ogv"}
OUT_EXTS = {"h264": ".mp4", "vp9": ".webm"}
_TOL_S = 1e-4  # timestamps within 0.1 ms count as equal when resampling


class BadInput(Exception):
    """A video that cannot be prepared; the message is the reason in the report."""


def find_videos(src) -> list[Path]:
    """Relative paths of the videos under ``src`` (recursive, sorted; hidden files and folders skipped)."""
    src = Path(src)
    found = []
    for p in src.rglob("*"):
        rel = p.relative_to(src)
        if p.is_file() and p.suffix.lower() in VIDEO_EXTS and not any(s.startswith(".") for s in rel.parts):
            found.append(rel)
    return sorted(found)


def scaled_size(height: int, width: int, max_height: int | None) -> tuple[int, int]:
    """``(H, W)`` after scaling to at most ``max_height`` rows (aspect kept, both even, at least 2; never upscaled)."""
    if max_height and height > max_height:
        width, height = width * max_height / height, max_height
    return max(2, int(height) // 2 * 2), max(2, int(round(width / 2)) * 2)


def _decoded(container, stream, packets: list):
    """The frames of ``stream`` in presentation order; ``packets[0]`` counts its demuxed packets (flush packets not
    counted, as :func:`lfvila.data.decode.truncation` wants them)."""
    from lfvila.data.decode import is_flush_packet

    for packet in container.demux(stream):
        packets[0] += not is_flush_packet(packet)
        yield from packet.decode()  # the flush packet drains the decoder


def _frames(src: str, fps: float, max_height: int | None, deadline: float, counts: dict):
    """Yield uint8 ``(H, W, 3)`` RGB frames of ``src``'s :func:`~lfvila.data.decode.video_stream` resampled to ``fps``
    and scaled; counts in/out frames. :class:`BadInput` (possibly after some frames) when it cannot be read to the end,
    or ends before the frames its header declares (the decoders' :func:`~lfvila.data.decode.truncation` rule)."""
    import av
    from av.video.reformatter import Interpolation

    from lfvila.data.decode import DecodeError, truncation, video_stream

    # area averaging (anti-aliased downscaling), full-resolution chroma, accurate rounding
    area = Interpolation.AREA | Interpolation.FULL_CHR_H_INT | Interpolation.ACCURATE_RND
    try:
        container = av.open(src, timeout=max(1.0, deadline - time.monotonic()))
    except (av.FFmpegError, OSError) as e:
        raise BadInput(f"cannot open ({getattr(e, 'strerror', None) or e}): truncated, corrupt or not a video") from e
    with container:
        try:
            stream = video_stream(container, src)
        except DecodeError as e:
            raise BadInput(e.reason) from e
        stream.codec_context.thread_type = "AUTO"
        size = None
        t0 = prev = prev_rgb = prev_t = prev_dur = None
        k, packets = 0, [0]
        frames = _decoded(container, stream, packets)
        while True:
            if time.monotonic() > deadline:
                raise BadInput(f"timed out after {counts['in_frames']} frames")
            try:
                frame = next(frames)
            except StopIteration:
                break
            except av.FFmpegError as e:
                raise BadInput(f"decode error after {counts['in_frames']} frames "
                               f"({getattr(e, 'strerror', None) or e}): corrupt stream") from e
            if frame.time is None:
                continue
            counts["in_frames"] += 1
            if size is None:
                size = scaled_size(frame.height, frame.width, max_height)
                t0 = frame.time
            t = frame.time - t0
            while prev is not None and k / fps < t - _TOL_S:  # output times before this frame show the previous one
                if prev_rgb is None:
                    prev_rgb = prev.to_ndarray(height=size[0], width=size[1], format="rgb24", interpolation=area)
                yield prev_rgb
                k += 1
            if prev is not None and prev_t is not None and t > prev_t:
                prev_dur = t - prev_t
            prev, prev_rgb, prev_t = frame, None, t
        if (why := truncation(stream, packets[0])) is not None:
            raise BadInput(why)  # write_video then deletes its temporary file: no output
        if prev is None:
            raise BadInput("video stream has no decodable frames")
        last = float(prev.duration * prev.time_base) if prev.duration and prev.time_base else 0.0
        end = prev_t + (last or prev_dur or 1.0 / fps)
        while k / fps < end - _TOL_S or k == 0:  # hold the last frame until the stream ends (at least one frame)
            if prev_rgb is None:
                prev_rgb = prev.to_ndarray(height=size[0], width=size[1], format="rgb24", interpolation=area)
            yield prev_rgb
            k += 1


def _complete_frames(out: Path) -> int | None:
    """Frame count of an existing, readable output; None when absent or unreadable."""
    from lfvila.data.decode import DecodeError, probe

    if not out.is_file():
        return None
    try:
        return probe(out).num_frames
    except DecodeError:
        return None


def prepare_one(src, out, fps: float = 3.0, gop: int = 8, max_height: int | None = 240, codec: str = "h264",
                crf: int = 18, timeout: float = 600.0, force: bool = False) -> dict:
    """Re-encode ``src`` to ``out``; returns the report row (never raises for a bad input)."""
    from lfvila.data.encode import write_video

    started = time.monotonic()
    row = {"path": str(src), "output": str(out), "status": "ok", "reason": "", "in_frames": 0, "out_frames": 0}
    out = Path(out)
    done = None if force else _complete_frames(out)
    if done:
        row.update(status="skipped", reason="output exists", out_frames=done)
    else:
        counts = {"in_frames": 0, "out_frames": 0}

        def counted(frames):
            for f in frames:
                counts["out_frames"] += 1
                yield f

        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            frames = _frames(os.fspath(src), fps, max_height, started + timeout, counts)
            write_video(out, counted(frames), fps=fps, codec=codec, gop=gop, crf=crf)
        except (BadInput, ValueError, OSError) as e:
            row.update(status="failed", reason=str(e) or type(e).__name__)
        except Exception as e:  # noqa: BLE001 - one bad video (an FFmpeg error in the encoder, ...) must not end the batch
            row.update(status="failed", reason=f"{type(e).__name__}: {e}")
        row.update(counts)
    row["seconds"] = round(time.monotonic() - started, 3)
    return row


def run(src, dst, fps: float = 3.0, gop: int = 8, max_height: int | None = 240, codec: str = "h264",
        workers: int = 1, crf: int = 18, timeout: float = 600.0, force: bool = False, report=None) -> list[dict]:
    """Prepare every video under ``src`` into ``dst``; writes the report (one JSON object per line, in completion
    order) and returns its rows with paths relative to ``src`` / ``dst``."""
    if codec not in OUT_EXTS:
        raise ValueError(f"codec must be one of {sorted(OUT_EXTS)}, got {codec!r}")
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise ValueError(f"SRC {src} is not a folder")
    dst.mkdir(parents=True, exist_ok=True)
    report = Path(report) if report else dst / "prepare_report.jsonl"
    jobs, rows, owners = [], [], {}
    for rel in find_videos(src):
        out_rel = rel.with_suffix(OUT_EXTS[codec])
        if out_rel in owners:  # a.mp4 and a.webm both map to a.mp4
            rows.append({"path": str(rel), "output": str(out_rel), "status": "failed", "in_frames": 0,
                         "out_frames": 0, "seconds": 0.0, "reason": f"output name collides with {owners[out_rel]}"})
            continue
        owners[out_rel] = rel
        jobs.append((rel, out_rel))
    kwargs = dict(fps=fps, gop=gop, max_height=max_height, codec=codec, crf=crf, timeout=timeout, force=force)

    def relative(row, rel, out_rel):
        return {**row, "path": str(rel), "output": str(out_rel)}

    with open(report, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")

        def record(row):
            rows.append(row)
            f.write(json.dumps(row) + "\n")
            f.flush()

        if workers <= 1 or len(jobs) <= 1:
            for rel, out_rel in jobs:
                record(relative(prepare_one(src / rel, dst / out_rel, **kwargs), rel, out_rel))
        else:
            # spawn: workers must not inherit the parent's threads (FFmpeg, torch) through fork
            with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
                futures = {pool.submit(prepare_one, src / rel, dst / out_rel, **kwargs): (rel, out_rel)
                           for rel, out_rel in jobs}
                for fut in as_completed(futures):
                    rel, out_rel = futures[fut]
                    try:
                        row = relative(fut.result(), rel, out_rel)
                    except BrokenProcessPool:
                        row = {"path": str(rel), "output": str(out_rel), "status": "failed", "in_frames": 0,
                               "out_frames": 0, "seconds": 0.0,
                               "reason": "a worker process died (decoder crash on this or another video); rerun"}
                    record(row)
    return rows


def summary(rows: list[dict]) -> str:
    n = {s: sum(r["status"] == s for r in rows) for s in ("ok", "skipped", "failed")}
    return f"{len(rows)} videos: {n['ok']} ok, {n['skipped']} skipped, {n['failed']} failed"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m lfvila.data.prepare", description=__doc__.split("\n\n")[0])
    p.add_argument("src", help="folder of input videos (searched recursively)")
    p.add_argument("dst", help="output folder (relative paths kept)")
    p.add_argument("--fps", type=float, default=3.0, help="output frame rate (default 3, the LF-VILA recipe)")
    p.add_argument("--gop", type=int, default=8, help="keyframe interval in output frames (default 8)")
    p.add_argument("--max-height", type=int, default=240, help="scale down to at most this height; 0 keeps it")
    p.add_argument("--codec", choices=sorted(OUT_EXTS), default="h264")
    p.add_argument("--crf", type=int, default=18, help="encoder quality (x264 CRF; VP9 uses crf + 12)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="parallel processes")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds allowed per video")
    p.add_argument("--force", action="store_true", help="redo outputs that already exist")
    p.add_argument("--report", default=None, help="JSON-lines report (default DST/prepare_report.jsonl)")
    s = p.add_argument_group("tar shards (--shards; lfvila.data.shard_writer)")
    s.add_argument("--shards", action="store_true",
                   help="write the samples of --annotations into WebDataset tar shards + DST/index.json")
    s.add_argument("--annotations", help="the annotation file (video paths relative to SRC)")
    s.add_argument("--format", help="its lfvila.data.formats format (lfvila_pretrain, generic_jsonl, ...)")
    s.add_argument("--format-kwargs", default="{}",
                   help="JSON object of the format's options, e.g. '{\"min_clips\": 2}'")
    s.add_argument("--on-error", choices=("raise", "skip"), default="raise", help="bad annotation rows")
    size = s.add_mutually_exclusive_group()
    size.add_argument("--shard-samples", type=int, default=None,
                      help="samples per shard: equal ranges of the annotation samples (default 1000)")
    size.add_argument("--shard-size", default=None, help="bytes per shard at most (e.g. 512M, 2G)")
    a = p.parse_args(argv)
    if a.fps <= 0 or a.gop < 1:
        p.error("--fps must be > 0 and --gop >= 1")
    if a.shards:
        return _main_shards(p, a)
    given = [f"--{k.replace('_', '-')}" for k in ("annotations", "format", "shard_samples", "shard_size")
             if getattr(a, k) is not None]
    if given:
        p.error(f"{', '.join(given)}: only with --shards")
    try:
        rows = run(a.src, a.dst, fps=a.fps, gop=a.gop, max_height=a.max_height or None, codec=a.codec,
                   workers=a.workers, crf=a.crf, timeout=a.timeout, force=a.force, report=a.report)
    except ValueError as e:
        p.error(str(e))
    failed = [r for r in rows if r["status"] == "failed"]
    print(f"prepare: {summary(rows)}; report: {a.report or Path(a.dst) / 'prepare_report.jsonl'}")
    for r in failed:
        print(f"  failed {r['path']}: {r['reason']}")
    return 1 if failed else 0


def _main_shards(p: argparse.ArgumentParser, a) -> int:
    from lfvila.data import shard_writer

    if not a.annotations or not a.format:
        p.error("--shards needs --annotations ANN and --format FMT")
    try:
        kwargs = json.loads(a.format_kwargs)
        if not isinstance(kwargs, dict):
            raise ValueError("not a JSON object")
        size = None if a.shard_size is None else shard_writer.parse_size(a.shard_size)
    except ValueError as e:
        p.error(f"--format-kwargs / --shard-size: {e}")
    try:
        result = shard_writer.write_shards(
            a.src, a.dst, a.annotations, a.format, format_kwargs=kwargs, on_error=a.on_error,
            shard_samples=a.shard_samples, shard_size=size, fps=a.fps, gop=a.gop, max_height=a.max_height or None,
            codec=a.codec, crf=a.crf, workers=a.workers, timeout=a.timeout, force=a.force, report=a.report)
    except ValueError as e:
        p.error(str(e))
    failed = [r for r in result["rows"] if r["status"] == "failed"]
    print(f"prepare --shards: {shard_writer.summary(result)}; index: {Path(a.dst) / 'index.json'}; report: "
          f"{a.report or Path(a.dst) / 'prepare_report.jsonl'}")
    for r in failed:
        print(f"  failed {r['path']} (sample {r['index']} left out): {r['reason']}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
