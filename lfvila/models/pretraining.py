"""The full LF-VILA pre-training model: video encoder + split BERT + projections + stage-1 / stage-2 losses.

Structure (official numbers: ``docs/official.md``; D = 1024, M = 4 clips / sentences, T = 32):

    video --VideoEncoder--> grid (B, T, 3, 5, D) [final, after ``norm``], local (B, T, 3, 5, D) [intra-clip branch]
    pooled = per-frame 2 x 3 max-pool (``pool_video_tokens``)                  (B, T, 6, D)
    clip feature   = mean over the T/M frames and 6 patches of each clip   (B, M, D)  (official downsample_video_embd)
    video global   = norm(video_global_proj(mean over clips of the *grid* clip features))   (B, D)   -> VPC
    video clips    = norm(video_local_proj(clip features of the *local* branch))            (B, M, D) -> MTC
    fusion tokens  = video_token_pos(pooled grid) (stage 2; plain flatten in stage 1)        (B, T*6, D)

    ids (B, M, L) --text_encoder layers [0, 8)--> sentence states; sentence [CLS] --text_local_proj, norm--> (B, M, D)
    --sent_embedding + paragraph [CLS] + layers [8, 12)--> paragraph states; [CLS] --text_global_proj, norm--> (B, D)

Which video features feed MTC: by default the clip features are pooled from ``VideoEncoderOutput.local`` (the
intra-clip branch ``local_feat_proj`` + ``norm_local`` on the last layer whose temporal window fits one clip), as the
paper intends. ``compat_official=True`` reproduces the official bug (the local feature is the final grid): clips and
global are then both pooled from ``grid``, and ``local_feat_proj`` / ``norm_local`` get no gradient. The global (VPC)
feature always comes from the final grid. ``compat_official`` is also passed to the video encoder, the text encoder
(paragraph [CLS] over padded sentences too) and the MTC / VTM sampling.

Module names are the official top-level ones (``video_encoder``, ``text_encoder``, ``video_local_proj``,
``text_local_proj``, ``video_global_proj``, ``text_global_proj``, ``sent_embedding``, ``video_token_pos`` (stage 2
only)), so an official ``pytorch_model.bin`` maps by prefix (drop ``sent_embedding.position_ids``: non-persistent
here).

Registered variants (importing this module registers them; names and aliases: ``registry``):
    ``lfvila-base``: official sizes (video encoder ``lfvila-base-video``, BERT-large split 8/12/24, D = 1024).
    ``lfvila-tiny``: the ``lfvila-tiny-video`` video encoder (final width 256) with a tiny BERT of hidden 256
        (4 heads, FFN 512, layers 2/4/6, vocab 128, 4 sentences x 12 tokens, 8 frames); intended input 8 x 64 x 96,
        i.e. 4 clips of 2 frames.
    Aliases: ``lfvila-base-model`` -> ``lfvila-base``, ``lfvila-tiny-model`` -> ``lfvila-tiny`` (the old names).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import losses
from .registry import _tiny_video_config, register_alias, register_model
from .text_encoder import (
    SentEmbedding,
    SplitBertTextEncoder,
    TextEncoderConfig,
    VideoTokenPos,
    bert_large_text_config,
    pool_video_tokens,
    tiny_text_config,
)
from .video_encoder import VideoEncoder, VideoEncoderConfig

__all__ = ["LFVILA", "LFVILAConfig", "PARAM_INITS", "init_projection", "lfvila_base_config", "lfvila_tiny_config"]

PARAM_INITS = ("official", "bert")  # LFVILAConfig.param_init


@dataclass
class LFVILAConfig:
    """The full model. ``embed_dim`` is the projection output width (official 1024 = video width = BERT hidden).

    ``stage`` 1 builds the dual encoder (BERT layers ``[0, stage1_layers)`` only, no ``video_token_pos``); stage 2
    builds all ``text.num_layers`` layers and the fusion positions. ``compat_official`` overrides the sub-configs'
    flags (see the module docstring). ``num_clips`` defaults to ``text.num_sentences``.

    ``mtc_gather``: True (official) computes MTC over the global batch when ``torch.distributed`` runs more than one
    rank (features all-gathered with gradients, the roll over the global batch; ``losses.mtc_loss``); False keeps MTC
    on each rank's own batch. VPC always follows ``forward_stage1``'s ``distributed``.

    ``param_init``: the initialisation of the modules LF-VILA adds to Swin + BERT, ``{video,text}_{local,global}_proj``
    and ``sent_embedding`` (a pretrained checkpoint overwrites both, so this only matters for a stage-1 run from Swin +
    BERT). ``"official"``: ``nn.Linear``'s default (Kaiming uniform weight, uniform bias in ``+-1/sqrt(fan_in)``) and
    ``nn.Embedding``'s N(0, 1), as the official modules. ``"bert"``: BERT's rule, N(0, 0.02) weights and tables, zero
    bias (a segment table of N(0, 1) is as large as the LayerNorm-ed sentence states it is added to; 0.02 starts it
    as a small perturbation).
    """

    video: VideoEncoderConfig = field(default_factory=VideoEncoderConfig)
    text: TextEncoderConfig = field(default_factory=bert_large_text_config)
    embed_dim: int = 1024
    temperature: float = 0.05
    mtc_temperature: float = 0.05
    mtc_weight: float = 0.25
    vtm_weight: float = 10.0
    stage: int = 1
    num_clips: int | None = None
    num_classes: int = 0
    span_weight: float = 1.0
    label_smoothing: float = 0.0
    compat_official: bool = False
    loss_impl: str = "auto"
    mtc_gather: bool = True
    param_init: str = "official"

    def __post_init__(self):
        if self.stage not in (1, 2):
            raise ValueError(f"stage must be 1 or 2, got {self.stage}")
        if self.loss_impl not in ("auto", "triton", "torch"):
            raise ValueError(f"loss_impl must be auto, triton or torch, got {self.loss_impl!r}")
        if self.param_init not in PARAM_INITS:
            raise ValueError(f"param_init must be official or bert, got {self.param_init!r}")
        if self.num_clips is None:
            self.num_clips = self.text.num_sentences


def lfvila_base_config(**overrides) -> LFVILAConfig:
    return dataclasses.replace(LFVILAConfig(video=VideoEncoderConfig(extra={"input": (32, 192, 320)})), **overrides)


def lfvila_tiny_config(**overrides) -> LFVILAConfig:
    text = tiny_text_config(hidden_size=256, num_attention_heads=4, intermediate_size=512)
    return dataclasses.replace(LFVILAConfig(video=_tiny_video_config(), text=text, embed_dim=256), **overrides)


def _l2(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x, dim=-1)


def init_projection(proj: nn.Linear, rule: str) -> nn.Linear:
    """``rule`` ``"official"``: keep ``nn.Linear``'s default init; ``"bert"``: N(0, 0.02) weight, zero bias."""
    if rule not in PARAM_INITS:
        raise ValueError(f"param_init must be official or bert, got {rule!r}")
    if rule == "bert":
        nn.init.normal_(proj.weight, std=0.02)
        nn.init.zeros_(proj.bias)
    return proj


