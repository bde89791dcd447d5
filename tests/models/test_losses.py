"""lfvila.losses against direct small-batch formulas: VPC (incl. two gloo ranks), MTC labels and value, MLM masking,
VTM pairs, stage totals."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from lfvila.losses import (
    IGNORE_INDEX,
    MTCSample,
    mlm_loss,
    mlm_mask,
    mtc_labels,
    mtc_loss,
    mtc_sample,
    stage1_loss,
    stage2_loss,
    vpc_loss,
    vtm_loss,
    vtm_pairs,
)

# ----------------------------------------------------------------------------------------------------------- VPC


def _unit(*shape, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=dtype), dim=-1)


def _vpc_direct(v, t, tau):
    logits = v @ t.T / tau
    target = torch.arange(v.shape[0])
    return F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)


@pytest.mark.parametrize("official_scale", [True, False])
def test_vpc_matches_direct_formula_with_grads(official_scale):
    v0, t0 = _unit(6, 16, seed=1), _unit(6, 16, seed=2)
    v, t = v0.clone().requires_grad_(), t0.clone().requires_grad_()
    loss = vpc_loss(v, t, temperature=0.05, official_scale=official_scale, impl="torch")
    dv, dt = torch.autograd.grad(loss, (v, t))
    v2, t2 = v0.clone().requires_grad_(), t0.clone().requires_grad_()
    ref = _vpc_direct(v2, t2, 0.05) * (1.0 if official_scale else 0.5)
    rv, rt = torch.autograd.grad(ref, (v2, t2))
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(dv, rv)
    torch.testing.assert_close(dt, rt)


def test_vpc_float32_default_impl():
    v, t = _unit(5, 8, seed=3, dtype=torch.float32), _unit(5, 8, seed=4, dtype=torch.float32)
    torch.testing.assert_close(vpc_loss(v, t), _vpc_direct(v, t, 0.05), atol=1e-4, rtol=1e-4)


WORLD, ROWS, DIM = 2, 3, 8


def _vpc_worker(rank, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        v, t = _unit(WORLD * ROWS, DIM, seed=5), _unit(WORLD * ROWS, DIM, seed=6)
        rows = slice(rank * ROWS, (rank + 1) * ROWS)
        v_local, t_local = v[rows].clone().requires_grad_(), t[rows].clone().requires_grad_()
        loss = vpc_loss(v_local, t_local, impl="torch")  # distributed=None: auto, initialised with 2 ranks
        loss.backward()
        local_only = vpc_loss(v_local.detach(), t_local.detach(), distributed=False, impl="torch")
        torch.save({"loss": loss.detach(), "dv": v_local.grad, "dt": t_local.grad, "local": local_only},
                   os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()  # every rank past its last collective before any tears down (see test_contrastive_distributed)
    finally:
        dist.destroy_process_group()


def test_vpc_two_gloo_ranks_match_single_process(tmp_path):
    mp.spawn(_vpc_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    res = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    v, t = _unit(WORLD * ROWS, DIM, seed=5).requires_grad_(), _unit(WORLD * ROWS, DIM, seed=6).requires_grad_()
    ref = _vpc_direct(v, t, 0.05)
    dv, dt = torch.autograd.grad(ref, (v, t))
    # ddp_average: the ranks' mean loss is the global loss; each rank's feature grads are WORLD x the global ones
    torch.testing.assert_close(torch.stack([r["loss"] for r in res]).mean(), ref.detach())
    torch.testing.assert_close(torch.cat([r["dv"] for r in res]), WORLD * dv)
    torch.testing.assert_close(torch.cat([r["dt"] for r in res]), WORLD * dt)
    # distributed=False: each rank's own batch only
    for r, x in enumerate(res):
        rows = slice(r * ROWS, (r + 1) * ROWS)
        torch.testing.assert_close(x["local"], _vpc_direct(v[rows].detach(), t[rows].detach(), 0.05))


def test_vpc_explicit_distributed_without_init_raises():
    v = _unit(2, 4)
    with pytest.raises(ValueError):
        vpc_loss(v, v, distributed=True)


# ----------------------------------------------------------------------------------------------------------- MTC


def test_mtc_labels_hand_made():
    keys = torch.tensor([[0, 2], [3, 1], [1, 2]])
    values = torch.tensor([[1, 3], [0, 3], [2, 1]])
    expected = torch.tensor([
        [0, IGNORE_INDEX],  # k=0, V=(1,3): 1 nearer; k=2: tie
        [1, 0],  # k=3, V=(0,3): slot 1 (distance 0); k=1, V=(0,3): slot 0
        [1, 0],  # k=1, V=(2,1): slot 1; k=2: slot 0
    ])
    assert torch.equal(mtc_labels(keys, values), expected)
    # three values: tie only when the minimum is shared
    assert mtc_labels(torch.tensor([[2]]), torch.tensor([[0, 1, 3]])).tolist() == [[IGNORE_INDEX]]
    assert mtc_labels(torch.tensor([[2]]), torch.tensor([[0, 2, 3]])).tolist() == [[1]]


def _mtc_direct(clip, sent, s: MTCSample, tau, mask_padded_others=False):
    """Loop formula: for every (b, key) row, materialise the candidate list and the CE, then average both ways."""
    batch = clip.shape[0]
    t2v, v2t = [], []
    for b in range(batch):
        src = [(b - sh) % batch for sh in s.shifts]
        for j, k in enumerate(s.keys[b].tolist()):
            dists = [abs(vv - k) for vv in s.values[b].tolist()]
            if dists.count(min(dists)) > 1 or not bool(s.valid[b, j]):
                continue
            target = torch.tensor(dists.index(min(dists)))
            for out, q, c, mask in ((t2v, sent, clip, False), (v2t, clip, sent, mask_padded_others)):
                cands = [c[b, vv] for vv in s.values[b].tolist()] + [c[o, s.other[o]] for o in src]
                logits = torch.stack([q[b, k] @ x for x in cands]) / tau
                if mask:
                    nv = s.values.shape[1]
                    for i in range(len(src)):
                        if not bool(s.other_valid[b, i]):
                            logits[nv + i] = float("-inf")
                out.append(F.cross_entropy(logits, target))
    return torch.stack(t2v).mean() + torch.stack(v2t).mean()


@pytest.mark.parametrize("compat_official", [False, True])
def test_mtc_value_matches_loop_formula(compat_official):
    clip0, sent0 = _unit(4, 4, 8, seed=7), _unit(4, 4, 8, seed=8)
    clip, sent = clip0.clone().requires_grad_(), sent0.clone().requires_grad_()
    g = torch.Generator().manual_seed(0)
    loss, s = mtc_loss(clip, sent, generator=g, compat_official=compat_official, return_sample=True)
    assert s.shifts == ((0, 1, 2) if compat_official else (1, 2, 3))
    dc, ds = torch.autograd.grad(loss, (clip, sent))
    clip2, sent2 = clip0.clone().requires_grad_(), sent0.clone().requires_grad_()
    ref = _mtc_direct(clip2, sent2, s, 0.05)
    rc, rs = torch.autograd.grad(ref, (clip2, sent2))
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(dc, rc)
    torch.testing.assert_close(ds, rs)
    # deterministic given the generator
    again = mtc_loss(clip0, sent0, generator=torch.Generator().manual_seed(0), compat_official=compat_official)
    torch.testing.assert_close(again, loss.detach())


def test_mtc_explicit_sample_and_all_ignored_is_zero():
    clip, sent = _unit(2, 4, 8, seed=9).requires_grad_(), _unit(2, 4, 8, seed=10)
    tie = MTCSample(keys=torch.tensor([[2], [2]]), values=torch.tensor([[1, 3], [1, 3]]), other=torch.tensor([0, 0]),
                    shifts=(1,), valid=torch.ones(2, 1, dtype=torch.bool),
                    other_valid=torch.ones(2, 1, dtype=torch.bool))
    loss = mtc_loss(clip, sent, sample=tie)
    assert loss.item() == 0.0
    loss.backward()  # stays connected to the graph


def _positive_position(s: MTCSample):
    lab = mtc_labels(s.keys, s.values)
    return s.values.gather(1, lab.clamp(min=0)), lab != IGNORE_INDEX  # (B, nk) clip position of the positive


def test_mtc_default_never_uses_positive_as_negative_compat_can():
    batch, m = 4, 4
    hit_compat = 0
    for seed in range(50):
        for compat in (False, True):
            s = mtc_sample(batch, m, num_other_neg=3, generator=torch.Generator().manual_seed(seed),
                           compat_official=compat)
            pos, counted = _positive_position(s)
            for b in range(batch):
                for i, sh in enumerate(s.shifts):
                    src = (b - sh) % batch
                    same = (src == b) & (s.other[src] == pos[b]) & counted[b]
                    if compat:
                        hit_compat += int(same.sum())
                    else:
                        assert src != b and not bool(same.any()), (seed, b, i)
    assert hit_compat > 0  # the official shift-0 negative does coincide with the positive clip


def test_mtc_small_batch_shifts_stay_cross_video():
    assert mtc_sample(2, 4, generator=torch.Generator().manual_seed(0)).shifts == (1,)
    assert mtc_sample(1, 4, generator=torch.Generator().manual_seed(0)).shifts == ()
    loss = mtc_loss(_unit(1, 4, 8, seed=1), _unit(1, 4, 8, seed=2), generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(loss)


def test_mtc_padded_sentences_never_sampled():
    batch, m = 4, 4
    real = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 0, 0], [1, 0, 0, 0]], dtype=torch.bool)
    saw_padded_compat = False
    for seed in range(30):
        s = mtc_sample(batch, m, real, generator=torch.Generator().manual_seed(seed))
        for b in range(batch):
            if bool(s.valid[b].all()):
                assert bool(real[b, s.keys[b]].all()) and bool(real[b, s.values[b]].all())
            else:
                assert int(real[b].sum()) < 2  # only a video with one real sentence cannot give 2 distinct keys
        assert not bool(s.valid[3].any())
        # reals are drawn first: a video with >= 2 real sentences never draws a padded key or value
        assert bool(s.valid[:3].all())
        assert bool(real[torch.arange(batch), s.other][: 3].all())
        sc = mtc_sample(batch, m, real, generator=torch.Generator().manual_seed(seed), compat_official=True)
        saw_padded_compat |= not bool(real.gather(1, sc.keys).all())
    assert saw_padded_compat
    # value with padded sentences: matches the loop formula with padded "other" sentences masked out of v->t (only a
    # video without any real sentence can offer a padded "other" sentence: reals are drawn first)
    real[3] = False
    clip, sent = _unit(batch, m, 8, seed=11), _unit(batch, m, 8, seed=12)
    loss, s = mtc_loss(clip, sent, real, generator=torch.Generator().manual_seed(3), return_sample=True)
    assert not bool(s.other_valid.all())
    torch.testing.assert_close(loss, _mtc_direct(clip, sent, s, 0.05, mask_padded_others=True))


# ----------------------------------------------------------------------------------------------------------- MLM

CLS, SEP, PAD, MASK, VOCAB = 101, 102, 0, 103, 30522


def _ids(b=64, m=4, seq_len=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, VOCAB, (b, m, seq_len), generator=g)
    lengths = torch.randint(5, seq_len + 1, (b, m), generator=g)
    attn = torch.arange(seq_len)[None, None] < lengths[..., None]
    ids[..., 0] = CLS
    ids[torch.arange(b)[:, None], torch.arange(m)[None], lengths - 1] = SEP
    ids[~attn] = PAD
    return ids, attn.long()


def test_mlm_mask_statistics_and_exclusions():
    ids, attn = _ids()
    masked, labels = mlm_mask(ids, attn, VOCAB, MASK, (CLS, SEP, PAD), generator=torch.Generator().manual_seed(0))
    assert masked.shape == ids.shape and labels.shape == ids.shape
    eligible = (attn.bool()) & (ids != CLS) & (ids != SEP) & (ids != PAD)
    sel = labels != IGNORE_INDEX
    assert not bool((sel & ~eligible).any())  # specials and padding never selected
    assert torch.equal(masked[~sel], ids[~sel])  # untouched elsewhere
    assert torch.equal(labels[sel], ids[sel])
    n = int(sel.sum())
    assert abs(n / int(eligible.sum()) - 0.15) < 0.01
    frac_mask = int((masked[sel] == MASK).sum()) / n
    frac_keep = int((masked[sel] == ids[sel]).sum()) / n
    frac_rand = 1 - frac_mask - frac_keep
    assert abs(frac_mask - 0.8) < 0.03 and abs(frac_keep - 0.1) < 0.02 and abs(frac_rand - 0.1) < 0.02
    again = mlm_mask(ids, attn, VOCAB, MASK, (CLS, SEP, PAD), generator=torch.Generator().manual_seed(0))
    assert torch.equal(again[0], masked) and torch.equal(again[1], labels)


def test_mlm_loss_matches_cross_entropy_and_matched():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(4, 6, 11, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 11, (4, 6), generator=g)
    labels[torch.rand(4, 6, generator=g) < 0.5] = IGNORE_INDEX
    labels[2:, 0] = 3  # at least one label in the matched half
    torch.testing.assert_close(mlm_loss(logits, labels), F.cross_entropy(logits.reshape(-1, 11), labels.reshape(-1)))
    flat = mlm_loss(logits.reshape(-1, 11), labels.reshape(-1))
    torch.testing.assert_close(flat, mlm_loss(logits, labels))
    _, vtm_labels = vtm_pairs(4)
    ref = F.cross_entropy(logits[2:].reshape(-1, 11), labels[2:].reshape(-1))
    torch.testing.assert_close(mlm_loss(logits, labels, matched=vtm_labels.bool()), ref)
    empty = torch.full((4, 6), IGNORE_INDEX)
    assert mlm_loss(logits, empty).item() == 0.0


# ----------------------------------------------------------------------------------------------------------- VTM


def test_vtm_pairs_even_and_odd():
    perm, labels = vtm_pairs(4)
    assert perm.tolist() == [1, 0, 2, 3] and labels.tolist() == [0, 0, 1, 1]
    perm, labels = vtm_pairs(5)  # odd: h = 2 negatives, 3 positives
    assert perm.tolist() == [1, 0, 2, 3, 4] and labels.tolist() == [0, 0, 1, 1, 1]
    perm, labels = vtm_pairs(6)
    assert perm.tolist() == [2, 0, 1, 3, 4, 5] and labels.tolist() == [0, 0, 0, 1, 1, 1]
    # every label-0 pair is really mismatched
    for b in range(2, 9):
        perm, labels = vtm_pairs(b)
        assert bool((perm[labels == 0] != torch.arange(b)[labels == 0]).all())
    # h == 1: the official roll is the identity (a "mismatched" pair that is matched); fixed by default
    assert vtm_pairs(2)[0].tolist() == [1, 1]
    assert vtm_pairs(2, compat_official=True)[0].tolist() == [0, 1]


def test_vtm_loss_and_stage_totals():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(6, 2, generator=g)
    _, labels = vtm_pairs(6)
    vtm = vtm_loss(logits, labels)
    torch.testing.assert_close(vtm, F.cross_entropy(logits, labels))
    a, b = torch.tensor(1.5), torch.tensor(0.4)
    torch.testing.assert_close(stage1_loss(a, b), a + 0.25 * b)
    torch.testing.assert_close(stage2_loss(a, b), a + 10.0 * b)
