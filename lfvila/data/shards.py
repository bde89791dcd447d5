"""WebDataset tar shards of prepared clips: the streaming reader :class:`ShardStream`.

Why: pretraining reads 34M small clip files; on a shared filesystem the per-file opens and random reads, not the
decoding, bound the throughput. A shard is a plain WebDataset tar (``webdataset``'s ``TarWriter`` writes it) that
a worker reads front to back, so each worker makes a few large sequential reads.

The on-disk layout and ``index.json``: :mod:`lfvila.data.shard_index`.

Reading (:class:`ShardStream`, an ``IterableDataset``): each sample's video members are written to a per-process
scratch folder (``/dev/shm`` when it exists), then :class:`~lfvila.data.loader.VideoTextDataset`'s own sample path
(decode, augment, tokenise, random draws from ``(seed, epoch, index)``) runs on a one-sample annotation view whose
paths point there, and the files are deleted. So a sample is the one the DataLoader path makes of the same
annotation and video bytes, bit for bit, and ``collate`` / ``to_model_input`` / the trainer take it unchanged.

Determinism and equal work (training, ``equal_work=True``). ``P = world_size * num_workers`` slots, slot
``s = rank * num_workers + role``. Each epoch the shard list is permuted from ``(seed, epoch)`` (``shuffle``; else index
order) and slot ``s`` reads ``shards[s::P]`` in that order, through a shuffle buffer of ``buffer`` samples drawn from
``(seed, epoch, s)``. Every slot yields exactly ``m`` samples: ``m = floor(L / batch_size) * batch_size`` where ``L``
is the sum of the ``floor(S / P)`` smallest shard counts of the index (``S`` shards), the least any slot can hold
under any permutation, so ``m`` -- and the number of batches -- is known from the index alone and is the same in every
epoch (the schedule counts steps per epoch). The rest of a slot's samples are dropped (logged per epoch); ``S < P``
is an error. Each worker thus yields ``m / batch_size`` full batches and the DataLoader's round robin is deterministic:
batch ``i`` of the rank comes from the worker playing role ``i % num_workers``.

Resume (:meth:`ShardStream.set_position` ``(epoch, start_batch)``, as ``samplers.EpochSampler``): the role that
served global batch ``g`` is ``g % W``, and it served ``start_batch // W + (1 if role < start_batch % W else 0)`` of
the first ``start_batch`` batches; those samples are read and skipped without being decoded. A fresh DataLoader asks
worker 0 first, so worker ``w`` plays role ``(w + start_batch) % W``: the resumed epoch gets the remaining batches in
the uninterrupted epoch's order, each with the same samples and draws.

Bad samples follow ``cfg.on_error``: ``raise`` (the ``DecodeError`` names the extracted file, whose folder and name
are the shard and member), ``skip`` (counted; ``None`` in its place, so the batch is smaller), ``replace`` (counted,
then the next sample of the slot's stream takes its place, up to ``replace_attempts`` tries, ``meta["replaced"]`` the
bad index; the stream is deterministic, so this is too; a replacement is not yielded again at its own position). A
shard that cannot be read to the end (a tar cut short, a sample with a missing member, a bad json member) raises a
:class:`ShardError` naming it under ``raise``; otherwise it is logged, named in ``bad_shards`` and its missing
samples are counted in ``lost_samples`` (both per process). A slot that ends short (a truncated shard, replacements
that ran out of stream) fills its quota with ``None`` so every worker and rank still yields the same number of
batches: never a hang. Resume caveat: the skipped prefix is counted in samples of the stream, so under ``replace``
a resume after ``r`` replacements in the skipped part of a worker's stream is shifted by ``r`` samples for that worker.

Evaluation (``equal_work=False``, no shuffle): each slot yields every sample of its shards (none dropped, slots
without a shard yield nothing), so over all ranks every written sample comes exactly once.

Exact order (``data.shard_order: sampler``; ``lfvila.data.shard_map.ShardDataset``): the stream's order is its own
(shards dealt to slots, a shuffle buffer), so its batches are the annotation path's samples in another order.
``ShardDataset`` is the map-style alternative: ``len`` is the annotation count, item ``i`` is found by its
annotation index through the per-sample byte ``offsets`` of ``index.json`` (version 2; a version-1 index is scanned
once, headers only) and read with one ``pread``, and the training loop's ``EpochSampler`` / DataLoader (evaluation:
``build_loader``'s samplers) run over it unchanged: for a seed the batches are the jsonl / LMDB path's, sample for
sample and in order, a mid-epoch resume is the sampler's, and ``num_workers`` changes nothing. The price is random
reads of samples (one a sample, of its ~100 KB-1 MB span) instead of sequential reads of whole shards.

DALI: ``data.backend: dali`` with ``data.format: shards`` is refused (:data:`DALI_REFUSAL`). DALI has
``fn.readers.webdataset``, but (1) it splits and shuffles samples by its own rule (``shard_id`` / ``num_shards`` over
samples, a reader-internal shuffle buffer seeded per pipeline), not this stream's slot, equal-work and
``(seed, epoch, index)`` rule, so a DALI run would see other samples in another order, and it resumes mid-epoch only
from its own serialized pipeline checkpoint (``enable_checkpointing``), not from the ``(epoch, batch)`` position our
checkpoints carry; and (2) our ``DaliLoader`` plans each sample's frame indices and clip window on the host from the
annotation and a probe of the file (``loader.plan_frames`` / ``plan_clips``) and feeds bytes and indices through
``external_source``, while a reader inside the pipeline gives no host step between reading a sample and decoding it.
Feeding ``DaliLoader`` from this stream's entries (the bytes are in memory already) is the way forward; it needs a
single-process slot iteration (``DaliLoader`` runs in the training process, not in DataLoader workers).
"""

