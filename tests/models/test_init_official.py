"""The initialisation of the modules LF-VILA adds to Swin + BERT (docs/official.md M9, M10): ``param_init="official"``
(default: ``nn.Linear`` / ``nn.Embedding`` defaults, as the official code) and ``param_init="bert"`` (N(0, 0.02))."""

import math

import pytest
import torch

from lfvila.models import create_model
from lfvila.models.pretraining import LFVILAConfig
from lfvila.models.text_encoder import SentEmbedding

PROJ = ("video_local_proj", "text_local_proj", "video_global_proj", "text_global_proj")


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    official = create_model("lfvila-tiny")
    torch.manual_seed(0)
    return official, create_model("lfvila-tiny", param_init="bert")


def test_official_init_is_the_default(models):
    model = models[0]
    assert LFVILAConfig().param_init == model.cfg.param_init == "official"
    seg = model.sent_embedding.segment_embeddings.weight  # (8, 256): nn.Embedding's N(0, 1)
    assert 0.9 < seg.std().item() < 1.1 and abs(seg.mean().item()) < 0.1
    for name in PROJ:
        proj = getattr(model, name)
        bound = 1 / math.sqrt(proj.in_features)  # kaiming_uniform_(a=sqrt(5)) and the bias rule: U(-bound, bound)
        w, b = proj.weight.detach(), proj.bias.detach()
        assert w.abs().max() <= bound and b.abs().max() <= bound, name
        assert abs(w.std().item() / (bound / math.sqrt(3)) - 1) < 0.05, name  # the std of U(-bound, bound)
        assert (b != 0).all() and b.std().item() > bound / 3, name
    # the position table is BERT's, copied (official _init_sent_embedding)
    bert_pos = model.text_encoder.bert.embeddings.position_embeddings.weight
    assert torch.equal(model.sent_embedding.position_embeddings.weight, bert_pos)


def test_bert_init_switch(models):
    model = models[1]
    seg = model.sent_embedding.segment_embeddings.weight
    assert 0.015 < seg.std().item() < 0.025
    for name in PROJ:
        proj = getattr(model, name)
        assert abs(proj.weight.std().item() / 0.02 - 1) < 0.05, name
        assert not proj.bias.any(), name
    # only the added modules differ: the encoders are initialised alike
    a, b = (dict(m.named_parameters()) for m in models)
    same = [n for n in a if n.startswith(("video_encoder.", "text_encoder."))]
    assert same and all(torch.equal(a[n], b[n]) for n in same)


def test_sent_embedding_init_rules():
    torch.manual_seed(0)
    official = SentEmbedding(64, 128, 8)
    bert = SentEmbedding(64, 128, 8, init="bert")
    assert 0.9 < official.position_embeddings.weight.std().item() < 1.1
    assert 0.015 < bert.position_embeddings.weight.std().item() < 0.025
    with pytest.raises(ValueError, match="init"):
        SentEmbedding(64, 128, 8, init="xavier")


def test_unknown_param_init_raises():
    with pytest.raises(ValueError, match="param_init"):
        LFVILAConfig(param_init="xavier")
