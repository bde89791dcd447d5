"""Which samples a rank reads, in which order: one module for training and evaluation, every loader alike
(``loader.build_loader``, the training loop, ``ShardDataset``, ``DaliLoader``).

* Training, :class:`EpochSampler`: one permutation per ``(seed, epoch)``, dealt to the ranks like
  ``DistributedSampler(drop_last=True)`` (every rank ``n // world_size`` indices, so every rank runs the same number
  of steps), startable at any batch of the epoch (``set_position``), so a resumed run reads exactly the samples the
  uninterrupted run would have, without decoding the ones it skips. Nothing is drawn from the global RNGs.
* Evaluation, :class:`RankPartSampler`: each rank a disjoint, ordered part (no duplicate padding), so results gathered
  by annotation index cover the split exactly once.

:func:`build_sampler` picks one; it is the only place the choice is made.
"""

from __future__ import annotations

import math

import torch
from torch.utils.data import Dataset, Sampler

__all__ = ["EpochSampler", "RankPartSampler", "build_sampler", "shard"]


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


class EpochSampler(Sampler[int]):
    """Shuffled, rank-sharded indices of one epoch, starting at batch ``start_batch`` (module docstring)."""

    def __init__(self, n: int, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0):
        if n < world_size:
            raise ValueError(f"{n} samples cannot be shared by {world_size} ranks")
        self.n, self.batch_size, self.rank, self.world_size, self.seed = n, batch_size, rank, world_size, seed
        self.epoch, self.start_batch = 0, 0

    @property
    def per_rank(self) -> int:
        return self.n // self.world_size

    def batches_per_epoch(self, drop_last: bool = True) -> int:
        return self.per_rank // self.batch_size if drop_last else math.ceil(self.per_rank / self.batch_size)

    def set_position(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = int(epoch), int(start_batch)

    def set_epoch(self, epoch: int) -> None:
        """A new epoch from its start (what ``SeededDataLoader.set_epoch`` calls); resuming: :meth:`set_position`."""
        if int(epoch) != self.epoch:
            self.set_position(epoch, 0)

    def _indices(self) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.n, generator=g)[: self.per_rank * self.world_size]
        return order[self.rank::self.world_size].tolist()

    def __iter__(self):
        return iter(self._indices()[self.start_batch * self.batch_size:])

    def __len__(self) -> int:
        return max(0, self.per_rank - self.start_batch * self.batch_size)


class RankPartSampler(Sampler[int]):
    """Evaluation: this rank's disjoint part of ``range(n)``, in order (every item once over all ranks)."""

    def __init__(self, n: int, rank: int = 0, world_size: int = 1):
        self.indices = shard(n, rank, world_size, mode="disjoint")

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def build_sampler(n: int, *, train: bool, batch_size: int, rank: int = 0, world_size: int = 1,
                  seed: int = 0) -> EpochSampler | RankPartSampler:
    """The sampler of a loader over ``n`` samples: :class:`EpochSampler` for training, :class:`RankPartSampler` for
    evaluation."""
    if train:
        return EpochSampler(n, batch_size, rank, world_size, seed)
    return RankPartSampler(n, rank, world_size)
