"""Retrieval metrics: per-query rank of the correct gallery item, R@K, median rank (MdR), mean rank (MnR).

Shapes:

* ``sim``        float (N_query, N_gallery), torch or numpy, any device torch supports; larger = more similar.
  Paragraph-to-video (t2v) uses rows = paragraphs, columns = videos; video-to-paragraph (v2t) is ``sim.T``.
* ``targets``    int (N_query,), the gallery column of each query's correct item (several queries may share one).
  Default (``targets`` and ``positives`` both None): a square ``sim`` whose correct item for query i is column i.
* ``positives``  bool (N_query, N_gallery), several correct items per query; the rank is that of the best-scoring one.
* ranks          (N_query,) 1-based; int64, or float64 for ``ties="mean"``; torch in, torch out; numpy in, numpy out.

Ties (a wrong gallery item with exactly the score of the query's best correct item):

* ``"optimistic"`` (default): rank = 1 + #(items scoring strictly higher);
* ``"pessimistic"``: rank = 1 + #(items scoring strictly higher) + #(wrong items scoring equal);
* ``"mean"``: the average of the two (with one correct item: its expected rank under a random order of the ties).

What the official code did (``src/utils/metrics.py: compute_rt_metrics``, square ``sim`` only): it sorts every row's
scores (``np.sort(-x)``), subtracts the diagonal score and takes *every* sorted position whose difference is exactly 0.
Without exact ties that is one position per query, the 0-based optimistic rank, and all three modes here give the
official numbers. With a tie among e items, the query contributes e positions, each tied rank once, and every metric is
averaged over the total number of positions rather than the number of queries. No single per-query rank reproduces
that: ``retrieval_metrics(..., ties="official")`` does, from counts (no sort). Ties are more likely there than in
float32: with ``--fp16`` the official trainer feeds half inputs to the DeepSpeed fp16 model, so the features and the
similarity matrix are presumably float16 (11 significant bits).

Why "optimistic" is the default: it is the official result whenever the correct item is not tied, it is deterministic
and independent of the gallery order (unlike a position after ``np.argsort``, whose order among equal scores is
arbitrary), and it is the rank of the best positive in the multi-positive case. Its weakness is degenerate input: a
collapsed model with identical scores everywhere gets R@1 = 100. Every metrics dict therefore reports ``n_tied``,
the number of queries whose best correct item ties with a wrong one; compare ``"pessimistic"`` when it is not 0.

Memory: rows are processed in blocks of ``block_rows`` queries (default: about 2^22 comparisons per block), so beyond
``sim`` itself nothing of size N_query x N_gallery is allocated. A row containing NaN is an error.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping

import numpy as np
import torch

__all__ = ["TIE_MODES", "both_directions", "flatten", "rank_of_matches", "retrieval_metrics"]

TIE_MODES = ("optimistic", "pessimistic", "mean")
_BLOCK_ELEMENTS = 1 << 22


def _to_tensor(x, name: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        t = x
    else:
        a = np.asarray(x)
        if any(s < 0 for s in a.strides):
            a = a.copy()  # torch cannot wrap negative strides
        with warnings.catch_warnings():  # read-only arrays (np.load(mmap_mode="r")): we never write
            warnings.simplefilter("ignore", UserWarning)
            t = torch.from_numpy(a)
    if t.ndim != 2 and name == "sim":
        raise ValueError(f"sim must be 2-D (N_query, N_gallery), got shape {tuple(t.shape)}")
    return t


def _block_rows(n_gallery: int, block_rows: int | None) -> int:
    if block_rows is not None:
        if block_rows < 1:
            raise ValueError(f"block_rows must be >= 1, got {block_rows}")
        return block_rows
    return max(1, _BLOCK_ELEMENTS // max(n_gallery, 1))


def _check_finite_rows(block: torch.Tensor, start: int) -> None:
    if block.is_floating_point() and bool(torch.isnan(block).any()):
        row = start + int(torch.isnan(block).any(dim=1).nonzero()[0])
        raise ValueError(f"sim has NaN in query row {row}")


def _counts(sim: torch.Tensor, targets=None, positives=None, gallery_targets=None, block_rows: int | None = None
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per query: (#items strictly above the best correct score, #wrong items equal to it, the best score).

    ``gallery_targets`` (N_gallery,) is the transposed form of ``targets``: the query each gallery item belongs to.
    """
    if sum(x is not None for x in (targets, positives, gallery_targets)) > 1:
        raise ValueError("give at most one of targets, positives, gallery_targets")
    if not sim.is_floating_point():
        sim = sim.to(torch.float64)
    n_q, n_g = sim.shape
    if n_g == 0 and n_q:
        raise ValueError("empty gallery")
    dev = sim.device
    pos = None
    if positives is not None:
        pos = _to_tensor(positives, "positives").to(device=dev, dtype=torch.bool)
        if pos.shape != sim.shape:
            raise ValueError(f"positives shape {tuple(pos.shape)} != sim shape {tuple(sim.shape)}")
        best = n_pos_at_best = None
    elif gallery_targets is not None:
        owner = _to_tensor(gallery_targets, "gallery_targets").to(device=dev, dtype=torch.int64).reshape(-1)
        if owner.numel() != n_g or (n_g and (int(owner.min()) < 0 or int(owner.max()) >= n_q)):
            raise ValueError("gallery_targets must be (N_gallery,) with values in [0, N_query)")
        own_score = sim[owner, torch.arange(n_g, device=dev)]
        if bool(torch.isnan(own_score).any()):
            raise ValueError("sim has NaN at a correct item")
        best = torch.full((n_q,), float("-inf"), dtype=sim.dtype, device=dev)
        best.scatter_reduce_(0, owner, own_score, reduce="amax")
        n_owned = torch.zeros(n_q, dtype=torch.int64, device=dev).scatter_add_(0, owner, torch.ones_like(owner))
        if bool((n_owned == 0).any()):
            raise ValueError(f"query {int((n_owned == 0).nonzero()[0])} has no correct gallery item")
        n_pos_at_best = torch.zeros(n_q, dtype=torch.int64, device=dev).scatter_add_(
            0, owner, (own_score == best[owner]).to(torch.int64))
    else:
        if targets is None:
            if n_q != n_g:
                raise ValueError(f"sim is {n_q}x{n_g}: a non-square sim needs targets or positives")
            tgt = torch.arange(n_q, device=dev)
        else:
            tgt = _to_tensor(targets, "targets").to(device=dev, dtype=torch.int64).reshape(-1)
            if tgt.numel() != n_q or (n_q and (int(tgt.min()) < 0 or int(tgt.max()) >= n_g)):
                raise ValueError(f"targets must be (N_query,) = ({n_q},) with values in [0, {n_g})")
        best = sim[torch.arange(n_q, device=dev), tgt]
        n_pos_at_best = torch.ones(n_q, dtype=torch.int64, device=dev)

    greater = torch.empty(n_q, dtype=torch.int64, device=dev)
    tied = torch.empty(n_q, dtype=torch.int64, device=dev)
    best_all = torch.empty(n_q, dtype=sim.dtype, device=dev) if pos is not None else best
    step = _block_rows(n_g, block_rows)
    for start in range(0, n_q, step):
        stop = min(start + step, n_q)
        rows = sim[start:stop]
        _check_finite_rows(rows, start)
        if pos is not None:
            p = pos[start:stop]
            if not bool(p.any(dim=1).all()):
                raise ValueError(f"query {start + int((~p.any(dim=1)).nonzero()[0])} has no positive")
            b = rows.masked_fill(~p, float("-inf")).amax(dim=1)
            eq = rows == b[:, None]
            n_best = (eq & p).sum(dim=1, dtype=torch.int32)
            best_all[start:stop] = b
        else:
            b = best[start:stop]
            eq = rows == b[:, None]
            n_best = n_pos_at_best[start:stop]
        greater[start:stop] = (rows > b[:, None]).sum(dim=1, dtype=torch.int32)  # int32: a smaller temporary
        tied[start:stop] = eq.sum(dim=1, dtype=torch.int32) - n_best
    return greater, tied, best_all


