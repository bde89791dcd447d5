"""Checkpoint tests: the official key set (lfvila-base, as docs/official.md lists it, written out here independently),
official-format files into our models, task initialisation, errors that list keys, our save/load format."""

from __future__ import annotations

import json
import os

import pytest
import torch
from transformers import BertForPreTraining

from lfvila.models import convert as cv
from lfvila.models import create_model
from lfvila.models.convert import CheckpointError

B, M, L, T, H, W = 2, 4, 12, 8, 64, 96


# ------------------------------------------------------------------------------ the official key set, base size


def _official_base_keys(stage: int) -> dict[str, tuple[int, ...]]:
    """Official ``LFVILA_Pretrain`` keys and shapes (stage 1: 12 BERT layers; stage 2: 24 + ``video_token_pos``)."""
    keys: dict[str, tuple[int, ...]] = {}

    def ln(prefix, d):
        keys[f"{prefix}.weight"] = (d,)
        keys[f"{prefix}.bias"] = (d,)

    def linear(prefix, n_in, n_out, bias=True):
        keys[f"{prefix}.weight"] = (n_out, n_in)
        if bias:
            keys[f"{prefix}.bias"] = (n_out,)

    v = "video_encoder"
    keys[f"{v}.patch_embed.proj.weight"] = (128, 3, 1, 8, 8)
    keys[f"{v}.patch_embed.proj.bias"] = (128,)
    ln(f"{v}.patch_embed.norm", 128)
    dims, depths, heads = (128, 256, 512, 512, 512, 1024), (2, 2, 14, 2, 2, 2), (4, 8, 16, 16, 16, 32)
    wt = (2, 4, 8, 16, 16, 32)
    for i in range(6):
        d = dims[i]
        for j in range(depths[i]):
            p = f"{v}.layers.{i}.blocks.{j}"
            ln(f"{p}.norm1", d)
            linear(f"{p}.attn.qkv", d, 3 * d)
            linear(f"{p}.attn.proj", d, d)
            keys[f"{p}.attn.relative_position_bias_table"] = ((2 * wt[i] - 1) * 5 * 9, heads[i])
            keys[f"{p}.attn.relative_position_index"] = (wt[i] * 15, wt[i] * 15)
            ln(f"{p}.norm2", d)
            linear(f"{p}.mlp.fc1", d, 4 * d)
            linear(f"{p}.mlp.fc2", 4 * d, d)
        if i in (0, 1, 4):
            ln(f"{v}.layers.{i}.downsample.norm", 4 * d)
            linear(f"{v}.layers.{i}.downsample.reduction", 4 * d, 2 * d, bias=False)
    ln(f"{v}.norm", 1024)
    ln(f"{v}.norm_local", 1024)
    ln(f"{v}.local_feat_proj.norm", 2048)
    linear(f"{v}.local_feat_proj.reduction", 2048, 1024, bias=False)
    t = "text_encoder"
    keys[f"{t}.bert.embeddings.word_embeddings.weight"] = (30522, 1024)
    keys[f"{t}.bert.embeddings.position_embeddings.weight"] = (512, 1024)
    keys[f"{t}.bert.embeddings.token_type_embeddings.weight"] = (2, 1024)
    keys[f"{t}.bert.embeddings.position_ids"] = (1, 512)
    ln(f"{t}.bert.embeddings.LayerNorm", 1024)
    for i in range(12 if stage == 1 else 24):
        p = f"{t}.bert.encoder.layer.{i}"
        for name in ("query", "key", "value"):
            linear(f"{p}.attention.self.{name}", 1024, 1024)
        linear(f"{p}.attention.output.dense", 1024, 1024)
        ln(f"{p}.attention.output.LayerNorm", 1024)
        linear(f"{p}.intermediate.dense", 1024, 4096)
        linear(f"{p}.output.dense", 4096, 1024)
        ln(f"{p}.output.LayerNorm", 1024)
    linear(f"{t}.bert.pooler.dense", 1024, 1024)
    keys[f"{t}.cls.predictions.bias"] = (30522,)
    linear(f"{t}.cls.predictions.transform.dense", 1024, 1024)
    ln(f"{t}.cls.predictions.transform.LayerNorm", 1024)
    linear(f"{t}.cls.predictions.decoder", 1024, 30522)
    linear(f"{t}.seq_relationship", 1024, 2)
    for side in ("video", "text"):
        for kind in ("local", "global"):
            linear(f"{side}_{kind}_proj", 1024, 1024)
    keys["sent_embedding.position_embeddings.weight"] = (512, 1024)
    keys["sent_embedding.segment_embeddings.weight"] = (8, 1024)
    ln("sent_embedding.norm", 1024)
    keys["sent_embedding.position_ids"] = (1, 512)
    if stage == 2:
        keys["video_token_pos.s_pos_embed"] = (1, 1, 6, 1024)
        keys["video_token_pos.t_pos_embed"] = (1, 32, 1, 1024)
        ln("video_token_pos.norm", 1024)
    return keys


