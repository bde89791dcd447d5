"""Synthetic long-form video-language data: real encoded videos of scripted events with time-stamped paragraphs.

The offline default dataset (nothing is downloaded). Each video is a script of 3-6 events; an event is a coloured
shape doing one motion for a time span ("a red circle moves to the left"), and its sentence is the event's caption.
Videos come in families that share the same events in different orders (families never straddle a split), so a
paragraph's sentences alone do not identify its video: retrieval has to get the temporal order right.

    python -m lfvila.data.synthetic OUT --videos 200 --seed 0 [--size 96x160] [--fps 3] \\
        [--min-seconds 30 --max-seconds 90] [--radius 0.26,0.34] [--workers N]

What lands under ``OUT``:

- ``videos/<video_id>.mp4`` (H.264) or ``videos/<video_id>.webm`` (VP9, every 4th video): constant ``fps`` (3 by
  default, the HD-VILA / LF-VILA re-encode rate), keyframe every 8 frames, ``size`` = ``(height, width)`` pixels.
  Every frame carries its own index in the top-left corner (:mod:`lfvila.data.framecode`); shapes stay below it.
- ``train.json``, ``val.json``, ``test.json``: ActivityNet Captions format, ``{video_id: {"duration": seconds,
  "timestamps": [[start, end], ...], "sentences": [...], "video": "videos/<video_id>.<ext>"}}``, sentences in
  temporal order; the split is by video family, about 80/10/10 (val and test get at least one video from 3 videos).
  ``"video"`` is an extra key (ActivityNet readers ignore it); ``videos.json`` maps every ``video_id`` to the same
  relative path, for readers that look files up by id.
- ``vocab.txt``: a lowercase WordPiece vocabulary in the bert-base-uncased file layout (one token per line, line
  number = id, ``##`` marks a continuation), loadable by ``tokenizers.BertWordPieceTokenizer(path, lowercase=True)``
  and transformers' ``BertTokenizer``. Special ids are bert-base-uncased's: ``[PAD]`` 0, ``[unused0..98]`` 1-99,
  ``[UNK]`` 100, ``[CLS]`` 101, ``[SEP]`` 102, ``[MASK]`` 103 (code should still read them from the tokenizer).
- ``meta.json``: the settings. A rerun with the same settings skips videos already written (files are renamed into
  place only when complete) and rewrites the same annotation bytes; other settings into the same ``OUT`` are refused.

The same seed gives byte-identical annotations and vocabulary and identical decoded frames, whatever ``workers``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from lfvila.data.encode import CODECS, write_video
from lfvila.data.framecode import code_size, draw_index
from lfvila.data.sampling import Segment, segment_frame_range

FORMAT = "lfvila-synthetic/2"  # /2: shapes drawn larger by default (radius range 0.26-0.34, was 0.16-0.22)

COLOURS = {
    "red": (220, 35, 35), "green": (40, 180, 60), "blue": (50, 90, 235), "yellow": (240, 220, 40),
    "orange": (245, 140, 25), "purple": (150, 60, 205), "cyan": (40, 210, 225), "white": (245, 245, 245),
    "pink": (240, 115, 185),
}
SHAPES = ("circle", "square", "triangle", "star", "cross", "hexagon", "diamond")
MOTIONS = {  # motion -> verb phrase (third person singular)
    "left": "moves to the left", "right": "moves to the right", "up": "moves up", "down": "moves down",
    "grow": "grows bigger", "shrink": "shrinks", "spin": "spins around", "bounce": "bounces",
}
TEMPLATES = (
    "{a} {colour} {shape} {verb}", "the {colour} {shape} {verb}", "{a} {colour} {shape} appears and {verb}",
    "there is {a} {colour} {shape} that {verb}", "we see {a} {colour} {shape} that {verb}",
)
_MIN_EVENTS, _MAX_EVENTS = 3, 6
_SCALE_RANGE = {"grow": (0.45, 1.35), "shrink": (1.35, 0.45)}  # radius multipliers over the event
# Shape radius as a fraction of the play area's height. Models see a video through the mean of its patch tokens (the
# LF-VILA global feature), so a shape's share of the frame sets how strong its signal is: at 0.16-0.22 a shape covers
# ~7 % of a frame and a from-scratch lfvila-tiny did not learn which colours a video shows within 200 steps; at
# 0.30-0.38 it learned them within 100-200 (train/demo.py). The upper bound keeps a grown shape inside the play area.
RADIUS = (0.26, 0.34)
_MAX_RADIUS = 0.36


@dataclass(frozen=True)
class Event:
    """One scripted event. Times in seconds; ``x``, ``y`` in ``[0, 1]`` place the shape's centre inside the range
    it may take in the play area (so any frame size works); ``radius`` is a fraction of the play area's height."""

    shape: str
    colour: str
    motion: str
    start: float
    end: float
    x: float
    y: float
    radius: float
    sentence: str


