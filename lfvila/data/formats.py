"""Annotation formats: the registry and the base class; one small class per format, all yielding the same annotation
sample dict (the official LF-VILA formats: :mod:`lfvila.data.official_formats`; the public releases:
:mod:`lfvila.data.public_formats`; video classification: :mod:`lfvila.data.video_cls`).

No decoding or frame sampling happens here: a sample says which video file to read and what text goes with it;
the loader combines samples with :mod:`lfvila.data.decode` and :mod:`lfvila.data.sampling`. Formats (registry name
-> class): ``lfvila_retrieval``, ``lfvila_pretrain``, ``lfvila_how2qa``, ``lfvila_violin``, ``lfvila_actnet_qa``,
``lfvila_video_cls`` (the official LF-VILA jsonl files; the last in :mod:`lfvila.data.video_cls`),
``activitynet_captions``, ``didemo``, ``how2qa_csv`` (the public How2QA release) and ``generic_jsonl``. Build one
with :func:`build_dataset`; split one over ranks with ``lfvila.data.samplers.shard``.
"""

from __future__ import annotations

import glob
import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import ClassVar

from torch.utils.data import Dataset

from lfvila.data import rowstore
from lfvila.data.row_parsing import (
    AnnotationError,
    ErrorPolicy,
    RowError,
    as_int,
    get_field,
    parse_json,
    safe_relpath,
)

VIDEO_EXTS = (".mp4", ".webm", ".mkv", ".avi", ".mov", ".m4v", ".mpg", ".mpeg", ".flv")
REGISTRY: dict[str, type[AnnotationDataset]] = {}


def register(name: str):
    """Class decorator: make a dataset class buildable by ``build_dataset(name, ...)``."""

    def deco(cls):
        if name in REGISTRY:
            raise ValueError(f"dataset format {name!r} registered twice")
        cls.format_name = name
        REGISTRY[name] = cls
        return cls

    return deco


