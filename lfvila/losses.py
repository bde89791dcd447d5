"""LF-VILA losses: VPC, MTC (stage 1), MLM, VTM (stage 2), the stage totals, and How2QA's per-frame span loss.

Every loss returns a scalar and is **unweighted**; the official weights are applied by :func:`stage1_loss`
(``vpc + 0.25 * mtc``) and :func:`stage2_loss` (``mlm + 10 * vtm``).

Magnitudes follow the official code (``src/models/lfvila_pretrain.py``):

* VPC is ``CE(v t^T / tau) + CE(t v^T / tau)``, the two directions **summed** (weight 1). The fused
  ``lfvila_kernels.contrastive_loss`` returns their mean, so :func:`vpc_loss` returns twice it by default
  (``official_scale=True``); ``official_scale=False`` gives the symmetric mean.
* MTC is ``CE_t2v + CE_v2t`` (summed) over the sampled key rows, ties ignored.

Both contrastive losses use the global batch when ``torch.distributed`` is initialised with more than one rank
(``distributed=None``, the default), as the official ``SyncFunction`` all-gather does; ``distributed=False`` keeps a
rank's own batch. Either way DDP's average of the ranks' gradients is the gradient of the single-process loss of the
whole batch (:func:`vpc_loss`, :func:`mtc_loss` give the scale).

Known defects of the official MTC, fixed by default and reproducible with ``compat_official=True``:

* the shift-0 "other" negative is a clip / sentence of the *same* video and can be the positive itself (a false
  negative); by default the cross-video negatives come from other videos only (roll shifts ``1..num_other_neg``);
* padded sentences can be drawn as keys, values and negatives; by default only real sentences are drawn.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from lfvila_kernels import contrastive_loss, distributed_contrastive_loss

IGNORE_INDEX = -100

__all__ = [
    "IGNORE_INDEX",
    "MTCSample",
    "mlm_loss",
    "mlm_mask",
    "mtc_labels",
    "mtc_loss",
    "mtc_sample",
    "span_frame_labels",
    "span_loss",
    "stage1_loss",
    "stage2_loss",
    "vpc_loss",
    "vtm_loss",
    "vtm_pairs",
]


def _zero_like(x: torch.Tensor) -> torch.Tensor:
    """A zero scalar that stays connected to the graph of ``x`` (so ``backward`` works when nothing is counted)."""
    return x.sum() * 0.0


def _ce_mean(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """CE over rows whose label is not -100, averaged over those rows; 0 (not NaN) when every row is ignored."""
    if not bool((labels != IGNORE_INDEX).any()):
        return _zero_like(logits)
    return F.cross_entropy(logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits, labels,
                           ignore_index=IGNORE_INDEX)


def _process_group(distributed) -> tuple[bool, object]:
    """``distributed`` of :func:`vpc_loss` / :func:`mtc_loss` -> (use the global batch, process group or None)."""
    if distributed is not False and torch.distributed.is_available() and torch.distributed.is_initialized():
        group = None if distributed in (None, True) else distributed
        return distributed is not None or torch.distributed.get_world_size() > 1, group
    if distributed not in (None, False):
        raise ValueError("distributed=True / a group needs an initialised torch.distributed")
    return False, None


# ----------------------------------------------------------------------------------------------------------- VPC


def vpc_loss(
    video_global: torch.Tensor,
    text_global: torch.Tensor,
    temperature: float = 0.05,
    distributed=None,
    official_scale: bool = True,
    impl: str = "auto",
) -> torch.Tensor:
    """Global video-paragraph contrastive loss (official ``ct_global_loss``), both directions.

    Args:
        video_global: ``(B, D)`` video features, L2-normalised by the caller (the op does not normalise).
        text_global: ``(B, D)`` paragraph features, L2-normalised, row ``i`` paired with video ``i``.
        temperature: fixed temperature (official 0.05).
        distributed: ``None`` (auto: the global batch of all ranks when ``torch.distributed`` is initialised with
            more than one rank), ``False`` (this rank's batch only), ``True`` (the default group) or a process group.
            The distributed path is ``distributed_contrastive_loss(..., ddp_average=True)``: each rank returns the
            loss of its own rows against the global batch, so the mean over ranks equals the single-process loss of
            the whole global batch and DDP's averaged gradients equal the single-process gradients.
        official_scale: ``True`` returns ``CE_v2t + CE_t2v`` (the official sum, weight 1); ``False`` their mean.
        impl: ``"auto" | "triton" | "torch"``, passed to the kernel.

    Returns a scalar (fp32 for half inputs).
    """
    use_dist, group = _process_group(distributed)
    v, t = video_global.contiguous(), text_global.contiguous()
    if use_dist:
        loss = distributed_contrastive_loss(v, t, group=group, temperature=temperature, ddp_average=True, impl=impl)
    else:
        loss = contrastive_loss(v, t, temperature=temperature, impl=impl)
    return 2.0 * loss if official_scale else loss


# ----------------------------------------------------------------------------------------------------------- MTC


class MTCSample(NamedTuple):
    """The random draw of one MTC step.

    keys: ``(B, num_key)`` key positions (sentences for t->v, clips for v->t).
    values: ``(B, num_value)`` value positions (clips for t->v, sentences for v->t), of the same video.
    other: ``(B,)`` one extra position per video; candidate ``j`` of row ``b`` is position ``other[b - shifts[j]]`` of
        video ``b - shifts[j]`` (``torch.roll`` along the batch).
    shifts: the roll shifts (official ``(0, 1, 2)``; default ``(1, .., num_other_neg)`` capped at ``B - 1``).
    valid: ``(B, num_key)`` bool, False where a key or a value landed on a padded sentence (default mode only, when a
        video has fewer real sentences than ``num_key`` / ``num_value``); those rows are ignored.
    other_valid: ``(B, len(shifts))`` bool, False where the "other" sentence is padded (masked out of v->t).
    """

    keys: torch.Tensor
    values: torch.Tensor
    other: torch.Tensor
    shifts: tuple[int, ...]
    valid: torch.Tensor
    other_valid: torch.Tensor


def _draw_distinct(scores: torch.Tensor, k: int) -> torch.Tensor:
    """``(B, k)`` distinct positions per row: the top-k of random scores (padded positions scored below all reals)."""
    return scores.topk(k, dim=1).indices


def mtc_sample(
    batch: int,
    num_clips: int,
    sent_real: torch.Tensor | None = None,
    num_key: int = 2,
    num_value: int = 2,
    num_other_neg: int = 3,
    generator: torch.Generator | None = None,
    device=None,
    compat_official: bool = False,
) -> MTCSample:
    """Draw the MTC keys, values and "other" positions for ``batch`` videos of ``num_clips`` clips / sentences.

    Keys and values are drawn independently, each ``num_key`` / ``num_value`` distinct positions, uniformly. By default
    only real sentences (``sent_real`` ``(B, M)`` bool) are drawn and the other negatives come from other videos
    (shifts ``1..min(num_other_neg, B - 1)``); ``compat_official=True`` ignores ``sent_real`` and uses the official
    shifts ``0..num_other_neg - 1``. Deterministic given ``generator`` (which must live on ``device``).
    """
    if num_key > num_clips or num_value > num_clips:
        raise ValueError(f"num_key={num_key} / num_value={num_value} exceed the {num_clips} clips per video")
    if device is None:
        device = sent_real.device if sent_real is not None else torch.device("cpu")
    if sent_real is None or compat_official:
        real = torch.ones(batch, num_clips, dtype=torch.bool, device=device)
    else:
        if sent_real.shape != (batch, num_clips):
            raise ValueError(f"sent_real must be ({batch}, {num_clips}), got {tuple(sent_real.shape)}")
        real = sent_real.to(device=device, dtype=torch.bool)

    def scores():  # uniform in [0, 1) on real positions, below 0 on padded ones: top-k prefers reals
        u = torch.rand(batch, num_clips, generator=generator, device=device)
        return torch.where(real, u, u - 2.0)

    keys = _draw_distinct(scores(), num_key)
    values = _draw_distinct(scores(), num_value)
    other = _draw_distinct(scores(), 1).squeeze(1)
    if compat_official:
        shifts = tuple(range(num_other_neg))
    else:
        shifts = tuple(range(1, min(num_other_neg, batch - 1) + 1))
    valid = real.gather(1, keys).all(1, keepdim=True) & real.gather(1, values).all(1, keepdim=True)
    valid = valid.expand(batch, num_key)
    other_real = real.gather(1, other[:, None]).squeeze(1)  # (B,)
    other_valid = torch.stack([other_real.roll(s, 0) for s in shifts], 1) if shifts else real.new_zeros(batch, 0)
    return MTCSample(keys, values, other, shifts, valid, other_valid)


def mtc_labels(keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """MTC targets: for key ``k`` the value slot ``j`` minimising ``|values[j] - k|``; -100 on a tie.

    Args: keys ``(B, num_key)``, values ``(B, num_value)`` integer positions. Returns ``(B, num_key)`` int64.
    Examples: ``k=0, V=(1, 3) -> 0``; ``k=2, V=(1, 3) -> -100`` (tie); ``k=3, V=(0, 3) -> 1``.
    """
    dist = (values[:, None, :] - keys[:, :, None]).abs()  # (B, num_key, num_value)
    best = dist.min(-1, keepdim=True).values
    labels = dist.argmin(-1)
    tie = (dist == best).sum(-1) > 1
    return labels.masked_fill(tie, IGNORE_INDEX).long()


def _gather_pos(feats: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """``feats (B, M, D)``, ``pos (B, K)`` -> ``(B, K, D)``."""
    return feats.gather(1, pos[..., None].expand(*pos.shape, feats.shape[-1]))


def _gather_batch(clip_feats: torch.Tensor, sent_feats: torch.Tensor, sent_real: torch.Tensor | None, group
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The MTC inputs of every rank concatenated along the batch in rank order: ``(W*B, M, D)`` features, all-gathered
    with gradients (``torch.distributed.nn.functional.all_gather``: the backward sums every rank's gradient into the
    rows of their owner), and ``(W*B, M)`` bool ``sent_real`` (all True where None). Every rank must hold the same
    shapes."""
    import torch.distributed as dist
    from torch.distributed.nn.functional import all_gather

    world = dist.get_world_size(group)
    shape = torch.tensor(clip_feats.shape, device=clip_feats.device)
    shapes = [torch.empty_like(shape) for _ in range(world)]
    dist.all_gather(shapes, shape, group=group)
    if any(not torch.equal(x, shape) for x in shapes):
        raise ValueError(f"mtc_loss: every rank must hold clip_feats / sent_feats of the same (B, M, D); got "
                         f"{[tuple(x.tolist()) for x in shapes]}")
    if sent_real is None:
        real = torch.ones(clip_feats.shape[:2], dtype=torch.uint8, device=clip_feats.device)
    elif sent_real.shape != clip_feats.shape[:2]:
        raise ValueError(f"sent_real must be {tuple(clip_feats.shape[:2])}, got {tuple(sent_real.shape)}")
    else:
        real = sent_real.to(device=clip_feats.device, dtype=torch.uint8).contiguous()  # gloo has no bool
    reals = [torch.empty_like(real) for _ in range(world)]
    dist.all_gather(reals, real, group=group)
    clip = torch.cat(all_gather(clip_feats, group=group), 0)
    sent = torch.cat(all_gather(sent_feats, group=group), 0)
    return clip, sent, torch.cat(reals).bool()


def _broadcast_sample(sample: MTCSample, group) -> MTCSample:
    """Rank 0's draw (of the group) on every rank, one int64 broadcast of the packed positions and masks."""
    import torch.distributed as dist

    parts = (sample.keys, sample.values, sample.other[:, None], sample.valid, sample.other_valid)
    packed = torch.cat([x.long() for x in parts], 1).contiguous()
    dist.broadcast(packed, src=0 if group is None else dist.get_global_rank(group, 0), group=group)
    keys, values, other, valid, other_valid = packed.split([x.shape[1] for x in parts], 1)
    return MTCSample(keys, values, other.squeeze(1), sample.shifts, valid.bool(), other_valid.bool())


def mtc_loss(
    clip_feats: torch.Tensor,
    sent_feats: torch.Tensor,
    sent_real: torch.Tensor | None = None,
    temperature: float = 0.05,
    num_key: int = 2,
    num_value: int = 2,
    num_other_neg: int = 3,
    generator: torch.Generator | None = None,
    compat_official: bool = False,
    sample: MTCSample | None = None,
    return_sample: bool = False,
    distributed=None,
):
    """Multi-modal temporal contrastive loss (official ``ct_time_loss``), unweighted (the caller applies 0.25).

    For each video ``b`` and key position ``k``: t->v scores sentence ``s_{b,k}`` against the candidates
    ``[c_{b,V_0}, .., c_{b,V_{nv-1}}, c_{b-s_0,o}, c_{b-s_1,o}, ..] / tau``; the positive is the temporally nearest
    value ``argmin_j |V_j - k|`` (ties ignored). v->t is the same with clips and sentences swapped. The loss is
    ``CE_t2v + CE_v2t``, each averaged over non-ignored rows (0 when every row is ignored; the official gives NaN).

    Global batch (official): with ``distributed`` resolved to a process group of ``W`` ranks, the features and
    ``sent_real`` of every rank are all-gathered (rank order) and every rank computes the loss ``L`` of the whole
    ``(W*B, M, D)`` batch: the draw covers the global batch and the roll wraps over it, so a rank's first videos take
    their "other" negatives from the previous rank's last ones. Every rank draws on the global batch and uses rank 0's
    draw (broadcast), so all ranks share one draw whatever their random states (the official ranks share it through
    one seed; the trainer seeds ``seed + rank``), and it is the single-process draw when ``generator`` of rank 0 is in
    the single-process state. Scale: every rank returns ``L`` itself, the single-process loss of the whole batch; the
    all-gather's backward sums the ``W`` ranks' gradients, so each rank's feature gradient is ``W * dL/d(own
    features)`` and DDP's average over ranks of the parameter gradients is ``dL/dparams``, the single-process gradient.

    Args:
        clip_feats: ``(B, M, D)`` L2-normalised clip features of this rank.
        sent_feats: ``(B, M, D)`` L2-normalised sentence features, sentence ``i`` aligned with clip ``i``.
        sent_real: ``(B, M)`` bool, False for padded sentences; never drawn in the default mode (see
            :func:`mtc_sample`), ignored with ``compat_official=True``.
        temperature: official ``time_temp`` 0.05.
        num_key, num_value, num_other_neg: official 2, 2, 3.
        generator: a ``torch.Generator`` on the features' device, for a reproducible draw.
        compat_official: reproduce the official draw (same-video shift-0 negative, padded sentences allowed).
        sample: an explicit :class:`MTCSample` (tests), instead of drawing one; of the global batch when gathered.
        return_sample: also return the sample used.
        distributed: ``None`` (auto: the global batch when ``torch.distributed`` is initialised with more than one
            rank), ``False`` (this rank's batch only), ``True`` (the default group) or a process group; as
            :func:`vpc_loss`. Every rank of the group must call it with the same shapes.

    Returns a scalar (fp32 for half inputs), or ``(loss, sample)``.
    """
    if clip_feats.dim() != 3 or clip_feats.shape != sent_feats.shape:
        raise ValueError(f"clip_feats and sent_feats must both be (B, M, D); got {tuple(clip_feats.shape)} and "
                         f"{tuple(sent_feats.shape)}")
    use_dist, group = _process_group(distributed)
    if use_dist:
        clip_feats, sent_feats, sent_real = _gather_batch(clip_feats, sent_feats, sent_real, group)
    batch, m, _ = clip_feats.shape
    if sample is None:
        sample = mtc_sample(batch, m, sent_real, num_key, num_value, num_other_neg, generator, clip_feats.device,
                            compat_official)
        if use_dist:
            sample = _broadcast_sample(sample, group)
    keys, values, other, shifts = sample.keys, sample.values, sample.other, sample.shifts
    labels = mtc_labels(keys, values).masked_fill(~sample.valid, IGNORE_INDEX).reshape(-1)
    ar = torch.arange(batch, device=clip_feats.device)

    def logits(query_feats, cand_feats, mask_others):
        q = _gather_pos(query_feats, keys)  # (B, nk, D)
        cands = [_gather_pos(cand_feats, values)]  # (B, nv, D)
        if shifts:
            o = cand_feats[ar, other]  # (B, D)
            cands.append(torch.stack([o.roll(s, 0) for s in shifts], 1))  # (B, S, D)
        out = torch.einsum("bkd,bcd->bkc", q, torch.cat(cands, 1)) / temperature  # (B, nk, nv + S)
        if mask_others and shifts:
            pad = ~sample.other_valid[:, None, :].expand(-1, keys.shape[1], -1)
            out = torch.cat([out[..., : values.shape[1]], out[..., values.shape[1]:].masked_fill(pad, float("-inf"))],
                            -1)
        return out.reshape(-1, out.shape[-1])

    mask = not compat_official
    loss = _ce_mean(logits(sent_feats, clip_feats, False), labels) + _ce_mean(logits(clip_feats, sent_feats, mask),
                                                                              labels)
    return (loss, sample) if return_sample else loss


# ----------------------------------------------------------------------------------------------------------- MLM


def mlm_mask(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    vocab_size: int,
    mask_token_id: int,
    special_ids,
    prob: float = 0.15,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking (official ``mask_batch_text_tokens``): any shape, e.g. ``(B, M, L)`` sentence ids.

    Each token that is neither special (``special_ids``: [CLS], [SEP], [PAD], ...) nor padding (``attention_mask``
    0) is selected with probability ``prob``; a selected token becomes ``mask_token_id`` with probability 0.8, a
    token drawn uniformly from ``[0, vocab_size)`` with 0.1 (as BERT / HF), and stays unchanged with 0.1.

    Returns ``(masked_ids, labels)``, both shaped like ``input_ids``: labels hold the original id at selected
    positions and -100 elsewhere. Deterministic given ``generator`` (on ``input_ids.device``).
    """
    device = input_ids.device
    eligible = ~torch.isin(input_ids, torch.as_tensor(list(special_ids), dtype=input_ids.dtype, device=device))
    if attention_mask is not None:
        eligible &= attention_mask.bool()
    rand = lambda: torch.rand(input_ids.shape, generator=generator, device=device)  # noqa: E731
    selected = eligible & (rand() < prob)
    action = rand()
    to_mask = selected & (action < 0.8)
    to_random = selected & (action >= 0.8) & (action < 0.9)
    random_ids = torch.randint(vocab_size, input_ids.shape, generator=generator, device=device, dtype=input_ids.dtype)
    masked = torch.where(to_mask, torch.full_like(input_ids, mask_token_id), input_ids)
    masked = torch.where(to_random, random_ids, masked)
    labels = torch.where(selected, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
    return masked, labels


def mlm_loss(logits: torch.Tensor, labels: torch.Tensor, matched: torch.Tensor | None = None) -> torch.Tensor:
    """Masked-LM cross-entropy, averaged over labelled (not -100) tokens; 0 when there are none.

    Args:
        logits: ``(..., V)``, e.g. ``(B, T, V)`` or flattened ``(N, V)``.
        labels: ``(...)`` matching the leading dims of ``logits``.
        matched: optional bool mask over the leading dims of ``labels`` (e.g. ``(B,)`` per sample, or ``(N,)``
            per token); only True entries count. Official: only the matched (VTM label 1) half of the batch, so pass
            ``vtm_labels.bool()``.
    """
    if matched is not None:
        keep = matched.bool().reshape(matched.shape + (1,) * (labels.dim() - matched.dim()))
        labels = labels.masked_fill(~keep, IGNORE_INDEX)
    return _ce_mean(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))


# ----------------------------------------------------------------------------------------------------------- VTM


def vtm_pairs(batch_size: int, device=None, compat_official: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Official ``shuffle_embd_for_vtm``: which video each text is fused with, and the VTM labels.

    The first ``h = B // 2`` samples get the video of the previous sample within that half (``torch.roll`` by 1:
    sample ``i`` gets video ``(i - 1) mod h``), label 0 (mismatched); the remaining ``B - h`` keep their own video,
    label 1. An odd batch thus has one more matched than mismatched pair (B=5: 2 negatives, 3 positives).

    With ``h == 1`` (B = 2 or 3) the official roll is the identity, so its "mismatched" pair is in fact matched; by
    default sample 0 then gets the video of sample 1 instead (``compat_official=True`` keeps the identity).

    Returns ``(video_perm (B,) int64, labels (B,) int64)``: fuse text ``i`` with ``video[video_perm[i]]``.
    """
    h = batch_size // 2
    perm = torch.arange(batch_size, device=device)
    if h > 0:
        perm[:h] = perm[:h].roll(1, 0)
        if h == 1 and not compat_official:
            perm[0] = 1
    labels = (torch.arange(batch_size, device=device) >= h).long()
    return perm, labels


def vtm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Video-text matching CE on ``logits (B, 2)`` (``seq_relationship(pooler)``) and ``labels (B,)``, unweighted."""
    return F.cross_entropy(logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits, labels)


# ---------------------------------------------------------------------------------------------------- stage totals


def stage1_loss(vpc: torch.Tensor, mtc: torch.Tensor, mtc_weight: float = 0.25) -> torch.Tensor:
    """Stage-1 total: ``vpc + mtc_weight * mtc`` (official ``ct_global_loss_weight`` 1, ``ct_time_loss_weight``
    0.25)."""
    return vpc + mtc_weight * mtc


def stage2_loss(mlm: torch.Tensor, vtm: torch.Tensor, vtm_weight: float = 10.0) -> torch.Tensor:
    """Stage-2 total: ``mlm + vtm_weight * vtm`` (official ``mlm_loss_weight`` 1, ``vtm_loss_weight`` 10)."""
    return mlm + vtm_weight * vtm


# ------------------------------------------------------------------------------------------------ How2QA span loss


def span_frame_labels(span: tuple[float, float] | None, duration: float, num_frames: int = 32
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-frame in-span labels and class-balanced weights for How2QA's span loss (official
    ``get_temporal_loss_label``).

    ``span`` ``(start, end)`` in seconds (None or NaN: the whole video), ``duration`` of the sampled video in seconds
    (the official code uses ``frame_count / 3`` for its 3 fps videos), ``num_frames`` T uniformly covering it ->
    ``labels`` (T,) long in {0, 1} and ``weights`` (T,) float: ``T / 2 / N1`` on the N1 in-span frames and
    ``T / 2 / max(1, T - N1)`` elsewhere, so each class carries half the total weight. The span covers frames
    ``[round(start / duration * T), round(end / duration * T))`` clamped to ``[0, T)`` and at least one frame long
    (Python's ``round``, half to even, like the official code).
    """
    if duration <= 0:
        raise ValueError(f"duration must be positive, got {duration}")
    if span is None or any(v != v for v in span):  # NaN check without numpy
        lo, hi = 0.0, 1.0
    else:
        lo = min(max(span[0] / duration, 0.0), 1.0)
        hi = min(max(span[1] / duration, 0.0), 1.0)
    start = min(max(int(round(lo * num_frames)), 0), num_frames - 1)
    end = min(max(int(round(hi * num_frames)), start + 1), num_frames)
    labels = torch.zeros(num_frames, dtype=torch.long)
    labels[start:end] = 1
    n1 = end - start
    weights = torch.full((num_frames,), num_frames * 0.5 / max(1, num_frames - n1))
    weights[start:end] = num_frames * 0.5 / n1
    return labels, weights


def span_loss(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """How2QA span loss: per-frame CE of ``logits`` (B, T, 2) against ``labels`` (B, T), times ``weights`` (B, T)
    (:func:`span_frame_labels`), averaged over all B*T frames (the official ``(CE * w).mean()``, not a weighted
    mean)."""
    ce = F.cross_entropy(logits.reshape(-1, 2).float(), labels.reshape(-1), reduction="none")
    return (ce * weights.reshape(-1).to(ce.dtype)).mean()
