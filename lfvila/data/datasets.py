"""Dataset adapters: one small class per annotation format, all yielding the same annotation sample dict.

No decoding or frame sampling happens here: a sample says which video file to read and what text goes with it;
the loader combines samples with :mod:`lfvila.data.decode` and :mod:`lfvila.data.sampling`. Formats (registry name
-> class): ``lfvila_retrieval``, ``lfvila_pretrain``, ``lfvila_how2qa``, ``lfvila_violin``, ``lfvila_actnet_qa``,
``lfvila_video_cls`` (the official LF-VILA jsonl files; the last in :mod:`lfvila.data.video_cls`),
``activitynet_captions``, ``didemo``, ``how2qa_csv`` (the public How2QA release) and ``generic_jsonl``. Build one
with :func:`build_dataset`; split one over ranks with :func:`shard`.
"""

from __future__ import annotations

import glob
import os
import random
from collections import Counter
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import ClassVar

from torch.utils.data import Dataset

from lfvila.data import rowstore
from lfvila.data.annotations import (
    AnnotationError,
    ErrorPolicy,
    RowError,
    as_float,
    as_int,
    as_list,
    as_span,
    as_str,
    check_zero_span,
    clean_segments,
    contains_replacement,
    get_field,
    load_json,
    parse_json,
    parse_literal,
    parse_span_text,
    question_span,
    read_csv_rows,
    safe_relpath,
    timed_segments,
)
from lfvila.data.sampling import Segment

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


@register("lfvila_retrieval")
class LFVILARetrieval(AnnotationDataset):
    """Official LF-VILA retrieval jsonl (ActivityNet, DiDeMo, QuerYD, CMovie): ``{"clip_id": stem, "text": str |
    [sentences]}``; the video is ``video_root/<clip_id>.mp4`` (other extensions as fallback). A string ``text`` is
    one sentence; untimed segments."""

    lines = True

    def _parse(self, raw):
        clip_id = as_str(get_field(raw, "clip_id"), "clip_id")
        text = get_field(raw, "text")
        sentences = [text] if isinstance(text, str) else as_list(text, "text")
        segments = clean_segments([(t, None, None) for t in sentences], None, *self._counts)
        path, stems = self._video(clip_id, "clip_id")
        return self._make(clip_id, path, stems, segments=segments)


@register("lfvila_pretrain")
class LFVILAPretrain(AnnotationDataset):
    """Official LF-VILA pretraining rows: each row a list ``[{"clip_id": "<youtube_id>.<n>.mp4", "text": ...}, ...]``
    in temporal order, as JSON or as a Python literal (the official LMDB values; parsed with ``ast.literal_eval``,
    never ``eval``). Clip files: ``video_root/<youtube_id>/<clip_id>``. Segment i is clip i's sentence, untimed; a clip
    with empty text keeps an empty segment so the alignment holds. ``min_clips``: rows with fewer clips are bad.

    ``annotation_path``: a jsonl file (one row per line, every row checked on load, bad rows by the ``on_error``
    policy), or the official LMDB folder (key ``str(i)``, ``i < num_rows``; default ``num_rows``: the number of
    entries). An LMDB row is read and parsed only when asked for, so opening 8.5M rows costs nothing; a bad one
    raises its AnnotationError, naming the key, from ``__getitem__``, and the loaders count it by their skip
    policy (``LoaderConfig.on_error``)."""

    lines = True
    reads_lmdb = True

    def __init__(self, annotation_path, video_root, *, min_clips: int = 1, num_rows: int | None = None, **kw):
        if min_clips < 1:
            raise ValueError(f"min_clips must be >= 1, got {min_clips}")
        self.min_clips = min_clips
        self.lmdb_rows = num_rows
        super().__init__(annotation_path, video_root, **kw)

    @staticmethod
    def parse_value(value: str | bytes) -> list:
        """Parse one stored row (e.g. an LMDB value) safely; raises RowError when it is not a JSON / literal list."""
        return as_list(parse_literal(value), "row")

    def parse_line(self, text):
        return self.parse_value(text)

    @staticmethod
    def _clip_name(value, what: str) -> str:
        name = as_str(value, what).strip().replace("\\", "/")
        if name and "/" not in name and name not in (".", ".."):
            return name  # the common case, without pathlib (the load checks every row of millions)
        rel = safe_relpath(name, what)
        if len(rel.parts) != 1:
            raise RowError("bad value", f"{what} {str(rel)!r} must be a file name")
        return rel.name

    def _parse(self, raw):
        raw = as_list(raw, "row")
        if len(raw) < self.min_clips:
            raise RowError("too few clips", f"{len(raw)} clips < min_clips {self.min_clips}")
        clips, segments, video_id = [], [], None
        for k, item in enumerate(raw):
            name = self._clip_name(get_field(item, "clip_id"), f"row[{k}].clip_id")
            vid = name.split(".")[0]
            if video_id is not None and vid != video_id:
                raise RowError("bad value", f"row[{k}].clip_id {name!r} is not from video {video_id!r}")
            video_id = vid
            text = get_field(item, "text")
            text = " ".join(as_str(t, f"row[{k}].text") for t in text) if isinstance(text, list) else text
            segments.append(Segment(" ".join(as_str(text, f"row[{k}].text").split())))
            clips.append(f"{self._root}{vid}/{name}")
        return self._make(video_id, f"{self._root}{video_id}", clips=clips, segments=segments)


