"""LF-VILA task models: paragraph-to-video retrieval, How2QA multiple choice, ActivityNet-QA / VIOLIN classification,
long-form video classification (COIN, LVU).

Each is the pre-training model (``LFVILA``) with other heads, under the official parameter names of
``LFVILA_Retrieval``, ``LFVILA_QA_Multichoice``, ``LFVILA_QA_Classification`` and ``LFVILA_Video_Classification``, so
their checkpoints load without missing or unexpected keys:

    ``LFVILARetrieval``         dual encoder: ``video_encoder``, ``text_encoder`` (12 layers, ``cls`` +
                                ``seq_relationship`` kept, unused), ``{video,text}_global_proj``, ``sent_embedding``.
                                Loss: VPC only (global batch), the official fine-tuning loss.
    ``LFVILAForMultipleChoice``  ``video_encoder``, ``text_encoder`` (24 layers, ``classifier`` Linear(D, 1),
                                ``span_classifier`` Linear(D, 2)), ``sent_embedding``, ``video_token_pos``.
                                Each (question, answer_c, subtitles) text is fused with the video; loss
                                ``CE(choice logits) + span_weight * span_loss`` (``losses.span_loss``).
    ``LFVILAForClassification``  as above with ``classifier`` Linear(D, num_classes); loss CE with
                                ``label_smoothing``.
    ``LFVILAForVideoClassification``  video only (no text encoder is built): ``video_encoder``, ``video_global_proj``,
                                ``video_frame_proj`` (per-frame features, official, not in the loss), ``classifier``
                                Linear(E, num_classes) on the L2-normed global feature; loss CE.

Registered variants, by head (``registry`` lists them with the aliases that keep the old dataset names):
``lfvila-{base,tiny}-retrieval``, ``-multichoice``, ``-classification`` and ``-video-classification``. The two
classification heads take their class count from the config (``model.overrides.num_classes``: ActivityNet-QA 1654,
VIOLIN 2, COIN 180, LVU relationship 4 / scene 6 / way of speaking 5); built without one they raise naming that key.

To start a task from a pre-training checkpoint use ``convert.init_from_pretraining`` (it expects the heads the task
adds to be missing and the pre-training heads it drops to be unused).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import losses
from .pretraining import LFVILA, LFVILAConfig, init_projection, lfvila_base_config, lfvila_tiny_config
from .registry import register_alias, register_model

__all__ = ["LFVILAForClassification", "LFVILAForMultipleChoice", "LFVILAForVideoClassification", "LFVILARetrieval"]


def _require_num_classes(cfg: LFVILAConfig | None, cls: type) -> None:
    """A classification head needs its class count: the variants leave it unset (it is the dataset's)."""
    n = (cfg or LFVILAConfig()).num_classes
    if n < 1:
        raise ValueError(f"{cls.__name__}: num_classes is not set (got {n}): set model.overrides.num_classes in the "
                         "config (create_model(name, num_classes=N) in code), e.g. 1654 for ActivityNet-QA, 2 for "
                         "VIOLIN, 180 for COIN")


def _ce(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    return F.cross_entropy(logits.float(), labels, label_smoothing=label_smoothing)


class LFVILARetrieval(LFVILA):
    """Paragraph-to-video retrieval (official ``LFVILA_Retrieval``): VPC on the global features only.

    ``forward(video, ids, mask, real=None, distributed=None)`` -> ``loss`` (= ``vpc``), ``video`` (B, E) and ``text``
    (B, E) L2-normed embeddings (this rank's; eval builds the similarity matrix from them).
    """

    projections = ("global",)
    fusion = False

    def forward(self, video: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, real: torch.Tensor | None = None,
                distributed=None) -> dict[str, torch.Tensor]:
        v = self.encode_video(video)["global"]
        t = self.encode_text(ids, mask, real)["paragraph"]
        vpc = losses.vpc_loss(v, t, self.cfg.temperature, distributed=distributed, impl=self.cfg.loss_impl)
        return {"loss": vpc, "vpc": vpc, "video": v, "text": t}


class _FusionQA(LFVILA):
    fusion = True
    projections = ()

    def _fused(self, video: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, copies: int,
               real: torch.Tensor | None) -> torch.Tensor:
        """Text (N, M, L) with N = B * ``copies`` (copies of a sample contiguous) fused with its video -> fused states
        (N, 1 + M*L + T*P, D)."""
        tokens = self.encode_video(video)["tokens"]  # (B, T*P, D)
        t = self.encode_text(ids, mask, real)
        if copies > 1:
            tokens = tokens.repeat_interleave(copies, 0)
        return self.text_encoder.fuse(t["states"], t["mask"], tokens)


class LFVILAForMultipleChoice(_FusionQA):
    """How2QA (official ``LFVILA_QA_Multichoice``): one fused sequence per choice.

    ``forward(video, ids, mask, labels=None, span_labels=None, span_weights=None, real=None)`` with ``ids``/``mask``
    (B, C, M, L) (choice c: question, answer c, subtitles as M segments) -> ``logits`` (B, C), ``span_logits``
    (B, T, 2) (per-frame in-span, max over choices) and, with ``labels`` (B,), ``ce``; with ``span_labels`` /
    ``span_weights`` (B, T) (``losses.span_frame_labels``), ``span``; ``loss = ce + span_weight * span``.
    """

    text_head = "multichoice"

    def forward(self, video: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor | None = None,
                span_labels: torch.Tensor | None = None, span_weights: torch.Tensor | None = None,
                real: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        if ids.ndim != 4 or mask.shape != ids.shape:
            raise ValueError(f"ids and mask must both be (B, choices, M, L), got {tuple(ids.shape)} and "
                             f"{tuple(mask.shape)}")
        b, c, m, length = ids.shape
        flat_real = None if real is None else real.reshape(b * c, m)
        fused = self._fused(video, ids.reshape(b * c, m, length), mask.reshape(b * c, m, length), c, flat_real)
        num_frames = fused.shape[1] - (1 + m * length)
        num_frames //= self.text_encoder.config.patches_per_frame
        out = {"logits": self.text_encoder.choice_logits(fused, c),
               "span_logits": self.text_encoder.span_logits(fused, num_frames, c)}
        loss = None
        if labels is not None:
            out["ce"] = loss = _ce(out["logits"], labels)
        if span_labels is not None:
            if span_weights is None:
                raise ValueError("span_labels given without span_weights (see losses.span_frame_labels)")
            out["span"] = losses.span_loss(out["span_logits"], span_labels, span_weights)
            loss = self.cfg.span_weight * out["span"] if loss is None else loss + self.cfg.span_weight * out["span"]
        if loss is not None:
            out["loss"] = loss
        return out


class LFVILAForClassification(_FusionQA):
    """ActivityNet-QA (1654 answers) / VIOLIN (2) (official ``LFVILA_QA_Classification``).

    ``forward(video, ids, mask, labels=None, real=None)`` with ``ids``/``mask`` (B, M, L) -> ``logits``
    (B, num_classes) and, with ``labels`` (B,), ``loss`` (CE with ``label_smoothing``).
    """

    text_head = "classification"

    def __init__(self, cfg: LFVILAConfig | None = None):
        _require_num_classes(cfg, type(self))
        super().__init__(cfg)

    def forward(self, video: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor | None = None,
                real: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        fused = self._fused(video, ids, mask, 1, real)
        out = {"logits": self.text_encoder.class_logits(fused)}
        if labels is not None:
            out["loss"] = _ce(out["logits"], labels.reshape(-1), self.cfg.label_smoothing)
        return out


class LFVILAForVideoClassification(LFVILA):
    """Long-form video classification: COIN (180 tasks), LVU relationship (4), scene (6), way of speaking (5)
    (official ``LFVILA_Video_Classification``). Only the video side is built (``text_tower = False``).

    ``forward(video, labels=None)`` -> ``logits`` (B, num_classes) = ``classifier(global)``, ``global`` (B, E) the
    L2-normed ``encode_video(video)["global"]`` (the official path: final grid, ``MaxPool2d((2, 3), stride 1)``, mean
    over frames and patches, ``video_global_proj``, L2 norm), ``frames`` (B, T, E) the L2-normed
    ``video_frame_proj`` of each frame's mean pooled token (official output, not in the loss) and, with ``labels``
    (B,), ``loss`` (CE with ``label_smoothing``, 0 officially).
    """

    projections = ("global",)
    fusion = False
    text_tower = False

    def __init__(self, cfg: LFVILAConfig | None = None):
        _require_num_classes(cfg, type(self))
        super().__init__(cfg)
        dv, e = self.video_encoder.num_features, self.cfg.embed_dim
        self.video_frame_proj = init_projection(nn.Linear(dv, e), self.cfg.param_init)  # official: plain nn.Linear
        self.classifier = nn.Linear(e, self.cfg.num_classes)  # torch's default init, as the official nn.Linear

    def forward(self, video: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        v = self.encode_video(video)
        out = {"logits": self.classifier(v["global"]), "global": v["global"],
               "frames": F.normalize(self.video_frame_proj(v["pooled"].mean(2)), dim=-1)}
        if labels is not None:
            out["loss"] = _ce(out["logits"], labels.reshape(-1), self.cfg.label_smoothing)
        return out


def _qa(base, **overrides):
    def factory() -> LFVILAConfig:
        return dataclasses.replace(base(), stage=2, **overrides)
    return factory


def _video_cls(base):
    def factory() -> LFVILAConfig:
        return dataclasses.replace(base(), stage=1)
    return factory


# Variants by head (names: ``registry``); the class count of a classification head is a config value (num_classes).
# Long-form video classification starts from stage 1 (official coin_cls / lvu_*_cls.yaml: 32 frames = 4 clips x 8).
for _size, _base in (("base", lfvila_base_config), ("tiny", lfvila_tiny_config)):
    _what = "official" if _size == "base" else "tiny (tests, demo)"
    register_model(f"lfvila-{_size}-retrieval", _base, LFVILARetrieval,
                   f"{_what} paragraph-to-video retrieval (ActivityNet, DiDeMo, QuerYD, Condensed Movies)")
    register_model(f"lfvila-{_size}-multichoice", _qa(_base), LFVILAForMultipleChoice,
                   f"{_what} multiple-choice QA with the per-frame span loss (How2QA)")
    register_model(f"lfvila-{_size}-classification", _qa(_base), LFVILAForClassification,
                   f"{_what} QA as classification (ActivityNet-QA 1654, VIOLIN 2); set num_classes")
    register_model(f"lfvila-{_size}-video-classification", _video_cls(_base), LFVILAForVideoClassification,
                   f"{_what} long-form video classification (COIN 180, LVU 4 / 6 / 5); set num_classes")

# Aliases: the old dataset names, each a head with its dataset's class count.
register_alias("lfvila-base-how2qa", "lfvila-base-multichoice", "How2QA multiple choice")
register_alias("lfvila-base-actnet-qa", "lfvila-base-classification", "ActivityNet-QA, 1654 answer classes",
               num_classes=1654)
register_alias("lfvila-base-violin", "lfvila-base-classification", "VIOLIN, 2 classes", num_classes=2)
VIDEO_CLS_CLASSES = {"coin": 180, "lvu-relationship": 4, "lvu-scene": 6, "lvu-wayspeaking": 5}
for _dataset, _classes in VIDEO_CLS_CLASSES.items():
    for _size in ("base", "tiny"):
        register_alias(f"lfvila-{_size}-{_dataset}-cls", f"lfvila-{_size}-video-classification",
                       f"{_dataset} long-form video classification, {_classes} classes", num_classes=_classes)