@pytest.mark.parametrize("stage", [1, 2])
def test_official_base_key_set_maps_exactly(stage):
    with torch.device("meta"):
        model = create_model("lfvila-base", stage=stage)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    official = _official_base_keys(stage)
    mapped = {}
    for key, shape in official.items():
        name = cv.official_key(key)
        if name is not None:
            mapped[name] = shape
    assert sorted(set(mapped) - set(ours)) == []  # nothing unexpected
    assert sorted(set(ours) - set(mapped)) == []  # nothing missing
    assert {k: v for k, v in ours.items()} == mapped  # every shape
    assert sum(v.numel() for k, v in model.video_encoder.named_parameters()) == 89_229_448


# ------------------------------------------------------------------------------ official files, tiny size


def _inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    video = torch.randn(B, 3, T, H, W, generator=g)
    ids = torch.randint(1, 128, (B, M, L), generator=g)
    mask = torch.ones(B, M, L, dtype=torch.long)
    mask[0, :, 9:] = 0
    mask[1, 3] = 0
    return video, ids * mask, mask


def _official_file(model, path, drop_decoder_bias=True):
    """What DeepSpeed's save_fp16_model writes for ``model``: flat fp16, the official extra buffers."""
    sd = {k: v.detach().clone().half() if v.is_floating_point() else v.clone() for k, v in model.state_dict().items()}
    n = model.sent_embedding.position_embeddings.num_embeddings
    sd["sent_embedding.position_ids"] = torch.arange(n)[None]
    sd["text_encoder.bert.embeddings.position_ids"] = torch.arange(n)[None]
    if drop_decoder_bias:  # HF marks it "missing ok"; official files may lack it
        sd.pop("text_encoder.cls.predictions.decoder.bias", None)
    torch.save(sd, path)
    return path


def _randomise(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05 + (1.0 if p.ndim == 1 and p.shape[0] > 1 else 0.0))
    return model


def _features(model, video, ids, mask):
    with torch.no_grad():
        v, t = model.encode_video(video), model.encode_text(ids, mask)
    return {**{f"v_{k}": x for k, x in v.items()}, **{f"t_{k}": x for k, x in t.items()}}


@pytest.mark.parametrize("stage", [1, 2])
def test_official_file_loads_strictly_and_reproduces_outputs(tmp_path, stage):
    torch.manual_seed(0)
    source = _randomise(create_model("lfvila-tiny", stage=stage, compat_official=True).eval(), 3)
    path = _official_file(source, tmp_path / "pytorch_model.bin")
    torch.manual_seed(1)
    model = create_model("lfvila-tiny", stage=stage, compat_official=True).eval()
    report = cv.load_checkpoint(model, path)
    assert report.unexpected == [] and report.mismatched == []
    assert set(report.dropped) >= {"sent_embedding.position_ids", "text_encoder.bert.embeddings.position_ids"}
    assert report.missing == []
    reference = source.half().float()  # the official weights are the fp16-rounded ones
    video, ids, mask = _inputs()
    got, want = _features(model, video, ids, mask), _features(reference, video, ids, mask)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0, msg=k)
    te = model.text_encoder
    assert te.cls.predictions.decoder.bias is te.cls.predictions.bias