class _SubtitleQA(AnnotationDataset):
    needs_text = False

    def _subtitles(self, raw) -> list[Segment]:
        return timed_segments(get_field(raw, "text_s", []), "text_s", None, *self._counts)


@register("lfvila_how2qa")
class LFVILAHow2QA(_SubtitleQA):
    """Official LF-VILA How2QA jsonl: ``clip_id``, ``span`` [start, end] s, ``text_q``, ``text_a`` (``num_answers``
    answers, 4 officially), ``text_s`` [{text, start, end}] subtitles, ``answer_idx``. ``zero_span``: see
    :func:`~lfvila.data.annotations.question_span`."""

    lines = True

    def __init__(self, annotation_path, video_root, *, num_answers: int = 4, zero_span: str = "widen", **kw):
        self.num_answers, self.zero_span = num_answers, check_zero_span(zero_span)
        super().__init__(annotation_path, video_root, **kw)

    def _parse(self, raw):
        clip_id = as_str(get_field(raw, "clip_id"), "clip_id")
        flags: list[str] = []
        span = question_span(*as_span(get_field(raw, "span"), "span"), self.zero_span, flags)
        question = as_str(get_field(raw, "text_q"), "text_q")
        answers = [as_str(a, "text_a[]") for a in as_list(get_field(raw, "text_a"), "text_a")]
        if len(answers) != self.num_answers:
            raise RowError("bad value", f"text_a has {len(answers)} answers, expected {self.num_answers}")
        answer = as_int(get_field(raw, "answer_idx"), "answer_idx")
        if not 0 <= answer < len(answers):
            raise RowError("bad value", f"answer_idx {answer} out of range for {len(answers)} answers")
        subs = self._subtitles(raw)
        path, stems = self._video(clip_id, "clip_id")
        return self._make(clip_id, path, stems, segments=subs, subtitles=subs, question=question, answers=answers,
                          answer=answer, span=span, flags=flags)


@register("lfvila_violin")
class LFVILAViolin(_SubtitleQA):
    """Official LF-VILA VIOLIN jsonl: ``clip_id``, ``text_q`` (the statement), ``text_s`` subtitles, ``answer`` 0/1
    (-> ``label``)."""

    lines = True

    def _parse(self, raw):
        clip_id = as_str(get_field(raw, "clip_id"), "clip_id")
        label = as_int(get_field(raw, "answer"), "answer")
        if label not in (0, 1):
            raise RowError("bad value", f"answer must be 0 or 1, got {label}")
        subs = self._subtitles(raw)
        path, stems = self._video(clip_id, "clip_id")
        return self._make(clip_id, path, stems, segments=subs, subtitles=subs,
                          question=as_str(get_field(raw, "text_q"), "text_q"), label=label)


