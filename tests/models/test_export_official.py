"""Export to the official flat ``.bin`` state dict (``lfvila.models.export_official``): the round trip through our
strict loader, the official key names (``docs/official.md`` section 8; the base key set of ``test_convert``), dtypes,
the atomic write and the command line."""

from __future__ import annotations

import os

import pytest
import torch

from lfvila.models import convert as cv
from lfvila.models import create_model
from lfvila.models import export_official as ex
from lfvila.models.convert import CheckpointError
from tests.models.test_convert import _official_base_keys, _randomise

# Official names (docs/official.md section 8, the official bert.py / video_encoder.py / lfvila_pretrain.py buffers).
KNOWN = ("video_encoder.patch_embed.proj.weight", "video_encoder.layers.0.blocks.1.attn.relative_position_bias_table",
         "video_encoder.layers.2.blocks.0.attn.relative_position_index",
         "video_encoder.local_feat_proj.reduction.weight",
         "text_encoder.bert.embeddings.position_ids", "text_encoder.bert.encoder.layer.0.attention.self.query.weight",
         "text_encoder.bert.encoder.layer.0.attention.output.LayerNorm.weight", "text_encoder.cls.predictions.bias",
         "text_encoder.cls.predictions.decoder.bias", "sent_embedding.position_ids",
         "sent_embedding.segment_embeddings.weight", "video_token_pos.t_pos_embed", "video_global_proj.weight")


@pytest.fixture(scope="module")
def stage2(tmp_path_factory):
    torch.manual_seed(0)
    model = _randomise(create_model("lfvila-tiny", stage=2), 5).eval()
    return model, cv.save_pretrained(model, tmp_path_factory.mktemp("export") / "stage2")


def _fresh(seed):
    torch.manual_seed(seed)
    return create_model("lfvila-tiny", stage=2)


def test_round_trip_through_the_strict_loader_is_bitwise(stage2, tmp_path):
    model, src = stage2
    out = ex.export_official(src, tmp_path / "pytorch_model.bin")
    sd = torch.load(out, map_location="cpu", weights_only=True)
    for key in KNOWN:
        assert key in sd, key
    n = model.sent_embedding.position_embeddings.num_embeddings
    assert torch.equal(sd["sent_embedding.position_ids"], torch.arange(n)[None])
    assert sd["text_encoder.bert.embeddings.position_ids"].dtype == torch.int64
    assert "text_encoder.bert.embeddings.token_type_ids" not in sd  # non-persistent in the official model too
    fresh = _fresh(1)
    report = cv.load_checkpoint(fresh, out, strict=True)
    assert report.missing == [] and report.unexpected == [] and report.mismatched == [] and report.resized == []
    assert {"sent_embedding.position_ids", "text_encoder.bert.embeddings.position_ids"} <= set(report.dropped)
    want, got = model.state_dict(), fresh.state_dict()
    assert set(got) == set(want)
    for key, value in want.items():
        assert got[key].dtype == value.dtype and torch.equal(got[key], value), key
    te = fresh.text_encoder
    assert te.cls.predictions.decoder.bias is te.cls.predictions.bias


@pytest.mark.parametrize("stage", [1, 2])
def test_base_key_set_is_the_official_one(stage):
    with torch.device("meta"):
        model = create_model("lfvila-base", stage=stage)
    keys = {k: tuple(v.shape) for k, v in cv.official_state_dict(model.state_dict()).items()}
    assert keys == _official_base_keys(stage)


def test_fp16_export_and_a_training_checkpoint(stage2, tmp_path):
    from train.checkpoint import save_checkpoint

    model, _ = stage2
    step = save_checkpoint(tmp_path / "run", 7, model=model)
    out = ex.export_official(step, tmp_path / "half.bin", dtype="fp16")
    sd = torch.load(out, map_location="cpu", weights_only=True)
    assert {v.dtype for v in sd.values() if v.is_floating_point()} == {torch.float16}
    assert sd["video_encoder.layers.0.blocks.0.attn.relative_position_index"].dtype == torch.int64
    fresh = _fresh(2)
    cv.load_checkpoint(fresh, out, strict=True)
    for key, value in model.state_dict().items():
        want = value.half().to(value.dtype) if value.is_floating_point() else value
        assert torch.equal(fresh.state_dict()[key], want), key


def test_prefixes_are_stripped_and_foreign_names_refused(stage2):
    model, _ = stage2
    wrapped = {f"module._orig_mod.{k}": v for k, v in model.state_dict().items()}
    assert set(ex.official_checkpoint(wrapped)) == set(ex.official_checkpoint(model))
    with pytest.raises(CheckpointError, match="not one of our state-dict names"):
        cv.official_state_dict({"module.norm.weight": torch.ones(2)})
    with pytest.raises(ValueError, match="dtype must be one of"):
        ex.official_checkpoint(model, dtype="bf16")


def test_weights_that_do_not_fit_their_config_are_refused(tmp_path):
    video = cv.save_pretrained(create_model("lfvila-tiny-video"), tmp_path / "video")
    other = create_model("lfvila-tiny-video", embed_dim=16)
    cv.save_pretrained(other, tmp_path / "other")
    os.replace(tmp_path / "other" / "model.safetensors", video / "model.safetensors")
    with pytest.raises(CheckpointError, match="do not fit its config.json"):
        ex.official_checkpoint(video)


def test_write_is_atomic_and_does_not_overwrite_by_default(stage2, tmp_path, monkeypatch):
    model, src = stage2
    out = tmp_path / "model.bin"
    out.write_bytes(b"old")
    with pytest.raises(FileExistsError, match="overwrite"):
        ex.export_official(src, out)

    def broken_save(obj, path):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(ex.torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        ex.export_official(src, out, overwrite=True)
    assert out.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["model.bin"]


def test_command_line(stage2, tmp_path, capsys):
    _, src = stage2
    out = tmp_path / "cli.bin"
    assert ex.main([str(src), str(out), "--dtype", "fp16"]) == 0
    assert "wrote" in capsys.readouterr().out
    assert torch.load(out, map_location="cpu", weights_only=True)["video_global_proj.weight"].dtype == torch.float16
    assert ex.main([str(src), str(out)]) == 1  # exists, no --overwrite
    assert "exists" in capsys.readouterr().err
    assert ex.main([str(src), str(out), "--overwrite"]) == 0
