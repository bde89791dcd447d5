"""The ``model.init`` chain (``convert.apply_init``) does what the official runners do after each load."""

from __future__ import annotations

import torch
from transformers import BertForPreTraining

from lfvila.config import InitStep, ModelConfig
from lfvila.models.factory import build_model


def test_bert_step_copies_the_loaded_position_embeddings_into_sent_embedding(tmp_path):
    """Official ``run_pretrain.py``: ``load_bert`` then ``model._init_sent_embedding()``, so the paragraph position
    table starts as BERT-large's, not as the random BERT's the model was built with."""
    plain = build_model(ModelConfig(name="lfvila-tiny"))
    torch.manual_seed(11)
    bert = BertForPreTraining(plain.text_encoder.bert.config).eval()
    bert.save_pretrained(tmp_path / "bert")
    before = plain.sent_embedding.position_embeddings.weight.clone()
    model = build_model(ModelConfig(name="lfvila-tiny", init=[InitStep("bert", str(tmp_path / "bert"))]))
    source = bert.bert.embeddings.position_embeddings.weight
    got = model.sent_embedding.position_embeddings.weight
    n = min(source.shape[0], got.shape[0])
    assert torch.equal(model.text_encoder.bert.embeddings.position_embeddings.weight, source)
    assert torch.equal(got[:n], source[:n]) and not torch.equal(got[:n], before[:n])
