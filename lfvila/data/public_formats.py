"""Public annotation formats (the datasets' own releases), each a registered
:class:`~lfvila.data.formats.AnnotationDataset`: ``activitynet_captions``, ``didemo``, ``how2qa_csv`` (the public How2QA
release) and ``generic_jsonl``.
"""

from __future__ import annotations

import random
from collections import Counter
from pathlib import PurePosixPath

from lfvila.data.row_parsing import (
    AnnotationError,
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
    parse_span_text,
    question_span,
    read_csv_rows,
    timed_segments,
)

from .formats import AnnotationDataset, register


@register("generic_jsonl")
class GenericJsonlFormat(AnnotationDataset):
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
class ActivityNetCaptionsFormat(AnnotationDataset):
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
class DiDeMoFormat(AnnotationDataset):
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
class How2QACSVFormat(AnnotationDataset):
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