from __future__ import annotations

import json
import logging
import multiprocessing.util
import os
import shutil
import tarfile
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from torch.utils.data import IterableDataset, get_worker_info

from .loader import LoaderConfig, SeededDataLoader, VideoTextDataset, make_loader
from .shard_index import IndexRows, ShardError, ShardInfo, load_index, sample_from_json, sample_key

__all__ = ["DALI_REFUSAL", "SHARD_ORDERS", "ShardError", "ShardStream", "build_shard_loader", "load_index",
           "sample_key"]
SHARD_ORDERS = ("stream", "sampler")  # data.shard_order: ShardStream (default) | ShardDataset under a sampler

_SHARD_ORDER, _BUFFER = 0x5A4D0, 0xB0FF3  # non-zero tags: seed streams of their own
DALI_REFUSAL = ("DALI's fn.readers.webdataset splits and shuffles samples by its own rule (not the stream's slot, "
                "equal-work and (seed, epoch, index) rule; it resumes only from its own pipeline checkpoint, not from "
                "an (epoch, batch) position), and DaliLoader plans frames on the host from a probe of each file; see "
                "the lfvila.data.shards docstring. Use data.backend pyav or auto")
log = logging.getLogger(__name__)


class OneSample:
    """The annotations a ``VideoTextDataset`` reads here: the one sample being loaded, at its annotation index."""

    def __init__(self, n: int, path, format_name: str):
        self.n, self.annotation_path, self.format_name = n, path, format_name
        self.index, self.sample = None, None

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        if i != self.index:
            raise IndexError(f"{self.annotation_path}: sample {i} is not the one being loaded ({self.index})")
        return dict(self.sample)


@dataclass
class Entry:
    """One sample read from a shard: its json member (``meta``) and video members (name -> bytes)."""

    shard: ShardInfo
    key: str
    meta: dict
    files: dict[str, bytes]

    @property
    def index(self) -> int:
        return int(self.meta["index"])


def make_entry(shard: ShardInfo, key: str, group: dict[str, bytes]) -> Entry:
    """The entry of sample ``key`` from its members ``group`` (extension -> bytes); a missing or bad json member or a
    missing video member is a :class:`ShardError`."""
    try:
        meta = json.loads(group.pop("json"))
    except KeyError:
        raise ShardError(f"sample {key} has no json member") from None
    except ValueError as e:
        raise ShardError(f"sample {key}: bad json member ({e})") from None
    names = meta["clips"] if meta.get("clips") else [meta["video"]]
    files = {}
    for name in names:
        ext = name.partition(".")[2]
        if ext not in group:
            raise ShardError(f"sample {key} lacks its member {name}")
        files[name] = group[ext]
    return Entry(shard, key, meta, files)


def make_scratch(owner, base) -> Path:
    """A new scratch folder for ``owner``'s video members (under ``base``; default ``/dev/shm`` when writable, else
    the temp folder), removed when ``owner`` goes or the process leaves."""
    if base is None and os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK):
        base = "/dev/shm"
    tmp = Path(tempfile.mkdtemp(prefix="lfvila-shards-", dir=base))
    # DataLoader workers leave through multiprocessing's exit path, which runs these (atexit does not)
    multiprocessing.util.Finalize(owner, shutil.rmtree, args=(str(tmp), True), exitpriority=10)
    return tmp