def build_dataset(format_name: str, annotation_path, video_root, **kw) -> AnnotationDataset:
    """Build the adapter registered as ``format_name`` (see ``REGISTRY``); ``kw`` go to its constructor."""
    if format_name not in REGISTRY:
        raise ValueError(f"unknown dataset format {format_name!r}; known: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[format_name](annotation_path, video_root, **kw)


class AnnotationDataset(Dataset):
    """Base class: parses an annotation file once, keeps one sample per good row, applies the bad-row policy.

    Every adapter yields the same sample dict (every key is always present; ``None`` where a format has no value)::

        video_id   str                  the video's id in the annotation (clip_id, video_name, key, ...)
        video      str                  path of the video file under ``video_root`` (for ``lfvila_pretrain``: the
                                        folder holding the video's clips, see ``clips``)
        clips      list[str] | None     ``lfvila_pretrain`` only: clip files in temporal order, clip i <-> segment i
        duration   float | None         seconds, where the annotation gives it
        segments   list[Segment]        the video's sentences (captions, ASR, subtitles) in paragraph order, texts
                                        stripped; time-stamped (seconds, clamped to [0, duration]) where the format
                                        has times, else start = end = None
        text       str                  the paragraph: the non-empty segment texts joined by spaces
        question   str | None           QA: the question (VIOLIN: the statement to verify)
        answers    list[str] | None     multiple choice: the candidate answers
        answer     int | None           multiple choice: index of the correct one in ``answers``
        span       (float, float) | None  How2QA: the question's time span in seconds
        label      int | None           classification: class id (VIOLIN 0/1, ActivityNet-QA answer class)
        subtitles  list[Segment] | None  formats whose text is subtitles (How2QA, VIOLIN): the same list as segments
        flags      tuple[str, ...]      notes on repairs, e.g. "zero_length_span"
        source     str                  "<annotation file>: <row>", for error messages downstream

    Bad rows (malformed JSON / CSV, non-UTF-8 bytes, missing or mistyped fields, an empty paragraph, no valid
    time-stamped segment left, an unsafe path, a missing video file under ``check_files=True``) raise an
    :class:`AnnotationError` naming the file and row, or under ``on_error="skip"`` are logged and counted
    (``skipped``, ``skip_reasons``); loading then raises if more than ``max_skip_fraction`` of the rows were skipped.
    Segments dropped or clamped inside good rows are counted in ``dropped_segments`` / ``clamped_segments``.

    Video files are looked up at ``video_root/<name>``; when that file does not exist, ``__getitem__`` tries the
    other ``video_exts`` and then ``<stem>.*`` before giving the default path back (the decoder then names it).
    """

    format_name: ClassVar[str] = ""
    needs_text: ClassVar[bool] = True  # False for QA: the question carries the text, subtitles may be absent

    def __init__(self, annotation_path, video_root, *, on_error: str = "raise", max_skip_fraction: float = 0.05,
                 check_files: bool = False, video_exts=VIDEO_EXTS, cache_dir=None):
        self.annotation_path = Path(annotation_path)
        self.video_root = Path(video_root)
        self.video_exts = tuple(video_exts)
        if not self.video_exts or not all(isinstance(e, str) and e.startswith(".") for e in self.video_exts):
            raise ValueError(f"video_exts must be extensions like '.mp4', got {video_exts!r}")
        self.check_files = check_files
        self.cache_dir = None if cache_dir is None else Path(cache_dir)
        self.dropped_segments: Counter = Counter()
        self.clamped_segments: Counter = Counter()
        self.cached = False  # True when the row index came from cache_dir
        self._root = "" if str(self.video_root) == "." else str(self.video_root).rstrip("/") + "/"
        self._policy = ErrorPolicy(self.annotation_path, on_error, max_skip_fraction)
        self._loading = True
        if self.annotation_path.is_dir() and (self.annotation_path / "data.mdb").is_file() and self.reads_lmdb:
            self._store = rowstore.LmdbRows(self.annotation_path, self.lmdb_rows)
        elif self.annotation_path.is_dir():
            raise AnnotationError(self.annotation_path, "file", "a folder, not an annotation file"
                                  + (" or an LMDB (no data.mdb in it)" if self.reads_lmdb else ""), "bad file")
        elif self.lines:
            self._store = self._load_lines()
        else:
            self._store = self._load_rows()
        self._loading = False

    # -- subclass interface --------------------------------------------------------------------------------
    lines: ClassVar[bool] = False  # True: one row per line (jsonl): rows are indexed and parsed again on access
    reads_lmdb: ClassVar[bool] = False  # True: ``annotation_path`` may be an LMDB folder (rows read on access)
    lmdb_rows: int | None = None

    def _rows(self) -> Iterator[tuple[str, object]]:
        """Formats whose rows are not lines: yield ``(row label, raw row)``; a raw row that is a RowError is a bad
        row found by the reader."""
        raise NotImplementedError

    def parse_line(self, text: str):
        """Line formats: one line's text -> the raw row given to :meth:`_parse` (RowError when malformed)."""
        return parse_json(text)

    def _parse(self, raw) -> dict:
        """Turn one raw row into a sample (via :meth:`_make`); raise RowError for a bad row."""
        raise NotImplementedError

    # -- shared machinery ----------------------------------------------------------------------------------
    @property
    def _counts(self) -> tuple[Counter, Counter]:
        """The dropped / clamped segment counters while loading; throwaway ones when a row is parsed again."""
        return (self.dropped_segments, self.clamped_segments) if self._loading else (Counter(), Counter())

    def _sample(self, raw, row: str) -> dict:
        """A parsed, checked sample of one raw row (RowError when the row is bad)."""
        if isinstance(raw, RowError):
            raise raw
        sample = self._parse(raw)
        if self.needs_text and not sample["text"]:
            raise RowError("empty paragraph", "empty paragraph (no non-empty sentence with a valid span)")
        if self.check_files and self._loading:
            for path in sample["clips"] or [self._resolve(sample["video"], sample["_stems"])]:
                if not os.path.isfile(path):
                    raise RowError("missing video", f"video file not found: {path}")
        sample["source"] = f"{self.annotation_path}: {row}"
        return sample

    def _line_sample(self, data: bytes, row: str) -> dict:
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as err:
            raise RowError("non-utf8", f"non-UTF-8 bytes at byte {err.start} of the line ({err.reason})") from None
        return self._sample(self.parse_line(text), row)

    def _bad(self, row: str, err: RowError) -> None:
        self._policy.bad(AnnotationError(self.annotation_path, row, str(err), err.reason))

    def _load_lines(self) -> rowstore.LineIndex:
        if not self.annotation_path.is_file():
            raise FileNotFoundError(f"annotation file not found: {self.annotation_path}")
        key = self._cache_fields()
        if key is not None:
            hit = rowstore.load_index(self.cache_dir, self.format_name, key, self.annotation_path)
            if hit is not None:
                index, stats = hit
                self._restore(stats)
                self.cached = True
                self._policy.finish()
                return index
        stamp = rowstore.file_stamp(self.annotation_path)
        builder = rowstore.LineIndexBuilder()
        for n, offset, data in rowstore.iter_lines(self.annotation_path):
            try:
                self._line_sample(data, f"line {n}")
            except RowError as err:
                self._bad(f"line {n}", err)
                continue
            builder.add(offset, len(data), n)
            self._policy.kept += 1
        if rowstore.file_stamp(self.annotation_path) != stamp:
            raise AnnotationError(self.annotation_path, "file", "the file changed while it was read", "bad file")
        self._policy.finish()
        index = builder.build(self.annotation_path, stamp)
        if key is not None:
            rowstore.save_index(self.cache_dir, self.format_name, key, index, self._stats())
        return index

    def _load_rows(self) -> rowstore.PackedRows:
        packed = rowstore.PackedRows()
        for row, raw in self._rows():
            try:
                sample = self._sample(raw, row)
            except RowError as err:
                self._bad(row, err)
                continue
            packed.add(sample)
            self._policy.kept += 1
        self._policy.finish()
        return packed.freeze()

    def _cache_fields(self) -> dict | None:
        """What a cached index is keyed by (besides the file's size and mtime, checked on load): the format, its
        version, the file and every option of this dataset. ``None`` (no caching) without ``cache_dir``, or under
        ``check_files`` (the answer depends on other files)."""
        if self.cache_dir is None or self.check_files:
            return None
        skip = {"dropped_segments", "clamped_segments", "cache_dir", "cached", "annotation_path"}
        options = {k: repr(v) for k, v in sorted(vars(self).items()) if not k.startswith("_") and k not in skip}
        return {"format": self.format_name, "version": rowstore.INDEX_VERSION,
                "path": str(self.annotation_path.resolve()), "on_error": self._policy.on_error, "options": options}

    def _stats(self) -> dict:
        p = self._policy
        return {"kept": p.kept, "skipped": p.skipped, "reasons": dict(p.reasons),
                "dropped": dict(self.dropped_segments), "clamped": dict(self.clamped_segments)}

    def _restore(self, stats: dict) -> None:
        p = self._policy
        p.kept, p.skipped, p.reasons = int(stats["kept"]), int(stats["skipped"]), Counter(stats["reasons"])
        self.dropped_segments.update(stats["dropped"])
        self.clamped_segments.update(stats["clamped"])

    def _video(self, name: str, what: str = "video name") -> tuple[str, tuple[str, ...]]:
        """Default path and fallback stems of a video named ``name`` (a stem, or a file name with a video
        extension, possibly in sub-folders) under the video root."""
        rel = safe_relpath(name, what)
        if rel.suffix.lower() in self.video_exts:
            return str(self.video_root / rel), (str(rel.with_suffix("")),)
        return str(self.video_root / f"{rel}{self.video_exts[0]}"), (str(rel),)

    def _resolve(self, default: str, stems: tuple[str, ...]) -> str:
        if os.path.isfile(default):
            return default
        for stem in stems:
            for ext in self.video_exts:
                path = self.video_root / f"{stem}{ext}"
                if path.is_file():
                    return str(path)
        for stem in stems:
            rel = PurePosixPath(stem)
            found = sorted(glob.glob(str(self.video_root / rel.parent / (glob.escape(rel.name) + ".*"))))
            if found:
                return found[0]
        return default

    def _make(self, video_id: str, video: str, stems: tuple[str, ...] = (), *, clips=None, duration=None,
              segments=(), question=None, answers=None, answer=None, span=None, label=None, subtitles=None,
              flags=()) -> dict:
        segments = list(segments)
        return {
            "video_id": video_id, "video": video, "clips": clips, "duration": duration, "segments": segments,
            "text": " ".join(s.text for s in segments if s.text), "question": question, "answers": answers,
            "answer": answer, "span": span, "label": label, "subtitles": subtitles, "flags": tuple(flags),
            "source": "", "_stems": tuple(stems),
        }

    # -- public --------------------------------------------------------------------------------------------
    @property
    def skipped(self) -> int:
        """Number of bad rows skipped (``on_error="skip"``)."""
        return self._policy.skipped

    @property
    def skip_reasons(self) -> Counter:
        """Skipped rows by reason."""
        return self._policy.reasons

    def __len__(self) -> int:
        return len(self._store)

    def __getitem__(self, i: int) -> dict:
        """The sample dict of row ``i`` (a new dict each call), with ``video`` resolved on disk where a fallback
        name exists. An LMDB row is parsed here: a bad one raises its :class:`AnnotationError` (a ValueError) naming
        the key, which the loaders count under their skip policy."""
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} samples")
        i = int(i) % len(self)
        store = self._store
        if isinstance(store, rowstore.PackedRows):
            sample = store.get(i)
        else:
            row = store.label(i)
            try:
                data = store.read(i)
                if data is None:
                    raise RowError("missing key", "no such key in the LMDB")
                sample = self._line_sample(data, row)
            except RowError as err:
                raise AnnotationError(self.annotation_path, row, str(err), err.reason) from None
        stems = sample.pop("_stems")
        if sample["clips"] is None:
            sample["video"] = self._resolve(sample["video"], stems)
        return sample

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({str(self.annotation_path)!r}, samples={len(self)}, "
                f"skipped={self.skipped})")


class ClassLabelled(AnnotationDataset):
    """A format whose rows carry an integer class: ``num_classes`` (when given) bounds it, and :meth:`_label` reads
    and checks it, naming the field."""

    def __init__(self, annotation_path, video_root, *, num_classes: int | None = None, **kw):
        self.num_classes = num_classes
        super().__init__(annotation_path, video_root, **kw)

    def _label(self, raw, key: str) -> int:
        label = as_int(get_field(raw, key), key)
        if label < 0 or (self.num_classes is not None and label >= self.num_classes):
            raise RowError("bad value", f"{key} {label} outside [0, {self.num_classes})")
        return label


# the formats register themselves on import (they import this module)
from lfvila.data import official_formats, public_formats, video_cls  # noqa: E402, F401
