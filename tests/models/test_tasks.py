"""Task models (retrieval, multiple-choice and classification QA) on the tiny config, and How2QA's span loss."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lfvila import losses
from lfvila.models import LFVILAForClassification, LFVILAForMultipleChoice, LFVILARetrieval, create_model

B, C, M, L, T, H, W = 2, 3, 4, 12, 8, 64, 96


def _video(seed=0):
    return torch.randn(B, 3, T, H, W, generator=torch.Generator().manual_seed(seed))


def _text(*lead, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 128, (*lead, M, L), generator=g)
    mask = torch.ones_like(ids)
    mask[..., 8:] = 0
    mask[..., 3, :] = 0  # an empty segment
    return ids * mask, mask


def test_span_frame_labels_hand_made():
    labels, weights = losses.span_frame_labels((2.0, 5.0), duration=10.0, num_frames=8)
    # start round(0.2 * 8) = round(1.6) = 2, end round(0.5 * 8) = 4
    assert labels.tolist() == [0, 0, 1, 1, 0, 0, 0, 0]
    assert torch.allclose(weights, torch.tensor([4 / 6] * 2 + [2.0] * 2 + [4 / 6] * 4))
    labels, _ = losses.span_frame_labels((1.25, 1.25), duration=10.0, num_frames=8)  # at least one frame
    assert labels.tolist() == [0, 1, 0, 0, 0, 0, 0, 0]
    labels, weights = losses.span_frame_labels(None, duration=3.0, num_frames=4)  # no span: whole video
    assert labels.tolist() == [1, 1, 1, 1] and torch.allclose(weights, torch.full((4,), 0.5))
    labels, _ = losses.span_frame_labels((float("nan"), 2.0), duration=3.0, num_frames=4)
    assert labels.tolist() == [1, 1, 1, 1]
    labels, _ = losses.span_frame_labels((-5.0, 50.0), duration=10.0, num_frames=4)  # clamped
    assert labels.tolist() == [1, 1, 1, 1]
    labels, _ = losses.span_frame_labels((0.5, 1.5), duration=8.0, num_frames=8)  # round half to even: 0.5->0, 1.5->2
    assert labels.tolist() == [1, 1, 0, 0, 0, 0, 0, 0]
    labels, _ = losses.span_frame_labels((9.9, 10.0), duration=10.0, num_frames=8)  # start clamped to T-1
    assert labels.tolist() == [0] * 7 + [1]
    with pytest.raises(ValueError, match="duration"):
        losses.span_frame_labels((0.0, 1.0), duration=0.0)


def test_span_loss_is_weighted_mean_over_all_frames():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(B, T, 2, generator=g, requires_grad=True)
    pairs = [losses.span_frame_labels((1.0, 4.0), 8.0, T), losses.span_frame_labels((0.0, 2.0), 8.0, T)]
    labels = torch.stack([p[0] for p in pairs])
    weights = torch.stack([p[1] for p in pairs])
    got = losses.span_loss(logits, labels, weights)
    direct = sum(-weights[b, t] * torch.log_softmax(logits[b, t], -1)[labels[b, t]]
                 for b in range(B) for t in range(T)) / (B * T)
    torch.testing.assert_close(got, direct)
    got.backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_retrieval_forward_and_backward():
    torch.manual_seed(0)
    model = create_model("lfvila-tiny-retrieval")
    assert isinstance(model, LFVILARetrieval) and model.video_token_pos is None
    assert model.text_encoder.config.num_layers == model.text_encoder.config.stage1_layers
    ids, mask = _text(B)
    out = model(_video(), ids, mask)
    assert out["video"].shape == out["text"].shape == (B, 256)
    sim = out["video"] @ out["text"].T / model.cfg.temperature
    direct = F.cross_entropy(sim, torch.arange(B)) + F.cross_entropy(sim.T, torch.arange(B))
    torch.testing.assert_close(out["loss"], direct, rtol=1e-5, atol=1e-5)
    out["loss"].backward()
    assert model.video_global_proj.weight.grad.abs().sum() > 0
    assert model.video_encoder.patch_embed.proj.weight.grad.abs().sum() > 0


def test_multiple_choice_matches_per_choice_fusion():
    torch.manual_seed(0)
    model = create_model("lfvila-tiny-multichoice").eval()
    assert isinstance(model, LFVILAForMultipleChoice)
    video = _video()
    ids, mask = _text(B, C)
    labels = torch.tensor([2, 0])
    spans = [losses.span_frame_labels((1.0, 3.0), 6.0, T), losses.span_frame_labels((0.0, 6.0), 6.0, T)]
    span_labels, span_weights = torch.stack([s[0] for s in spans]), torch.stack([s[1] for s in spans])
    with torch.no_grad():
        out = model(video, ids, mask, labels, span_labels, span_weights)
        assert out["logits"].shape == (B, C) and out["span_logits"].shape == (B, T, 2)
        # choice c alone: the same text fused with the same video gives the same logit
        tokens = model.encode_video(video)["tokens"]
        for c in range(C):
            t = model.encode_text(ids[:, c], mask[:, c])
            fused = model.text_encoder.fuse(t["states"], t["mask"], tokens)
            pooled = model.text_encoder.pooled(fused)
            torch.testing.assert_close(out["logits"][:, c], model.text_encoder.classifier(pooled)[:, 0],
                                       rtol=1e-4, atol=1e-5)
    ce = F.cross_entropy(out["logits"], labels)
    span = losses.span_loss(out["span_logits"], span_labels, span_weights)
    torch.testing.assert_close(out["loss"], ce + model.cfg.span_weight * span)
    model.train()
    out = model(video, ids, mask, labels, span_labels, span_weights)
    out["loss"].backward()
    for name in ("classifier", "span_classifier"):
        assert getattr(model.text_encoder, name).weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="choices"):
        model(video, ids[:, 0], mask[:, 0])
    with pytest.raises(ValueError, match="span_weights"):
        model(video, ids, mask, labels, span_labels)


def test_classification_forward_and_label_smoothing():
    torch.manual_seed(0)
    model = create_model("lfvila-tiny-classification", num_classes=5, label_smoothing=0.1).eval()
    assert isinstance(model, LFVILAForClassification) and model.text_encoder.classifier.out_features == 5
    ids, mask = _text(B)
    labels = torch.tensor([4, 1])
    with torch.no_grad():
        out = model(_video(), ids, mask, labels)
    assert out["logits"].shape == (B, 5)
    torch.testing.assert_close(out["loss"], F.cross_entropy(out["logits"], labels, label_smoothing=0.1))
    with pytest.raises(ValueError, match=r"model\.overrides\.num_classes"):
        create_model("lfvila-tiny-classification", num_classes=0)