class LFVILA(nn.Module):
    """LF-VILA pre-training model (official ``LFVILA_Pretrain``'s parameter names); see the module docstring.

    Task models (``tasks.py``) subclass it and change four class attributes: ``projections`` (which of the
    ``{video,text}_{local,global}_proj`` pairs exist), ``text_head`` (``TextEncoderConfig.head``), ``fusion``
    (``None``: from ``cfg.stage``; True / False: always / never build the fusion layers and ``video_token_pos``) and
    ``text_tower`` (False: a video-only model, no ``text_encoder``, ``sent_embedding`` or ``text_*_proj`` at all;
    ``cfg.text`` then only gives ``pool_grid``).
    """

    projections: tuple[str, ...] = ("local", "global")
    text_head: str = "pretraining"
    fusion: bool | None = None
    text_tower: bool = True

    def __init__(self, cfg: LFVILAConfig | None = None):
        super().__init__()
        cfg = cfg or LFVILAConfig()
        fusion = cfg.stage == 2 if self.fusion is None else self.fusion
        video_cfg = dataclasses.replace(cfg.video, compat_official=cfg.compat_official)
        text_cfg = dataclasses.replace(cfg.text, compat_official=cfg.compat_official, head=self.text_head,
                                       num_classes=cfg.num_classes)
        if not fusion:
            text_cfg = dataclasses.replace(text_cfg, num_layers=text_cfg.stage1_layers)
        self.cfg = cfg
        self.compat_official = cfg.compat_official
        self.has_fusion = fusion
        if fusion and not self.text_tower:
            raise ValueError(f"{type(self).__name__} has no text tower to fuse with")
        self.video_encoder = VideoEncoder(video_cfg)
        if self.text_tower:
            self.text_encoder = SplitBertTextEncoder(text_cfg)
        dv, e = self.video_encoder.num_features, cfg.embed_dim
        dt = self.text_encoder.hidden_size if self.text_tower else None
        local_dv = self.video_encoder.norm_local.normalized_shape[0]
        if "local" in self.projections and not cfg.compat_official and local_dv != dv:
            raise ValueError(f"local branch width {local_dv} != final video width {dv}")
        if fusion and dv != dt:
            raise ValueError(f"fusion needs video width {dv} == text hidden {dt}")
        for kind in self.projections:
            for side, d in (("video", dv), ("text", dt)):
                if d is None:  # no text tower
                    continue
                setattr(self, f"{side}_{kind}_proj", init_projection(nn.Linear(d, e), cfg.param_init))
        if self.text_tower:
            self.sent_embedding = SentEmbedding(dt, text_cfg.max_position_embeddings, text_cfg.sent_type_vocab,
                                                text_cfg.layer_norm_eps, text_cfg.hidden_dropout_prob,
                                                init=cfg.param_init)
            self.sent_embedding.init_from_bert(self.text_encoder.bert)
        if fusion:
            self.video_token_pos = VideoTokenPos(dt, text_cfg.num_frames, text_cfg.patches_per_frame,
                                                 text_cfg.layer_norm_eps)
        else:
            self.video_token_pos = None

    # ------------------------------------------------------------------------------------------------- encoders

    def _clip_mean(self, pooled: torch.Tensor) -> torch.Tensor:
        """(B, T, P, C) -> (B, M, C): average over the T/M frames and P patches of each clip."""
        b, t, p, c = pooled.shape
        m = self.cfg.num_clips
        if t % m:
            raise ValueError(f"{t} frames do not split into {m} clips")
        return pooled.reshape(b, m, t // m, p, c).mean((2, 3))

    def encode_video(self, video: torch.Tensor) -> dict[str, torch.Tensor]:
        """``video`` (float (B, 3, T, H, W) normalised, or uint8 (B, T, H, W, 3)) ->
        ``clip`` (B, M, E) L2-normed (models with the local projections), ``global`` (B, E) L2-normed (models with
        the global ones), ``tokens`` (B, T*P, D) for fusion (through ``video_token_pos`` when the model fuses),
        ``pooled`` (B, T, P, D) the pooled final grid."""
        out = self.video_encoder(video)
        grid_pool = pool_video_tokens(out.grid, self.cfg.text.pool_grid)  # (B, T, P, D)
        result = {"pooled": grid_pool}
        if "global" in self.projections or "local" in self.projections:
            grid_clips = self._clip_mean(grid_pool)  # (B, M, D)
        if "local" in self.projections:
            if self.compat_official:
                local_clips = grid_clips  # official: "local" is the final grid
            else:
                local_clips = self._clip_mean(pool_video_tokens(out.local, self.cfg.text.pool_grid))
            result["clip"] = _l2(self.video_local_proj(local_clips))
        if "global" in self.projections:
            result["global"] = _l2(self.video_global_proj(grid_clips.mean(1)))
        if self.video_token_pos is not None:
            result["tokens"] = self.video_token_pos(grid_pool)
        else:
            result["tokens"] = grid_pool.flatten(1, 2)
        return result

    def encode_text(self, ids: torch.Tensor, mask: torch.Tensor, real: torch.Tensor | None = None
                    ) -> dict[str, torch.Tensor]:
        """``ids``, ``mask`` (B, M, L), ``real`` (B, M) bool (default: any token real) -> ``sentence`` (B, M, E)
        L2-normed (local projections), ``paragraph`` (B, E) L2-normed (global projections), ``states``
        (B, 1+M*L, D) / ``mask`` (B, 1+M*L) for fusion, ``real`` (B, M)."""
        if real is None:
            real = mask.bool().any(-1)
        sent_states = self.text_encoder.encode_sentences(ids, mask)  # (B, M, L, D)
        states, pmask = self.text_encoder.encode_paragraph(sent_states, mask, self.sent_embedding, real)
        result = {"states": states, "mask": pmask, "real": real}
        if "local" in self.projections:
            result["sentence"] = _l2(self.text_local_proj(sent_states[:, :, 0]))
        if "global" in self.projections:
            result["paragraph"] = _l2(self.text_global_proj(states[:, 0]))
        return result

    # --------------------------------------------------------------------------------------------------- losses

    def forward_stage1(self, video: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor,
                       real: torch.Tensor | None = None, generator: torch.Generator | None = None,
                       distributed=None) -> dict[str, torch.Tensor]:
        """Stage-1 losses: ``loss = vpc + mtc_weight * mtc``. ``distributed`` (``None``: auto, ``False``, ``True``
        or a process group) picks this rank's batch or the global one for VPC (``losses.vpc_loss``) and, unless
        ``cfg.mtc_gather`` is False, for MTC (``losses.mtc_loss``); ``generator`` drives the MTC draw."""
        v = self.encode_video(video)
        t = self.encode_text(ids, mask, real)
        vpc = losses.vpc_loss(v["global"], t["paragraph"], self.cfg.temperature, distributed=distributed,
                              impl=self.cfg.loss_impl)
        mtc = losses.mtc_loss(v["clip"], t["sentence"], t["real"], self.cfg.mtc_temperature, generator=generator,
                              compat_official=self.compat_official,
                              distributed=distributed if self.cfg.mtc_gather else False)
        return {"loss": losses.stage1_loss(vpc, mtc, self.cfg.mtc_weight), "vpc": vpc, "mtc": mtc}

    def forward_stage2(self, video: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, mlm_labels: torch.Tensor,
                       real: torch.Tensor | None = None, stats: bool = False) -> dict[str, torch.Tensor]:
        """Stage-2 losses on already-masked ``ids`` (``losses.mlm_mask``) with ``mlm_labels`` (B, M, L):
        VTM pairs from ``losses.vtm_pairs`` (first half mismatched), MLM only on the matched samples;
        ``loss = mlm + vtm_weight * vtm``. ``stats``: also the counts of the accuracies, int64 scalars:
        ``mlm_hits`` / ``mlm_tokens`` (every masked token, the official ``mlm_acc``), ``mlm_loss_tokens`` (the
        matched ones, which the MLM loss averages), ``vtm_hits`` (of the B pairs)."""
        if not self.has_fusion:
            raise RuntimeError("forward_stage2 needs a stage-2 model (fusion layers)")
        v = self.encode_video(video)
        t = self.encode_text(ids, mask, real)
        b = ids.shape[0]
        perm, vtm_labels = losses.vtm_pairs(b, ids.device, self.compat_official)
        fused = self.text_encoder.fuse(t["states"], t["mask"], v["tokens"][perm])
        n_text = t["states"].shape[1]
        labels = torch.cat([mlm_labels.new_full((b, 1), losses.IGNORE_INDEX), mlm_labels.reshape(b, -1)], 1)
        select = labels != losses.IGNORE_INDEX  # (B, 1+M*L)
        logits = self.text_encoder.mlm_logits(fused[:, :n_text], select)  # (K, V)
        matched = vtm_labels.bool()[:, None].expand_as(select)[select]
        mlm = losses.mlm_loss(logits, labels[select], matched)
        vtm_logits = self.text_encoder.vtm_logits(fused)
        vtm = losses.vtm_loss(vtm_logits, vtm_labels)
        out = {"loss": losses.stage2_loss(mlm, vtm, self.cfg.vtm_weight), "mlm": mlm, "vtm": vtm}
        if stats:
            out.update(mlm_hits=(logits.detach().argmax(-1) == labels[select]).sum(), mlm_tokens=select.sum(),
                       mlm_loss_tokens=matched.sum(), vtm_hits=(vtm_logits.detach().argmax(-1) == vtm_labels).sum())
        return out

    def forward(self, *args, **kwargs) -> dict[str, torch.Tensor]:
        """``forward_stage1`` for stage-1 models, ``forward_stage2`` for stage-2 ones."""
        return (self.forward_stage1 if self.cfg.stage == 1 else self.forward_stage2)(*args, **kwargs)


register_model("lfvila-base", lfvila_base_config, LFVILA,
               "official LF-VILA pre-training model (video encoder + BERT-large split, D = 1024)")
register_model("lfvila-tiny", lfvila_tiny_config, LFVILA,
               "scaled-down LF-VILA pre-training model for tests and the CPU demo (D = 256)")
register_alias("lfvila-base-model", "lfvila-base", "old name of lfvila-base (the full pre-training model)")
register_alias("lfvila-tiny-model", "lfvila-tiny", "old name of lfvila-tiny (the full pre-training model)")
