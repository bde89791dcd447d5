"""LF-VILA's text and cross-modal encoder: one transformers BERT split by layer ranges.

Structure (official numbers: ``docs/official.md``; D = 1024, M = 4 sentences, L = 50 tokens, T = 32, P = 6):

    ids (B, M, L) --BERT embeddings + layers [0, 8) per sentence (B*M sequences)-->  sentence states (B, M, L, D)
    --SentEmbedding (positions 0..M*L-1, sentence index, LN, dropout)--> (B, M*L, D)
    --prepend paragraph [CLS] = mean of the sentences' [CLS] tokens after SentEmbedding--> (B, 1+M*L, D)
    --layers [8, 12)-->                                               paragraph states (B, 1+M*L, D)
    final video grid (B, T, 3, 5, D) --per-frame MaxPool2d((2,3), stride 1) + VideoTokenPos--> (B, T*P, D)
    [paragraph ; video] --layers [12, 24), plain self-attention-->     fused states (B, 1+M*L+T*P, D)

Attention is the library's (``attn_implementation="sdpa"``); every layer range gets an additive float key mask
``(B, 1, 1, N)`` (0 for real keys, ``finfo.min`` for padding), so an all-padding sentence gives uniform attention
instead of NaN (a boolean mask would give NaN rows).

Known defect reproduced behind ``compat_official=True``: the official paragraph [CLS] is the mean over all M sentence
[CLS] tokens, padded (empty) sentences included; by default only the real sentences enter the mean. Either way the
[CLS] tokens are taken *after* ``SentEmbedding`` (paragraph position, sentence index, LN), as the official models do.

Heads (``TextEncoderConfig.head``), with the official module names of the three official text encoders:
    ``"pretraining"`` (``TextEncoderForPretraining``; pre-training and retrieval models): ``cls`` (BERT MLM head; its
        decoder weight is its own parameter, NOT tied to the word embeddings: the official class defines no
        ``get_output_embeddings``, so transformers never ties them and stage 2 trains the decoder while the
        embeddings stay frozen; the decoder bias is ``cls.predictions.bias``) and ``seq_relationship`` Linear(D, 2)
        (VTM, on the pooler).
    ``"multichoice"`` (``TextEncoderForMultichoice``; How2QA): ``classifier`` Linear(D, 1) on the dropped-out pooler,
        one logit per choice, and ``span_classifier`` Linear(D, 2) on each frame's mean fused video token.
    ``"classification"`` (``TextEncoderForClassification``; ActivityNet-QA, VIOLIN): ``classifier`` Linear(D, n) on
        the dropped-out pooler.
Module names follow the official checkpoint: this module is the official ``text_encoder``; ``SentEmbedding`` and
``VideoTokenPos`` are defined here for the top-level model to own as ``sent_embedding`` and ``video_token_pos``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import BertConfig, BertModel
from transformers.models.bert.modeling_bert import BertOnlyMLMHead

from .weights import LoadReport, read_state_dict

__all__ = [
    "HEADS",
    "LoadReport",
    "SentEmbedding",
    "SplitBertTextEncoder",
    "TextEncoderConfig",
    "VideoTokenPos",
    "bert_large_text_config",
    "extended_key_mask",
    "load_bert_weights",
    "pool_video_tokens",
    "tiny_text_config",
]


HEADS = ("pretraining", "multichoice", "classification")


@dataclass
class TextEncoderConfig:
    """BERT sizes plus the LF-VILA split. ``bert_config`` (a transformers ``BertConfig``), when given, supplies the BERT
    fields instead of the ones below; ``num_hidden_layers`` is always replaced by ``num_layers``.

    ``num_layers`` is 12 for stage-1 models (dual encoder, retrieval) and 24 for stage-2 / QA models; layers
    ``[0, num_local_layers)`` are per sentence, ``[num_local_layers, stage1_layers)`` per paragraph and
    ``[stage1_layers, num_layers)`` the fusion encoder.
    """

    vocab_size: int = 30522
    hidden_size: int = 1024
    num_attention_heads: int = 16
    intermediate_size: int = 4096
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    initializer_range: float = 0.02
    bert_config: BertConfig | None = None
    num_layers: int = 24
    num_local_layers: int = 8
    stage1_layers: int = 12
    num_sentences: int = 4
    max_len: int = 50
    sent_type_vocab: int = 8
    num_frames: int = 32
    pool_grid: tuple[int, int] = (2, 3)
    head: str = "pretraining"
    num_classes: int = 0
    compat_official: bool = False

    @property
    def patches_per_frame(self) -> int:
        """Video tokens per frame for fusion (6 for the official 2 x 3 pooled grid)."""
        return self.pool_grid[0] * self.pool_grid[1]

    def to_bert_config(self) -> BertConfig:
        """The transformers ``BertConfig`` (SDPA attention, ``num_layers`` layers)."""
        if self.bert_config is not None:
            cfg = BertConfig.from_dict(self.bert_config.to_dict())
        else:
            cfg = BertConfig(
                vocab_size=self.vocab_size,
                hidden_size=self.hidden_size,
                num_attention_heads=self.num_attention_heads,
                intermediate_size=self.intermediate_size,
                max_position_embeddings=self.max_position_embeddings,
                type_vocab_size=self.type_vocab_size,
                hidden_dropout_prob=self.hidden_dropout_prob,
                attention_probs_dropout_prob=self.attention_probs_dropout_prob,
                layer_norm_eps=self.layer_norm_eps,
                pad_token_id=self.pad_token_id,
                initializer_range=self.initializer_range,
            )
        cfg.num_hidden_layers = self.num_layers
        cfg._attn_implementation = "sdpa"
        return cfg

    def __post_init__(self):
        if not 0 < self.num_local_layers <= self.stage1_layers <= self.num_layers:
            raise ValueError("need 0 < num_local_layers <= stage1_layers <= num_layers")
        if self.head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {self.head!r}")
        if self.head == "classification" and self.num_classes < 1:
            raise ValueError(f"head 'classification' needs num_classes >= 1, got {self.num_classes}")
        self.pool_grid = tuple(self.pool_grid)


def bert_large_text_config(stage: int = 2, **overrides) -> TextEncoderConfig:
    """The official split of bert-large-uncased: 12 layers for stage-1 models, 24 for stage-2 / QA models."""
    return dataclasses.replace(TextEncoderConfig(num_layers=12 if stage == 1 else 24), **overrides)


def tiny_text_config(**overrides) -> TextEncoderConfig:
    """A tiny text side (``lfvila-tiny`` takes it with hidden 256, 4 heads, FFN 512): hidden 64, 4 heads, layers
    2/2/2, vocab 128, 4 sentences x 12 tokens, 8 frames."""
    base = TextEncoderConfig(
        vocab_size=128, hidden_size=64, num_attention_heads=4, intermediate_size=128, max_position_embeddings=64,
        num_layers=6, num_local_layers=2, stage1_layers=4, num_sentences=4, max_len=12, num_frames=8,
    )
    return dataclasses.replace(base, **overrides)


def extended_key_mask(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """Key-padding mask ``(B, N)`` (1 real, 0 pad) -> additive ``(B, 1, 1, N)`` for SDPA (``None`` stays ``None``).

    No "is anything padded?" check: that would cost a device sync per layer range."""
    if mask is None:
        return None
    return (1.0 - mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min


class SentEmbedding(nn.Module):
    """Paragraph positions and sentence index added to the concatenated sentence states, then LN and dropout.

    Official parameter names: ``position_embeddings`` (P_max, D) (initialise from BERT's with ``init_from_bert``),
    ``segment_embeddings`` (8, D), ``norm``. The official ``position_ids`` buffer is non-persistent here (drop it when
    loading an official checkpoint).

    ``init="official"``: both tables keep ``nn.Embedding``'s default N(0, 1), as the official module (built outside
    ``BertPreTrainedModel``, so BERT's init never reaches it). ``init="bert"``: N(0, 0.02), BERT's rule for its own
    embedding tables, which keeps the sentence-index signal small next to the sentence states at the start.
    """

    def __init__(self, hidden_size: int, max_positions: int = 512, type_vocab: int = 8, eps: float = 1e-12,
                 dropout: float = 0.1, init: str = "official"):
        super().__init__()
        if init not in ("official", "bert"):
            raise ValueError(f"init must be official or bert, got {init!r}")
        self.position_embeddings = nn.Embedding(max_positions, hidden_size)
        self.segment_embeddings = nn.Embedding(type_vocab, hidden_size)
        self.norm = nn.LayerNorm(hidden_size, eps=eps)
        self.dropout = nn.Dropout(dropout)
        self.register_buffer("position_ids", torch.arange(max_positions)[None], persistent=False)
        if init == "bert":
            nn.init.normal_(self.position_embeddings.weight, std=0.02)
            nn.init.normal_(self.segment_embeddings.weight, std=0.02)

    @torch.no_grad()
    def init_from_bert(self, bert: BertModel) -> None:
        """Copy BERT's absolute position embeddings (the official ``_init_sent_embedding``)."""
        src = bert.embeddings.position_embeddings.weight
        n = min(src.shape[0], self.position_embeddings.weight.shape[0])
        self.position_embeddings.weight[:n].copy_(src[:n])

    def forward(self, x: torch.Tensor, sentence_len: int) -> torch.Tensor:
        """``x`` (B, M*L, D), sentences of ``sentence_len`` tokens in order -> (B, M*L, D)."""
        n = x.shape[1]
        if n > self.position_embeddings.num_embeddings:
            raise ValueError(f"paragraph of {n} tokens exceeds {self.position_embeddings.num_embeddings} positions")
        pos = self.position_ids[:, :n]
        seg = torch.div(pos, sentence_len, rounding_mode="floor")
        return self.dropout(self.norm(x + self.position_embeddings(pos) + self.segment_embeddings(seg)))


class VideoTokenPos(nn.Module):
    """Learned spatial ``s_pos_embed`` (1, 1, P, D) and temporal ``t_pos_embed`` (1, T, 1, D) positions, then LN."""

    def __init__(self, hidden_size: int, num_frames: int = 32, patches_per_frame: int = 6, eps: float = 1e-12):
        super().__init__()
        self.s_pos_embed = nn.Parameter(torch.zeros(1, 1, patches_per_frame, hidden_size))
        self.t_pos_embed = nn.Parameter(torch.zeros(1, num_frames, 1, hidden_size))
        self.norm = nn.LayerNorm(hidden_size, eps=eps)
        nn.init.trunc_normal_(self.s_pos_embed, std=0.02)
        nn.init.trunc_normal_(self.t_pos_embed, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (B, T, P, D) with T <= num_frames -> (B, T*P, D)."""
        b, t, p, d = x.shape
        if t > self.t_pos_embed.shape[1] or p != self.s_pos_embed.shape[2]:
            raise ValueError(f"video tokens {tuple(x.shape)} do not fit positions "
                             f"(T<={self.t_pos_embed.shape[1]}, P={self.s_pos_embed.shape[2]})")
        x = x + self.s_pos_embed + self.t_pos_embed[:, :t]
        return self.norm(x).reshape(b, t * p, d)


def pool_video_tokens(grid: torch.Tensor, out_grid: tuple[int, int] = (2, 3)) -> torch.Tensor:
    """Per-frame max pooling of the final video grid to ``out_grid`` tokens per frame.

    ``grid`` (B, T, h, w, D) -> (B, T, oh, ow, D) flattened to (B, T, oh*ow, D). The official code applies
    ``MaxPool2d((2, 3), stride 1)`` to the 3 x 5 map, i.e. a stride-1 window of size ``(h-oh+1, w-ow+1)``; that rule is
    used for any grid at least ``out_grid`` in size (identical to the official on 3 x 5). Smaller grids (tiny test
    models) use ``adaptive_max_pool2d``, which repeats cells.
    """
    b, t, h, w, d = grid.shape
    oh, ow = out_grid
    x = grid.reshape(b * t, h, w, d).permute(0, 3, 1, 2)
    if h >= oh and w >= ow:
        x = F.max_pool2d(x, kernel_size=(h - oh + 1, w - ow + 1), stride=1)
    else:
        x = F.adaptive_max_pool2d(x, (oh, ow))
    return x.permute(0, 2, 3, 1).reshape(b, t, oh * ow, d)


class SplitBertTextEncoder(nn.Module):
    """One BERT run in three layer ranges (sentence, paragraph, fusion) with the heads of ``config.head``.

    Parameters: ``bert`` (transformers ``BertModel`` with pooler, SDPA attention) and, per head (module docstring):
    ``cls`` (``BertOnlyMLMHead``, decoder weight untied as in the official model, bias = ``cls.predictions.bias``) +
    ``seq_relationship`` Linear(D, 2); or ``classifier`` Linear(D, 1) + ``span_classifier`` Linear(D, 2); or
    ``classifier`` Linear(D, n).
    """

    def __init__(self, config: TextEncoderConfig):
        super().__init__()
        self.config = config
        bert_cfg = config.to_bert_config()
        self.bert = BertModel(bert_cfg, add_pooling_layer=True)
        d = bert_cfg.hidden_size
        if config.head == "pretraining":
            self.cls = BertOnlyMLMHead(bert_cfg)
            self.seq_relationship = nn.Linear(d, 2)
            heads = (self.cls, self.seq_relationship)
        else:
            self.dropout = nn.Dropout(bert_cfg.hidden_dropout_prob)
            self.classifier = nn.Linear(d, 1 if config.head == "multichoice" else config.num_classes)
            heads = (self.classifier,)
            if config.head == "multichoice":
                self.span_classifier = nn.Linear(d, 2)
                heads += (self.span_classifier,)
        std = bert_cfg.initializer_range
        for m in heads:
            for sub in m.modules():
                if isinstance(sub, nn.Linear):
                    nn.init.normal_(sub.weight, std=std)
                    nn.init.zeros_(sub.bias)
        self.tie_weights()

    @property
    def hidden_size(self) -> int:
        return self.bert.config.hidden_size

    def tie_weights(self) -> None:
        """MLM decoder bias = ``cls.predictions.bias`` (BERT's head ties them in its constructor). The decoder weight
        stays untied from the word embeddings, as in the official ``TextEncoderForPretraining``."""
        if self.config.head != "pretraining":
            return
        self.cls.predictions.decoder.bias = self.cls.predictions.bias

    def run_layers(self, hidden: torch.Tensor, mask: torch.Tensor | None, start: int, end: int) -> torch.Tensor:
        """Apply BERT layers ``[start, end)`` to ``hidden`` (N, S, D) with key mask ``mask`` (N, S) -> (N, S, D)."""
        ext = extended_key_mask(mask, hidden.dtype)
        for layer in self.bert.encoder.layer[start:end]:
            hidden = layer(hidden, ext)
        return hidden

    def encode_sentences(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``ids``, ``mask`` (B, M, L) -> token states (B, M, L, D): BERT embeddings (token type 0, positions 0..L-1)
        and layers ``[0, num_local_layers)`` on each of the B*M sentences independently."""
        b, m, length = ids.shape
        h = self.bert.embeddings(input_ids=ids.reshape(b * m, length))
        h = self.run_layers(h, mask.reshape(b * m, length), 0, self.config.num_local_layers)
        return h.reshape(b, m, length, -1)

    def paragraph_cls(self, sentence_states: torch.Tensor, real: torch.Tensor | None) -> torch.Tensor:
        """Mean of the sentence [CLS] tokens of ``sentence_states`` (B, M, L, D) over the real sentences ``real`` (B, M)
        -> (B, D); over all M when ``compat_official`` or ``real`` is None. A sample with no real sentence falls back to
        the mean of all. ``encode_paragraph`` passes the tokens after ``SentEmbedding`` (the official order)."""
        cls = sentence_states[:, :, 0]
        if real is None or self.config.compat_official:
            return cls.mean(1)
        w = real.to(cls.dtype)
        w = torch.where(w.sum(1, keepdim=True) > 0, w, torch.ones_like(w))
        return (cls * w[..., None]).sum(1) / w.sum(1, keepdim=True)

    def encode_paragraph(self, sentence_states: torch.Tensor, mask: torch.Tensor, sent_embedding: SentEmbedding,
                         real: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Paragraph stage: ``sentence_states`` (B, M, L, D), ``mask`` (B, M, L), ``real`` (B, M) bool (default: a
        sentence is real when any of its tokens is) -> (paragraph states (B, 1+M*L, D), paragraph mask (B, 1+M*L)).

        ``sent_embedding`` is passed in because the official model owns it at the top level (``sent_embedding.*``).
        """
        b, m, length, d = sentence_states.shape
        if real is None:
            real = mask.any(-1)
        tokens = sent_embedding(sentence_states.reshape(b, m * length, d), length)
        cls = self.paragraph_cls(tokens.reshape(b, m, length, d), real)
        h = torch.cat([cls[:, None], tokens], 1)
        pmask = torch.cat([mask.new_ones(b, 1), mask.reshape(b, m * length)], 1)
        h = self.run_layers(h, pmask, self.config.num_local_layers, self.config.stage1_layers)
        return h, pmask

    def fuse(self, paragraph_states: torch.Tensor, paragraph_mask: torch.Tensor, video_tokens: torch.Tensor,
             video_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Fusion layers ``[stage1_layers, num_layers)`` over ``[paragraph (B, Np, D) ; video (B, Nv, D)]`` with the
        joint key mask (video all real unless ``video_mask`` (B, Nv)) -> (B, Np+Nv, D)."""
        if self.config.num_layers <= self.config.stage1_layers:
            raise RuntimeError("this text encoder has no fusion layers (a stage-1 model)")
        if video_mask is None:
            video_mask = paragraph_mask.new_ones(video_tokens.shape[:2])
        h = torch.cat([paragraph_states, video_tokens.to(paragraph_states.dtype)], 1)
        mask = torch.cat([paragraph_mask, video_mask.to(paragraph_mask.dtype)], 1)
        return self.run_layers(h, mask, self.config.stage1_layers, self.config.num_layers)

    def pooled(self, states: torch.Tensor) -> torch.Tensor:
        """BERT pooler (dense + tanh on token 0): (B, N, D) -> (B, D)."""
        return self.bert.pooler(states)

    def mlm_logits(self, states: torch.Tensor, select: torch.Tensor | None = None) -> torch.Tensor:
        """MLM logits: (B, N, D) -> (B, N, V); with ``select`` (B, N) bool only the selected tokens -> (K, V), which
        avoids the vocabulary projection on the ~85% of tokens that carry no label."""
        if select is not None:
            states = states[select]
        return self.cls(states)

    def vtm_logits(self, states: torch.Tensor) -> torch.Tensor:
        """Video-text matching logits: ``seq_relationship(pooler(states))``, (B, N, D) -> (B, 2)."""
        return self.seq_relationship(self.pooled(states))

    def choice_logits(self, states: torch.Tensor, num_choices: int) -> torch.Tensor:
        """Multiple choice: fused states (B*C, N, D), choices contiguous per sample -> logits (B, C) from
        ``classifier(dropout(pooler))``."""
        return self.classifier(self.dropout(self.pooled(states))).reshape(-1, num_choices)

    def span_logits(self, states: torch.Tensor, num_frames: int, num_choices: int) -> torch.Tensor:
        """Per-frame in-span logits from the last ``num_frames * P`` fused tokens (the video tokens) of
        ``states`` (B*C, N, D): mean over each frame's P tokens, ``span_classifier``, max over the C choices ->
        (B, T, 2) (official ``TextEncoderForMultichoice``)."""
        p = self.config.patches_per_frame
        video = states[:, states.shape[1] - num_frames * p:]
        frames = video.reshape(video.shape[0], num_frames, p, video.shape[-1]).mean(2)
        return self.span_classifier(frames).reshape(-1, num_choices, num_frames, 2).amax(1)

    def class_logits(self, states: torch.Tensor) -> torch.Tensor:
        """Classification: fused states (B, N, D) -> (B, num_classes) from ``classifier(dropout(pooler))``."""
        return self.classifier(self.dropout(self.pooled(states)))


_TIED = {"cls.predictions.decoder.weight", "cls.predictions.decoder.bias"}


def _normalise_key(key: str) -> str | None:
    """Map a source key onto this module's names (``bert.*``, ``cls.*``, ...); None drops it silently."""
    for prefix in ("module.", "text_encoder."):
        if key.startswith(prefix):
            key = key[len(prefix):]
    if key.startswith(("embeddings.", "encoder.", "pooler.")):  # a bare BertModel
        key = "bert." + key
    if key.endswith("position_ids"):
        return None
    if key.endswith(".gamma"):
        key = key[: -len(".gamma")] + ".weight"
    elif key.endswith(".beta"):
        key = key[: -len(".beta")] + ".bias"
    return key


def load_bert_weights(module: SplitBertTextEncoder, src) -> LoadReport:
    """Load BERT weights into ``module`` from a state dict, a file (``torch.load(weights_only=True)`` or safetensors)
    or a local ``save_pretrained`` directory (no hub access).

    Accepts ``bert.*``/``cls.*`` (``BertForPreTraining``), bare ``BertModel`` keys, and ``text_encoder.*`` (official
    LF-VILA) keys; renames ``LayerNorm.gamma/beta`` to ``weight/bias``. Like the official loader, shape mismatches are
    skipped and everything else is non-strict; BERT's NSP head (``cls.seq_relationship``) does not match the VTM head
    ``seq_relationship`` and is reported as unexpected. Layers beyond ``num_layers`` are unexpected too.
    """
    raw = read_state_dict(src)
    target = module.state_dict()
    to_load: dict[str, torch.Tensor] = {}
    unexpected, mismatched = [], []
    for key, value in raw.items():
        name = _normalise_key(key)
        if name is None:
            continue
        if name not in target:
            unexpected.append(key)
        elif tuple(target[name].shape) != tuple(value.shape):
            mismatched.append(f"{key}: {tuple(value.shape)} vs {tuple(target[name].shape)}")
        else:
            to_load[name] = value.to(target[name].dtype)
    words, decoder = "bert.embeddings.word_embeddings.weight", "cls.predictions.decoder.weight"
    if decoder in target and decoder not in to_load and words in to_load:
        to_load[decoder] = to_load[words].clone()  # files saved with tied weights may omit the decoder copy
    module.load_state_dict(to_load, strict=False)
    module.tie_weights()
    loaded = set(to_load)
    if "cls.predictions.bias" in loaded:
        loaded.add("cls.predictions.decoder.bias")
    missing = sorted(k for k in target if k not in loaded)
    return LoadReport(sorted(to_load), missing, sorted(unexpected), sorted(mismatched))
