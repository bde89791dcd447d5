"""Retrieval ranks and metrics against hand-computed values, a naive argsort oracle and a naive model of the official
tie behaviour; chunking must not change anything."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lfvila.eval import TIE_MODES, both_directions, flatten, rank_of_matches, retrieval_metrics

# rows = queries; the correct item of query i is column i
TIED = np.array([
    [0.9, 0.9, 0.1, 0.9],  # correct 0.9 ties columns 1 and 3         -> optimistic 1, pessimistic 3
    [0.2, 0.5, 0.7, 0.5],  # one strictly higher, column 3 ties         -> 2, 3
    [0.3, 0.3, 0.3, 0.3],  # everything ties                            -> 1, 4
    [0.0, 0.1, 0.2, 0.8],  # clean top-1                                -> 1, 1
])
TIED_RANKS = {"optimistic": [1, 2, 1, 1], "pessimistic": [3, 3, 4, 1], "mean": [2.0, 2.5, 2.5, 1.0]}


@pytest.mark.parametrize("ties", TIE_MODES)
def test_hand_ranks_with_exact_ties(ties):
    ranks = rank_of_matches(TIED, ties=ties)
    assert isinstance(ranks, np.ndarray)
    np.testing.assert_array_equal(ranks, TIED_RANKS[ties])
    ranks_t = rank_of_matches(torch.tensor(TIED, dtype=torch.float32), ties=ties)
    assert isinstance(ranks_t, torch.Tensor)
    np.testing.assert_array_equal(ranks_t.numpy(), TIED_RANKS[ties])
    assert ranks.dtype == (np.float64 if ties == "mean" else np.int64)


def test_default_is_optimistic():
    np.testing.assert_array_equal(rank_of_matches(TIED), TIED_RANKS["optimistic"])


def test_targets_several_queries_one_item_and_duplicate_gallery_items():
    # gallery: columns 1 and 2 are the same video (identical scores in every row)
    sim = np.array([
        [0.8, 0.1, 0.1],  # target 0                    -> 1
        [0.2, 0.6, 0.6],  # target 1; its duplicate ties -> optimistic 1, pessimistic 2
        [0.9, 0.4, 0.4],  # target 2; col 0 higher, col 1 ties -> 2, 3
        [0.7, 0.5, 0.5],  # target 0 again (two queries share video 0) -> 1
        [0.3, 0.2, 0.2],  # target 0 again -> 1
    ])
    targets = [0, 1, 2, 0, 0]
    np.testing.assert_array_equal(rank_of_matches(sim, targets=targets), [1, 1, 2, 1, 1])
    np.testing.assert_array_equal(rank_of_matches(sim, targets=targets, ties="pessimistic"), [1, 2, 3, 1, 1])
    np.testing.assert_array_equal(rank_of_matches(sim, targets=targets, ties="mean"), [1, 1.5, 2.5, 1, 1])
    m = retrieval_metrics(sim, targets=np.array(targets), ks=(1, 2))
    assert m["R@1"] == pytest.approx(80.0) and m["R@2"] == 100.0 and m["n"] == 5 and m["n_tied"] == 2


def test_positives_matrix_rank_of_best_positive():
    sim = np.array([
        [0.1, 0.9, 0.5, 0.7],
        [0.4, 0.4, 0.3, 0.2],
        [0.6, 0.6, 0.6, 0.1],
    ])
    pos = np.array([
        [True, False, True, False],   # best positive 0.5: 0.9 and 0.7 above -> 3 (no ties)
        [False, True, False, True],   # best positive 0.4 ties negative col 0 -> 1 / 2
        [True, True, False, False],   # best 0.6, two positives tie each other (not a tie), negative col 2 ties -> 1 / 2
    ])
    np.testing.assert_array_equal(rank_of_matches(sim, positives=pos), [3, 1, 1])
    np.testing.assert_array_equal(rank_of_matches(sim, positives=pos, ties="pessimistic"), [3, 2, 2])
    # one positive per row == targets
    tgt = np.array([2, 0, 3])
    onehot = np.zeros_like(pos)
    onehot[np.arange(3), tgt] = True
    for ties in TIE_MODES:
        np.testing.assert_array_equal(rank_of_matches(sim, positives=onehot, ties=ties),
                                      rank_of_matches(sim, targets=tgt, ties=ties))


def _sim_with_ranks(ranks, n_gallery):
    """A sim whose query i has its correct item (column i) at 1-based rank ranks[i], no ties."""
    n = len(ranks)
    sim = np.zeros((n, n_gallery))
    for i, r in enumerate(ranks):
        others = [j for j in range(n_gallery) if j != i]
        order = others[: r - 1] + [i] + others[r - 1:]  # best first
        sim[i, order] = np.linspace(1.0, 0.0, n_gallery)
    return sim


@pytest.mark.parametrize("ranks,mdr", [([1, 3, 2, 7, 1], 2.0), ([1, 3, 2, 8, 1, 12], 2.5)], ids=["odd", "even"])
def test_recall_median_mean_hand_computed(ranks, mdr):
    n = len(ranks)
    sim = _sim_with_ranks(ranks, n_gallery=60)
    np.testing.assert_array_equal(rank_of_matches(sim, targets=np.arange(n)), ranks)
    m = retrieval_metrics(sim, targets=np.arange(n))
    assert m["R@1"] == pytest.approx(100.0 * 2 / n)
    assert m["R@5"] == pytest.approx(100.0 * sum(r <= 5 for r in ranks) / n)
    assert m["R@10"] == pytest.approx(100.0 * sum(r <= 10 for r in ranks) / n)
    assert m["R@50"] == 100.0
    assert m["MdR"] == mdr
    assert m["MnR"] == pytest.approx(sum(ranks) / n)
    assert m["n"] == n and m["n_tied"] == 0


def test_both_directions_v2t_is_transpose_and_flatten():
    g = np.random.default_rng(0)
    sim = g.standard_normal((30, 30))
    both = both_directions(torch.from_numpy(sim))
    assert both["t2v"] == retrieval_metrics(sim)
    assert both["v2t"] == retrieval_metrics(sim.T.copy())
    flat = flatten(both)
    assert flat["t2v_R@1"] == both["t2v"]["R@1"] and flat["v2t_MdR"] == both["v2t"]["MdR"]
    assert len(flat) == 2 * len(both["t2v"])


def test_both_directions_with_targets_uses_every_paragraph_of_a_video():
    g = np.random.default_rng(1)
    sim = np.round(g.standard_normal((12, 5)), 1)  # 12 paragraphs, 5 videos, with ties
    targets = np.array([0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 0, 0])
    pos_v2t = targets[None, :] == np.arange(5)[:, None]  # (5 videos, 12 paragraphs)
    for ties in TIE_MODES:
        both = both_directions(sim, targets=targets, ties=ties, ks=(1, 2, 3))
        assert both["t2v"] == retrieval_metrics(sim, targets=targets, ties=ties, ks=(1, 2, 3))
        assert both["v2t"] == retrieval_metrics(sim.T, positives=pos_v2t, ties=ties, ks=(1, 2, 3))


def _naive_ranks(sim, targets):
    order = np.argsort(-sim, axis=1, kind="stable")
    return np.array([int(np.nonzero(order[i] == t)[0][0]) + 1 for i, t in enumerate(targets)])


def test_large_random_matches_naive_argsort():
    g = np.random.default_rng(2)
    sim = g.standard_normal((700, 900))  # continuous: no ties
    targets = g.integers(0, 900, size=700)
    ref = _naive_ranks(sim, targets)
    for ties in TIE_MODES:
        np.testing.assert_array_equal(rank_of_matches(sim, targets=targets, ties=ties), ref)
    sq = g.standard_normal((500, 500)).astype(np.float32)
    ref_sq = _naive_ranks(sq, np.arange(500))
    np.testing.assert_array_equal(rank_of_matches(torch.from_numpy(sq)).numpy(), ref_sq)
    m = retrieval_metrics(sq)
    assert m["R@10"] == pytest.approx(100.0 * np.mean(ref_sq <= 10))
    assert m["MdR"] == np.median(ref_sq) and m["MnR"] == pytest.approx(ref_sq.mean())


def _naive_official(sim, ks):
    """The official expansion, spelled out: every sorted position whose score equals the correct one counts."""
    positions = []
    for i in range(sim.shape[0]):
        sorted_desc = np.sort(sim[i])[::-1]
        positions.extend(np.nonzero(sorted_desc == sim[i, i])[0].tolist())
    p = np.array(positions)
    out = {f"R@{k}": 100.0 * np.mean(p < k) for k in ks}
    out.update(MdR=float(np.median(p) + 1), MnR=float(np.mean(p) + 1))
    return out


@pytest.mark.parametrize("n", [9, 40])
def test_official_tie_expansion(n):
    g = np.random.default_rng(n)
    sim = np.round(g.random((n, n)), 1).astype(np.float16)  # many exact ties, as fp16 similarities produce
    ks = (1, 2, 5, 10)
    got = retrieval_metrics(sim, ks=ks, ties="official")
    ref = _naive_official(sim.astype(np.float64), ks)
    for k, v in ref.items():
        assert got[k] == pytest.approx(v), k
    # without ties official == every per-query convention
    clean = g.standard_normal((n, n))
    off = retrieval_metrics(clean, ties="official")
    for ties in TIE_MODES:
        assert retrieval_metrics(clean, ties=ties) == off


def test_chunking_changes_nothing():
    g = np.random.default_rng(3)
    sim = torch.from_numpy(np.round(g.standard_normal((37, 23)), 1))  # ties included
    targets = torch.from_numpy(g.integers(0, 23, size=37))
    pos = torch.from_numpy(g.random((37, 23)) < 0.2)
    pos[torch.arange(37), targets] = True
    for ties in TIE_MODES:
        for kw in ({"targets": targets}, {"positives": pos}):
            full = rank_of_matches(sim, ties=ties, block_rows=10_000, **kw)
            for block in (1, 4, 36, 37):
                torch.testing.assert_close(rank_of_matches(sim, ties=ties, block_rows=block, **kw), full)
            assert retrieval_metrics(sim, ties=ties, block_rows=5, **kw) == retrieval_metrics(sim, ties=ties, **kw)
    sq = sim[:23]
    assert retrieval_metrics(sq, ties="official", block_rows=2) == retrieval_metrics(sq, ties="official")


def test_dtypes_and_devices_agree():
    g = np.random.default_rng(4)
    sim = g.standard_normal((20, 20))
    ref = rank_of_matches(sim)
    for dt in (torch.float32, torch.float64):
        np.testing.assert_array_equal(rank_of_matches(torch.from_numpy(sim).to(dt)).numpy(), ref)
    half = torch.from_numpy(sim).half()
    np.testing.assert_array_equal(rank_of_matches(half).numpy(), rank_of_matches(half.double()).numpy())
    np.testing.assert_array_equal(rank_of_matches((sim * 10).astype(np.int64)), rank_of_matches(np.trunc(sim * 10)))


def test_errors():
    with pytest.raises(ValueError, match="non-square"):
        rank_of_matches(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="ties"):
        rank_of_matches(np.eye(3), ties="random")
    bad = np.eye(3)
    bad[1, 2] = np.nan
    with pytest.raises(ValueError, match="NaN in query row 1"):
        rank_of_matches(bad, block_rows=1)
    with pytest.raises(ValueError, match="no positive"):
        rank_of_matches(np.eye(2), positives=np.array([[True, False], [False, False]]))
    with pytest.raises(ValueError, match="targets"):
        rank_of_matches(np.eye(3), targets=[0, 1, 3])
    with pytest.raises(ValueError, match="official"):
        retrieval_metrics(np.eye(2), ties="official", positives=np.eye(2, dtype=bool))