def test_errors_list_offending_keys(tmp_path):
    torch.manual_seed(0)
    model = create_model("lfvila-tiny")
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    sd["video_encoder.layers.0.blocks.0.attn.qkv.weightX"] = sd.pop("video_encoder.layers.0.blocks.0.attn.qkv.weight")
    sd["text_global_proj.weight"] = torch.zeros(3, 3)
    sd["extra.thing"] = torch.zeros(1)
    index = "video_encoder.layers.1.blocks.0.attn.relative_position_index"
    sd[index] = sd[index].flip(0)
    with pytest.raises(CheckpointError) as err:
        cv.load_checkpoint(model, sd)
    msg = str(err.value)
    for needle in ("missing (1): video_encoder.layers.0.blocks.0.attn.qkv.weight",
                   "video_encoder.layers.0.blocks.0.attn.qkv.weightX", "extra.thing",
                   "text_global_proj.weight: (3, 3) vs (256, 256)", index):
        assert needle in msg, (needle, msg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = cv.load_checkpoint(model, sd, strict=False)  # non-strict: reported, the rest loads
    assert "extra.thing" in report.unexpected and len(report.mismatched) == 2
    assert torch.equal(model.state_dict()["text_global_proj.weight"], before["text_global_proj.weight"])


class _Evil:
    """An arbitrary object: a checkpoint holding one must not be unpickled."""


def test_unreadable_files_name_the_file(tmp_path):
    model = create_model("lfvila-tiny-video")
    truncated = tmp_path / "cut.bin"
    torch.save(model.state_dict(), truncated)
    truncated.write_bytes(truncated.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="cut.bin"):
        cv.read_state_dict(truncated)

    pickled = tmp_path / "evil.bin"
    torch.save({"w": torch.zeros(1), "obj": _Evil()}, pickled)
    with pytest.raises(CheckpointError, match="evil.bin"):  # weights_only refuses arbitrary objects
        cv.read_state_dict(pickled)
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        cv.read_state_dict(tmp_path / "absent.bin")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="bad.safetensors"):
        cv.read_state_dict(bad)


# ------------------------------------------------------------------------------ task models


def test_task_models_official_key_sets():
    torch.manual_seed(0)
    stage1 = set(create_model("lfvila-tiny").state_dict())
    retrieval = set(create_model("lfvila-tiny-retrieval").state_dict())
    assert retrieval == {k for k in stage1 if not k.startswith(("video_local_proj", "text_local_proj"))}
    stage2 = set(create_model("lfvila-tiny", stage=2).state_dict())
    mc = set(create_model("lfvila-tiny-multichoice").state_dict())
    common = {k for k in stage2 if not k.startswith(("text_encoder.cls.", "text_encoder.seq_relationship.",
                                                     "video_local", "text_local", "video_global", "text_global"))}
    assert mc - common == {f"text_encoder.{h}.{p}" for h in ("classifier", "span_classifier")
                           for p in ("weight", "bias")}
    assert common <= mc
    cl = set(create_model("lfvila-tiny-classification", num_classes=5).state_dict())
    assert cl - common == {"text_encoder.classifier.weight", "text_encoder.classifier.bias"}


def test_init_from_pretraining(tmp_path):
    torch.manual_seed(0)
    stage1 = _randomise(create_model("lfvila-tiny"), 4)
    stage2 = _randomise(create_model("lfvila-tiny", stage=2), 5)
    retrieval = create_model("lfvila-tiny-retrieval")
    report = cv.init_from_pretraining(retrieval, stage1.state_dict())
    assert report.missing == [] and set(report.unexpected) == {
        f"{s}_local_proj.{p}" for s in ("video", "text") for p in ("weight", "bias")}
    assert torch.equal(retrieval.text_global_proj.weight, stage1.text_global_proj.weight)
    cv.init_from_pretraining(create_model("lfvila-tiny-retrieval"), stage2.state_dict())  # fusion parts unused
    qa = create_model("lfvila-tiny-multichoice")
    report = cv.init_from_pretraining(qa, stage2.state_dict())
    assert report.missing == sorted(f"text_encoder.{h}.{p}" for h in ("classifier", "span_classifier")
                                    for p in ("bias", "weight"))
    assert torch.equal(qa.video_token_pos.t_pos_embed, stage2.video_token_pos.t_pos_embed)
    with pytest.raises(CheckpointError, match=r"missing .*text_encoder\.bert\.encoder\.layer\.4\."):
        cv.init_from_pretraining(create_model("lfvila-tiny-classification", num_classes=5), stage1.state_dict())
    # a segment table of another size: overlapping rows load, the others keep the model's (official rule)
    sd = dict(stage2.state_dict())
    sd["sent_embedding.segment_embeddings.weight"] = sd["sent_embedding.segment_embeddings.weight"][:3].clone()
    qa = create_model("lfvila-tiny-multichoice")
    keep = qa.sent_embedding.segment_embeddings.weight[3:].clone()
    cv.init_from_pretraining(qa, sd)
    assert torch.equal(qa.sent_embedding.segment_embeddings.weight[:3], sd["sent_embedding.segment_embeddings.weight"])
    assert torch.equal(qa.sent_embedding.segment_embeddings.weight[3:], keep)