@dataclass(frozen=True)
class VideoScript:
    """A whole video: ``num_frames`` frames at ``fps`` (duration ``num_frames / fps`` seconds), RGB background
    ``(top, bottom)`` colours of a vertical gradient, events in temporal order."""

    video_id: str
    split: str
    codec: str
    num_frames: int
    fps: float
    background: tuple[tuple[int, int, int], tuple[int, int, int]]
    events: tuple[Event, ...]

    @property
    def duration(self) -> float:
        return self.num_frames / self.fps

    @property
    def relpath(self) -> str:
        return f"videos/{self.video_id}{CODECS[self.codec][2]}"


# --- planning: all randomness lives here, drawn from one generator seeded by ``seed`` ----------------------------


def _split_sizes(videos: int) -> dict[str, int]:
    held = max(1, round(0.1 * videos)) if videos >= 3 else 0
    return {"train": videos - 2 * held, "val": held, "test": held}


def _sentence(rng: np.random.Generator, shape: str, colour: str, motion: str) -> str:
    article = "an" if colour[0] in "aeiou" else "a"
    text = TEMPLATES[int(rng.integers(len(TEMPLATES)))].format(a=article, colour=colour, shape=shape,
                                                                verb=MOTIONS[motion])
    return text[0].upper() + text[1:] + "."


def _timeline(rng: np.random.Generator, k: int, duration: float) -> list[tuple[float, float]]:
    """``k`` ordered, non-overlapping spans (seconds, 2 decimals) inside ``[0, duration]`` with short gaps."""
    mean = duration / k
    lead, tail = rng.uniform(0, 0.05) * duration, rng.uniform(0, 0.05) * duration
    gaps = rng.uniform(0.05, 0.2, size=k - 1) * mean
    weights = rng.uniform(1.0, 2.0, size=k)
    lengths = (duration - lead - tail - gaps.sum()) * weights / weights.sum()
    spans, t = [], lead
    limit = math.floor(duration * 100) / 100
    for i in range(k):
        start, end = round(t, 2), min(round(t + lengths[i], 2), limit)
        spans.append((start, end))
        t += lengths[i] + (gaps[i] if i < k - 1 else 0.0)
    return spans


