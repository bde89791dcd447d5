"""The on-disk format of WebDataset tar shards of prepared clips (read by :mod:`lfvila.data.shards`).

Written by ``python -m lfvila.data.prepare SRC DST --shards --annotations ANN --format FMT``
(:mod:`lfvila.data.shard_writer`)::

    DST/shard-000000.tar ...  one WebDataset sample per annotation sample, key = the annotation index zero-padded
                              to ``key_digits`` (9) digits, members
                                <key>.json      the annotation sample (:func:`sample_to_json`)
                                <key>.mp4       its video (single-video formats), or
                                <key>.<k>.mp4   clip k of a row with one file per clip (``lfvila_pretrain``)
                              (``.webm`` for ``--codec vp9``), each video re-encoded as ``lfvila.data.prepare`` does
    DST/index.json            the index (below)
    DST/prepare_report.jsonl  one row per video, as ``lfvila.data.prepare`` writes
    DST/.shards/              the writer's records of finished shards (for resuming; readers do not need it)

``index.json``::

    format, version          "lfvila-webdataset-shards", 2 (version 1, without ``offsets``, is still read)
    annotation_format        the ``lfvila.data.formats`` format of the annotation file; annotations, video_root
    annotation_samples       N, the number of samples of the annotation dataset (indices are 0 .. N-1);
                             annotation_rows_skipped: bad rows the dataset skipped (``--on-error skip``)
    mode                     "paragraph" | "multichoice" | "classification" (``loader.sample_mode``)
    key_digits, ext          9, ".mp4" | ".webm"
    prepare, shard_rule      the re-encoding options (fps, gop, max_height, codec, crf); {"samples": n} | {"bytes": b}
    samples, failed          samples written; annotation indices left out (a video failed, or the row did not parse)
    shards                   [{name, samples, bytes, indices, [labels]}]: ``indices`` the annotation indices it holds
                             in tar order as ``[start, stop)`` runs (:func:`expand_runs`; key = :func:`sample_key`);
                             ``labels`` (classification only) the samples' class ids; ``offsets`` (version 2)
                             ``samples + 1`` byte offsets: sample k (tar order) is the bytes ``[offsets[k],
                             offsets[k + 1])`` of the tar, its members' headers and 512-padded data, so a reader finds
                             it with one seek and one read (:func:`scan_samples` makes them from the tar's headers)

Why offsets per sample rather than per member: a sample's members are contiguous, and each member's own header (name,
size, checksum) lies inside its span, so the span gives every member's offset and size when it is read, with one read
per sample; the index holds 1 number a sample instead of 2 per member (an 8.5M-row pretraining set has ~40M members).
A version-1 index has no ``offsets``; a reader that needs them scans the tar headers once (:func:`scan_samples`: the
headers only, each member's data is seeked over, never read).
"""

from __future__ import annotations

import json
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

from .sampling import Segment

INDEX_FORMAT, INDEX_VERSION, KEY_DIGITS = "lfvila-webdataset-shards", 2, 9
READ_VERSIONS = (1, 2)  # the index versions this reader reads (1: no per-sample offsets)
_BLOCK = tarfile.BLOCKSIZE


class ShardError(ValueError):
    """A shard or index that cannot be read (truncated, corrupt, missing); the message names the file."""


def sample_key(index: int) -> str:
    """The WebDataset key of annotation sample ``index``: ``index`` zero-padded to :data:`KEY_DIGITS` digits."""
    return f"{int(index):0{KEY_DIGITS}d}"


def index_runs(indices) -> list[list[int]]:
    """Sorted-or-not integer ``indices`` as ``[start, stop)`` runs of consecutive values, in order."""
    runs: list[list[int]] = []
    for i in map(int, indices):
        if runs and runs[-1][1] == i:
            runs[-1][1] = i + 1
        else:
            runs.append([i, i + 1])
    return runs


def expand_runs(runs) -> list[int]:
    """The indices of ``[start, stop)`` runs (:func:`index_runs`'s inverse)."""
    return [i for start, stop in runs for i in range(int(start), int(stop))]


def _segments_json(segments):
    return None if segments is None else [[s.text, s.start, s.end] for s in segments]


def sample_to_json(sample: dict, index: int, members: list[str], key: str) -> dict:
    """The ``<key>.json`` member of annotation sample ``index`` (an ``AnnotationDataset`` sample dict): the same keys,
    segments / subtitles as ``[text, start, end]`` lists, ``span`` a list, ``flags`` a list, ``index`` added; paths
    replaced by member names: ``clips`` the clip members (rows with one file per clip; ``video`` then ``key``, the
    analogue of the clips' folder), else ``video`` the video member. ``src_files``: the source paths."""
    out = {k: v for k, v in sample.items() if not k.startswith("_")}
    out["segments"] = _segments_json(sample["segments"])
    out["subtitles"] = _segments_json(sample.get("subtitles"))
    out["span"] = None if sample.get("span") is None else [float(v) for v in sample["span"]]
    out["flags"] = list(sample.get("flags") or ())
    out["src_files"] = list(sample["clips"]) if sample.get("clips") else [sample["video"]]
    if sample.get("clips"):
        out["video"], out["clips"] = key, list(members)
    else:
        out["video"], out["clips"] = members[0], None
    out["index"] = int(index)
    return out


def sample_from_json(meta: dict, paths: dict[str, str], folder: str) -> dict:
    """The annotation sample dict of a ``<key>.json`` member, its member names mapped to the files in ``paths``
    (``folder``: the ``video`` of a row with one file per clip)."""
    sample = dict(meta)
    sample["segments"] = [Segment(*s) for s in meta["segments"]]
    if meta.get("subtitles") is not None:
        sample["subtitles"] = [Segment(*s) for s in meta["subtitles"]]
    sample["span"] = None if meta.get("span") is None else tuple(meta["span"])
    sample["flags"] = tuple(meta.get("flags") or ())
    if meta.get("clips"):
        sample["clips"], sample["video"] = [paths[c] for c in meta["clips"]], folder
    else:
        sample["video"] = paths[meta["video"]]
    return sample