def test_init_stage2_from_stage1_and_bert(tmp_path):
    torch.manual_seed(0)
    stage1 = _randomise(create_model("lfvila-tiny"), 6)
    model = create_model("lfvila-tiny", stage=2)
    bert = BertForPreTraining(model.text_encoder.config.to_bert_config())
    bert_report, report = cv.init_stage2(model, stage1.state_dict(), bert.state_dict())
    assert report.unexpected == []
    te = model.text_encoder
    first = te.config.stage1_layers
    for i in range(te.config.num_layers):  # layers < first from stage 1, the fusion layers from BERT
        src = stage1.text_encoder.bert.encoder.layer[i] if i < first else bert.bert.encoder.layer[i]
        got = te.bert.encoder.layer[i].attention.self.query.weight
        assert torch.equal(got, src.attention.self.query.weight), i
    words = stage1.text_encoder.bert.embeddings.word_embeddings.weight
    assert torch.equal(te.bert.embeddings.word_embeddings.weight, words)
    assert torch.equal(model.video_encoder.norm.weight, stage1.video_encoder.norm.weight)
    with pytest.raises(ValueError, match="stage-2"):
        cv.init_stage2(create_model("lfvila-tiny"), stage1.state_dict(), bert.state_dict())


# ------------------------------------------------------------------------------ our own format


@pytest.mark.parametrize("name,overrides", [("lfvila-tiny", {"stage": 2}),
                                            ("lfvila-tiny-classification", {"num_classes": 5}),
                                            ("lfvila-tiny-retrieval", {}), ("lfvila-tiny-video", {})])
def test_save_from_pretrained_round_trip(tmp_path, name, overrides):
    torch.manual_seed(0)
    model = _randomise(create_model(name, **overrides), 7).eval()
    out = cv.save_pretrained(model, tmp_path / "ckpt")
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
    meta = json.loads((out / "config.json").read_text())
    assert meta["class"] == type(model).__name__
    loaded = cv.from_pretrained(out).eval()
    assert type(loaded) is type(model) and loaded.cfg == model.cfg
    for (k, a), (k2, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k
    video = torch.randn(1, 3, T, H, W)
    with torch.no_grad():
        if name == "lfvila-tiny-video":
            torch.testing.assert_close(loaded(video).grid, model(video).grid, rtol=0, atol=0)
        else:
            torch.testing.assert_close(loaded.encode_video(video)["tokens"], model.encode_video(video)["tokens"],
                                       rtol=0, atol=0)


def test_save_is_atomic_and_replaces(tmp_path, monkeypatch):
    torch.manual_seed(0)
    first = create_model("lfvila-tiny-video")
    target = cv.save_pretrained(first, tmp_path / "ckpt")
    second = _randomise(create_model("lfvila-tiny-video"), 8)

    import safetensors.torch as st

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(st, "save_file", broken)  # the weights codec's writer (lfvila.models.weights)
    with pytest.raises(OSError, match="disk full"):
        cv.save_pretrained(second, target)
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]  # no temporary left behind
    torch.testing.assert_close(cv.from_pretrained(target).norm.weight, first.norm.weight)  # old one intact
    monkeypatch.undo()
    cv.save_pretrained(second, target)
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]
    torch.testing.assert_close(cv.from_pretrained(target).norm.weight, second.norm.weight)
    with pytest.raises(FileExistsError):
        cv.save_pretrained(second, target, overwrite=False)


def test_from_pretrained_errors(tmp_path):
    torch.manual_seed(0)
    target = cv.save_pretrained(create_model("lfvila-tiny-retrieval"), tmp_path / "ckpt")
    meta = json.loads((target / "config.json").read_text())
    meta["config"]["video"]["windw_size"] = [1, 2, 3]
    (target / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="windw_size"):
        cv.from_pretrained(target)
    target = cv.save_pretrained(create_model("lfvila-tiny-retrieval"), tmp_path / "ckpt")
    (target / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="model.safetensors"):
        cv.from_pretrained(target)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="config.json"):
        cv.from_pretrained(tmp_path / "empty")
    # weights of another variant under a valid config: every offending key is listed
    target = cv.save_pretrained(create_model("lfvila-tiny-retrieval"), tmp_path / "ckpt")
    other = cv.save_pretrained(create_model("lfvila-tiny"), tmp_path / "other")
    os.replace(other / "model.safetensors", target / "model.safetensors")
    with pytest.raises(CheckpointError, match="unexpected .*video_local_proj"):
        cv.from_pretrained(target)
