"""The weights codec shared by save_pretrained and the training checkpoints (``lfvila.models.weights``)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn

from lfvila.models import convert, create_model
from lfvila.models import weights as w


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 4)
        self.b = nn.Linear(3, 4)
        self.b.weight = self.a.weight


def test_tied_tensors_stored_once_and_read_back_under_every_name(tmp_path):
    m = Tied()
    tensors, aliases = w.storable(m.state_dict(), m)
    assert aliases == {"b.weight": "a.weight"} and set(tensors) == {"a.weight", "a.bias", "b.bias"}
    size = w.write_safetensors(tmp_path / "x.safetensors", tensors, aliases, {"format": "pt"})
    assert size == (tmp_path / "x.safetensors").stat().st_size
    back = w.read_state_dict(tmp_path / "x.safetensors")
    assert set(back) == set(m.state_dict()) and torch.equal(back["b.weight"], m.a.weight)


def test_save_pretrained_stores_the_tied_decoder_once_and_old_files_still_load(tmp_path):
    model = create_model("lfvila-tiny", stage=2)
    out = convert.save_pretrained(model, tmp_path / "new")
    tensors, meta = w.read_safetensors(out / "model.safetensors")
    assert json.loads(meta["aliases"]), "the tied decoder weight should be an alias"
    for k, v in model.state_dict().items():
        assert torch.equal(tensors[k], v), k
    # a directory written by safetensors' save_model (no aliases metadata), as earlier versions did
    from safetensors.torch import save_model

    old = tmp_path / "old"
    old.mkdir()
    (old / "config.json").write_text((out / "config.json").read_text())
    save_model(model, str(old / "model.safetensors"))
    loaded = convert.from_pretrained(old)
    for (k, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), k


def test_compare_keys_and_its_message():
    weights = {"a": torch.zeros(2), "b": torch.zeros(3), "x": torch.zeros(1)}
    target = {"a": torch.zeros(2), "b": torch.zeros(4), "c": torch.zeros(1)}
    missing, unexpected, mismatched = w.compare_keys(weights, target)
    assert (missing, unexpected, mismatched) == (["c"], ["x"], ["b: (3,) vs (4,)"])
    text = w.mismatch_message("f: does not fit", (("missing", missing), ("unexpected", unexpected), ("empty", [])))
    assert text == "f: does not fit\n  missing (1): c\n  unexpected (1): x"
    assert w.listing("k", [str(i) for i in range(20)]).endswith("(+8 more)")


def test_replace_dir_swaps_whole_directories(tmp_path):
    final, trash = tmp_path / "final", tmp_path / ".trash-final"
    for name, text in (("first", "1"), ("second", "2")):
        tmp = tmp_path / f".tmp-{name}"
        tmp.mkdir()
        (tmp / "f").write_text(text)
        w.replace_dir(tmp, final, trash)
        assert (final / "f").read_text() == text and not tmp.exists() and not trash.exists()


def test_unreadable_file_is_named(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(w.CheckpointError, match="bad.safetensors"):
        w.read_state_dict(bad)
