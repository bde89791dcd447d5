"""WebDataset tar shards read in the sampler's order (``data.shard_order: sampler``): :class:`ShardDataset`.

The streaming reader (:class:`~lfvila.data.shards.ShardStream`) reads whole shards front to back in an order of its
own; this map-style dataset finds each sample by its annotation index instead (the per-sample byte offsets of a
version-2 ``index.json``, or a scan of the tar headers for version 1) and reads it with one ``pread``, so the loaders'
samplers (``lfvila.data.samplers``) run over it unchanged and its batches are the jsonl / LMDB path's, sample for
sample and in order. A sample becomes a batch item through the same code as the stream's
(``shards.load_entry``: the members to a scratch folder, then ``VideoTextDataset``'s own sample path).
"""

from __future__ import annotations

import io
import logging
import os
import tarfile
from collections import OrderedDict
from dataclasses import replace
from pathlib import Path

import numpy as np
from torch.utils.data import Dataset

from .loader import LoaderConfig, VideoTextDataset, load_or_replace
from .shard_index import ShardError, ShardInfo, load_index, sample_key, scan_samples
from .shards import Entry, OneSample, load_entry, make_entry, make_scratch

__all__ = ["ShardDataset"]
log = logging.getLogger("lfvila.data.shards")


class _Labels:
    """The annotation view the trainer's QA check reads (``train.tasks.check_qa_data``): ``{"index", "label"}`` for
    every annotation index ``0 .. N-1``; ``label`` None unless the index is of classification samples. A sample left
    out of the shards is never loaded (skipped, replaced or an error); its label reads 0."""

    def __init__(self, index: dict, n: int):
        self.format_name, self.annotation_path, self.n = index["annotation_format"], index["path"], n
        self.labels = None
        if index.get("mode") == "classification":
            self.labels = np.zeros(n, np.int64)
            for s in index["shards"]:
                if s.labels is not None:
                    self.labels[list(s.indices)] = s.labels

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < self.n:
            raise IndexError(f"index {i} out of range for {self.n} samples")
        return {"index": int(i), "label": None if self.labels is None else int(self.labels[i])}


