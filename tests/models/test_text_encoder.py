"""Tests of the split BERT text / fusion encoder on the tiny config (hidden 64, layers 2/2/2)."""

import pytest
import torch
import torch.nn as nn
from transformers import BertForPreTraining, BertModel

from lfvila.models.text_encoder import (
    SentEmbedding,
    SplitBertTextEncoder,
    VideoTokenPos,
    load_bert_weights,
    pool_video_tokens,
    tiny_text_config,
)

B, M, L, T, D = 2, 4, 12, 8, 64


def _model(**overrides):
    torch.manual_seed(0)
    cfg = tiny_text_config(**overrides)
    model = SplitBertTextEncoder(cfg).eval()
    sent = SentEmbedding(D, cfg.max_position_embeddings, cfg.sent_type_vocab).eval()
    sent.init_from_bert(model.bert)
    pos = VideoTokenPos(D, cfg.num_frames, cfg.patches_per_frame).eval()
    return model, sent, pos


def _inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 128, (B, M, L), generator=g)
    mask = torch.ones(B, M, L, dtype=torch.long)
    mask[0, :, 9:] = 0  # padded tail in every sentence of sample 0
    mask[1, 2, 5:] = 0
    mask[1, 3] = 0  # sample 1: the last sentence is empty padding
    ids = ids * mask  # pad id 0
    return ids, mask


def _forward(model, sent, pos, ids, mask, grid):
    s = model.encode_sentences(ids, mask)
    p, pmask = model.encode_paragraph(s, mask, sent)
    v = pos(pool_video_tokens(grid, model.config.pool_grid))
    return s, p, pmask, model.fuse(p, pmask, v)


@torch.no_grad()
def test_shapes_through_each_stage():
    model, sent, pos = _model()
    ids, mask = _inputs()
    grid = torch.randn(B, T, 3, 5, D)
    s, p, pmask, f = _forward(model, sent, pos, ids, mask, grid)
    assert s.shape == (B, M, L, D)
    assert p.shape == (B, 1 + M * L, D) and pmask.shape == (B, 1 + M * L)
    assert pmask[:, 0].all() and torch.equal(pmask[:, 1:], mask.reshape(B, -1))
    assert f.shape == (B, 1 + M * L + T * 6, D)
    assert torch.isfinite(f).all()
    assert model.mlm_logits(f).shape == (B, f.shape[1], 128)
    select = torch.zeros(B, f.shape[1], dtype=torch.bool)
    select[0, 3] = select[1, 7] = True
    assert torch.allclose(model.mlm_logits(f, select), model.mlm_logits(f)[select], atol=1e-5)
    assert model.vtm_logits(f).shape == (B, 2)


@torch.no_grad()
def test_padding_invariance():
    model, sent, pos = _model()
    ids, mask = _inputs()
    grid = torch.randn(B, T, 3, 5, D)
    out1 = _forward(model, sent, pos, ids, mask, grid)
    noise = torch.randint(1, 128, ids.shape, generator=torch.Generator().manual_seed(5))
    ids2 = torch.where(mask.bool(), ids, noise)
    assert not torch.equal(ids, ids2)
    out2 = _forward(model, sent, pos, ids2, mask, grid)
    real = mask.bool()
    assert torch.allclose(out1[0][real], out2[0][real], atol=1e-5)
    preal = out1[2].bool()
    assert torch.allclose(out1[1][preal], out2[1][preal], atol=1e-5)
    freal = torch.cat([preal, torch.ones(B, T * 6, dtype=torch.bool)], 1)
    assert torch.allclose(out1[3][freal], out2[3][freal], atol=1e-5)


@torch.no_grad()
def test_video_mask_is_honoured():
    model, sent, pos = _model()
    ids, mask = _inputs()
    s = model.encode_sentences(ids, mask)
    p, pmask = model.encode_paragraph(s, mask, sent)
    v = torch.randn(B, T * 6, D)
    vmask = torch.ones(B, T * 6, dtype=torch.long)
    vmask[:, -6:] = 0
    v2 = v.clone()
    v2[:, -6:] = torch.randn(B, 6, D)
    f1, f2 = model.fuse(p, pmask, v, vmask), model.fuse(p, pmask, v2, vmask)
    keep = torch.cat([pmask, vmask], 1).bool()
    assert torch.allclose(f1[keep], f2[keep], atol=1e-5)


