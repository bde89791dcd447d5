"""lfvila: long-form video-language pre-training (LF-VILA), built on ``lfvila_kernels``."""

__version__ = "0.1.0"


def create_model(name: str, **overrides):
    """Build a named variant or alias (``"lfvila-base"``: the full model, ``"lfvila-base-video"``: its video encoder,
    ``"lfvila-base-retrieval"``, ...); see ``lfvila.models.registry``.

    Imported lazily so that ``import lfvila.data`` (data-loader workers) does not pull in torch models or triton.
    """
    from .models import create_model as _create_model

    return _create_model(name, **overrides)
