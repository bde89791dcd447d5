"""Collect per-example evaluation outputs from every rank, in dataset order, each example once.

Shapes:

* ``tensors``  dict name -> (n, ...) on each rank; n may differ between ranks (0 included); the trailing dims and
  the dtype of a name must agree across ranks.
* ``index``    int64 (n,): the dataset (annotation) index of each row, the loader batch's ``index`` field.
* returns      (dict name -> (N, ...) sorted by index, int64 (N,) the sorted unique indices), N = #distinct indices;
  every tensor comes back on the device it came from.

An index seen more than once (``DistributedSampler`` pads its last round with repeated indices so that every rank
gets the same count) keeps its first occurrence in rank order (rank 0's rows, then rank 1's, ...), and within a rank
its first row. Outside ``torch.distributed`` (not initialised, or world size 1) the same sort and de-duplication run
locally.

Transport: the row counts are all-gathered first, then every tensor is padded to the largest count, all-gathered and
cut back. With NCCL the tensors travel on the current CUDA device (call ``torch.cuda.set_device(local_rank)`` first,
as for any NCCL collective); with gloo on the CPU. Every rank must call this with the same names (it is a collective);
names, trailing shapes and dtypes are compared first, so a mismatch raises on every rank instead of hanging.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["gather_by_index", "sort_unique_by_index"]


def sort_unique_by_index(tensors: dict[str, torch.Tensor], index: torch.Tensor
                         ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Rows of every (n, ...) tensor ordered by ``index`` (n,), keeping the first row of each repeated index."""
    index = index.reshape(-1)
    order = torch.argsort(index, stable=True)  # stable: the first occurrence stays first among equal indices
    idx_sorted = index[order]
    keep = torch.ones_like(idx_sorted, dtype=torch.bool)
    keep[1:] = idx_sorted[1:] != idx_sorted[:-1]
    sel = order[keep]
    return {k: v[sel.to(v.device)] for k, v in tensors.items()}, idx_sorted[keep]


def _transport_device(group) -> torch.device:
    backend = str(dist.get_backend(group)).lower()
    if "nccl" in backend and "gloo" not in backend:
        return torch.device("cuda", torch.cuda.current_device())
    if "gloo" in backend or "mpi" in backend:
        return torch.device("cpu")
    # other backends (e.g. "cpu:gloo,cuda:nccl" handled above; custom ones): the default accelerator if any
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def _all_gather_rows(x: torch.Tensor, sizes: list[int], device: torch.device, group) -> torch.Tensor:
    """All-gather (n_r, ...) from every rank r (n_r = sizes[r]) -> (sum n_r, ...) in rank order."""
    wire = x.to(torch.uint8) if x.dtype == torch.bool else x  # bool is not a collective dtype on every backend
    wire = wire.to(device).contiguous()
    max_n = max(sizes)
    if max_n == 0:  # every rank is empty (all ranks know it from the same sizes): nothing to send
        return x.new_empty((0, *x.shape[1:]))
    if wire.shape[0] < max_n:
        pad = wire.new_zeros((max_n - wire.shape[0], *wire.shape[1:]))
        wire = torch.cat([wire, pad])
    buffers = [torch.empty_like(wire) for _ in sizes]
    dist.all_gather(buffers, wire, group=group)
    out = torch.cat([b[:n] for b, n in zip(buffers, sizes)])
    return out.to(torch.bool) if x.dtype == torch.bool else out


def gather_by_index(tensors: dict[str, torch.Tensor], index: torch.Tensor, group=None,
                    num_samples: int | None = None) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """All-gather per-example results, sort by dataset ``index`` and drop repeated indices (see the module docstring).

    ``num_samples``: if given, the gathered indices must be exactly ``0 .. num_samples - 1`` (no example lost);
    a ``ValueError`` says which are missing otherwise.
    """
    index = torch.as_tensor(index).reshape(-1)
    if index.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
        raise TypeError(f"index must be an integer tensor, got {index.dtype}")
    index = index.to(torch.int64)
    n = index.numel()
    for k, v in tensors.items():
        if v.ndim == 0 or v.shape[0] != n:
            raise ValueError(f"tensors[{k!r}] has shape {tuple(v.shape)}; expected ({n}, ...) rows like index")

    if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
        device = _transport_device(group)
        world = dist.get_world_size(group)
        # metadata first, so that a mismatch raises on every rank instead of hanging inside a collective
        meta = {k: (tuple(v.shape[1:]), str(v.dtype)) for k, v in tensors.items()}
        metas: list = [None] * world
        dist.all_gather_object(metas, (n, meta), group=group)
        sizes = [m[0] for m in metas]
        if any(m[1] != meta for m in metas):
            raise ValueError(f"gather_by_index: names / trailing shapes / dtypes differ across ranks: "
                             f"{[m[1] for m in metas]}")
        gathered = {k: _all_gather_rows(tensors[k], sizes, device, group).to(tensors[k].device)
                    for k in sorted(tensors)}
        all_index = _all_gather_rows(index, sizes, device, group).to(index.device)
    else:
        gathered, all_index = dict(tensors), index
    out, unique = sort_unique_by_index(gathered, all_index)
    out = {k: out[k] for k in tensors}  # the caller's key order
    if num_samples is not None:
        expected = torch.arange(num_samples, device=unique.device)
        if unique.numel() != num_samples or not bool((unique == expected).all()):
            present = torch.zeros(max(num_samples, 1), dtype=torch.bool)
            inside = unique[(unique >= 0) & (unique < num_samples)].cpu()
            present[inside] = True
            missing = (~present[:num_samples]).nonzero().flatten()[:10].tolist()
            extra = unique[(unique < 0) | (unique >= num_samples)].cpu()[:10].tolist()
            raise ValueError(f"gathered {unique.numel()} distinct indices, expected 0..{num_samples - 1}; "
                             f"missing (first 10): {missing}; out of range (first 10): {extra}")
    return out, unique
