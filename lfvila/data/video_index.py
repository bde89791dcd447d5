"""Per-file facts about a video, found by demuxing without decoding: :func:`probe` (:class:`VideoInfo`), the frame
index (frame ``i`` = the packet with the ``i``-th smallest timestamp of the stream :func:`video_stream` picks:
:func:`frame_times`, cached per process), the truncation rule (:func:`truncation`); and the errors and skip policy
every decoder shares (:class:`DecodeError`, :class:`SkipCounter`). The rules in full: ``lfvila.data.decode``, which
re-exports all of this and holds the decoders.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from dataclasses import dataclass
from fractions import Fraction

import av
import numpy as np

log = logging.getLogger("lfvila.data.decode")

DEFAULT_TIMEOUT_S = 60.0  # per video: index building and decoding each get this long


# --------------------------------------------------------------------------------------------------- errors / skips
class DecodeError(RuntimeError):
    """A video could not be probed or decoded; ``str()`` is ``"<path>: <reason>"``."""

    def __init__(self, path, reason: str):
        super().__init__(str(path), reason)  # args round-trip through pickle (DataLoader workers)
        self.path, self.reason = str(path), reason

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


class TooManySkipsError(RuntimeError):
    """More than ``max_skip_fraction`` of the videos seen so far were skipped."""


class SkipCounter:
    """Strict or lax handling of bad videos. ``on_error="raise"``: :meth:`skip` re-raises. ``on_error="skip"``: log
    and count the skip; raise :class:`TooManySkipsError` once at least ``min_seen`` videos were seen and the skipped
    fraction exceeds ``max_skip_fraction`` (and at :meth:`check`, whatever the count). One counter per process: a
    DataLoader worker keeps its own."""

    def __init__(self, on_error: str = "raise", max_skip_fraction: float = 0.05, min_seen: int = 20,
                 logger: logging.Logger | None = None):
        if on_error not in ("raise", "skip") or not 0.0 <= max_skip_fraction <= 1.0:
            raise ValueError(f"on_error must be 'raise' or 'skip' and 0 <= max_skip_fraction <= 1: {on_error!r}, "
                             f"{max_skip_fraction}")
        self.on_error, self.max_skip_fraction, self.min_seen, self.log = on_error, max_skip_fraction, min_seen, logger
        self.seen = self.skipped = 0
        self.reasons: list[str] = []  # "path: reason" of every skip

    fraction = property(lambda self: self.skipped / self.seen if self.seen else 0.0)

    def ok(self) -> None:  # one video that loaded
        self.seen += 1

    def skip(self, path, error: BaseException) -> None:
        """Count one bad video: re-raise it (as a :class:`DecodeError`) or log and count it."""
        if not isinstance(error, DecodeError):
            error = DecodeError(path, f"{type(error).__name__}: {error}").with_traceback(error.__traceback__)
        if self.on_error == "raise":
            raise error
        self.seen, self.skipped = self.seen + 1, self.skipped + 1
        self.reasons.append(str(error))
        (self.log or log).warning("skipping %s (%d of %d skipped)", error, self.skipped, self.seen)
        if self.seen >= self.min_seen:
            self.check()

    def check(self) -> None:
        """Raise :class:`TooManySkipsError` if the skipped fraction exceeds ``max_skip_fraction``."""
        if self.skipped and self.fraction > self.max_skip_fraction:
            raise TooManySkipsError(f"{self.skipped} of {self.seen} videos skipped ({self.fraction:.1%} > "
                                    f"max_skip_fraction {self.max_skip_fraction:.1%}); last: {self.reasons[-1]}")

    def call(self, path, fn, *args, errors: tuple = (DecodeError,), **kwargs):
        """``fn(*args, **kwargs)``, counted; ``None`` when it raised one of ``errors`` and the policy skips."""
        try:
            out = fn(*args, **kwargs)
        except errors as e:
            return self.skip(path, e)
        self.ok()
        return out


# ------------------------------------------------------------------------------------------------ probe / index
@dataclass(frozen=True)
class VideoInfo:
    """What :func:`probe` knows about a video. ``fps``: average frames per second (``num_frames / duration``, or the
    container's exact rate when they agree); ``duration`` in seconds from the first frame to the end of the last;
    ``codec``: FFmpeg's codec name (``h264``, ``hevc``, ``vp9``, ``av1``, ...); ``vfr``: frame steps differ. All of
    it describes the stream :func:`video_stream` picks: ``stream`` is its container index, ``video_streams`` how many
    video streams the file has."""

    num_frames: int
    fps: float
    duration: float
    width: int
    height: int
    codec: str
    bit_depth: int = 8
    pix_fmt: str = ""
    vfr: bool = False
    path: str = ""
    stream: int = 0
    video_streams: int = 1


@dataclass(frozen=True)
class StreamIndex:
    pts: np.ndarray  # int64 (N,), sorted: presentation timestamps in time_base units; frame i has pts[i]
    keys: np.ndarray  # int64 (K,), sorted: frame indices of keyframes
    time_base: Fraction
    info: VideoInfo

    def key_before(self, i: int) -> int:  # the last keyframe at or before frame i (0 if none)
        k = int(np.searchsorted(self.keys, i, side="right")) - 1
        return int(self.keys[k]) if k >= 0 else 0

    def lookup(self, pts) -> int | None:
        i = int(np.searchsorted(self.pts, pts)) if pts is not None else len(self.pts)
        return i if i < len(self.pts) and self.pts[i] == pts else None


def ffmpeg_message(e: BaseException) -> str:
    return getattr(e, "strerror", None) or str(e)


def video_stream(container, path):
    """The video stream of an open PyAV ``container`` that every backend and ``prepare`` read: the one FFmpeg's
    best-stream rule picks (``av_find_best_stream`` after probing, as decord and ffplay use it; decord also passes
    over streams FFmpeg has no decoder for. The ``ffmpeg`` command line's default mapping, the highest resolution, is
    another rule). In order: a stream flagged ``default`` (and not for the hearing or visually impaired), then more
    frames decoded while the file was probed (counting up to 5), then the higher bit rate the demuxer reports, then
    more probed frames; remaining ties go to the lowest index. So a file with two video streams may be read from its
    second. :class:`DecodeError` naming ``path`` when there is no video stream."""
    if not container.streams.video:
        kinds = sorted({s.type for s in container.streams}) or ["none"]
        raise DecodeError(path, f"no video stream (streams: {', '.join(kinds)})")
    return container.streams.best("video")


def is_flush_packet(packet) -> bool:
    """The empty packet PyAV's ``demux`` yields at the end of a stream (to drain the decoder): not a frame."""
    return packet.size == 0 and packet.pts is None and packet.dts is None


def truncation(stream, readable: int) -> str | None:
    """Why a stream is cut short: its header declares more frames (``stream.frames``, e.g. MP4's sample table) than
    the ``readable`` packets the demuxer gave (flush packets not counted); None when it is not, or declares nothing
    (Matroska / WebM). A file cut after its header (an MP4 with the index first) then demuxes cleanly and ends early.
    The rule both the decoders' index and ``prepare`` apply."""
    if (declared := stream.frames or 0) > readable:
        return f"container declares {declared} frames but {readable} can be read: truncated"
    return None


def stream_index(path) -> StreamIndex:
    path = os.fspath(path)
    try:
        st = os.stat(path)
    except OSError as e:
        raise DecodeError(path, "file not found" if isinstance(e, FileNotFoundError) else f"cannot stat: {e}") from e
    if not os.path.isfile(path) or st.st_size == 0:
        raise DecodeError(path, "empty file (0 bytes)" if st.st_size == 0 else "not a regular file")
    return _build_index(path, st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=1024)  # keyed on (path, size, mtime) so a rewritten file is indexed again
def _build_index(path: str, size: int, mtime_ns: int) -> StreamIndex:
    deadline = time.monotonic() + DEFAULT_TIMEOUT_S
    try:
        container = av.open(path, timeout=DEFAULT_TIMEOUT_S)
    except (av.FFmpegError, OSError) as e:
        raise DecodeError(path, f"cannot open ({ffmpeg_message(e)}): truncated, corrupt or not a media file") from e
    with container:
        stream = video_stream(container, path)
        pts, key, durations, total = [], [], [], 0
        try:
            for packet in container.demux(stream):
                if is_flush_packet(packet):
                    continue
                total += 1
                ts = packet.pts if packet.pts is not None else packet.dts
                if ts is None or packet.is_discard:
                    continue
                pts.append(ts), key.append(packet.is_keyframe), durations.append(packet.duration or 0)
                if time.monotonic() > deadline:
                    raise DecodeError(path, f"indexing timed out after {DEFAULT_TIMEOUT_S:.0f} s")
        except av.FFmpegError as e:
            raise DecodeError(path, f"demuxing failed after {total} packets ({ffmpeg_message(e)}): corrupt") from e
        if not pts:
            raise DecodeError(path, "video stream has no frames")
        if (why := truncation(stream, total)) is not None:
            raise DecodeError(path, why)
        order = np.argsort(np.asarray(pts, np.int64), kind="stable")
        pts_arr = np.asarray(pts, np.int64)[order]
        if np.any(np.diff(pts_arr) == 0):
            raise DecodeError(path, "two frames share a timestamp: frame order is ambiguous")
        keys = np.flatnonzero(np.asarray(key, bool)[order]).astype(np.int64)
        tb, n, cc, steps = Fraction(stream.time_base), len(pts_arr), stream.codec_context, np.diff(pts_arr)
        rate, last = stream.average_rate or stream.guessed_rate, int(np.asarray(durations)[order][-1])
        if last <= 0:
            last = int(np.median(steps)) if n > 1 else (round(1 / (rate * tb)) if rate else 0)
        duration = float((int(pts_arr[-1]) - int(pts_arr[0]) + last) * tb)
        fps = n / duration if duration > 0 else float(rate or 0)
        if rate and abs(float(rate) - fps) <= 0.01 * fps:
            fps = float(rate)  # the container's exact rate (30000/1001, ...) when it agrees with the timestamps
        vfr = n > 2 and int(steps.max() - steps.min()) > max(1, int(0.02 * np.median(steps)))
        fmt = cc.format
        bits = max((c.bits for c in fmt.components), default=8) if fmt is not None else 8
        info = VideoInfo(num_frames=n, fps=fps, duration=duration, width=cc.width, height=cc.height,
                         codec=cc.codec.canonical_name, bit_depth=bits, pix_fmt=fmt.name if fmt is not None else "",
                         vfr=bool(vfr), path=path, stream=stream.index, video_streams=len(container.streams.video))
    return StreamIndex(pts_arr, keys, tb, info)


def probe(path) -> VideoInfo:
    """Frame count, rate, duration, size and codec of the :func:`video_stream` (:class:`DecodeError` if unreadable)."""
    return stream_index(path).info


def frame_times(path) -> np.ndarray:
    """float64 ``(N,)``: presentation time in seconds of every frame, relative to frame 0 (exact for VFR files)."""
    return ((index := stream_index(path)).pts - index.pts[0]) * float(index.time_base)
