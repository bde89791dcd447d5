"""Checkpoints: official LF-VILA weights, Swin-2D inflation, BERT weights, and our own ``save_pretrained`` format.

Official checkpoints (``pytorch_model.bin`` from DeepSpeed's ``save_fp16_model``: a flat fp16 state dict, no
``module.`` prefix) use the official module names, which are ours too, so the key map is the identity except for:

    ============================================  ==========================================================
    official key                                  here
    ============================================  ==========================================================
    ``module.*`` (a DDP wrapper's prefix)         prefix stripped
    ``*.LayerNorm.gamma`` / ``.beta``             ``*.LayerNorm.weight`` / ``.bias`` (old BERT files)
    ``sent_embedding.position_ids``               dropped: a non-persistent buffer here (``arange``)
    ``text_encoder.bert.embeddings.position_ids``  dropped: non-persistent in transformers >= 4.31
    ``text_encoder.bert.embeddings.token_type_ids`` dropped: idem
    ``*.attn.relative_position_index``            not loaded: checked equal to ours (else an error naming it),
                                                  or replaced by ours under ``resize_windows`` (below)
    ``text_encoder.cls.predictions.decoder.bias`` optional: tied to ``cls.predictions.bias``
    ============================================  ==========================================================

Every other key must exist with the same shape: :func:`load_checkpoint` raises :class:`CheckpointError` listing every
missing, unexpected and mismatched key (strict by default). fp16 values are cast to the model's dtypes. A checkpoint
with other window sizes (another frame count) loads with ``resize_windows=True``: each bias table is resampled to the
model's window (``lfvila.models.window_resize``, the official ``change_window`` rule) and the model keeps its own
``relative_position_index``. The way back, our weights as an official file: :func:`official_state_dict`
(``lfvila.models.export_official``).

Which official file fits which class: ``lfvila_stage1.bin`` -> ``LFVILA`` with ``stage=1``; ``lfvila_stage2.bin`` ->
``stage=2``; fine-tuned retrieval checkpoints -> ``LFVILARetrieval``; How2QA -> ``LFVILAForMultipleChoice``;
ActivityNet-QA / VIOLIN -> ``LFVILAForClassification``; COIN / LVU video classification ->
``LFVILAForVideoClassification``. Build the model with ``compat_official=True`` to reproduce the
official forward with official weights (``docs/official.md``). Starting a task from a pre-training checkpoint is
:func:`init_from_pretraining` (the task's new heads may be missing, the pre-training heads it drops unused); stage 2
from stage 1 is :func:`init_stage2` (BERT-large first for the fusion layers, then the stage-1 weights over it, as the
official code does).

Our own format (:func:`save_pretrained` / :func:`from_pretrained`): a directory with ``config.json`` (the model class
and its config dataclass) and ``model.safetensors``, written to a temporary directory beside the target and renamed
into place, so an interrupted save never leaves a half-written checkpoint under the final name.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import tempfile
import typing
from pathlib import Path

import torch
import torch.nn as nn
from transformers import BertConfig

from lfvila.config import from_dict, to_dict

from .pretraining import LFVILA, LFVILAConfig
from .swin2d import inflate_swin2d, load_swin2d
from .tasks import LFVILAForClassification, LFVILAForMultipleChoice, LFVILAForVideoClassification, LFVILARetrieval
from .text_encoder import load_bert_weights
from .video_encoder import VideoEncoder, VideoEncoderConfig
from .weights import (
    CheckpointError,
    LoadReport,
    mismatch_message,
    read_state_dict,
    replace_dir,
    storable,
    write_file,
    write_safetensors,
)
from .window_resize import resize_bias_table, source_window, window_from_index

__all__ = [
    "CheckpointError",
    "LoadReport",
    "apply_init",
    "from_pretrained",
    "inflate_swin2d",
    "init_from_pretraining",
    "init_stage2",
    "load_bert_weights",
    "load_checkpoint",
    "load_stage1",
    "load_swin2d",
    "official_key",
    "official_state_dict",
    "read_state_dict",
    "save_pretrained",
]



def _positions(table: str):
    """The official ``position_ids`` buffer ``(1, P)`` beside position table ``table`` ``(P, C)`` of a state dict."""
    return lambda state: (torch.arange(state[table].shape[0])[None] if table in state else None)


# Official keys that are no state here (the rows "dropped" of the module table). Value: the official value, built from
# our state dict (None where our model lacks the owning module), for :func:`official_state_dict`; None for a key the
# official files do not hold either (non-persistent there too).
_DROPPED = {
    "sent_embedding.position_ids": _positions("sent_embedding.position_embeddings.weight"),
    "text_encoder.bert.embeddings.position_ids": _positions("text_encoder.bert.embeddings.position_embeddings.weight"),
    "text_encoder.bert.embeddings.token_type_ids": None,  # non-persistent in the official bert.py too
}
_TIED = {"text_encoder.cls.predictions.decoder.bias": "text_encoder.cls.predictions.bias"}


def official_key(key: str) -> str | None:
    """The name in our models of official key ``key``; None for keys dropped on purpose (see the module table)."""
    if key.startswith("module."):
        key = key[len("module."):]
    if key in _DROPPED:
        return None
    if key.endswith(".gamma") and "LayerNorm" in key:
        key = key[: -len(".gamma")] + ".weight"
    elif key.endswith(".beta") and "LayerNorm" in key:
        key = key[: -len(".beta")] + ".bias"
    return key


def official_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of :func:`official_key`: our state dict ``state`` (our names, ``model.state_dict()`` or a
    ``model.safetensors``) as the official model's, key for key, plus the official buffers we do not keep (the
    ``position_ids`` of the dropped rows of the module table, rebuilt from their position tables). Our names are the
    official ones (the renames of :func:`official_key` only read other spellings), which is checked key by key."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key in _DROPPED:
            continue  # rebuilt below, as the official model holds it
        if official_key(key) != key:
            raise CheckpointError(f"{key}: not one of our state-dict names (it reads as {official_key(key)!r}); "
                                  "strip wrapper prefixes first")
        out[key] = value
    for key, build in _DROPPED.items():
        value = build(state) if build is not None else None
        if value is not None:
            out[key] = value
    return out


def _matches(key: str, patterns) -> bool:
    """``patterns``: regular expressions (``re.search``) or predicates ``key -> bool``."""
    return any(p(key) if callable(p) else re.search(p, key) for p in patterns)


def load_checkpoint(model: nn.Module, src, *, strict: bool = True, allow_missing=(), allow_unexpected=(),
                    resize_segments: bool = False, resize_windows: bool = False) -> LoadReport:
    """Load an official LF-VILA checkpoint (or any state dict with our names) into ``model``.

    ``src``: a state dict, a file (``.bin``/``.pt``/``.pth`` read with ``weights_only=True``, or ``.safetensors``) or a
    directory (``read_state_dict``). Keys go through :func:`official_key`. ``allow_missing`` / ``allow_unexpected``
    are regular expressions (``re.search``) of model keys that may stay at their init / source keys that may go
    unused. With ``strict`` any other missing or unexpected key, any shape mismatch, and any
    ``relative_position_index`` that differs from the model's raise :class:`CheckpointError` listing them all; without
    it they are only reported. Patterns may also be predicates ``key -> bool``. ``resize_segments``: a
    ``sent_embedding.segment_embeddings.weight`` with another number of rows loads its overlapping rows and keeps the
    model's others (the official loader's rule). ``resize_windows``: a checkpoint written with other window sizes
    (another frame count) loads: each ``relative_position_bias_table`` whose window (read from the checkpoint's
    ``relative_position_index``, else the official rule's) differs from the model's is resampled to the model's window
    (:func:`lfvila.models.window_resize.resize_bias_table`, the official ``change_window`` rule), the model keeps its
    own ``relative_position_index``, and ``LoadReport.resized`` lists the tables; without it a differing index is an
    error naming this switch.
    """
    where = src if isinstance(src, (str, os.PathLike)) else "<state dict>"
    raw = read_state_dict(src)
    target = model.state_dict()
    to_load: dict[str, torch.Tensor] = {}
    unexpected, mismatched, dropped, bad_index, resized = [], [], [], [], []
    seen = set()  # model keys the checkpoint has, loadable or not (a mismatch is not also "missing")
    for key, value in raw.items():
        name = official_key(key)
        if name is None:
            dropped.append(key)
            continue
        if name not in target:
            unexpected.append(key)
            continue
        want = target[name]
        seen.add(name)
        if name.endswith("relative_position_index"):
            same = tuple(value.shape) == tuple(want.shape) and torch.equal(value.to(want.dtype), want)
            (dropped if same or resize_windows else bad_index).append(key)
            continue
        if resize_windows and name.endswith("relative_position_bias_table"):
            table = _resized_table(key, value, raw, target, name)
            if table is not None:
                to_load[name] = table.to(want.dtype)
                resized.append(key)
                continue
        if tuple(value.shape) != tuple(want.shape):
            if (resize_segments and name == "sent_embedding.segment_embeddings.weight"
                    and value.shape[1:] == want.shape[1:]):
                merged = want.clone()
                n = min(value.shape[0], want.shape[0])
                merged[:n] = value[:n].to(want.dtype)
                to_load[name] = merged
                continue
            mismatched.append(f"{key}: {tuple(value.shape)} vs {tuple(want.shape)}")
            continue
        to_load[name] = value.to(want.dtype)
    for tied, source in _TIED.items():  # a tied key is satisfied by its source
        if tied in target and tied not in to_load and source in to_load:
            to_load[tied] = to_load[source]
    missing = sorted(k for k in target
                     if k not in to_load and k not in seen and not k.endswith("relative_position_index"))
    bad_missing = [k for k in missing if not _matches(k, allow_missing)]
    bad_unexpected = [k for k in sorted(unexpected) if not _matches(official_key(k) or k, allow_unexpected)]
    if strict and (bad_missing or bad_unexpected or mismatched or bad_index):
        raise CheckpointError(mismatch_message(f"{where}: checkpoint does not fit {type(model).__name__}", (
            ("missing", bad_missing), ("unexpected", bad_unexpected),
            ("shape mismatch (checkpoint vs model)", mismatched),
            ("relative_position_index differs (other window size: load with resize_windows=True)", bad_index))))
    model.load_state_dict(to_load, strict=False)
    if hasattr(model, "text_encoder"):
        model.text_encoder.tie_weights()
    return LoadReport(sorted(to_load), missing, sorted(unexpected), sorted(mismatched + bad_index), sorted(dropped),
                      sorted(resized))


def _resized_table(key: str, value: torch.Tensor, raw: dict, target: dict, name: str) -> torch.Tensor | None:
    """Checkpoint bias table ``value`` (source key ``key``, model key ``name``) resampled to the model's window;
    None when the windows agree or the heads differ (then the ordinary shape check applies)."""
    want = target[name]
    index_name = name[: -len("relative_position_bias_table")] + "relative_position_index"
    if value.ndim != 2 or value.shape[1] != want.shape[1] or index_name not in target:
        return None
    new = window_from_index(target[index_name], want.shape[0])
    if new is None:
        raise CheckpointError(f"{index_name}: the model's index fits no window with a {want.shape[0]}-row table")
    src_index = raw.get(key[: -len("relative_position_bias_table")] + "relative_position_index")
    try:
        old = source_window(value.shape[0], new, src_index)
    except ValueError as e:
        raise CheckpointError(f"{key}: cannot resize to window {new}: {e}") from e
    return None if old == new else resize_bias_table(value, old, new)


_LAYER = re.compile(r"^text_encoder\.bert\.encoder\.layer\.(\d+)\.")


def _layers_from(first: int):
    """A key predicate: BERT layer ``i >= first`` (``text_encoder.bert.encoder.layer.{i}.*``)."""
    def match(key: str) -> bool:
        m = _LAYER.match(key)
        return m is not None and int(m.group(1)) >= first
    return match


def _pretraining_allowances(model: nn.Module) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(may be missing, may be unused) when ``model`` starts from a pre-training checkpoint."""
    heads = r"^text_encoder\.(cls|seq_relationship)\."
    projections = r"^(video|text)_(local|global)_proj\."
    if isinstance(model, LFVILARetrieval):  # from stage 1 (or 2): drops the local projections and any fusion part
        n = model.text_encoder.config.num_layers
        return (), (r"^(video|text)_local_proj\.", r"^video_token_pos\.", _layers_from(n))
    if isinstance(model, (LFVILAForMultipleChoice, LFVILAForClassification)):  # from stage 2
        return (r"^text_encoder\.(classifier|span_classifier)\.",), (heads, projections)
    if isinstance(model, LFVILAForVideoClassification):  # from stage 1 (or 2): the video side only
        return (r"^(classifier|video_frame_proj)\.",), (r"^text_", r"^sent_embedding\.", r"^video_local_proj\.",
                                                        r"^video_token_pos\.")
    if isinstance(model, LFVILA):
        return (), ()
    raise TypeError(f"init_from_pretraining does not know {type(model).__name__}")


def init_from_pretraining(model: nn.Module, src, *, allow_missing=(), allow_unexpected=(),
                          resize_windows: bool = False) -> LoadReport:
    """Initialise a task model from a pre-training checkpoint (official ``lfvila_stage1.bin`` / ``lfvila_stage2.bin``
    or ours): strict except that the task's new heads may be missing (QA ``classifier`` / ``span_classifier``; video
    classification ``classifier``, ``video_frame_proj``) and the pre-training parts it does not have may be unused
    (retrieval: local projections, fusion layers; QA: MLM / VTM heads and projections; video classification: the
    whole text side and the local video projection). A segment table of another size loads its overlapping rows.
    More patterns can be added; ``resize_windows`` as in :func:`load_checkpoint`."""
    missing, unused = _pretraining_allowances(model)
    return load_checkpoint(model, src, allow_missing=missing + tuple(allow_missing),
                           allow_unexpected=unused + tuple(allow_unexpected), resize_segments=True,
                           resize_windows=resize_windows)


def init_stage2(model: LFVILA, stage1, bert) -> tuple[LoadReport, LoadReport]:
    """Stage-2 initialisation as the official code: BERT weights (``bert``: bert-large-uncased directory, file or
    state dict) into ``model.text_encoder`` (they supply the fusion layers, the pooler and the MLM head), then the
    stage-1 checkpoint over everything it has (missing: the fusion layers, ``video_token_pos``, the VTM head)."""
    if not getattr(model, "has_fusion", False):
        raise ValueError("init_stage2 needs a stage-2 model (LFVILA with stage=2)")
    bert_report = load_bert_weights(model.text_encoder, bert)
    return bert_report, load_stage1(model, stage1)


def load_stage1(model: LFVILA, src, *, resize_windows: bool = False) -> LoadReport:
    """A stage-1 checkpoint into a stage-2 model: strict, except that the parts stage 1 does not have (the fusion
    layers, ``video_token_pos``, the pooler and the MLM / VTM heads) may be missing; load BERT weights first for
    those (:func:`init_stage2`). ``resize_windows`` as in :func:`load_checkpoint`."""
    first = model.text_encoder.config.stage1_layers
    allow = (_layers_from(first), r"^video_token_pos\.", r"^text_encoder\.seq_relationship\.",
             r"^text_encoder\.bert\.pooler\.", r"^text_encoder\.cls\.")
    return load_checkpoint(model, src, allow_missing=allow, resize_windows=resize_windows)


# ------------------------------------------------------------------------------------------ our own format

MODEL_CLASSES: dict[str, tuple[type[nn.Module], type]] = {
    "LFVILA": (LFVILA, LFVILAConfig),
    "LFVILARetrieval": (LFVILARetrieval, LFVILAConfig),
    "LFVILAForMultipleChoice": (LFVILAForMultipleChoice, LFVILAConfig),
    "LFVILAForClassification": (LFVILAForClassification, LFVILAConfig),
    "LFVILAForVideoClassification": (LFVILAForVideoClassification, LFVILAConfig),
    "VideoEncoder": (VideoEncoder, VideoEncoderConfig),
}
FORMAT_VERSION = 1


def apply_init(model: nn.Module, steps) -> None:
    """Run the init chain ``steps`` (``lfvila.config.InitStep``: ``kind``, ``path``) on ``model``, in order:
    ``swin2d`` (an ImageNet Swin-2D, inflated into the video encoder), ``bert`` (BERT weights into the text encoder,
    then its position embeddings copied into ``sent_embedding``, as the official ``_init_sent_embedding`` does),
    ``checkpoint`` (a strict full load), ``pretraining`` (a task from a pre-training checkpoint: new heads may be
    missing, unused heads dropped), ``stage1`` (stage-1 weights over a stage-2 model), ``pretrained`` (a
    ``save_pretrained`` directory or its weights file). A step's ``resize_windows: true`` lets the last four load a
    checkpoint of other window sizes (:func:`load_checkpoint`)."""
    for step in steps:
        resize = getattr(step, "resize_windows", False)
        if resize and step.kind in ("swin2d", "bert"):
            raise ValueError(f"model.init: resize_windows applies to checkpoint, pretraining, stage1 and pretrained "
                             f"steps, not {step.kind}")
        if step.kind == "swin2d":
            load_swin2d(model.video_encoder, step.path)
        elif step.kind == "bert":
            load_bert_weights(model.text_encoder, step.path)
            if hasattr(model, "sent_embedding"):  # the official _init_sent_embedding, right after the BERT weights
                model.sent_embedding.init_from_bert(model.text_encoder.bert)
        elif step.kind == "checkpoint":
            load_checkpoint(model, step.path, resize_windows=resize)
        elif step.kind == "pretraining":
            init_from_pretraining(model, step.path, resize_windows=resize)
        elif step.kind == "stage1":
            load_stage1(model, step.path, resize_windows=resize)
        elif step.kind == "pretrained":
            path = Path(step.path)
            load_checkpoint(model, path / "model.safetensors" if path.is_dir() else path, resize_windows=resize)
        else:
            raise ValueError(f"model.init: unknown kind {step.kind!r}")


def _encode_bert(v):
    return {"__bert_config__": v.to_dict()} if isinstance(v, BertConfig) else NotImplemented


def _tuples(v):
    return tuple(_tuples(x) for x in v) if isinstance(v, list) else v


def _decode_model_value(v, hint):
    """``config.json`` values that JSON cannot tell apart: a BertConfig, and the tuples inside free-form dict fields
    (``VideoEncoderConfig.extra``), which JSON stores as lists."""
    if isinstance(v, dict) and "__bert_config__" in v:
        return BertConfig.from_dict(v["__bert_config__"])
    if (hint is dict or typing.get_origin(hint) is dict) and isinstance(v, dict):
        return {k: _tuples(x) for k, x in v.items()}
    return NotImplemented


def config_to_dict(cfg) -> dict:
    """A model config dataclass -> JSON-ready dict (``lfvila.config.to_dict``; a transformers ``BertConfig`` as
    ``{"__bert_config__": its dict}``)."""
    return to_dict(cfg, encode=_encode_bert)


def config_from_dict(cls: type, data: dict, where: str = "config"):
    """Inverse of :func:`config_to_dict` for dataclass ``cls`` (``lfvila.config.from_dict``: every value checked
    against its field's type; unknown keys and wrong types raise a ValueError naming the key)."""
    return from_dict(cls, data, where, decode=_decode_model_value)


def save_pretrained(model: nn.Module, directory, *, overwrite: bool = True) -> Path:
    """Write ``model`` as ``directory/config.json`` + ``directory/model.safetensors`` (tied weights stored once,
    ``lfvila.models.weights``), atomically: built in a temporary sibling directory, each file fsynced, then renamed
    over ``directory`` (``weights.replace_dir``). Returns the path."""
    name = type(model).__name__
    if name not in MODEL_CLASSES:
        raise TypeError(f"save_pretrained supports {sorted(MODEL_CLASSES)}, not {name}")
    target = Path(directory)
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} exists (pass overwrite=True to replace it)")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        meta = {"format": "lfvila", "format_version": FORMAT_VERSION, "class": name,
                "config": config_to_dict(model.cfg)}
        text = json.dumps(meta, indent=2, sort_keys=True)
        write_file(tmp / "config.json", lambda p: p.write_text(text))
        tensors, aliases = storable(model.state_dict(), model)
        write_safetensors(tmp / "model.safetensors", tensors, aliases, {"format": "pt", "class": name})
        replace_dir(tmp, target, target.with_name(f".{target.name}.old-{os.getpid()}"))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def from_pretrained(directory, *, resize_windows: bool = False, **overrides) -> nn.Module:
    """Rebuild a model written by :func:`save_pretrained` (config overrides allowed, e.g. ``attn_impl`` through
    ``video=...``, or ``compat_official=True``) and load its weights strictly. ``model.safetensors`` is read by
    safetensors; a ``pytorch_model.bin`` in its place is read with ``weights_only=True``. ``resize_windows=True`` with
    other ``window_size`` overrides (more frames) resamples the bias tables (:func:`load_checkpoint`)."""
    path = Path(directory)
    model_cls, cfg = read_pretrained_config(path)
    if overrides:
        cfg = dataclasses.replace(cfg, **overrides)
    model = model_cls(cfg)
    load_checkpoint(model, path, resize_windows=resize_windows)
    return model


def read_pretrained_config(directory) -> tuple[type[nn.Module], typing.Any]:
    """``(model class, config dataclass)`` of the ``config.json`` of a :func:`save_pretrained` directory; a file that
    cannot be read or is no lfvila model config raises :class:`CheckpointError` naming it."""
    config_file = Path(directory) / "config.json"
    try:
        with open(config_file) as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{config_file}: cannot read the model config ({type(e).__name__}: {e})") from e
    if meta.get("format") != "lfvila" or meta.get("class") not in MODEL_CLASSES:
        raise CheckpointError(f"{config_file}: not an lfvila checkpoint config (format={meta.get('format')!r}, "
                              f"class={meta.get('class')!r}; known classes {sorted(MODEL_CLASSES)})")
    model_cls, cfg_cls = MODEL_CLASSES[meta["class"]]
    try:
        cfg = config_from_dict(cfg_cls, meta["config"], f"{config_file}:config")
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{config_file}: {e}") from e
    return model_cls, cfg