def _ranks_from_counts(greater: torch.Tensor, tied: torch.Tensor, ties: str) -> torch.Tensor:
    if ties == "optimistic":
        return greater + 1
    if ties == "pessimistic":
        return greater + tied + 1
    if ties == "mean":
        return greater.to(torch.float64) + tied.to(torch.float64) / 2 + 1
    raise ValueError(f"ties must be one of {TIE_MODES}, got {ties!r}")


def rank_of_matches(sim, targets=None, positives=None, ties: str = "optimistic", block_rows: int | None = None):
    """1-based rank (N_query,) of each query's correct gallery item in its row of ``sim`` (N_query, N_gallery).

    ``targets`` (N_query,) int or ``positives`` (N_query, N_gallery) bool select the correct items (default: the
    diagonal of a square ``sim``); with several positives the rank is that of the best-scoring one. ``ties`` is
    ``"optimistic"`` (default), ``"pessimistic"`` or ``"mean"``; see the module docstring. Returns a torch tensor for
    torch input and a numpy array for anything else.
    """
    if ties not in TIE_MODES:
        raise ValueError(f"ties must be one of {TIE_MODES}, got {ties!r}")
    is_numpy = not isinstance(sim, torch.Tensor)
    greater, tied, _ = _counts(_to_tensor(sim, "sim"), targets, positives, block_rows=block_rows)
    ranks = _ranks_from_counts(greater, tied, ties)
    return ranks.cpu().numpy() if is_numpy else ranks


def _metrics_from_ranks(ranks: np.ndarray, ks: Iterable[int]) -> dict[str, float]:
    out: dict[str, float] = {}
    n = ranks.size
    for k in ks:
        out[f"R@{k}"] = float(100.0 * np.count_nonzero(ranks <= k) / n) if n else float("nan")
    out["MdR"] = float(np.median(ranks)) if n else float("nan")
    out["MnR"] = float(np.mean(ranks)) if n else float("nan")
    return out


