"""Annotation-file parsing helpers for :mod:`lfvila.data.formats`: readers that name the file and the row, safe
literal parsing (never ``eval``), typed field access, time-span cleaning, and the strict / skip error policy.

A *row* is the unit an error names and a skip drops: a line of a jsonl or CSV file (``"line 7"``), a key of a JSON
object (``"key 'v_abc'"``) or an entry of a JSON list (``"entry 3"``).
"""

from __future__ import annotations

import ast
import csv
import io
import json
import logging
import math
from collections import Counter
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

from lfvila.data.sampling import Segment

logger = logging.getLogger(__name__)

REPLACEMENT = "\ufffd"  # what undecodable bytes become under on_error="skip"


class AnnotationError(ValueError):
    """A bad annotation row (or file): the message starts with ``"<file>: <row>: "``; ``reason`` is a short key
    (``"malformed json"``, ``"missing field"``, ...) used to count skips."""

    def __init__(self, path, row: str, message: str, reason: str = "bad row"):
        self.path, self.row, self.reason = str(path), row, reason
        super().__init__(f"{path}: {row}: {message}")


class RowError(ValueError):
    """Raised by row parsers, which do not know the file or row; the dataset turns it into an AnnotationError."""

    def __init__(self, reason: str, message: str):
        self.reason = reason
        super().__init__(message)


# ---------------------------------------------------------------------------------------------------- readers


def _read_bytes(path: Path) -> bytes:
    if not path.is_file():
        raise FileNotFoundError(f"annotation file not found: {path}")
    return path.read_bytes()


def read_text(path, lenient: bool) -> tuple[str, bool]:
    """A whole file as text. Not UTF-8: raise an :class:`AnnotationError` naming the first bad line, or with
    ``lenient`` decode the bad bytes as U+FFFD and return ``(text, True)`` so the caller can refuse the rows that
    contain them (:func:`contains_replacement`)."""
    path = Path(path)
    data = _read_bytes(path)
    try:
        return data.decode("utf-8"), False
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        if not lenient:
            raise AnnotationError(path, f"line {line}", f"non-UTF-8 bytes ({err.reason})", "non-utf8") from err
        logger.warning("%s: non-UTF-8 bytes from line %d on; rows containing them are skipped", path, line)
        return data.decode("utf-8", errors="replace"), True


def load_json(path, lenient: bool) -> tuple[object, bool]:
    """A whole JSON document. Malformed JSON cannot be skipped row by row, so it always raises, naming the line."""
    text, replaced = read_text(path, lenient)
    try:
        return json.loads(text), replaced
    except json.JSONDecodeError as err:
        raise AnnotationError(path, f"line {err.lineno}", f"malformed JSON: {err.msg} (column {err.colno})",
                              "malformed json") from err


def read_csv_rows(path, lenient: bool) -> Iterator[tuple[str, list[str] | RowError]]:
    """CSV records as ``("line N", cells)`` (N: the record's first line; quoted fields may hold commas and newlines).
    Blank records are skipped; with ``lenient`` a record holding undecodable bytes comes as a RowError."""
    text, replaced = read_text(path, lenient)
    reader = csv.reader(io.StringIO(text, newline=""))
    first = 1
    while True:
        try:
            cells = next(reader)
        except StopIteration:
            return
        except csv.Error as err:
            yield f"line {first}", RowError("malformed csv", f"malformed CSV: {err}")
            if reader.line_num + 1 == first:  # the reader made no progress: stop rather than loop
                return
            first = reader.line_num + 1
            continue
        row, first = f"line {first}", reader.line_num + 1
        if not any(c.strip() for c in cells):
            continue
        if replaced and any(REPLACEMENT in c for c in cells):
            yield row, RowError("non-utf8", "non-UTF-8 bytes in the row")
            continue
        yield row, cells