class ShardDataset(Dataset):
    """The shards of an index as a map-style dataset: item ``i`` is :class:`~lfvila.data.loader.VideoTextDataset`'s
    sample ``i`` of the annotations the shards were written from (the same keys as :class:`ShardStream`'s samples),
    read by seeking into its tar. ``len`` is the annotation count ``N``, so a sampler over it (the training loop's
    ``EpochSampler``, ``DistributedSampler``, evaluation's ordered rank parts) deals the same indices as over the
    annotation file itself, and the batches are those of the jsonl / LMDB path, sample for sample and in order.

    Finding a sample: ``index.json`` (version 2) gives each sample's byte span in its tar (``offsets``,
    :mod:`lfvila.data.shard_index`); a version-1 index has none, so each tar's headers are scanned once here
    (:func:`~lfvila.data.shard_index.scan_samples`, the headers only), before any worker starts. A read is one
    ``pread`` of the span; its members are parsed from their own headers (checksummed) and must all carry the sample's
    key and fill the span exactly, so a truncated shard, a bad header or a stale index never gives another sample's
    bytes. Each process opens its own read-only handles (at most ``max_open``, least recently used closed): a forked
    DataLoader worker drops the handles it inherited (their file offset is shared with the parent) and opens its own.

    Errors: a sample that is not in the shards (left out when they were written: ``index.json`` ``failed``), or whose
    bytes cannot be read as above, is a :class:`ShardError` naming the shard file (or the index) and the sample key.
    It follows ``cfg.on_error`` as a bad video does in ``VideoTextDataset``: ``raise`` raises it, ``skip`` counts it
    (``skips``, ``max_skip_fraction``) and gives None, ``replace`` counts it and loads ``replacement_index``'s
    sample, exactly as the annotation path would. ``bad_shards``: the shards of this process whose size differs from
    the index's (logged once each)."""

    def __init__(self, index_path, tokenizer, cfg: LoaderConfig, scratch=None, max_open: int = 16):
        if max_open < 1:
            raise ValueError(f"max_open must be >= 1, got {max_open}")
        self.index = load_index(index_path)
        self.path, self.shards = self.index["path"], self.index["shards"]
        self.cfg, self.scratch, self.max_open = cfg, scratch, int(max_open)
        self.n = n = int(self.index["annotation_samples"])
        self._shard = np.full(n, -1, np.int32)  # the shard of each annotation index (-1: not written)
        self._start, self._stop = np.zeros(n, np.int64), np.zeros(n, np.int64)
        self._problems: dict[int, str] = {}  # annotation index -> why its bytes were not found (version-1 scan)
        scanned = 0
        for j, shard in enumerate(self.shards):
            idx = np.asarray(shard.indices, np.int64)
            if idx.size and (idx.min() < 0 or idx.max() >= n):
                raise ShardError(f"{self.path}: shard {shard.name} lists annotation indices outside [0, {n})")
            self._shard[idx] = j
            if shard.offsets is not None:
                offsets = np.asarray(shard.offsets, np.int64)
                self._start[idx], self._stop[idx] = offsets[:-1], offsets[1:]
            else:
                self._scan(shard, idx)
                scanned += 1
        if scanned:
            log.info("%s: index version %s has no sample offsets: scanned the headers of %d shards", self.path,
                     self.index["version"], scanned)
        mode = self.index.get("mode", "paragraph") if cfg.mode == "auto" else cfg.mode
        inner = replace(cfg, mode=mode, on_error="skip" if cfg.on_error == "replace" else cfg.on_error)
        self._view = OneSample(n, self.path, self.index["annotation_format"])
        self.dataset = VideoTextDataset(self._view, tokenizer, inner)
        self.mode = self.dataset.mode
        self.annotations = _Labels(self.index, n)
        self.epoch = 0
        self.bad_shards: list[str] = []
        self._pid, self._files, self._tmp = os.getpid(), OrderedDict(), None

    def _scan(self, shard: ShardInfo, idx: np.ndarray) -> None:
        """Offsets of a version-1 shard from its headers; samples not found get their reason in ``_problems``."""
        samples, error = scan_samples(shard.path)
        found = 0
        for (key, start, stop), i in zip(samples, idx.tolist()):
            if key != sample_key(i):
                why = (f"{shard.path}: corrupt shard or stale index: the scan of its headers finds sample {key} at "
                       f"byte {start} where index.json lists sample {sample_key(i)}")
                self._problems.update(dict.fromkeys(idx.tolist(), why))
                return
            self._start[i], self._stop[i] = start, stop
            found += 1
        why = f"{type(error).__name__}: {error}" if error is not None else "the tar ends early"
        for i in idx[found:].tolist():
            self._problems[i] = (f"{shard.path}: cannot read the shard ({why})" if isinstance(error, OSError) and
                                 not samples else f"{shard.path}: truncated or corrupt shard: sample {sample_key(i)} "
                                 f"not found by the scan of its headers ({why})")

    # -- Dataset -------------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.n

    @property
    def skips(self):
        """The per-process count of loaded and skipped samples (``decode.SkipCounter``)."""
        return self.dataset.skips

    def set_epoch(self, epoch: int) -> None:
        self.epoch = self.dataset.epoch = int(epoch)

    def __getitem__(self, index: int) -> dict | None:
        """As ``VideoTextDataset.__getitem__``: draws from ``(seed, epoch, index)``, ``replace`` by its rule."""
        return load_or_replace(self._load, len(self), index, self.cfg, self.epoch, self.path)

    def _load(self, index: int, rng: np.random.Generator) -> dict | None:
        try:
            entry = self.read(index)
        except ShardError as e:
            if self.skips.on_error == "raise":
                raise
            self.skips.skip(f"{self.path} (index {index})", e)
            return None
        return load_entry(entry, self._scratch_dir(), self._view, lambda: self.dataset._load(index, rng))

    # -- reading -------------------------------------------------------------------------------------------------
    def read(self, index: int) -> Entry:
        """Sample ``index``'s json and video members from its tar (class docstring); a :class:`ShardError` naming
        the shard (or the index) when it cannot be read exactly."""
        index = int(index)
        if not 0 <= index < self.n:
            raise IndexError(f"index {index} out of range for {self.n} samples")
        j = int(self._shard[index])
        key = sample_key(index)
        if j < 0:
            raise ShardError(f"{self.path}: annotation index {index} (sample {key}) is not in the shards: it was left "
                             f"out when they were written (its video failed or its row did not parse; index.json "
                             f"'failed', prepare_report.jsonl)")
        if index in self._problems:
            raise ShardError(self._problems[index])
        shard = self.shards[j]
        start, stop = int(self._start[index]), int(self._stop[index])
        try:
            data = os.pread(self._fd(shard), stop - start, start)
        except OSError as e:
            raise ShardError(f"{shard.path}: cannot read sample {key} ({e})") from None
        cut = (f"{shard.path}: truncated or corrupt shard: sample {key} (annotation index {index}, bytes "
               f"[{start}, {stop}))")
        if len(data) != stop - start:
            raise ShardError(f"{cut}: the file ends at byte {start + len(data)}")
        group: dict[str, bytes] = {}
        try:
            with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
                for member in tar:
                    k, _, ext = member.name.partition(".")
                    if k != key:
                        raise ShardError(f"{shard.path}: corrupt shard or stale index: member {member.name!r} at byte "
                                         f"{start + member.offset} where index.json puts sample {key}")
                    if member.isfile():
                        group[ext] = tar.extractfile(member).read()
                end = tar.offset
        except ShardError:
            raise
        except (tarfile.TarError, EOFError, ValueError) as e:
            raise ShardError(f"{cut}: {type(e).__name__}: {e}") from None
        if end != len(data):
            raise ShardError(f"{cut}: no valid tar header at byte {start + end}")
        try:
            return make_entry(shard, key, group)
        except ShardError as e:
            raise ShardError(f"{shard.path}: corrupt shard: {e}") from None

    def _fd(self, shard: ShardInfo) -> int:
        """This process's read-only descriptor of ``shard`` (opened on first use; the least recently used closed)."""
        self._own()
        f = self._files.get(shard.name)
        if f is not None:
            self._files.move_to_end(shard.name)
            return f.fileno()
        f = open(shard.path, "rb", buffering=0)
        size = os.fstat(f.fileno()).st_size
        if shard.bytes is not None and size != shard.bytes and shard.name not in self.bad_shards:
            self.bad_shards.append(shard.name)
            log.warning("%s: %d bytes where index.json says %d (a truncated copy or a changed shard): its samples are "
                        "checked as they are read", shard.path, size, shard.bytes)
        self._files[shard.name] = f
        while len(self._files) > self.max_open:
            self._files.popitem(last=False)[1].close()
        return f.fileno()

    def _own(self) -> None:
        """In a process other than the one that opened them (a forked DataLoader worker), drop the inherited shard
        handles (their file offsets are shared with the parent) and scratch folder: this process makes its own."""
        if self._pid != os.getpid():
            inherited, self._files, self._tmp, self._pid = self._files, OrderedDict(), None, os.getpid()
            for f in inherited.values():
                f.close()  # this process's copy of the descriptor only

    def _scratch_dir(self) -> Path:
        self._own()
        if self._tmp is None:
            self._tmp = make_scratch(self, self.scratch)
        return self._tmp

    def close(self) -> None:
        """Close this process's shard handles (reopened on the next read)."""
        if self._pid == os.getpid():
            while self._files:
                self._files.popitem()[1].close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown
            pass

    def __getstate__(self):
        state = dict(self.__dict__)
        state.update(_files=OrderedDict(), _tmp=None, _pid=None)  # each process opens its own handles and scratch
        return state