@dataclass(frozen=True)
class ShardInfo:
    """One shard of an index: file ``name`` / ``path``, ``samples`` count, annotation ``indices`` in tar order,
    ``bytes`` its size when written; ``offsets`` the ``samples + 1`` byte offsets of its samples (version 2; None in a
    version-1 index)."""

    name: str
    path: Path
    samples: int
    indices: tuple[int, ...]
    labels: tuple[int, ...] | None = None
    bytes: int | None = None
    offsets: tuple[int, ...] | None = field(default=None, repr=False)


def load_index(path) -> dict:
    """Read and check an ``index.json`` (module docstring); ``shards`` become :class:`ShardInfo` with paths next to the
    index. A missing, unreadable or foreign file is a :class:`ShardError` naming it."""
    path = Path(path)
    try:
        index = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ShardError(f"{path}: cannot read the shard index ({e})") from None
    if not isinstance(index, dict) or index.get("format") != INDEX_FORMAT:
        raise ShardError(f"{path}: not a shard index (format {INDEX_FORMAT!r}, written by python -m "
                         f"lfvila.data.prepare --shards)")
    if index.get("version") not in READ_VERSIONS:
        raise ShardError(f"{path}: shard index version {index.get('version')!r}, this reader reads "
                         f"{', '.join(map(str, READ_VERSIONS))}")
    shards = []
    for s in index["shards"]:
        indices = tuple(expand_runs(s["indices"]))
        if len(indices) != s["samples"]:
            raise ShardError(f"{path}: shard {s['name']} lists {len(indices)} indices for {s['samples']} samples")
        labels = tuple(s["labels"]) if s.get("labels") is not None else None
        offsets = None
        if index["version"] >= 2:
            offsets = tuple(int(o) for o in s.get("offsets") or ())
            if len(offsets) != len(indices) + 1 or any(b < a for a, b in zip(offsets, offsets[1:])) \
                    or offsets[-1] > int(s["bytes"]):
                raise ShardError(f"{path}: shard {s['name']}: 'offsets' must be {len(indices) + 1} non-decreasing "
                                 f"byte offsets within its {s['bytes']} bytes")
        shards.append(ShardInfo(s["name"], path.parent / s["name"], int(s["samples"]), indices, labels,
                                int(s["bytes"]), offsets))
    return {**index, "shards": shards, "path": path}


def scan_samples(source) -> tuple[list[tuple[str, int, int]], BaseException | None]:
    """The samples of a WebDataset tar (a path, or a binary file open for reading) in tar order, from its headers
    alone: ``[(key, start, stop), ...]``, ``start`` the offset of the first header of the sample's first member,
    ``stop`` the end of its last member's 512-padded data; and the error that ended the scan early (None when the tar
    read to its end). ``tarfile`` reads each 512-byte header and seeks over the member's data (the file is opened
    unbuffered, so no read-ahead pulls data in; ``tarfile`` reads one byte at the end of each member's padded block to
    detect a cut). A tar cut inside a member lists that member with a ``stop`` past the end of the file."""
    samples: list[list] = []
    error = None
    try:
        f = open(source, "rb", buffering=0) if not hasattr(source, "read") else source
    except OSError as e:
        return [], e
    try:
        with tarfile.open(fileobj=f, mode="r:") as tar:
            for member in tar:  # lazily, header by header
                if not member.isfile():
                    continue
                key = member.name.partition(".")[0]
                stop = member.offset_data + -(-member.size // _BLOCK) * _BLOCK
                if samples and samples[-1][0] == key:
                    samples[-1][2] = stop
                else:
                    samples.append([key, member.offset, stop])
    except (tarfile.TarError, OSError, EOFError) as e:
        error = e
    finally:
        if f is not source:
            f.close()
    return [tuple(s) for s in samples], error


def sample_offsets(path, indices) -> list[int]:
    """The ``offsets`` of the shard at ``path`` written with the annotation ``indices`` (tar order): ``len(indices)
    + 1`` byte offsets (module docstring), from :func:`scan_samples`. A tar that does not hold exactly those samples,
    contiguously, is a :class:`ShardError` naming it."""
    samples, error = scan_samples(path)
    keys = [sample_key(i) for i in indices]
    if error is not None or [k for k, _, _ in samples] != keys:
        why = f"{type(error).__name__}: {error}" if error is not None else "other samples"
        span = f"{keys[0]}..{keys[-1]}" if keys else "none"
        raise ShardError(f"{path}: the tar does not hold exactly the samples {span} of its record ({why})")
    for (_, _, stop), (_, start, _) in zip(samples, samples[1:]):
        if stop != start:
            raise ShardError(f"{path}: samples are not contiguous (a gap at byte {stop})")
    return [start for _, start, _ in samples] + ([samples[-1][2]] if samples else [0])


class IndexRows:
    """The written samples of an index as a read-only sequence (index order): ``{"index", "label"}`` each, ``label``
    ``None`` unless the index is of classification samples. What the trainer's QA check reads; ``format_name`` and
    ``annotation_path`` as an ``AnnotationDataset`` has them."""

    def __init__(self, index: dict):
        self.format_name, self.annotation_path = index["annotation_format"], index["path"]
        self._rows = [(i, None if s.labels is None else s.labels[k])
                      for s in index["shards"] for k, i in enumerate(s.indices)]

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, i: int) -> dict:
        index, label = self._rows[i]
        return {"index": index, "label": label}
