"""Training and evaluation data for the loop: datasets from the config, a resumable sampler, device prefetching.

Batches are the loader's (``lfvila.data.loader``): ``video`` uint8 (B, T, H, W, C), ``text_ids`` / ``text_mask``
(B, M, L), ``sentence_real`` (B, M), ``index`` (B,). :func:`to_device` moves one to the device (the frames stay
uint8: the model normalises them, ``VideoEncoder.normalize``); :class:`Prefetcher` does that for batch k+1 while
step k runs (a side CUDA stream on GPUs).

``data.backend``: ``pyav`` (the DataLoader path: PyAV decodes in worker processes), ``dali`` (``DaliLoader``: NVDEC
decodes and augments on the GPU; its batches arrive on the device, and the Prefetcher passes them
through), ``auto`` (DALI for training on a CUDA device when it is installed, PyAV otherwise). Evaluation always uses
the DataLoader path: its frames are the exact ones (DALI's resize differs from the torch one by a few grey levels).

``data.format: shards``: ``data.train`` / ``data.val`` / ``data.test`` are ``index.json`` files of WebDataset tar shards
(``python -m lfvila.data.prepare SRC DST --shards ...``); the loaders read them with ``lfvila.data.shards.ShardStream``
(``data.shard_buffer`` samples in each worker's shuffle buffer), which takes the sampler's place: it has the same
``set_position`` / ``batches_per_epoch`` / ``per_rank``, and resumes mid-epoch exactly (its module docstring, with
the one caveat of ``on_error: replace``). Every
rank and worker yields the same number of batches (the rest of the shards' samples dropped per epoch, logged);
evaluation reads every written sample once, in index order. ``data.backend: dali`` refuses shards (the reason:
``lfvila.data.shards``); ``auto`` reads them with PyAV. ``video_root`` and ``format_kwargs`` are not used (the shards
hold the videos and the parsed annotation rows). The stream's slots are ``world_size x data.num_workers``, so with
shards the loop refuses a resume that changes ``data.num_workers`` (``train.resume.resume_changes``; with
``run.resume_changes: keep`` the rest of that epoch's shards is dealt anew and may repeat or miss samples; from the
next epoch on it is exact again). A resume on another number of ranks does the same.

``data.shard_order: sampler`` reads the shards as a map-style ``lfvila.data.shard_map.ShardDataset`` instead (each
sample found by its annotation index and read by seeking into its tar), through the same sampler and
DataLoader as the annotation path (evaluation: ``build_loader``'s samplers): for a seed the training and evaluation
batches are the samples of the jsonl / LMDB path of the same annotations, in the same order, and a mid-epoch resume
is exact by the sampler's rule, with any ``data.num_workers``. Samples left out of the shards count as bad samples
(``data.on_error``), as their videos would on the annotation path.

Resuming mid-epoch: the training sampler (``lfvila.data.samplers.EpochSampler``) draws one permutation per
``(seed, epoch)`` and can start at any batch of the epoch (``set_position``), so a resumed run sees exactly the
samples the uninterrupted run would have, without decoding the ones it skips. Nothing here draws
from the global RNGs, which the checkpoint saves for the model and the losses (``train.persist.capture_rng``): the
sampler's order is a function of ``(seed, epoch)``, each sample's jitter / crop / flip of ``(seed, epoch, index)``
(``VideoTextDataset``), and the DataLoaders' worker seeds of ``(seed, rank, epoch)`` (``SeededDataLoader``; a plain
DataLoader would draw them from the global torch RNG at every ``iter()``, one draw more in a resumed run than in the
uninterrupted one). So the data side needs no saved state beyond the position (epoch, batches consumed). This also
matters with ``num_workers: 0``, where samples are loaded in the training process itself, one batch ahead of the
step (:class:`Prefetcher`): a global draw there would be taken before the checkpoint and again after the resume.
"""

from __future__ import annotations

import time

import torch
from torch.utils.data import DataLoader

from lfvila.config import Config
from lfvila.data import decode as decoding
from lfvila.data.formats import build_dataset
from lfvila.data.loader import LoaderConfig, VideoTextDataset, build_loader, make_loader, to_model_input
from lfvila.data.samplers import build_sampler
from lfvila.data.shard_map import ShardDataset
from lfvila.data.shards import DALI_REFUSAL, build_shard_loader
from lfvila.data.spec import spec_fields
from lfvila.data.text import load_tokenizer

