"""The official LF-VILA annotation formats (the jsonl files of the official release and its pretraining LMDB rows),
each a registered :class:`~lfvila.data.formats.AnnotationDataset`: ``lfvila_retrieval``, ``lfvila_pretrain``,
``lfvila_how2qa``, ``lfvila_violin``, ``lfvila_actnet_qa`` (``lfvila_video_cls``: :mod:`lfvila.data.video_cls`).
"""

from __future__ import annotations

from lfvila.data.row_parsing import (
    RowError,
    as_int,
    as_list,
    as_span,
    as_str,
    check_zero_span,
    clean_segments,
    get_field,
    parse_literal,
    question_span,
    safe_relpath,
    timed_segments,
)
from lfvila.data.sampling import Segment

from .formats import AnnotationDataset, ClassLabelled, register


@register("lfvila_retrieval")
class LFVILARetrievalFormat(AnnotationDataset):
    """Official LF-VILA retrieval jsonl (ActivityNet, DiDeMoFormat, QuerYD, CMovie): ``{"clip_id": stem, "text": str |
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
class LFVILAPretrainFormat(AnnotationDataset):
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
class LFVILAHow2QAFormat(_SubtitleQA):
    """Official LF-VILA How2QA jsonl: ``clip_id``, ``span`` [start, end] s, ``text_q``, ``text_a`` (``num_answers``
    answers, 4 officially), ``text_s`` [{text, start, end}] subtitles, ``answer_idx``. ``zero_span``: see
    :func:`~lfvila.data.row_parsing.question_span`."""

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
class LFVILAViolinFormat(_SubtitleQA):
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
class LFVILAActnetQAFormat(ClassLabelled):
    """Official LF-VILA ActivityNet-QA jsonl: ``video_name``, ``question``, ``answer`` (int class -> ``label``,
    checked against ``num_classes`` when given: 1654 officially)."""

    lines = True

    needs_text = False

    def _parse(self, raw):
        name = as_str(get_field(raw, "video_name"), "video_name")
        label = self._label(raw, "answer")
        question = as_str(get_field(raw, "question"), "question")
        if not question:
            raise RowError("bad value", "empty question")
        path, stems = self._video(name, "video_name")
        return self._make(name, path, stems, question=question, label=label)