@pytest.mark.parametrize("compat", [False, True])
@torch.no_grad()
def test_paragraph_cls_is_mean_of_sentence_cls(compat):
    # No paragraph layers (num_local == stage1), so token 0 of the paragraph output is the [CLS] mean itself.
    model, sent, _ = _model(num_local_layers=2, stage1_layers=2, num_layers=4, compat_official=compat)
    ids, mask = _inputs()
    s = model.encode_sentences(ids, mask)
    p, _ = model.encode_paragraph(s, mask, sent)
    real = mask.any(-1)
    assert real.tolist() == [[True] * 4, [True, True, True, False]]
    cls = sent(s.reshape(B, M * L, D), L).reshape(B, M, L, D)[:, :, 0]  # official: [CLS] after SentEmbedding
    expected = cls.mean(1) if compat else torch.stack([cls[b][real[b]].mean(0) for b in range(B)])
    assert torch.allclose(p[:, 0], expected, atol=1e-6)
    if not compat:
        assert not torch.allclose(p[1, 0], cls[1].mean(0), atol=1e-4)


def test_pool_video_tokens_and_positions():
    grid = torch.randn(B, T, 3, 5, D)
    tokens = pool_video_tokens(grid)
    assert tokens.shape == (B, T, 6, D)
    ref = nn.MaxPool2d((2, 3), stride=1)(grid.reshape(B * T, 3, 5, D).permute(0, 3, 1, 2))
    assert torch.equal(tokens, ref.permute(0, 2, 3, 1).reshape(B, T, 6, D))
    assert pool_video_tokens(torch.randn(B, T, 1, 2, D)).shape == (B, T, 6, D)  # tiny grid: adaptive
    assert pool_video_tokens(torch.randn(B, T, 6, 10, D)).shape == (B, T, 6, D)
    pos = VideoTokenPos(D, num_frames=T, patches_per_frame=6)
    assert pos.s_pos_embed.shape == (1, 1, 6, D) and pos.t_pos_embed.shape == (1, T, 1, D)
    out = pos(tokens)
    assert out.shape == (B, T * 6, D)
    assert pos(tokens[:, :4]).shape == (B, 4 * 6, D)
    with pytest.raises(ValueError):
        pos(torch.randn(B, T + 1, 6, D))


@torch.no_grad()
def test_sent_embedding_segments_and_init():
    model, sent, _ = _model()
    assert torch.equal(sent.position_embeddings.weight, model.bert.embeddings.position_embeddings.weight)
    assert sent.segment_embeddings.weight.shape == (8, D)
    x = torch.zeros(1, M * L, D)
    out = sent(x, L)
    manual = sent.norm(sent.position_embeddings.weight[: M * L] + sent.segment_embeddings.weight.repeat_interleave(
        L, 0)[: M * L])
    assert torch.allclose(out[0], manual, atol=1e-6)


@torch.no_grad()
def test_heads_and_official_names():
    model, _, _ = _model()
    names = {k.split(".")[0] for k in model.state_dict()}
    assert names == {"bert", "cls", "seq_relationship"}
    torch.manual_seed(0)
    mc = SplitBertTextEncoder(tiny_text_config(head="multichoice")).eval()
    assert {k.split(".")[0] for k in mc.state_dict()} == {"bert", "classifier", "span_classifier"}
    assert mc.classifier.weight.shape == (1, D) and mc.span_classifier.weight.shape == (2, D)
    C = 4
    states = torch.randn(B * C, 1 + M * L + T * 6, D)
    logits = mc.choice_logits(states, C)
    assert logits.shape == (B, C)
    torch.testing.assert_close(logits, mc.classifier(mc.pooled(states)).reshape(B, C))
    span = mc.span_logits(states, T, C)
    assert span.shape == (B, T, 2)
    frames = states[:, 1 + M * L:].reshape(B * C, T, 6, D).mean(2)
    torch.testing.assert_close(span, mc.span_classifier(frames).reshape(B, C, T, 2).amax(1))
    cl = SplitBertTextEncoder(tiny_text_config(head="classification", num_classes=7)).eval()
    assert {k.split(".")[0] for k in cl.state_dict()} == {"bert", "classifier"}
    assert cl.class_logits(states).shape == (B * C, 7)
    with pytest.raises(ValueError, match="num_classes"):
        tiny_text_config(head="classification")
    with pytest.raises(ValueError, match="head"):
        tiny_text_config(head="mlm")