SHARDS = "shards"  # data.format of WebDataset tar shards (an index.json per split)


def loader_config(cfg: Config, train: bool) -> LoaderConfig:
    """The loader settings of the training (``train``) or evaluation loaders. ``data.on_error``: ``raise``, ``skip``
    or ``replace`` (the pretraining configs' default: a bad training sample is replaced by another, deterministically,
    so the batch keeps its size; ``lfvila.data.loader``). Evaluation never replaces: under ``replace`` its loaders
    skip and count (a duplicate would bias the metrics)."""
    spec = spec_fields(cfg.data)  # the sample's fields, declared once (lfvila.data.spec.SampleSpec)
    if spec["on_error"] == "replace" and not train:
        spec["on_error"] = "skip"
    return LoaderConfig(**spec, train=train, backend="pyav", seed=cfg.train.seed)


def annotations(cfg: Config, split: str):
    """The annotation dataset of ``split`` (``train`` / ``val`` / ``test``), or a ValueError naming the config key.
    Bad annotation rows follow ``data.on_error`` (``replace`` skips them: they are dropped when the file is read,
    so no batch loses a sample)."""
    path = getattr(cfg.data, split, None)
    if not path:
        raise ValueError(f"data.{split}: no annotation file configured")
    if cfg.data.format == SHARDS:
        raise ValueError(f"data.{split}: data.format shards has no annotation dataset (the shards hold the parsed "
                         f"rows); read it with train_loader / eval_loader")
    on_error = "skip" if cfg.data.on_error == "replace" else cfg.data.on_error
    return build_dataset(cfg.data.format, path, cfg.data.video_root, on_error=on_error,
                         max_skip_fraction=cfg.data.max_skip_fraction, **cfg.data.format_kwargs)


def _split_path(cfg: Config, split: str) -> str:
    path = getattr(cfg.data, split, None)
    if not path:
        raise ValueError(f"data.{split}: no shard index (index.json) configured")
    return path


def tokenizer(cfg: Config):
    if not cfg.data.vocab:
        raise ValueError("data.vocab: a local vocab.txt (or HF tokenizer directory) is required")
    return load_tokenizer(cfg.data.vocab)


def use_dali(cfg: Config, device: torch.device) -> bool:
    """Whether training batches come from DALI (see the module docstring); ``data.backend: dali`` on a machine where
    it cannot run is a ValueError naming the key and the reason."""
    backend = cfg.data.backend
    if backend == "pyav":
        return False
    if cfg.data.format == SHARDS:
        if backend == "dali":
            raise ValueError(f"data.backend: dali cannot read data.format shards: {DALI_REFUSAL}")
        return False
    refusal = decoding.DaliDecoder.available(str(device))
    if backend == "dali":
        if refusal:
            raise ValueError(f"data.backend: dali cannot run on {device}: {refusal}")
        return True
    return device.type == "cuda" and refusal is None


def set_epoch(loader, epoch: int) -> None:
    """Tell a training loader (``SeededDataLoader`` over ``VideoTextDataset``, or ``DaliLoader``) which epoch it
    serves (its random draws depend on it); a plain DataLoader passes it to its dataset."""
    target = loader if hasattr(loader, "set_epoch") else getattr(loader, "dataset", None)
    if hasattr(target, "set_epoch"):
        target.set_epoch(epoch)