@register("lfvila_actnet_qa")
class LFVILAActnetQA(AnnotationDataset):
    """Official LF-VILA ActivityNet-QA jsonl: ``video_name``, ``question``, ``answer`` (int class -> ``label``,
    checked against ``num_classes`` when given: 1654 officially)."""

    lines = True

    needs_text = False

    def __init__(self, annotation_path, video_root, *, num_classes: int | None = None, **kw):
        self.num_classes = num_classes
        super().__init__(annotation_path, video_root, **kw)

    def _parse(self, raw):
        name = as_str(get_field(raw, "video_name"), "video_name")
        label = as_int(get_field(raw, "answer"), "answer")
        if label < 0 or (self.num_classes is not None and label >= self.num_classes):
            raise RowError("bad value", f"answer class {label} outside [0, {self.num_classes})")
        question = as_str(get_field(raw, "question"), "question")
        if not question:
            raise RowError("bad value", "empty question")
        path, stems = self._video(name, "video_name")
        return self._make(name, path, stems, question=question, label=label)


@register("generic_jsonl")
class GenericJsonl(AnnotationDataset):
    """Generic jsonl: ``{"video": relative path or stem, "duration": s (optional), "sentences": [{"text", "start",
    "end"}, ...]}`` (sentences may also be plain strings: untimed), optional ``"video_id"`` (default: the stem).
    Spans are clamped to [0, duration]; spans with start >= end are dropped; no valid sentence -> bad row."""

    lines = True

    def _parse(self, raw):
        duration = get_field(raw, "duration", None)
        if duration is not None:
            duration = as_float(duration, "duration")
            if duration <= 0:
                raise RowError("bad value", f"duration must be positive, got {duration}")
        path, stems = self._video(as_str(get_field(raw, "video"), "video"))
        video_id = get_field(raw, "video_id", PurePosixPath(stems[0]).name)
        segments = timed_segments(get_field(raw, "sentences"), "sentences", duration, *self._counts)
        return self._make(as_str(video_id, "video_id"), path, stems, duration=duration, segments=segments)


@register("activitynet_captions")
class ActivityNetCaptions(AnnotationDataset):
    """ActivityNet Captions JSON ``{video_id: {"duration": s, "timestamps": [[start, end], ...], "sentences": [...]}}``
    (also the format of the synthetic data). Spans are clamped to [0, duration]; spans with start >= end are dropped
    and counted in ``dropped_segments``; sentences are stripped (empty ones dropped); file order is kept. Video:
    ``video_root/<video_id>.mp4``, falling back to the id without ActivityNet's ``v_`` prefix; an optional
    ``"video"`` key (a path relative to ``video_root``, as :mod:`lfvila.data.synthetic` writes) is tried first."""

    def _rows(self):
        data, replaced = load_json(self.annotation_path, self._policy.lenient)
        if not isinstance(data, dict):
            raise AnnotationError(self.annotation_path, "file", "expected a JSON object {video_id: {...}}", "bad file")
        for key, entry in data.items():
            if replaced and contains_replacement((key, entry)):
                yield f"key {key!r}", RowError("non-utf8", "non-UTF-8 bytes in the row")
            else:
                yield f"key {key!r}", (key, entry)

    def _parse(self, raw):
        key, entry = raw
        duration = as_float(get_field(entry, "duration"), "duration")
        if duration <= 0:
            raise RowError("bad value", f"duration must be positive, got {duration}")
        stamps = as_list(get_field(entry, "timestamps"), "timestamps")
        sentences = as_list(get_field(entry, "sentences"), "sentences")
        if len(stamps) != len(sentences):
            raise RowError("bad value", f"{len(stamps)} timestamps but {len(sentences)} sentences")
        triples = [(t, *as_span(ts, f"timestamps[{k}]")) for k, (ts, t) in enumerate(zip(stamps, sentences))]
        segments = clean_segments(triples, duration, *self._counts)
        path, stems = self._video(key, "video id")
        if stems[0].startswith("v_"):
            stems += (stems[0][2:],)
        if "video" in entry:  # an optional relative path (the synthetic data writes one): tried first
            path, own = self._video(as_str(entry["video"], "video"), "video")
            stems = own + stems
        return self._make(key, path, stems, duration=duration, segments=segments)