def load_entry(entry: Entry, scratch: Path, view: OneSample, load) -> dict | None:
    """``load()`` (a ``VideoTextDataset`` sample of ``entry.index``, read through ``view``) with the entry's video
    members written under ``scratch`` for its duration; the meta's paths become ``<shard>/<member>``."""
    folder = scratch / Path(entry.shard.name).stem
    folder.mkdir(exist_ok=True)
    paths = {name: str(folder / name) for name in entry.files}
    try:
        for name, data in entry.files.items():
            Path(paths[name]).write_bytes(data)
        view.index = entry.index
        view.sample = sample_from_json(entry.meta, paths, str(folder / entry.key))
        out = load()
    finally:
        view.index = view.sample = None
        for p in paths.values():
            try:
                os.unlink(p)
            except FileNotFoundError:
                pass
    if out is not None:
        names = {p: f"{entry.shard.name}/{name}" for name, p in paths.items()}
        meta = out["meta"]
        meta["video"] = names.get(meta["video"], f"{entry.shard.name}/{entry.key}")
        if "clips" in meta:
            meta["clips"] = [names[p] for p in meta["clips"]]
        meta.update(shard=entry.shard.name, key=entry.key)
    return out


def _shuffled(entries, size: int, rng: np.random.Generator):
    """``entries`` through a shuffle buffer of ``size`` (<= 1: in order); draws only from ``rng``."""
    if size <= 1:
        yield from entries
        return
    buf = []
    for entry in entries:
        if len(buf) < size:
            buf.append(entry)
            continue
        j = int(rng.integers(size))
        yield buf[j]
        buf[j] = entry
    while buf:
        j = int(rng.integers(len(buf)))
        buf[j], buf[-1] = buf[-1], buf[j]
        yield buf.pop()