def plan_dataset(videos: int, seed: int, fps: float = 3.0, min_seconds: float = 30.0, max_seconds: float = 90.0,
                 vp9_every: int = 4, radius: tuple[float, float] = RADIUS) -> list[VideoScript]:
    """Scripts of all videos (no pixels): ids ``syn_00000 ...`` in split order train, val, test; video ``i`` is VP9
    when ``i % vp9_every == vp9_every - 1`` (``vp9_every=0``: all H.264); shape radii drawn uniformly from ``radius``
    (fractions of the play area's height, see ``RADIUS``). Independent of the frame size."""
    lo, hi = (float(v) for v in radius)
    if not 0 < lo <= hi <= _MAX_RADIUS:
        raise ValueError(f"radius must be (low, high) with 0 < low <= high <= {_MAX_RADIUS}, got {radius}")
    rng = np.random.default_rng(seed)
    atoms = [(s, c) for s in SHAPES for c in COLOURS]
    scripts: list[VideoScript] = []
    for split, size in _split_sizes(videos).items():
        left = size
        while left > 0:
            family = min(left, int(rng.integers(2, 4)))
            left -= family
            lo = max(1, math.ceil(min_seconds * fps))
            frames = [int(rng.integers(lo, max(lo, math.floor(max_seconds * fps)) + 1)) for _ in range(family)]
            most = max(_MIN_EVENTS, min(_MAX_EVENTS, int(min(frames) / fps // 2)))  # events last ~2 s or more
            k = int(rng.integers(_MIN_EVENTS, most + 1))
            picks = rng.choice(len(atoms), size=k, replace=False)
            base = []
            for p in picks:
                shape, colour = atoms[int(p)]
                motions = [m for m in MOTIONS if not (shape == "circle" and m == "spin")]  # a spinning circle is still
                base.append((shape, colour, motions[int(rng.integers(len(motions)))]))
            orders: list[tuple[int, ...]] = []
            for _ in range(family):
                order = tuple(int(j) for j in rng.permutation(k))
                for _ in range(20):  # siblings get distinct orders (k >= 3 leaves at least 6)
                    if order not in orders:
                        break
                    order = tuple(int(j) for j in rng.permutation(k))
                orders.append(order)
            for order, num_frames in zip(orders, frames):
                i = len(scripts)
                codec = "vp9" if vp9_every and i % vp9_every == vp9_every - 1 else "h264"
                spans = _timeline(rng, k, num_frames / fps)
                events = []
                for j, (start, end) in zip(order, spans):
                    shape, colour, motion = base[j]
                    x, y = (float(v) for v in rng.uniform(0, 1, size=2))
                    r = float(rng.uniform(*radius))
                    events.append(Event(shape, colour, motion, start, end, round(x, 4), round(y, 4), round(r, 4),
                                        _sentence(rng, shape, colour, motion)))
                grey = int(rng.integers(25, 70))
                tint = rng.integers(-8, 9, size=3)
                top = tuple(int(np.clip(grey + t, 0, 255)) for t in tint)
                bottom = tuple(int(np.clip(grey + 25 + t, 0, 255)) for t in tint)
                scripts.append(VideoScript(f"syn_{i:05d}", split, codec, num_frames, float(fps), (top, bottom),
                                           tuple(events)))
    return scripts


# --- rendering: a pure function of the script and the frame size ------------------------------------------------


def _unit_polygon(shape: str) -> np.ndarray:
    """Vertices ``(V, 2)`` (x, y; y down) of ``shape`` inside the unit circle, pointing up."""
    def ring(n, radii, offset=-math.pi / 2):
        a = offset + 2 * math.pi * np.arange(n) / n
        return np.stack([np.cos(a) * radii, np.sin(a) * radii], axis=1)

    if shape == "square":
        return ring(4, 1.0, offset=-math.pi / 4)
    if shape == "diamond":
        return ring(4, 1.0)
    if shape == "triangle":
        return ring(3, 1.0)
    if shape == "hexagon":
        return ring(6, 1.0, offset=0.0)
    if shape == "star":
        return ring(10, np.tile([1.0, 0.45], 5))
    if shape == "cross":
        a, b = 0.33, 0.95
        return np.array([(-a, -b), (a, -b), (a, -a), (b, -a), (b, a), (a, a), (a, b), (-a, b), (-a, a), (-b, a),
                         (-b, -a), (-a, -a)])
    raise ValueError(f"unknown shape {shape!r}")


def _inside(shape: str, px: np.ndarray, py: np.ndarray, cx: float, cy: float, r: float, angle: float) -> np.ndarray:
    """Boolean mask of pixel centres ``(px, py)`` (any broadcastable shapes, pixels) inside the shape."""
    if shape == "circle":
        return (px - cx) ** 2 + (py - cy) ** 2 <= r * r
    c, s = math.cos(angle), math.sin(angle)
    unit = _unit_polygon(shape)
    verts = np.stack([cx + r * (unit[:, 0] * c - unit[:, 1] * s), cy + r * (unit[:, 0] * s + unit[:, 1] * c)], 1)
    inside = np.zeros(np.broadcast_shapes(px.shape, py.shape), dtype=bool)
    for (x1, y1), (x2, y2) in zip(verts, np.roll(verts, -1, axis=0)):  # even-odd rule, one edge at a time
        if y1 == y2:
            continue
        crosses = (y1 > py) != (y2 > py)
        inside ^= crosses & (px < x1 + (py - y1) * (x2 - x1) / (y2 - y1))
    return inside


def _pose(event: Event, p: float, top: int, height: int, width: int) -> tuple[float, float, float, float]:
    """Centre ``(cx, cy)``, radius and angle (pixels, radians) of ``event``'s shape at progress ``p`` in ``[0, 1]``;
    the shape stays inside rows ``[top, height)``."""
    area = height - top
    r = event.radius * area
    lo_s, hi_s = _SCALE_RANGE.get(event.motion, (1.0, 1.0))
    rmax = r * max(lo_s, hi_s) + 1.0
    x0, x1 = rmax, width - 1 - rmax
    y0, y1 = top + rmax, height - 1 - rmax
    cx, cy = x0 + event.x * (x1 - x0), y0 + event.y * (y1 - y0)
    radius, angle = r * (lo_s + (hi_s - lo_s) * p), 0.0
    if event.motion == "left":
        cx = x1 + (x0 - x1) * p
    elif event.motion == "right":
        cx = x0 + (x1 - x0) * p
    elif event.motion == "up":
        cy = y1 + (y0 - y1) * p
    elif event.motion == "down":
        cy = y0 + (y1 - y0) * p
    elif event.motion == "spin":
        angle = 2 * math.pi * p
    elif event.motion == "bounce":
        cy = y1 - abs(math.sin(3 * math.pi * p)) * (y1 - y0)
    return cx, cy, radius, angle


def render_frames(script: VideoScript, size: tuple[int, int] = (96, 160)):
    """Yield the ``script.num_frames`` frames, each ``uint8 (H, W, 3)`` RGB with ``size = (H, W)``.

    Frame ``i`` shows every event whose span covers it by the rule of
    :func:`lfvila.data.sampling.segment_frame_range` (so the annotation's spans and the pixels agree frame for
    frame), at progress measured at the frame's centre time ``(i + 0.5) / fps``; its index is drawn top-left."""
    height, width = size
    top = code_size()[0] + 4
    ramp = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None, None]
    (t0, b0) = (np.array(c, np.float32) for c in script.background)
    background = np.broadcast_to(t0 + (b0 - t0) * ramp, (height, width, 3)).round().astype(np.uint8)
    py, px = np.mgrid[0:height, 0:width].astype(np.float32) + 0.5
    ranges = [segment_frame_range(script.num_frames, script.fps, Segment("e", e.start, e.end)) for e in script.events]
    for i in range(script.num_frames):
        frame = background.copy()
        t = (i + 0.5) / script.fps
        for event, (first, last) in zip(script.events, ranges):
            if first <= i <= last:
                p = min(max((t - event.start) / max(event.end - event.start, 1e-6), 0.0), 1.0)
                cx, cy, r, angle = _pose(event, p, top, height, width)
                y0, y1 = max(int(cy - r) - 1, top), min(int(cy + r) + 2, height)
                x0, x1 = max(int(cx - r) - 1, 0), min(int(cx + r) + 2, width)
                mask = _inside(event.shape, px[y0:y1, x0:x1], py[y0:y1, x0:x1], cx, cy, r, angle)
                frame[y0:y1, x0:x1][mask] = COLOURS[event.colour]
        yield draw_index(frame, i)


def _write_one(script: VideoScript, out: str, size: tuple[int, int], gop: int) -> tuple[str, int, bool]:
    """Encode one video unless it is already there (files appear only complete). Returns ``(id, frames, written)``."""
    path = Path(out) / script.relpath
    if path.exists():
        return script.video_id, script.num_frames, False
    write_video(path, render_frames(script, size), fps=script.fps, codec=script.codec, gop=gop)
    return script.video_id, script.num_frames, True


# --- annotations and vocabulary ---------------------------------------------------------------------------------


def annotations(scripts: list[VideoScript]) -> dict[str, dict[str, dict]]:
    """``{split: {video_id: {"duration", "timestamps", "sentences", "video"}}}`` in ActivityNet Captions format."""
    out: dict[str, dict[str, dict]] = {"train": {}, "val": {}, "test": {}}
    for s in scripts:
        out[s.split][s.video_id] = {"duration": round(s.duration, 3),
                                    "timestamps": [[e.start, e.end] for e in s.events],
                                    "sentences": [e.sentence for e in s.events], "video": s.relpath}
    return out


def build_vocab(texts: list[str], path, max_words: int | None = None) -> list[str]:
    """Write a lowercase WordPiece ``vocab.txt`` for ``texts`` to ``path``; returns the tokens (line = id).

    Text is split by the ``tokenizers`` library's own BERT normaliser and pre-tokeniser. The vocabulary is the
    special tokens, single characters (``a-z``, ``0-9``, common punctuation and any other character seen) with their
    ``##`` continuations, then whole words by descending count (ties alphabetical; at most ``max_words``): on a
    closed vocabulary like this one, what WordPiece training converges to. It is built directly because
    ``tokenizers``' WordPieceTrainer is not deterministic (ties between equal pair counts follow hash-map order: four
    runs on the same text gave four different vocabularies with tokenizers 0.23.3), and the same seed must give the
    same bytes. Words outside the vocabulary split into characters instead of becoming ``[UNK]``.
    """
    from tokenizers.normalizers import BertNormalizer
    from tokenizers.pre_tokenizers import BertPreTokenizer

    normalizer, pre = BertNormalizer(lowercase=True), BertPreTokenizer()
    counts: Counter[str] = Counter()
    for text in texts:
        counts.update(w for w, _ in pre.pre_tokenize_str(normalizer.normalize_str(text)))
    chars = set("abcdefghijklmnopqrstuvwxyz0123456789.,!?'\"-:;()/&%$#@+=*_[]")
    chars.update(c for w in counts for c in w)
    # bert-base-uncased's special-token ids: [PAD] 0, [unused0..98] 1-99, [UNK] 100, [CLS] 101, [SEP] 102, [MASK] 103
    head = ["[PAD]", *(f"[unused{i}]" for i in range(99)), "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokens = head + sorted(chars) + sorted(f"##{c}" for c in chars if c.isalnum())
    seen = set(tokens)
    words = sorted((w for w in counts if w not in seen), key=lambda w: (-counts[w], w))
    tokens += words[:max_words] if max_words is not None else words
    _write_text(Path(path), "\n".join(tokens) + "\n")
    return tokens


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _dump(obj: dict) -> str:
    """JSON with one top-level key per line (diffable, compact, byte-stable)."""
    rows = [f"{json.dumps(k)}: {json.dumps(v, ensure_ascii=False)}" for k, v in obj.items()]
    return "{\n" + ",\n".join(rows) + "\n}\n" if rows else "{}\n"


# --- the entry points -------------------------------------------------------------------------------------------


def make_dataset(out, videos: int = 200, seed: int = 0, size: tuple[int, int] = (96, 160), fps: float = 3.0,
                 min_seconds: float = 30.0, max_seconds: float = 90.0, workers: int = 1, gop: int = 8,
                 vp9_every: int = 4, radius: tuple[float, float] = RADIUS) -> dict:
    """Write the synthetic dataset under ``out`` (layout in the module docstring) and return a summary dict:
    ``out, videos, written, skipped, frames, splits {name: count}, codecs {name: count}, vocab_size, seconds``.

    ``size``: ``(height, width)`` pixels, both even, at least ``(48, 96)``. ``fps``: frames per second (constant).
    Durations are drawn uniformly from ``[min_seconds, max_seconds]`` (``min_seconds >= 6``: 3 events of 2 s); shape
    radii from ``radius`` (fractions of the play area's height).
    ``workers > 1`` encodes videos in that many processes; the output does not depend on it."""
    height, width = (int(v) for v in size)
    if videos < 1:
        raise ValueError(f"videos must be >= 1, got {videos}")
    if height % 2 or width % 2 or height < 48 or width < 96:
        raise ValueError(f"size must be (height, width), both even, at least (48, 96), got {size}")
    if not fps > 0:
        raise ValueError(f"fps must be positive, got {fps}")
    if not 6 <= min_seconds <= max_seconds:
        raise ValueError(f"need 6 <= min_seconds <= max_seconds, got {min_seconds}, {max_seconds}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    began = time.perf_counter()
    out = Path(out)
    (out / "videos").mkdir(parents=True, exist_ok=True)
    meta = {"format": FORMAT, "videos": int(videos), "seed": int(seed), "size": [height, width], "fps": float(fps),
            "min_seconds": float(min_seconds), "max_seconds": float(max_seconds), "gop": int(gop),
            "vp9_every": int(vp9_every), "radius": [float(v) for v in radius]}
    meta_path = out / "meta.json"
    if meta_path.exists():
        old = json.loads(meta_path.read_text(encoding="utf-8"))
        if old != meta:
            raise ValueError(f"{out} holds a synthetic dataset made with other settings ({old}); use another folder "
                             f"or delete it")
    else:
        _write_text(meta_path, _dump(meta))

    scripts = plan_dataset(videos, seed, fps, min_seconds, max_seconds, vp9_every, radius)
    if workers == 1:
        results = [_write_one(s, str(out), (height, width), gop) for s in scripts]
    else:
        with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
            results = list(pool.map(_write_one, scripts, [str(out)] * len(scripts), [(height, width)] * len(scripts),
                                    [gop] * len(scripts)))

    # annotations only after every video is in place, so no reader sees an entry whose file is missing
    splits = annotations(scripts)
    for name, entries in splits.items():
        _write_text(out / f"{name}.json", _dump(entries))
    _write_text(out / "videos.json", _dump({s.video_id: s.relpath for s in scripts}))
    vocab = build_vocab([e.sentence for s in scripts for e in s.events], out / "vocab.txt")
    written = sum(w for _, _, w in results)
    return {"out": str(out), "videos": len(scripts), "written": written, "skipped": len(scripts) - written,
            "frames": sum(n for _, n, _ in results), "splits": {k: len(v) for k, v in splits.items()},
            "codecs": dict(Counter(s.codec for s in scripts)), "vocab_size": len(vocab),
            "seconds": round(time.perf_counter() - began, 2)}


def _parse_size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"size must look like 96x160 (height x width), got {text!r}") from err
    return h, w


def _parse_radius(text: str) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"radius must look like 0.26,0.34 (low,high), got {text!r}") from err
    return lo, hi


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m lfvila.data.synthetic", description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="output folder")
    parser.add_argument("--videos", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=_parse_size, default=(96, 160), help="HEIGHTxWIDTH pixels, even (96x160)")
    parser.add_argument("--fps", type=float, default=3.0)
    parser.add_argument("--min-seconds", type=float, default=30.0)
    parser.add_argument("--max-seconds", type=float, default=90.0)
    parser.add_argument("--radius", type=_parse_radius, default=RADIUS,
                        help=f"LOW,HIGH shape radius, fractions of the play area's height ({RADIUS[0]},{RADIUS[1]})")
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1))
    args = parser.parse_args(argv)
    summary = make_dataset(args.out, videos=args.videos, seed=args.seed, size=args.size, fps=args.fps,
                           min_seconds=args.min_seconds, max_seconds=args.max_seconds, workers=args.workers,
                           radius=args.radius)
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
