"""LF-VILA models: the HTWA video encoder and the named-variant registry (``create_model``)."""

from .registry import create_model, list_models, model_config, register_model
from .video_encoder import (
    PatchEmbed3D,
    PatchMerging,
    VideoEncoder,
    VideoEncoderConfig,
    VideoEncoderOutput,
)

__all__ = [
    "PatchEmbed3D",
    "PatchMerging",
    "VideoEncoder",
    "VideoEncoderConfig",
    "VideoEncoderOutput",
    "create_model",
    "list_models",
    "model_config",
    "register_model",
]
