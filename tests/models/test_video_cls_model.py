"""Long-form video classification (``LFVILAForVideoClassification``): the official forward path by hand, the loss
and gradients, no text tower, the head at each official class count, and initialisation from a pre-training
checkpoint."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from lfvila.models import LFVILAForVideoClassification, convert, create_model, model_config
from lfvila.models.tasks import VIDEO_CLS_CLASSES
from train import tasks

B, T = 2, 8
VCLS = "lfvila-tiny-video-classification"


def _video(h=64, w=96, seed=0):
    return torch.randn(B, 3, T, h, w, generator=torch.Generator().manual_seed(seed))


def _official(model, video):
    """``LFVILA_Video_Classification.forward`` of the official code, written out on our modules."""
    grid = model.video_encoder(video).grid  # (B, N, H, W, C)
    b, n, h, w, c = grid.shape
    x = nn.MaxPool2d((2, 3), stride=(1, 1))(grid.permute(0, 1, 4, 2, 3).reshape(b * n, c, h, w))
    x = x.permute(0, 2, 3, 1).reshape(b, n, -1, c)  # (B, N, X, C)
    glob = F.normalize(model.video_global_proj(x.mean(dim=[1, 2])), dim=-1)
    frames = F.normalize(model.video_frame_proj(x.mean(dim=2)), dim=-1)
    return model.classifier(glob), glob, frames


def test_forward_is_the_official_path_on_a_3x5_grid():
    torch.manual_seed(0)
    model = create_model(VCLS, num_classes=6).eval()
    video = _video(192, 320)  # final grid 3 x 5, as the official 192 x 320 input
    with torch.no_grad():
        out = model(video)
        logits, glob, frames = _official(model, video)
        assert model.video_encoder(video).grid.shape[2:4] == (3, 5)
    torch.testing.assert_close(out["logits"], logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["global"], glob, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["frames"], frames, rtol=1e-5, atol=1e-5)
    assert out["logits"].shape == (B, 6) and torch.allclose(out["global"].norm(dim=-1), torch.ones(B))


def test_loss_is_cross_entropy_and_gradients_reach_the_video_encoder():
    torch.manual_seed(0)
    model = create_model(VCLS, num_classes=180)
    labels = torch.tensor([3, 177])
    out = model(_video(), labels)
    assert out["logits"].shape == (B, 180) and out["frames"].shape == (B, T, 256)
    torch.testing.assert_close(out["loss"], F.cross_entropy(out["logits"], labels))
    out["loss"].backward()
    for p in (model.classifier.weight, model.video_global_proj.weight, model.video_encoder.patch_embed.proj.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert model.video_frame_proj.weight.grad is None  # official: per-frame features, not in the loss
    assert "loss" not in model(_video())


def test_no_text_tower_is_built():
    model = create_model(VCLS, num_classes=4)
    names = {n.split(".")[0] for n in model.state_dict()}
    assert names == {"video_encoder", "video_global_proj", "video_frame_proj", "classifier"}
    assert not hasattr(model, "text_encoder") and not hasattr(model, "sent_embedding")
    assert model.video_token_pos is None and not model.has_fusion
    with pytest.raises(ValueError, match=r"model\.overrides\.num_classes"):
        create_model(VCLS, num_classes=0)
    with pytest.raises(ValueError, match=r"model\.overrides\.num_classes"):
        create_model(VCLS)  # the head has no class count of its own


@pytest.mark.parametrize("dataset", sorted(VIDEO_CLS_CLASSES))
def test_the_head_with_each_official_class_count(dataset):
    expected = {"coin": 180, "lvu-relationship": 4, "lvu-scene": 6, "lvu-wayspeaking": 5}[dataset]
    assert VIDEO_CLS_CLASSES[dataset] == expected
    for size in ("base", "tiny"):
        cfg = model_config(f"lfvila-{size}-video-classification", num_classes=expected)
        assert cfg.num_classes == expected and cfg.stage == 1
    base = model_config("lfvila-base-video-classification")
    assert (base.embed_dim, base.num_clips, base.video.extra["input"]) == (1024, 4, (32, 192, 320))
    model = create_model(VCLS, num_classes=expected)
    assert isinstance(model, LFVILAForVideoClassification) and model.classifier.out_features == expected
    assert {t.name for t in tasks.TASKS.values() if t.fits(model)} == {"video_classification"}


def test_init_from_stage1_and_stage2_checkpoints():
    torch.manual_seed(0)
    stage1 = create_model("lfvila-tiny")
    with torch.no_grad():
        for p in stage1.parameters():
            p.add_(torch.randn_like(p))
    model = create_model(VCLS, num_classes=180)
    report = convert.init_from_pretraining(model, stage1.state_dict())
    assert report.missing == sorted(f"{m}.{p}" for m in ("classifier", "video_frame_proj") for p in ("bias", "weight"))
    assert report.unexpected and all(k.startswith(("text_", "sent_embedding.", "video_local_proj."))
                                     for k in report.unexpected)
    for key, value in model.state_dict().items():
        if key.startswith(("video_encoder.", "video_global_proj.")):
            assert torch.equal(value, stage1.state_dict()[key]), key
    stage2 = create_model("lfvila-tiny", stage=2)  # fusion parts (video_token_pos, layers) unused too
    convert.init_from_pretraining(create_model(VCLS, num_classes=180), stage2.state_dict())


def test_save_and_load_pretrained(tmp_path):
    torch.manual_seed(0)
    model = create_model(VCLS, num_classes=5).eval()
    convert.save_pretrained(model, tmp_path / "m")
    loaded = convert.from_pretrained(tmp_path / "m").eval()
    assert isinstance(loaded, LFVILAForVideoClassification) and loaded.cfg == model.cfg
    with torch.no_grad():
        torch.testing.assert_close(loaded(_video())["logits"], model(_video())["logits"])