@register("didemo")
class DiDeMo(AnnotationDataset):
    """DiDeMo JSON: a list of ``{"video": name, "description": str, "times": [[a, b], ...]}`` (one description with
    its annotators' spans; the most frequent span is taken, the first on ties) or ``{"video", "descriptions": [...],
    "times": [span per description]}``. Times are 5-second chunk indices, both ends inclusive: chunk k covers
    ``[5k, 5k + 5)`` s, so ``[a, b]`` -> ``[5a, 5b + 5)``. Descriptions of one video form one paragraph, ordered by
    (start, end). A bad entry is a bad row ``"entry N"``; a video left without segments is a bad row ``"video X"``."""

    CHUNK_S = 5.0

    @classmethod
    def chunk_span(cls, times, what: str = "times") -> tuple[float, float]:
        """Seconds of a chunk-index span ``[a, b]``, or of the most frequent of a list of annotators' spans."""
        spans = as_list(times, what)
        if spans and all(isinstance(t, (list, tuple)) for t in spans):
            pairs = [as_span(t, f"{what}[{k}]") for k, t in enumerate(spans)]
            spans = list(Counter(pairs).most_common(1)[0][0])
        a, b = (as_int(v, what) for v in as_span(spans, what))
        return a * cls.CHUNK_S, (b + 1) * cls.CHUNK_S

    def _rows(self):
        data, replaced = load_json(self.annotation_path, self._policy.lenient)
        if not isinstance(data, list):
            raise AnnotationError(self.annotation_path, "file", "expected a JSON list of annotations", "bad file")
        groups: dict[str, list] = {}
        for n, entry in enumerate(data):
            try:
                if replaced and contains_replacement(entry):
                    raise RowError("non-utf8", "non-UTF-8 bytes in the row")
                video = as_str(get_field(entry, "video"), "video")
                if "descriptions" in entry:
                    descs, times = as_list(entry["descriptions"], "descriptions"), as_list(get_field(entry, "times"),
                                                                                           "times")
                    if len(descs) != len(times):
                        raise RowError("bad value", f"{len(descs)} descriptions but {len(times)} times")
                    pairs = list(zip(descs, times))
                else:
                    pairs = [(get_field(entry, "description"), get_field(entry, "times"))]
                items = [(d, *self.chunk_span(t, "times")) for d, t in pairs]
            except RowError as err:
                yield f"entry {n}", err
                continue
            groups.setdefault(video, []).extend(items)
        for video, items in groups.items():
            yield f"video {video!r}", (video, items)

    def _parse(self, raw):
        video, items = raw
        segments = clean_segments(items, None, *self._counts)
        segments.sort(key=lambda s: (s.start, s.end))
        path, stems = self._video(video)
        return self._make(video, path, stems, segments=segments)


