"""lfvila: long-form video-language pre-training (LF-VILA), built on ``lfvila_kernels``."""

__version__ = "0.1.0"
