"""Frame sampling and paragraph segmentation rules of LF-VILA, each a small pure function.

Frame indices are explicit lists (ints into the decoded stream, ``0 <= i < num_frames``) so that decoders never choose
frames themselves and train / eval sampling and clip-to-sentence alignment live here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Segment:
    """One sentence of a paragraph with its time span in seconds (``None`` when the format has no timestamps).
    A padding segment has ``text == ""``."""

    text: str
    start: float | None = None
    end: float | None = None

    @property
    def is_padding(self) -> bool:
        return self.text == ""


def merge_segments(segments: list[Segment], m: int) -> list[Segment]:
    """The official paragraph -> ``m`` sentences rule: while there are more than ``m`` segments, merge the adjacent
    pair with the smallest combined number of characters (the first such pair on ties), joining texts with a space
    and spans by union; then pad with empty segments to exactly ``m``.
    """
    if m < 1:
        raise ValueError(f"m must be >= 1, got {m}")
    segs = list(segments)
    while len(segs) > m:
        k = min(range(len(segs) - 1), key=lambda i: len(segs[i].text) + len(segs[i + 1].text))
        a, b = segs[k], segs[k + 1]
        starts = [s for s in (a.start, b.start) if s is not None]
        ends = [e for e in (a.end, b.end) if e is not None]
        merged = Segment(f"{a.text} {b.text}".strip(), min(starts) if starts else None, max(ends) if ends else None)
        segs[k : k + 2] = [merged]
    return segs + [Segment("")] * (m - len(segs))


# ---------------------------------------------------------------------------------------------------------------------
# Frame sampling. Every rule returns a ``list[int]`` of frame indices into the decoded stream (``0 <= i < num_frames``),
# sorted non-decreasing. Rounding follows the official code everywhere: ``np.linspace(...).astype(int)``, i.e. float
# positions truncated towards zero (== floor, positions are >= 0), not rounded to the nearest frame. Randomness comes
# only from an explicit ``numpy.random.Generator`` (``rng``), so a rule is deterministic given the generator's state.
# Videos shorter than asked repeat frames: the index list keeps its length and every index stays valid.
# ---------------------------------------------------------------------------------------------------------------------


def _check_num_frames(num_frames: int) -> int:
    if isinstance(num_frames, bool) or int(num_frames) != num_frames or num_frames < 1:
        raise ValueError(f"num_frames must be a positive integer (the video has no frames?), got {num_frames!r}")
    return int(num_frames)


def _check_count(name: str, value: int) -> int:
    if isinstance(value, bool) or int(value) != value or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _check_rng(rng: np.random.Generator | None) -> np.random.Generator:
    if rng is None:
        return np.random.default_rng()
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator (np.random.default_rng(seed)) or None, got {type(rng)}")
    return rng


def _linspace_floor(start: float, stop: float, count: int) -> list[int]:
    """``np.linspace(start, stop, count).astype(int)`` as a list: the official rounding (truncation)."""
    return np.linspace(start, stop, count).astype(np.int64).tolist()


def uniform_indices(num_frames: int, count: int = 32) -> list[int]:
    """Eval rule (official retrieval ``is_train=False``): ``linspace(0, num_frames - 1, count)`` truncated to int.

    Returns ``count`` frame indices in ``[0, num_frames - 1]``, sorted, first ``0`` and last ``num_frames - 1`` (when
    ``count > 1``). A video shorter than ``count`` frames gives every frame, in order, each repeated about
    ``count / num_frames`` times (e.g. ``num_frames=5, count=32``: ``[0]*8 + [1]*8 + ...``, in linspace proportions);
    ``num_frames == 1`` gives ``[0] * count``; ``num_frames < 1`` raises ValueError.
    """
    n = _check_num_frames(num_frames)
    count = _check_count("count", count)
    return _linspace_floor(0, n - 1, count)


def jittered_indices(num_frames: int, count: int = 32, rng: np.random.Generator | None = None) -> list[int]:
    """Train rule (official retrieval ``is_train=True``): with ``interval = int(num_frames / (count - 1))``, draw
    ``start`` uniformly from ``[0, interval]`` and ``end`` from ``[num_frames - 1 - interval, num_frames - 1]`` (both
    inclusive), then ``linspace(start, end, count)`` truncated to int.

    Returns ``count`` sorted indices in ``[0, num_frames - 1]``. The official code hardcodes ``count - 1 = 31``; here it
    follows ``count``, and ``interval`` is capped at ``(num_frames - 1) // 2`` so that ``start <= end`` (the cap only
    binds for ``count <= 3``, where the official formula would let the two ranges cross or leave the video).
    ``count == 1`` (no spacing to jitter) gives one frame drawn uniformly from the whole video. A video with fewer
    than ``count - 1`` frames has ``interval == 0``, so the rule equals :func:`uniform_indices` (every frame, in
    order, repeated); ``num_frames < 1`` raises ValueError. ``rng``: a ``numpy.random.Generator``;
    ``None`` uses a fresh, unseeded one (not reproducible).
    """
    n = _check_num_frames(num_frames)
    count = _check_count("count", count)
    rng = _check_rng(rng)
    if count == 1:
        return [int(rng.integers(0, n))]
    interval = min(int(n / (count - 1)), (n - 1) // 2)  # the cap keeps start <= end when count <= 3
    start = int(rng.integers(0, interval + 1))
    end = int(rng.integers(n - 1 - interval, n))
    return _linspace_floor(start, end, count)


def _clip_uniform(num_frames: int, count: int) -> list[int]:
    """Official per-clip rule ``linspace(0, num_frames, count + 1)[:count]`` truncated: the starts of ``count``
    equal parts of the clip (the last frames of the clip are never taken when ``num_frames >= count``)."""
    return np.linspace(0, num_frames, count + 1)[:count].astype(np.int64).tolist()


def segment_frame_range(num_frames: int, fps: float, segment: Segment, clip: int = 0,
                        clips: int = 1) -> tuple[int, int]:
    """The inclusive frame range ``(first, last)`` that clip ``clip`` of ``clips`` samples from.

    A timed segment ``[start, end]`` (seconds) covers the frames whose display interval ``[i / fps, (i + 1) / fps)``
    overlaps it: ``first = floor(start * fps)``, ``last = ceil(end * fps) - 1`` (at least ``first``, so a zero-length
    span still gives one frame). A reversed span is swapped. Both ends are then clamped to ``[0, num_frames - 1]``: a
    span that runs past the end of the video is cut there, one wholly after the end collapses onto the last frame.
    A padding segment (empty text) or one without a time span (``start`` or ``end`` is ``None``) gets the ``clip``-th
    of ``clips`` equal slices of the whole video instead,
    ``[floor(clip * n / clips), floor((clip + 1) * n / clips) - 1]``: a partition of the video; when ``n < clips``
    an empty slice takes its first frame, so neighbouring slices repeat frames.
    """
    n = _check_num_frames(num_frames)
    clips = _check_count("clips", clips)
    if not 0 <= clip < clips:
        raise ValueError(f"clip must be in [0, {clips - 1}], got {clip}")
    if segment.is_padding or segment.start is None or segment.end is None:
        first = (clip * n) // clips
        last = ((clip + 1) * n) // clips - 1
        return min(first, n - 1), min(max(last, first), n - 1)
    if not fps > 0:
        raise ValueError(f"fps must be positive to map a segment's seconds to frames, got {fps!r}")
    start, end = sorted((float(segment.start), float(segment.end)))
    first = math.floor(start * fps)
    last = max(first, math.ceil(end * fps) - 1)
    return min(max(first, 0), n - 1), min(max(last, 0), n - 1)


def clip_indices(num_frames: int, fps: float, segments: list[Segment], clips: int = 4, frames_per_clip: int = 8,
                 train: bool = False, rng: np.random.Generator | None = None) -> list[int]:
    """Clip-aligned sampling for the temporal losses: clip ``i``'s frames lie inside segment ``i``'s time span.

    Returns ``clips * frames_per_clip`` indices, clip-major (``out[i * frames_per_clip:(i + 1) * frames_per_clip]``
    are clip ``i``'s frames, paired with sentence ``i``). Each clip's range comes from :func:`segment_frame_range`
    (seconds -> frames with ``fps``, clamped to the video; padding or untimed segments get the clip's uniform slice
    of the whole video). Inside the range of ``L`` frames: eval (``train=False``) uses the official pretraining rule
    ``linspace(0, L, frames_per_clip + 1)[:frames_per_clip]`` (the official code uses it for training too); train
    (``train=True``) uses :func:`jittered_indices` on the range. Short ranges repeat frames.

    ``segments`` (``list[Segment]``, at most ``clips``; fewer are padded, as :func:`merge_segments` would) should be in
    temporal order. Each clip's indices are sorted; the whole list is sorted whenever the clips' frame ranges are
    ordered, e.g. all segments timed with ordered spans, or none timed. Overlapping or unordered spans, or padding
    clips after timed ones (a padding clip takes its uniform slice, which may lie earlier), give an unsorted list:
    sorting it would break the clip <-> sentence pairing. ``num_frames < 1`` raises ValueError.
    """
    n = _check_num_frames(num_frames)
    clips = _check_count("clips", clips)
    frames_per_clip = _check_count("frames_per_clip", frames_per_clip)
    if len(segments) > clips:
        raise ValueError(f"got {len(segments)} segments for {clips} clips: merge them first (merge_segments)")
    rng = _check_rng(rng) if train else None
    segs = list(segments) + [Segment("")] * (clips - len(segments))
    out: list[int] = []
    for i, seg in enumerate(segs):
        first, last = segment_frame_range(n, fps, seg, i, clips)
        length = last - first + 1
        local = jittered_indices(length, frames_per_clip, rng) if train else _clip_uniform(length, frames_per_clip)
        out.extend(first + j for j in local)
    return out


def consecutive_clip_start(num_clips_available: int, clips: int = 4, rng: np.random.Generator | None = None,
                           train: bool = True, compat_official: bool = False) -> int:
    """Index of the first of ``clips`` consecutive clips (the official LMDB pretraining rule).

    Train: a start drawn uniformly from the ``num_clips_available - clips + 1`` valid starts. The official code draws
    from ``range(len - clips)``, which never picks the last valid start; ``compat_official=True`` reproduces that.
    Eval (``train=False``), or ``num_clips_available <= clips`` (nothing to choose; fewer clips than asked are read
    as they are): ``0``. ``num_clips_available < 1`` raises ValueError.
    """
    if isinstance(num_clips_available, bool) or int(num_clips_available) != num_clips_available \
            or num_clips_available < 1:
        raise ValueError(f"num_clips_available must be a positive integer, got {num_clips_available!r}")
    clips = _check_count("clips", clips)
    if not train or num_clips_available <= clips:
        return 0
    rng = _check_rng(rng)
    starts = num_clips_available - clips + (0 if compat_official else 1)
    return int(rng.integers(0, starts))
