"""Option types of the run config's ``train`` section with their checks, kept apart from ``lfvila.config`` (which
holds them in ``TrainConfig`` and raises :func:`check`'s message as a ``ConfigError``).

``GradScalerConfig`` (``train.grad_scaler``): the fp16 loss scale, ``train.amp.HysteresisGradScaler``.
``FROZEN_EVAL`` (``train.frozen_eval``): which frozen modules stay in eval mode, ``train.optim.apply_frozen_eval``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["FROZEN_EVAL", "GradScalerConfig", "check"]

FROZEN_EVAL = ("all", "official", "none")


@dataclass
class GradScalerConfig:
    """The dynamic loss scale of ``train.precision: fp16``. Defaults: the official DeepSpeed ``fp16`` block of every
    LF-VILA config (``initial_scale_power: 32``, ``loss_scale_window: 1000``, ``hysteresis: 2``, ``min_loss_scale:
    1``; DeepSpeed's defaults ``consecutive_hysteresis: false``, ``raise_error_at_min_scale: true``), DeepSpeed's one
    ``scale_factor`` 2 as ``growth_factor`` 2 and ``backoff_factor`` 0.5. ``hysteresis``: the overflows tolerated,
    scale kept, before one cuts it (1: every overflow cuts, ``torch.amp.GradScaler``'s rule); ``raise_at_min_scale``:
    an overflow at ``min_scale`` stops the run."""

    init_scale: float = 2.0**32
    growth_interval: int = 1000
    growth_factor: float = 2.0
    backoff_factor: float = 0.5
    hysteresis: int = 2
    consecutive_hysteresis: bool = False
    min_scale: float = 1.0
    raise_at_min_scale: bool = True


def check(train) -> str | None:
    """The first problem of ``train.grad_scaler`` / ``train.frozen_eval`` as ``"key: message"`` (keys relative to
    the ``train`` section), or None."""
    g = train.grad_scaler
    rules = {"init_scale": (g.init_scale > 0, "> 0"), "growth_interval": (g.growth_interval >= 1, ">= 1"),
             "growth_factor": (g.growth_factor > 1.0, "> 1"), "backoff_factor": (0 < g.backoff_factor < 1, "in (0, 1)"),
             "hysteresis": (g.hysteresis >= 1, ">= 1"), "min_scale": (0 < g.min_scale <= g.init_scale,
                                                                      "in (0, init_scale]")}
    for name, (ok, want) in rules.items():
        if not ok:
            return f"grad_scaler.{name}: must be {want}, got {getattr(g, name)!r}"
    setting = train.frozen_eval
    if isinstance(setting, str):
        if setting not in FROZEN_EVAL:
            return f"frozen_eval: must be one of {FROZEN_EVAL} or a list of regexes, got {setting!r}"
        return None
    for p in setting:
        try:
            re.compile(p)
        except re.error as e:
            return f"frozen_eval: invalid regex {p!r}: {e}"
    return None
