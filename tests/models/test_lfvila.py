"""Tests of the full LF-VILA model on ``lfvila-tiny`` (video width 256 = BERT hidden 256, 8 x 64 x 96 input,
4 clips / sentences of 12 tokens)."""

import pytest
import torch

from lfvila import losses
from lfvila.models import create_model, list_models, model_config
from lfvila.models.pretraining import LFVILA, LFVILAConfig
from lfvila.models.text_encoder import pool_video_tokens

B, M, L, T, H, W, D = 2, 4, 12, 8, 64, 96, 256
OFFICIAL_PREFIXES = {"video_encoder", "text_encoder", "video_local_proj", "text_local_proj", "video_global_proj",
                     "text_global_proj", "sent_embedding"}
PROJ = ("video_local_proj", "text_local_proj", "video_global_proj", "text_global_proj")


def _model(**overrides) -> LFVILA:
    torch.manual_seed(0)
    return create_model("lfvila-tiny", **overrides)


def _inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    video = torch.randn(B, 3, T, H, W, generator=g)
    ids = torch.randint(1, 128, (B, M, L), generator=g)
    mask = torch.ones(B, M, L, dtype=torch.long)
    mask[0, :, 9:] = 0
    mask[1, 3] = 0  # sample 1: the last sentence is empty padding
    return video, ids * mask, mask


def test_registered():
    assert {"lfvila-tiny", "lfvila-base"} <= set(list_models())
    base = model_config("lfvila-base")
    assert isinstance(base, LFVILAConfig)
    assert base.embed_dim == base.text.hidden_size == 1024 and base.num_clips == 4 and base.stage == 1
    assert (base.temperature, base.mtc_weight, base.vtm_weight) == (0.05, 0.25, 10.0)


def test_shapes():
    model = _model().eval()
    video, ids, mask = _inputs()
    with torch.no_grad():
        v = model.encode_video(video)
        t = model.encode_text(ids, mask)
    assert v["clip"].shape == (B, M, D) and v["global"].shape == (B, D)
    assert v["tokens"].shape == (B, T * 6, D) and v["pooled"].shape == (B, T, 6, D)
    assert t["sentence"].shape == (B, M, D) and t["paragraph"].shape == (B, D)
    assert t["states"].shape == (B, 1 + M * L, D) and t["mask"].shape == (B, 1 + M * L)
    assert t["real"].tolist() == [[True] * 4, [True, True, True, False]]
    for x in (v["clip"], v["global"], t["sentence"], t["paragraph"]):
        torch.testing.assert_close(x.norm(dim=-1), torch.ones(x.shape[:-1]))


