"""A DataLoader whose random streams are a function of ``(seed, rank, epoch)``: :class:`SeededDataLoader`."""

from __future__ import annotations

import gc

import numpy as np
import torch
from torch.utils.data import DataLoader

__all__ = ["SeededDataLoader", "loader_seed"]


def loader_seed(seed: int, rank: int, epoch: int) -> int:
    """The seed of a :class:`SeededDataLoader`'s own generator: a well-mixed 64-bit function of ``(seed, rank, epoch)``
    (``numpy.random.SeedSequence``), so neighbouring seeds, ranks and epochs get unrelated streams."""
    entropy = [int(v) % 2**64 for v in (seed, rank, epoch)]
    return int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0])


class _FreezeHeap:
    """``worker_init_fn`` of :class:`SeededDataLoader`: ``gc.freeze()`` first, then the user's function. A forked
    worker inherits the parent's objects in shared pages; the first full garbage collection in the worker (which
    parsing rows can trigger) would write every one of their headers and so copy all those pages (about 40 MB a worker
    measured here with torch imported). Freezing moves them to the permanent generation, which the collector skips;
    it only relinks the generations' list heads, so it copies almost nothing itself."""

    def __init__(self, then=None):
        self.then = then

    def __call__(self, worker_id: int) -> None:
        gc.freeze()
        if self.then is not None:
            self.then(worker_id)


class SeededDataLoader(DataLoader):
    """A ``DataLoader`` whose iterators never draw from the global torch RNG, and whose workers freeze the heap they
    inherit (:class:`_FreezeHeap`: no copy-on-write of the parent's objects by the garbage collector).

    Why: every ``iter(DataLoader)`` draws its ``_base_seed`` (the seed of its worker processes) from ``generator``, and
    a DataLoader built without one draws it from the *global* torch generator, the one the model's dropout and the
    losses (MTC's keys and values, MLM masking) consume. A run resumed mid-epoch restores the global RNG from its
    checkpoint and then creates a fresh iterator, where the uninterrupted run created its iterator at the start of the
    epoch, before the steps that consumed the stream: the resumed run's stream is shifted by that draw, and every
    random draw of the steps after it differs. (An evaluation loader taken in the middle of training does the same.)

    Here ``generator`` is the loader's own and is reseeded from :func:`loader_seed` ``(seed, rank, epoch)`` at every
    ``iter()``, so the base seed is a pure function of the run's seed, the rank and the epoch, and nothing needs
    saving: a mid-epoch iterator of a resumed run gets the base seed its epoch had. Worker ``i`` then seeds torch and
    ``random`` with ``base_seed + i`` and numpy with a state derived from ``(base_seed, i)`` (``torch.utils.data``'s
    worker loop): those depend on ``(seed, rank, epoch, i)`` only. :class:`VideoTextDataset` draws nothing from them
    (its per-sample randomness comes from ``(seed, epoch, index)``), so neither the worker that serves a sample nor the
    batch at which an epoch was resumed changes what a batch holds. An explicit sampler keeps its own randomness
    (``lfvila.data.samplers``: seeded per epoch); with ``shuffle=True`` and no
    sampler, the DataLoader's ``RandomSampler`` would draw from this reseeded generator.

    ``set_epoch(epoch)`` selects the epoch's generator seed and passes the epoch on to the dataset and the sampler
    when they have a ``set_epoch``.
    """

    def __init__(self, *args, seed: int = 0, rank: int = 0, **kwargs):
        if kwargs.get("generator") is not None:
            raise ValueError("SeededDataLoader makes its own generator (from seed, rank and the epoch)")
        kwargs["generator"] = torch.Generator()
        kwargs["worker_init_fn"] = _FreezeHeap(kwargs.get("worker_init_fn"))
        super().__init__(*args, **kwargs)
        self.seed, self.rank, self.epoch = int(seed), int(rank), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        for part in (self.dataset, self.sampler):
            if hasattr(part, "set_epoch"):
                part.set_epoch(self.epoch)

    def __iter__(self):
        self.generator.manual_seed(loader_seed(self.seed, self.rank, self.epoch))
        return super().__iter__()