def contains_replacement(obj) -> bool:
    """Whether any string inside ``obj`` (nested dicts / lists) holds U+FFFD, i.e. came from undecodable bytes."""
    if isinstance(obj, str):
        return REPLACEMENT in obj
    if isinstance(obj, dict):
        return any(contains_replacement(k) or contains_replacement(v) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return any(contains_replacement(v) for v in obj)
    return False


def parse_json(text: str):
    """One JSON value; malformed -> RowError."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise RowError("malformed json", f"malformed JSON: {err.msg} (column {err.colno})") from None


def parse_literal(text: str | bytes):
    """One row of the official pretraining data: JSON, or else a Python literal (the official LMDB values are
    ``repr`` strings that the official code runs through ``eval``). Only :func:`ast.literal_eval` is used, so code
    such as ``__import__('os').system(...)`` is refused (RowError), never executed."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as err:
            raise RowError("non-utf8", f"non-UTF-8 bytes at byte {err.start} ({err.reason})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        pass
    try:
        return ast.literal_eval(text.strip())
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError) as err:
        raise RowError("malformed literal",
                       f"neither JSON nor a Python literal (code is refused, not run): {type(err).__name__}: "
                       f"{str(err)[:80]}") from None


# ---------------------------------------------------------------------------------------------------- fields


def get_field(obj, key: str, default=RowError):
    """``obj[key]`` where ``obj`` must be a dict; a missing key raises RowError("missing field") unless a default
    is given."""
    if not isinstance(obj, dict):
        raise RowError("bad row", f"expected a JSON object, got {type(obj).__name__}")
    if key not in obj or obj[key] is None:
        if default is RowError:
            raise RowError("missing field", f"missing field {key!r}")
        return default
    return obj[key]


def as_str(value, what: str) -> str:
    """A string field, stripped."""
    if not isinstance(value, str):
        raise RowError("bad value", f"{what} must be a string, got {type(value).__name__}")
    return value.strip()


def as_float(value, what: str) -> float:
    """A finite number (int, float or a numeric string); bools are refused."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise RowError("bad value", f"{what} must be a number, got {type(value).__name__}")
    try:
        x = float(value)
    except ValueError:
        raise RowError("bad value", f"{what} must be a number, got {value!r}") from None
    if not math.isfinite(x):
        raise RowError("bad value", f"{what} must be finite, got {value!r}")
    return x


def as_int(value, what: str) -> int:
    """An integer (int, integral float or digit string); bools are refused."""
    x = as_float(value, what)
    if not x.is_integer():
        raise RowError("bad value", f"{what} must be an integer, got {value!r}")
    return int(x)


def as_list(value, what: str) -> list:
    if not isinstance(value, (list, tuple)):
        raise RowError("bad value", f"{what} must be a list, got {type(value).__name__}")
    return list(value)


def as_span(value, what: str) -> tuple[float, float]:
    """A ``[start, end]`` pair of numbers."""
    pair = as_list(value, what)
    if len(pair) != 2:
        raise RowError("bad value", f"{what} must be [start, end], got {value!r}")
    return as_float(pair[0], f"{what}[0]"), as_float(pair[1], f"{what}[1]")


def parse_span_text(cell: str) -> tuple[float, float]:
    """A span written as text, ``"[start:end]"`` (also ``start:end`` or ``start-end``), in seconds."""
    text = cell.strip().strip("[]() ")
    sep = ":" if ":" in text else "-"
    if sep not in text:
        raise RowError("bad value", f"span {cell!r} is not '[start:end]'")
    a, b = text.split(sep, 1)
    return as_float(a.strip(), "span start"), as_float(b.strip(), "span end")


def safe_relpath(name: str, what: str = "video name") -> PurePosixPath:
    """A relative path that stays under its root (no absolute path, no ``..``), so annotation ids cannot point
    elsewhere on disk."""
    if not isinstance(name, str) or not name.strip():
        raise RowError("bad value", f"{what} must be a non-empty string, got {name!r}")
    p = PurePosixPath(name.strip().replace("\\", "/"))
    if p.is_absolute() or ".." in p.parts:
        raise RowError("unsafe path", f"{what} {name!r} leaves the video root")
    return p


# ---------------------------------------------------------------------------------------------------- spans


def clean_segments(items, duration: float | None, dropped: Counter, clamped: Counter) -> list[Segment]:
    """Segments from ``(text, start, end)`` triples (times in seconds or both ``None``), in the given order.

    Texts are stripped; an empty one is dropped (``dropped["empty sentence"]``). Timed spans are clamped to
    ``[0, duration]`` (``[0, inf)`` when the duration is unknown; ``clamped["clamped"]`` counts changes) and a span
    with ``start >= end`` after clamping is dropped (``dropped["start >= end"]``).
    """
    out = []
    for text, start, end in items:
        text = as_str(text, "sentence")
        if not text:
            dropped["empty sentence"] += 1
            continue
        if start is None and end is None:
            out.append(Segment(text))
            continue
        hi = duration if duration is not None else math.inf
        s, e = min(max(start, 0.0), hi), min(max(end, 0.0), hi)
        if (s, e) != (start, end):
            clamped["clamped"] += 1
        if s >= e:
            dropped["start >= end"] += 1
            continue
        out.append(Segment(text, s, e))
    return out


def timed_segments(items, what: str, duration: float | None, dropped: Counter,
                   clamped: Counter) -> list[Segment]:
    """Segments from ``[{text, start, end}, ...]`` (start and end both given or both absent; a plain string is an
    untimed sentence), cleaned by :func:`clean_segments`."""
    triples = []
    for k, item in enumerate(as_list(items, what)):
        if isinstance(item, str):
            triples.append((item, None, None))
            continue
        text = get_field(item, "text")
        start, end = get_field(item, "start", None), get_field(item, "end", None)
        if (start is None) != (end is None):
            raise RowError("missing field", f"{what}[{k}] has only one of 'start' / 'end'")
        if start is not None:
            start, end = as_float(start, f"{what}[{k}].start"), as_float(end, f"{what}[{k}].end")
        triples.append((text, start, end))
    return clean_segments(triples, duration, dropped, clamped)


def question_span(s: float, e: float, policy: str, flags: list) -> tuple[float, float]:
    """A question span: start > end or a negative start is a bad row; start == end is widened to one second
    (``"widen"``, the public How2QA's 1-second feature at ``start``), kept (``"keep"``) or refused (``"error"``)."""
    if s < 0 or s > e:
        raise RowError("bad value", f"span [{s}, {e}] must satisfy 0 <= start <= end")
    if s == e:
        if policy == "error":
            raise RowError("bad value", f"zero-length span [{s}, {e}]")
        flags.append("zero_length_span")
        if policy == "widen":
            e = s + 1.0
    return s, e


def check_zero_span(policy: str) -> str:
    if policy not in ("widen", "keep", "error"):
        raise ValueError(f"zero_span must be 'widen', 'keep' or 'error', got {policy!r}")
    return policy


# ---------------------------------------------------------------------------------------------------- policy


class ErrorPolicy:
    """Strict or lax handling of bad rows. ``on_error="raise"``: the first bad row raises its AnnotationError.
    ``on_error="skip"``: bad rows are logged (the first ``log_limit`` one by one, then only counted) and counted by
    reason; :meth:`finish` raises when the skipped fraction of all rows exceeds ``max_skip_fraction``."""

    def __init__(self, path, on_error: str = "raise", max_skip_fraction: float = 0.05, log_limit: int = 20):
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        if not 0.0 <= max_skip_fraction <= 1.0:
            raise ValueError(f"max_skip_fraction must be in [0, 1], got {max_skip_fraction!r}")
        self.path, self.on_error, self.max_skip_fraction, self.log_limit = str(path), on_error, max_skip_fraction, \
            log_limit
        self.kept = 0
        self.skipped = 0
        self.reasons: Counter = Counter()

    @property
    def lenient(self) -> bool:
        return self.on_error == "skip"

    def bad(self, err: AnnotationError) -> None:
        if self.on_error == "raise":
            raise err
        self.skipped += 1
        self.reasons[err.reason] += 1
        if self.skipped <= self.log_limit:
            logger.warning("skipping %s", err)
        elif self.skipped == self.log_limit + 1:
            logger.warning("%s: more bad rows; logging only the total from now on", self.path)

    def finish(self) -> None:
        total = self.kept + self.skipped
        if self.skipped:
            logger.warning("%s: skipped %d of %d rows (%s)", self.path, self.skipped, total, dict(self.reasons))
        if total == 0:
            raise AnnotationError(self.path, "file", "no annotation rows", "empty file")
        if self.skipped / total > self.max_skip_fraction:
            raise AnnotationError(self.path, "file", f"skipped {self.skipped} of {total} rows "
                                  f"({self.skipped / total:.1%} > max_skip_fraction {self.max_skip_fraction:.1%}): "
                                  f"{dict(self.reasons)}", "too many skips")
        if self.kept == 0:
            raise AnnotationError(self.path, "file", "no usable rows", "empty file")
