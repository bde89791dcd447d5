"""LF-VILA models: the HTWA video encoder, the split-BERT text encoder, the pre-training and task models, checkpoint
conversion and the named-variant registry (``create_model``, ``list_models``, ``list_aliases``)."""

from .pretraining import LFVILA, LFVILAConfig
from .registry import create_model, list_aliases, list_models, model_config, register_alias, register_model
from .tasks import LFVILAForClassification, LFVILAForMultipleChoice, LFVILAForVideoClassification, LFVILARetrieval
from .video_encoder import (
    PatchEmbed3D,
    PatchMerging,
    VideoEncoder,
    VideoEncoderConfig,
    VideoEncoderOutput,
)

__all__ = [
    "LFVILA",
    "LFVILAConfig",
    "LFVILAForClassification",
    "LFVILAForMultipleChoice",
    "LFVILAForVideoClassification",
    "LFVILARetrieval",
    "PatchEmbed3D",
    "PatchMerging",
    "VideoEncoder",
    "VideoEncoderConfig",
    "VideoEncoderOutput",
    "create_model",
    "list_aliases",
    "list_models",
    "model_config",
    "register_alias",
    "register_model",
]