def train_loader(cfg: Config, tok, rank: int, world_size: int, device: torch.device | None = None):
    """``(loader, sampler)`` of the training split: the sampler (:class:`EpochSampler`) sets the position to resume
    from; the loader is a DataLoader or, when :func:`use_dali`, a ``DaliLoader`` over the same sampler. With
    ``data.format: shards`` the loader is a DataLoader over a ``ShardStream``, which is also the "sampler" (the same
    ``set_position`` / ``batches_per_epoch`` / ``per_rank``); with ``data.shard_order: sampler`` it is the annotation
    path's DataLoader and :class:`EpochSampler` over a ``ShardDataset``."""
    lcfg = loader_config(cfg, train=True)
    device = torch.device("cpu") if device is None else torch.device(device)
    if cfg.data.format == SHARDS:
        use_dali(cfg, device)  # refuses data.backend dali
        if cfg.data.shard_order == "stream":
            loader = build_shard_loader(_split_path(cfg, "train"), tok, lcfg, cfg.train.batch_size,
                                        num_workers=cfg.data.num_workers, rank=rank, world_size=world_size,
                                        shuffle=True, buffer=cfg.data.shard_buffer, prefetch_factor=4)
            return loader, loader.dataset
        dataset = ShardDataset(_split_path(cfg, "train"), tok, lcfg)  # shard_order sampler: as the annotation path
        sampler = build_sampler(len(dataset), train=True, batch_size=cfg.train.batch_size, rank=rank,
                                world_size=world_size, seed=cfg.train.seed)
    else:
        ann = annotations(cfg, "train")
        sampler = build_sampler(len(ann), train=True, batch_size=cfg.train.batch_size, rank=rank,
                                world_size=world_size, seed=cfg.train.seed)
        if use_dali(cfg, device):
            from lfvila.data.dali_loader import DaliLoader

            loader = DaliLoader(ann, tok, lcfg, cfg.train.batch_size, device=str(device), rank=rank,
                                world_size=world_size, num_threads=max(1, cfg.data.num_workers), sampler=sampler)
            return loader, sampler
        dataset = VideoTextDataset(ann, tok, lcfg)
    loader = make_loader(dataset, cfg.train.batch_size, sampler, num_workers=cfg.data.num_workers,
                         seed=cfg.train.seed, rank=rank, drop_last=True, prefetch_factor=4, persistent_workers=False)
    return loader, sampler


def eval_loader(cfg: Config, tok, split: str, rank: int, world_size: int) -> DataLoader:
    """Each rank a disjoint, ordered part of ``split`` (no duplicate padding; ``batch["index"]`` to reorder). A
    ``SeededDataLoader`` (``build_loader``), so evaluating in the middle of training draws nothing from the RNG
    stream that the training steps consume."""
    batch = cfg.eval.batch_size or cfg.train.batch_size
    if cfg.data.format == SHARDS:
        path, lcfg = _split_path(cfg, split), loader_config(cfg, train=False)
        if cfg.data.shard_order == "sampler":  # build_loader's samplers and DataLoader over a ShardDataset
            return build_loader(None, tok, lcfg, batch, num_workers=cfg.data.num_workers, rank=rank,
                                world_size=world_size, dataset=ShardDataset(path, tok, lcfg))
        return build_shard_loader(path, tok, lcfg, batch, num_workers=cfg.data.num_workers, rank=rank,
                                  world_size=world_size, shuffle=False)
    return build_loader(annotations(cfg, split), tok, loader_config(cfg, train=False), batch,
                        num_workers=cfg.data.num_workers, rank=rank, world_size=world_size)


def to_device(batch: dict, device: torch.device) -> dict:
    """A loader batch on ``device`` (``loader.to_model_input``: the video stays uint8 ``(B, T, H, W, C)``, the model
    normalises it). DALI batches, already on the device, are moved nowhere."""
    return to_model_input(batch, device)


_END = object()


class Prefetcher:
    """Iterate ``loader`` with the next batch already on ``device``; ``wait`` accumulates the seconds the consumer
    spent blocked on data (the loader, or the copy). A batch whose samples were all skipped (``collate`` returned
    None) is yielded as None: under DDP every rank must then skip that step together (the loop agrees on it)."""

    def __init__(self, loader, device: torch.device):
        self.loader, self.device = loader, device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.wait = 0.0

    def _load(self, it):
        t0 = time.perf_counter()
        batch = next(it, _END)
        self.wait += time.perf_counter() - t0
        if batch is _END or batch is None:
            return batch
        if self.stream is not None:
            with torch.cuda.stream(self.stream):
                return to_device(batch, self.device)
        return to_device(batch, self.device)

    def __iter__(self):
        it = iter(self.loader)
        nxt = self._load(it)
        while nxt is not _END:
            if self.stream is not None and nxt is not None:
                current_stream = torch.cuda.current_stream(self.device)
                current_stream.wait_stream(self.stream)
                for v in nxt.values():
                    if isinstance(v, torch.Tensor):
                        v.record_stream(current_stream)
            current = nxt
            nxt = self._load(it)
            yield current