@register("how2qa_csv")
class How2QACSV(AnnotationDataset):
    """The public How2QA release CSV (``how2QA_{train,val}_release.csv``). Without a header row its columns are the
    release's: video id, span ``"[start:end]"`` (seconds in the full video), three wrong answers, question, correct
    answer. A first row with at least two known column names is a header, and columns are then found by name:
    video ``vid_id | video_id | video``, span ``timesteps | ts | span`` or ``start`` + ``end``, ``question``, correct
    answer ``a1 | answer | correct``, wrong answers ``a2 a3 a4 | wrong1 wrong2 wrong3``; any other first row whose
    second cell is not a span is a header over the release's layout, and is skipped. Quoted fields may hold commas
    and newlines.

    Answers: the file's columns give the correct one away, so with ``shuffle_answers`` (default) each row's answers
    get a fixed pseudo-random order (seeded by ``seed`` and the row); else the correct one is first.
    ``zero_span`` (start == end, common in the release, whose features are one per second): ``"widen"`` (default)
    -> ``[start, start + 1]``, ``"keep"``, or ``"error"``; both repairs add the flag ``"zero_length_span"``.
    """

    needs_text = False
    _NAMES = {"video": ("vid_id", "video_id", "video", "clip_id"), "span": ("timesteps", "ts", "span"),
              "start": ("start",), "end": ("end",), "question": ("question", "q"),
              "correct": ("a1", "answer", "correct", "correct_answer")}
    _WRONG = ("a2", "a3", "a4", "wrong1", "wrong2", "wrong3")
    _POSITIONAL = {"video": 0, "span": 1, "wrong": [2, 3, 4], "question": 5, "correct": 6}

    def __init__(self, annotation_path, video_root, *, zero_span: str = "widen", shuffle_answers: bool = True,
                 seed: int = 0, **kw):
        self.zero_span, self.shuffle_answers, self.seed = check_zero_span(zero_span), shuffle_answers, seed
        self._cols = self._POSITIONAL
        super().__init__(annotation_path, video_root, **kw)

    def _header(self, cells: list[str], row: str) -> dict | None:
        names = [c.strip().lower() for c in cells]
        known = {n for v in self._NAMES.values() for n in v} | set(self._WRONG)
        if sum(n in known for n in names) < 2:
            try:  # data in the release's layout, or a header with other names over that layout
                parse_span_text(cells[1] if len(cells) > 1 else "")
                return None
            except RowError:
                return self._POSITIONAL
        cols: dict = {"wrong": [i for i, n in enumerate(names) if n in self._WRONG]}
        for key, aliases in self._NAMES.items():
            found = [i for i, n in enumerate(names) if n in aliases]
            if found:
                cols[key] = found[0]
        if not ({"video", "question", "correct"} <= cols.keys() and cols["wrong"]
                and ("span" in cols or {"start", "end"} <= cols.keys())):
            raise AnnotationError(self.annotation_path, row, f"header {cells} lacks a video, span (or start and end), "
                                  "question, correct- or wrong-answer column", "bad header")
        return cols

    def _rows(self):
        for n, (row, cells) in enumerate(read_csv_rows(self.annotation_path, self._policy.lenient)):
            if isinstance(cells, RowError):
                yield row, cells
            elif n == 0 and (cols := self._header(cells, row)) is not None:
                self._cols = cols
            else:
                yield row, (row, cells)

    def _parse(self, raw):
        row, cells = raw

        def cell(key: str, i: int | None = None) -> str:
            i = self._cols[key] if i is None else i
            if i >= len(cells) or not cells[i].strip():
                raise RowError("missing field", f"missing {key} (column {i + 1} of a {len(cells)}-cell row)")
            return cells[i].strip()

        video_id = cell("video")
        if "span" in self._cols:
            start, end = parse_span_text(cell("span"))
        else:
            start, end = as_float(cell("start"), "start"), as_float(cell("end"), "end")
        flags: list[str] = []
        span = question_span(start, end, self.zero_span, flags)
        options = [cell("correct")] + [cell("wrong", i) for i in self._cols["wrong"]]
        order = list(range(len(options)))
        if self.shuffle_answers:
            random.Random(f"{self.seed}:{row}").shuffle(order)
        path, stems = self._video(video_id, "video id")
        return self._make(video_id, path, stems, question=cell("question"), answers=[options[k] for k in order],
                          answer=order.index(0), span=span, flags=flags)


def shard(items, rank: int, world_size: int, mode: str = "disjoint") -> list[int]:
    """The indices rank ``rank`` of ``world_size`` handles. ``items``: a dataset (anything with ``len``), a number
    of items, or a sequence of indices. Ranks take strided positions (``rank, rank + W, ...``) as torch's
    DistributedSampler does.

    ``mode``:
      * ``"disjoint"`` (default, for evaluation): every item exactly once over all ranks, no duplicates; rank sizes
        differ by at most one when ``W`` does not divide ``N``, so gather variable-size results.
      * ``"pad"``: DistributedSampler's choice: the list is extended with its own head to a multiple of ``W``, so
        every rank has ``ceil(N / W)`` items and some items appear twice (training only: it biases metrics).
      * ``"drop"``: the last ``N mod W`` items are left out, every rank has ``floor(N / W)`` items, no duplicates.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    if isinstance(items, int):
        idx = list(range(items))
    elif isinstance(items, Dataset) or not hasattr(items, "__iter__"):
        idx = list(range(len(items)))
    else:
        idx = [int(i) for i in items]
    if mode not in ("disjoint", "pad", "drop"):
        raise ValueError(f"mode must be 'disjoint', 'pad' or 'drop', got {mode!r}")
    n = len(idx)
    if mode == "pad" and n:
        total = -(-n // world_size) * world_size
        idx = (idx * (total // n + 1))[:total]
    elif mode == "drop":
        idx = idx[: n - n % world_size]
    return idx[rank::world_size]


from lfvila.data import video_cls  # noqa: E402, F401  (registers lfvila_video_cls; it imports this module)