@torch.no_grad()
def test_split_equals_full_stack():
    model, _, _ = _model()
    ids, mask = _inputs()
    flat_ids, flat_mask = ids.reshape(B * M, L), mask.reshape(B * M, L)
    h = model.bert.embeddings(input_ids=flat_ids)
    split = model.run_layers(model.run_layers(model.run_layers(h, flat_mask, 0, 2), flat_mask, 2, 4), flat_mask, 4, 6)
    whole = model.run_layers(h, flat_mask, 0, 6)
    real = flat_mask.bool()
    assert torch.allclose(split[real], whole[real], atol=1e-5)
    ref = model.bert(input_ids=flat_ids, attention_mask=flat_mask).last_hidden_state  # the library's own masking
    assert torch.allclose(whole[real], ref[real], atol=1e-5)


def test_mlm_decoder_weight_untied_bias_tied():
    # official TextEncoderForPretraining: no get_output_embeddings, so the decoder weight is its own parameter
    model, _, _ = _model()
    assert model.cls.predictions.decoder.weight is not model.bert.embeddings.word_embeddings.weight
    assert model.cls.predictions.decoder.bias is model.cls.predictions.bias


def _check_loaded(model, ref: BertForPreTraining):
    got = model.state_dict()
    for k, v in ref.state_dict().items():
        if k.startswith("cls.seq_relationship") or k.endswith("position_ids"):
            continue
        assert torch.equal(got[k], v), k


def test_load_bert_weights_from_gamma_beta_file(tmp_path):
    model, _, _ = _model()
    torch.manual_seed(3)
    ref = BertForPreTraining(model.config.to_bert_config()).eval()
    sd = {}
    for k, v in ref.state_dict().items():
        if "LayerNorm" in k:
            k = k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta")
        sd[k] = v.clone()
    assert any(k.endswith("gamma") for k in sd)
    path = tmp_path / "pytorch_model.bin"
    torch.save(sd, path)
    report = load_bert_weights(model, path)
    _check_loaded(model, ref)
    assert report.missing == ["seq_relationship.bias", "seq_relationship.weight"]
    assert report.unexpected == ["cls.seq_relationship.bias", "cls.seq_relationship.weight"]
    assert report.mismatched == []
    assert model.cls.predictions.decoder.weight is not model.bert.embeddings.word_embeddings.weight
    # a file saved with tied weights may omit the decoder copy: it is then filled from the word embeddings
    model2, _, _ = _model()
    sd.pop("cls.predictions.decoder.weight")
    report = load_bert_weights(model2, sd)
    assert "cls.predictions.decoder.weight" not in report.missing
    assert torch.equal(model2.cls.predictions.decoder.weight, ref.bert.embeddings.word_embeddings.weight)


def test_load_bert_weights_from_pretrained_dir(tmp_path):
    model, _, _ = _model(num_layers=4)  # a "stage-1" sized stack: the source's layers 4, 5 are unexpected
    big = tiny_text_config().to_bert_config()
    torch.manual_seed(4)
    ref = BertForPreTraining(big).eval()
    ref.save_pretrained(tmp_path / "bert")
    report = load_bert_weights(model, tmp_path / "bert")
    got = model.state_dict()
    for k, v in ref.state_dict().items():
        if k in got and not k.endswith("position_ids"):
            assert torch.equal(got[k], v), k
    assert any(k.startswith("bert.encoder.layer.5.") for k in report.unexpected)
    assert report.missing == ["seq_relationship.bias", "seq_relationship.weight"]
    # A bare BertModel directory (keys without "bert.") with a shape mismatch in the position table.
    bare = BertModel(tiny_text_config(max_position_embeddings=32).to_bert_config())
    bare.save_pretrained(tmp_path / "bare")
    report = load_bert_weights(model, tmp_path / "bare")
    assert report.mismatched and "position_embeddings" in report.mismatched[0]
    assert torch.equal(model.bert.encoder.layer[0].attention.self.query.weight,
                       bare.encoder.layer[0].attention.self.query.weight)