class ShardStream(IterableDataset):
    """The samples of a shard index for rank ``rank`` of ``world_size`` with ``num_workers`` DataLoader workers (0:
    the main process), as :class:`~lfvila.data.loader.VideoTextDataset` makes them (module docstring)::

        video          uint8 (T, H, W, C)    T = cfg.clips * cfg.frames_per_clip, (H, W) = cfg.size
        text_ids       int64 (M, L) (multiple choice (C, M, L)), text_mask likewise, sentence_real bool (M,)
        index          int                   the annotation index
        meta           dict                  video_id, video / clips (``<shard>/<member>``), frames, source, shard, key

    ``shuffle`` (default ``cfg.train``): permute the shards per epoch and draw through a ``buffer``-sample shuffle
    buffer per slot (memory: about ``buffer`` samples' encoded bytes per worker). ``equal_work`` (default
    ``cfg.train``): every slot yields the same ``m`` samples (the rest dropped); off, every sample once (evaluation).
    ``scratch``: where video members are written for decoding (default ``/dev/shm`` when it exists, else the temp
    folder). ``__len__`` is this rank's samples per epoch, :meth:`batches_per_epoch` its batches.
    """

    def __init__(self, index_path, tokenizer, cfg: LoaderConfig, batch_size: int, rank: int = 0, world_size: int = 1,
                 shuffle: bool | None = None, buffer: int = 256, num_workers: int = 0,
                 equal_work: bool | None = None, scratch=None):
        if batch_size < 1 or num_workers < 0 or buffer < 0:
            raise ValueError(f"need batch_size >= 1, num_workers >= 0 and buffer >= 0, got {batch_size}, "
                             f"{num_workers}, {buffer}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        self.index = load_index(index_path)
        self.path, self.shards = self.index["path"], self.index["shards"]
        self.cfg, self.batch_size, self.rank, self.world_size = cfg, batch_size, rank, world_size
        self.shuffle = cfg.train if shuffle is None else bool(shuffle)
        self.equal_work = cfg.train if equal_work is None else bool(equal_work)
        self.buffer, self.num_workers, self.scratch = int(buffer), int(num_workers), scratch
        self.epoch = self.start_batch = 0
        self.bad_shards: list[str] = []
        self.lost_samples = 0
        self._tmp: Path | None = None
        slots, count = self.slots, len(self.shards)
        if self.equal_work:
            if slots > count:
                raise ValueError(f"{self.path}: {slots} slots (world_size {world_size} x {self.workers} workers) but "
                                 f"only {count} shards: every slot needs a shard; write more, smaller shards "
                                 f"(--shard-samples) or use fewer workers")
            low = sum(sorted(s.samples for s in self.shards)[: count // slots])
            self.quota = low // batch_size * batch_size
            if self.quota == 0:
                raise ValueError(f"{self.path}: a slot may hold only {low} samples (the {count // slots} smallest of "
                                 f"{count} shards for {slots} slots), fewer than batch_size {batch_size}")
        else:
            self.quota = None
        mode = self.index.get("mode", "paragraph") if cfg.mode == "auto" else cfg.mode
        inner = replace(cfg, mode=mode, on_error="skip" if cfg.on_error == "replace" else cfg.on_error)
        self._view = OneSample(int(self.index["annotation_samples"]), self.path, self.index["annotation_format"])
        self.dataset = VideoTextDataset(self._view, tokenizer, inner)
        self.mode = self.dataset.mode
        self.annotations = IndexRows(self.index)

    # -- sizes and positions -------------------------------------------------------------------------------------
    @property
    def workers(self) -> int:
        return max(1, self.num_workers)

    @property
    def slots(self) -> int:
        return self.world_size * self.workers

    @property
    def skips(self):
        """The per-process count of loaded and skipped videos (``decode.SkipCounter``)."""
        return self.dataset.skips

    def assignment(self, epoch: int) -> list[list[ShardInfo]]:
        """The shards of every slot in ``epoch``: the (permuted) shard list dealt as ``shards[s::P]``."""
        order = list(range(len(self.shards)))
        if self.shuffle:
            order = np.random.default_rng((self.cfg.seed, epoch, _SHARD_ORDER)).permutation(len(order)).tolist()
        shards = [self.shards[i] for i in order]
        return [shards[s :: self.slots] for s in range(self.slots)]

    def _slot_sizes(self) -> list[int]:
        """Samples yielded per worker role of this rank in the current epoch."""
        if self.quota is not None:
            return [self.quota] * self.workers
        slots = self.assignment(self.epoch)
        return [sum(s.samples for s in slots[self.rank * self.workers + r]) for r in range(self.workers)]

    @property
    def per_rank(self) -> int:
        return sum(self._slot_sizes())

    def __len__(self) -> int:
        return self.per_rank

    def batches_per_epoch(self, drop_last: bool = True) -> int:
        """This rank's batches per epoch (each worker batches its own samples)."""
        rounding = (lambda n: n // self.batch_size) if drop_last else (lambda n: -(-n // self.batch_size))
        return sum(rounding(n) for n in self._slot_sizes())

    def set_epoch(self, epoch: int) -> None:
        """Select ``epoch`` (a new epoch starts at batch 0; the same epoch keeps its position)."""
        if int(epoch) != self.epoch:
            self.epoch, self.start_batch = int(epoch), 0

    def set_position(self, epoch: int, start_batch: int = 0) -> None:
        """Start ``epoch`` at batch ``start_batch`` of this rank (module docstring: the resume rule)."""
        if start_batch and self.quota is None:
            raise ValueError("set_position: a stream without equal_work (evaluation) cannot start mid-epoch")
        self.epoch, self.start_batch = int(epoch), int(start_batch)

    # -- iteration -----------------------------------------------------------------------------------------------
    def __iter__(self):
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        if workers != self.workers:
            raise ValueError(f"{self.path}: ShardStream built for num_workers={self.num_workers} is read by "
                             f"{workers} worker(s); pass the DataLoader's num_workers")
        role, skip = worker, 0
        if self.quota is not None:
            role = (worker + self.start_batch) % workers
            skip = (self.start_batch // workers + (1 if role < self.start_batch % workers else 0)) * self.batch_size
        slot = self.rank * workers + role
        shards = self.assignment(self.epoch)[slot]
        self.dataset.set_epoch(self.epoch)
        return self._serve(slot, shards, skip)

    def _serve(self, slot: int, shards: list[ShardInfo], skip: int):
        total = sum(s.samples for s in shards)
        quota = total if self.quota is None else self.quota
        if total > quota:
            log.info("%s: epoch %d, slot %d of %d: %d shards, %d samples, %d dropped for equal work", self.path,
                     self.epoch, slot, self.slots, len(shards), total, total - quota)
        entries = self._entries(shards)
        if self.shuffle:
            entries = _shuffled(entries, self.buffer, np.random.default_rng((self.cfg.seed, self.epoch, _BUFFER, slot)))
        done, entries = 0, iter(entries)
        try:
            while done < quota and (entry := next(entries, None)) is not None:
                done += 1
                if skip:
                    skip -= 1
                    continue
                out = self._load(entry)
                if out is None and self.cfg.on_error == "replace":
                    out = self._replacement(entry, entries)
                yield out
            if done < quota:
                log.warning("%s: epoch %d, slot %d: its stream ended after %d of %d samples; the rest of its batches "
                            "are filled with skipped (None) samples", self.path, self.epoch, slot, done, quota)
            for _ in range(done, quota):
                if skip:
                    skip -= 1
                    continue
                yield None
        finally:
            self._clean()

    def _replacement(self, bad: Entry, entries):
        """``on_error="replace"``: the next samples of the stream until one loads (``replace_attempts`` tries)."""
        for attempt in range(1, self.cfg.replace_attempts + 1):
            other = next(entries, None)
            if other is None:
                break
            out = self._load(other)
            if out is not None:
                out["meta"]["replaced"] = bad.index
                log.warning("%s: index %d (epoch %d) replaced by the next sample of its stream, index %d (attempt %d)",
                            self.path, bad.index, self.epoch, other.index, attempt)
                return out
        log.warning("%s: index %d (epoch %d): no replacement loaded; skipped", self.path, bad.index, self.epoch)
        return None

    def _entries(self, shards: list[ShardInfo]):
        for shard in shards:
            yield from self._read_shard(shard)

    def _read_shard(self, shard: ShardInfo):
        """The samples of ``shard`` in tar order (at most its index count); a shard that ends early or is corrupt is
        reported (:meth:`_bad_shard`) after the samples read before the damage."""
        n, error = 0, None
        key, group = None, {}
        try:
            with open(shard.path, "rb") as f, tarfile.open(fileobj=f, mode="r|") as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    k, _, ext = member.name.partition(".")
                    if k != key and key is not None:
                        yield self._entry(shard, key, group)
                        n += 1
                        if n == shard.samples:
                            return
                        group = {}
                    key = k
                    group[ext] = tar.extractfile(member).read()
                if key is not None:
                    yield self._entry(shard, key, group)
                    n += 1
        except (tarfile.TarError, OSError, EOFError, ShardError) as e:
            error = e
        if n < shard.samples:
            self._bad_shard(shard, n, error)

    def _entry(self, shard: ShardInfo, key: str, group: dict[str, bytes]) -> Entry:
        return make_entry(shard, key, group)

    def _bad_shard(self, shard: ShardInfo, read: int, error: BaseException | None) -> None:
        why = f"{type(error).__name__}: {error}" if error is not None else "the tar ends early"
        msg = f"{shard.path}: truncated or corrupt shard: {read} of its {shard.samples} samples read ({why})"
        if self.cfg.on_error == "raise":
            raise ShardError(msg)
        self.bad_shards.append(shard.name)
        self.lost_samples += shard.samples - read
        log.warning("%s; %d samples lost (%d bad shards in this process)", msg, shard.samples - read,
                    len(self.bad_shards))

    def _load(self, entry: Entry) -> dict | None:
        """``VideoTextDataset``'s sample ``entry.index`` made from the entry's members; None when skipped."""
        return load_entry(entry, self._scratch_dir(), self._view, lambda: self.dataset[entry.index])

    def _scratch_dir(self) -> Path:
        if self._tmp is None:
            self._tmp = make_scratch(self, self.scratch)
        return self._tmp

    def _clean(self) -> None:
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_tmp"] = None  # each process makes its own scratch folder
        return state


def build_shard_loader(index_path, tokenizer, cfg: LoaderConfig, batch_size: int, num_workers: int = 0,
                       rank: int = 0, world_size: int = 1, shuffle: bool | None = None, buffer: int = 256,
                       pin_memory: bool | None = None, prefetch_factor: int = 2) -> SeededDataLoader:
    """A DataLoader over :class:`ShardStream` ``(index_path, ...)`` for rank ``rank`` of ``world_size``, batching
    with ``loader.collate``: training (``cfg.train``) shuffled with equal work per slot, evaluation every sample once
    in index order. A :class:`~lfvila.data.loader.SeededDataLoader` (its iterators never draw from the global torch
    RNG); ``loader.dataset`` is the stream (``set_position`` / ``set_epoch`` / ``batches_per_epoch``)."""
    stream = ShardStream(index_path, tokenizer, cfg, batch_size, rank, world_size, shuffle=shuffle, buffer=buffer,
                         num_workers=num_workers)
    return make_loader(stream, batch_size, None, num_workers=num_workers, seed=cfg.seed, rank=rank, drop_last=False,
                       pin_memory=pin_memory, prefetch_factor=prefetch_factor, persistent_workers=False)