def test_clip_features_follow_downsample_video_embd():
    """clip = video_local_proj(mean over frames/patches of the pooled local branch); global from the final grid."""
    model = _model().eval()
    video, _, _ = _inputs()
    with torch.no_grad():
        out = model.video_encoder(video)
        v = model.encode_video(video)
        pooled_local = pool_video_tokens(out.local).reshape(B, M, T // M, 6, D).mean((2, 3))
        pooled_grid = pool_video_tokens(out.grid).reshape(B, M, T // M, 6, D).mean((2, 3))
        clip = torch.nn.functional.normalize(model.video_local_proj(pooled_local), dim=-1)
        glob = torch.nn.functional.normalize(model.video_global_proj(pooled_grid.mean(1)), dim=-1)
    torch.testing.assert_close(v["clip"], clip)
    torch.testing.assert_close(v["global"], glob)
    assert not torch.allclose(out.local, out.grid)


def test_compat_official_uses_final_grid_for_mtc():
    model = _model(compat_official=True).eval()
    video, _, _ = _inputs()
    with torch.no_grad():
        out = model.video_encoder(video)
        v = model.encode_video(video)
        pooled_grid = pool_video_tokens(out.grid).reshape(B, M, T // M, 6, D).mean((2, 3))
        clip = torch.nn.functional.normalize(model.video_local_proj(pooled_grid), dim=-1)
    torch.testing.assert_close(v["clip"], clip)
    assert model.video_encoder.compat_official and model.text_encoder.config.compat_official


@pytest.mark.parametrize("compat", [False, True])
def test_stage1_loss_and_gradients(compat):
    model = _model(compat_official=compat).train()
    video, ids, mask = _inputs()
    out = model.forward_stage1(video, ids, mask, generator=torch.Generator().manual_seed(0))
    assert set(out) == {"loss", "vpc", "mtc"}
    assert all(torch.isfinite(x) for x in out.values())
    torch.testing.assert_close(out["loss"], out["vpc"] + 0.25 * out["mtc"])
    out["loss"].backward()
    no_grad = {n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()}
    local_branch = {n for n in dict(model.named_parameters()) if ".local_feat_proj." in n or ".norm_local." in n}
    heads = {n for n in dict(model.named_parameters())
             if n.startswith(("text_encoder.cls.", "text_encoder.seq_relationship.", "text_encoder.bert.pooler."))}
    # Only the stage-2 heads are unused; compat_official additionally cuts the local branch (the official bug).
    assert no_grad == (heads | local_branch if compat else heads)
    for name in PROJ:
        assert getattr(model, name).weight.grad.abs().sum() > 0
    for i in range(model.text_encoder.config.num_local_layers):
        assert model.text_encoder.bert.encoder.layer[i].attention.self.query.weight.grad.abs().sum() > 0
    assert model.video_encoder.patch_embed.proj.weight.grad.abs().sum() > 0


def test_stage1_matches_losses_module():
    model = _model().eval()
    video, ids, mask = _inputs()
    with torch.no_grad():
        out = model.forward_stage1(video, ids, mask, generator=torch.Generator().manual_seed(3))
        v, t = model.encode_video(video), model.encode_text(ids, mask)
        vpc = losses.vpc_loss(v["global"], t["paragraph"], 0.05)
        mtc = losses.mtc_loss(v["clip"], t["sentence"], t["real"], 0.05, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(out["vpc"], vpc)
    torch.testing.assert_close(out["mtc"], mtc)


def test_state_dict_prefixes():
    s1 = {k.split(".")[0] for k in _model().state_dict()}
    assert s1 == OFFICIAL_PREFIXES
    s2 = _model(stage=2)
    assert {k.split(".")[0] for k in s2.state_dict()} == OFFICIAL_PREFIXES | {"video_token_pos"}
    assert len(_model().text_encoder.bert.encoder.layer) == 4 and len(s2.text_encoder.bert.encoder.layer) == 6
    keys = set(s2.state_dict())
    assert {"video_token_pos.s_pos_embed", "video_token_pos.t_pos_embed", "sent_embedding.segment_embeddings.weight",
            "video_local_proj.weight", "text_global_proj.bias", "video_encoder.norm_local.weight"} <= keys
    assert s2.video_token_pos.t_pos_embed.shape == (1, T, 1, D)


def test_stage2_losses_and_gradients():
    model = _model(stage=2).train()
    video, ids, mask = _inputs()
    masked, labels = losses.mlm_mask(ids, mask, 128, 103, [0, 101, 102], prob=0.5,
                                     generator=torch.Generator().manual_seed(0))
    out = model.forward_stage2(video, masked, mask, labels)
    assert set(out) == {"loss", "mlm", "vtm"} and all(torch.isfinite(x) for x in out.values())
    torch.testing.assert_close(out["loss"], out["mlm"] + 10.0 * out["vtm"])
    out["loss"].backward()
    assert model.video_token_pos.t_pos_embed.grad.abs().sum() > 0
    assert model.text_encoder.seq_relationship.weight.grad.abs().sum() > 0
    assert model.text_encoder.bert.encoder.layer[5].output.dense.weight.grad.abs().sum() > 0
    with pytest.raises(RuntimeError):
        _model().forward_stage2(video, masked, mask, labels)