def _official_metrics(greater: np.ndarray, tied: np.ndarray, best: np.ndarray, n_gallery: int,
                      ks: Iterable[int]) -> dict[str, float]:
    """The official multiset of 0-based positions: for each query, positions greater .. greater + e - 1, where
    e = 1 + tied is the number of items equal to its correct score (e = 0 for an infinite score, whose difference
    with itself is NaN, so the official code finds no position). Metrics are taken over all positions."""
    e = np.where(np.isfinite(best), tied + 1, 0).astype(np.int64)
    g = greater.astype(np.int64)
    m = int(e.sum())
    out: dict[str, float] = {}
    if m == 0:
        out.update({f"R@{k}": float("nan") for k in ks})
        out.update(MdR=float("nan"), MnR=float("nan"))
        return out
    for k in ks:
        hits = np.clip(np.minimum(g + e, k) - g, 0, None)
        out[f"R@{k}"] = float(100.0 * hits.sum() / m)
    # histogram of positions 0..n_gallery-1 by a difference array (O(N_query + N_gallery), no expansion)
    diff = np.zeros(n_gallery + 1, dtype=np.int64)
    np.add.at(diff, g[e > 0], 1)
    np.add.at(diff, (g + e)[e > 0], -1)
    cum = np.cumsum(np.cumsum(diff)[:n_gallery])  # cum[r] = #positions <= r

    def kth(j: int) -> int:  # the j-th smallest position (0-based j)
        return int(np.searchsorted(cum, j, side="right"))

    median0 = kth((m - 1) // 2) if m % 2 else (kth(m // 2 - 1) + kth(m // 2)) / 2
    out["MdR"] = float(median0 + 1)
    out["MnR"] = float((np.sum(e * g) + np.sum(e * (e - 1)) / 2) / m + 1)
    return out


def retrieval_metrics(sim, ks: Iterable[int] = (1, 5, 10, 50), ties: str = "optimistic", targets=None,
                      positives=None, block_rows: int | None = None) -> dict[str, float]:
    """R@K (percent), MdR, MnR (1-based ranks; the median follows numpy: the mean of the two middle ranks for an even
    count), ``n`` (queries) and ``n_tied`` (queries whose best correct item ties a wrong one) for ``sim``
    (N_query, N_gallery); arguments as :func:`rank_of_matches`.

    ``ties="official"`` reproduces ``compute_rt_metrics`` of the official code (see the module docstring), also with
    ``targets``; it cannot be combined with ``positives``.
    """
    ks = tuple(int(k) for k in ks)
    t = _to_tensor(sim, "sim")
    if ties == "official" and positives is not None:
        raise ValueError('ties="official" is defined for one correct item per query; positives not supported')
    if ties != "official" and ties not in TIE_MODES:
        raise ValueError(f"ties must be one of {TIE_MODES + ('official',)}, got {ties!r}")
    greater, tied, best = _counts(t, targets, positives, block_rows=block_rows)
    if ties == "official":
        out = _official_metrics(greater.cpu().numpy(), tied.cpu().numpy(), best.double().cpu().numpy(),
                                t.shape[1], ks)
    else:
        out = _metrics_from_ranks(_ranks_from_counts(greater, tied, ties).cpu().numpy(), ks)
    out["n"] = int(t.shape[0])
    out["n_tied"] = int((tied > 0).sum())
    return out


def both_directions(sim_text_video, ks: Iterable[int] = (1, 5, 10, 50), ties: str = "optimistic", targets=None,
                    block_rows: int | None = None) -> dict[str, dict[str, float]]:
    """``{"t2v": ..., "v2t": ...}`` for ``sim_text_video`` (N_text, N_video): t2v ranks videos per paragraph (rows),
    v2t ranks paragraphs per video (the transpose, as a strided view: no copy).

    ``targets`` (N_text,): the video of each paragraph when there are more paragraphs than videos (default: the
    diagonal). For v2t every paragraph of a video is then a correct item and the rank is that of the best one.
    """
    sim = _to_tensor(sim_text_video, "sim")
    t2v = retrieval_metrics(sim, ks, ties, targets=targets, block_rows=block_rows)
    if targets is None:
        v2t = retrieval_metrics(sim.T, ks, ties, block_rows=block_rows)
    else:
        if ties == "official":
            raise ValueError('ties="official" with targets is defined for t2v only')
        if ties not in TIE_MODES:
            raise ValueError(f"ties must be one of {TIE_MODES}, got {ties!r}")
        simt = sim.T
        greater, tied, _ = _counts(simt, gallery_targets=targets, block_rows=block_rows)
        v2t = _metrics_from_ranks(_ranks_from_counts(greater, tied, ties).cpu().numpy(), ks)
        v2t["n"] = int(simt.shape[0])
        v2t["n_tied"] = int((tied > 0).sum())
    return {"t2v": t2v, "v2t": v2t}


def flatten(metrics: Mapping[str, Mapping[str, float]], sep: str = "_") -> dict[str, float]:
    """``{"t2v": {"R@1": x}}`` -> ``{"t2v_R@1": x}`` (for loggers that take flat names)."""
    return {f"{direction}{sep}{name}": value for direction, inner in metrics.items() for name, value in inner.items()}
