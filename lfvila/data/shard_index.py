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

    format, version          "lfvila-webdataset-shards", 1
    annotation_format        the ``lfvila.data.datasets`` format of the annotation file; annotations, video_root
    annotation_samples       N, the number of samples of the annotation dataset (indices are 0 .. N-1);
                             annotation_rows_skipped: bad rows the dataset skipped (``--on-error skip``)
    mode                     "paragraph" | "multichoice" | "classification" (``loader.sample_mode``)
    key_digits, ext          9, ".mp4" | ".webm"
    prepare, shard_rule      the re-encoding options (fps, gop, max_height, codec, crf); {"samples": n} | {"bytes": b}
    samples, failed          samples written; annotation indices left out (a video failed, or the row did not parse)
    shards                   [{name, samples, bytes, indices, [labels]}]: ``indices`` the annotation indices it holds
                             in tar order as ``[start, stop)`` runs (:func:`expand_runs`; key = :func:`sample_key`);
                             ``labels`` (classification only) the samples' class ids
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .sampling import Segment

INDEX_FORMAT, INDEX_VERSION, KEY_DIGITS = "lfvila-webdataset-shards", 1, 9


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
    """One shard of an index: file ``name`` / ``path``, ``samples`` count, annotation ``indices`` in tar order."""

    name: str
    path: Path
    samples: int
    indices: tuple[int, ...]
    labels: tuple[int, ...] | None = None


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
    if index.get("version") != INDEX_VERSION:
        raise ShardError(f"{path}: shard index version {index.get('version')!r}, this reader reads {INDEX_VERSION}")
    shards = []
    for s in index["shards"]:
        indices = tuple(expand_runs(s["indices"]))
        if len(indices) != s["samples"]:
            raise ShardError(f"{path}: shard {s['name']} lists {len(indices)} indices for {s['samples']} samples")
        labels = tuple(s["labels"]) if s.get("labels") is not None else None
        shards.append(ShardInfo(s["name"], path.parent / s["name"], int(s["samples"]), indices, labels))
    return {**index, "shards": shards, "path": path}


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
