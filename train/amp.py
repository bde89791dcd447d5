"""fp16 loss scaling with DeepSpeed's rule: :class:`HysteresisGradScaler`, :func:`build_scaler`.

The official runs are DeepSpeed fp16 with a dynamic loss scale (every ``src/configs/*.yaml``: ``initial_scale_power:
32``, ``loss_scale_window: 1000``, ``hysteresis: 2``, ``min_loss_scale: 1``), i.e. DeepSpeed's ``DynamicLossScaler``
(``deepspeed/runtime/fp16/loss_scaler.py``). ``torch.amp.GradScaler`` has the same growth rule but no hysteresis and no
floor; :class:`HysteresisGradScaler` adds both, so that ``train.precision: fp16`` with the default
``train.grad_scaler`` (``lfvila.train_options.GradScalerConfig``) scales the loss as the official runs do. The
mapping of every DeepSpeed setting: ``docs/training.md``, "fp16 and ZeRO-2".
"""

from __future__ import annotations

import numbers
from typing import Any

import torch

__all__ = ["HysteresisGradScaler", "build_scaler"]


def _positive_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool) and x >= 1


class HysteresisGradScaler(torch.amp.GradScaler):
    """``torch.amp.GradScaler`` whose ``update()`` follows DeepSpeed's ``DynamicLossScaler.update_scale``.

    Per ``update()`` (once per optimizer step; an overflow is an inf / NaN among the unscaled gradients, and
    ``step()`` then skips the optimizer step, as DeepSpeed does):

    * overflow, ``hysteresis_left > 1``: ``hysteresis_left -= 1``; the scale is kept.
    * overflow, ``hysteresis_left == 1``: ``scale = max(scale * backoff_factor, min_scale)``; ``hysteresis_left``
      stays 1, so every further overflow cuts until the next growth. With ``raise_at_min_scale`` an overflow that
      would cut a scale already at ``min_scale`` raises a RuntimeError (DeepSpeed's ``raise_error_at_min_scale``,
      default true): the run cannot continue, and would otherwise skip every step from then on.
    * every overflow (cut or not) restarts the count of good steps, as DeepSpeed's ``last_overflow_iter = cur_iter``.
    * good step: the count grows by one; at ``growth_interval`` good steps since the last overflow or growth,
      ``scale *= growth_factor``, the count restarts, and ``hysteresis_left`` is reset to ``hysteresis``: the
      hysteresis resets on growth only (DeepSpeed's ``consecutive_hysteresis: false``, its default and the
      official setting). ``consecutive_hysteresis=True`` resets it on every good step instead.

    DeepSpeed grows when ``(cur_iter - last_overflow_iter) % scale_window == 0``, i.e. at every ``scale_window``-th
    good step since the last overflow, which is this count (``torch.amp.GradScaler``'s growth tracker). DeepSpeed's
    one ``scale_factor`` is ``growth_factor`` and ``1 / backoff_factor``. With ``hysteresis=1`` and ``min_scale``
    below every scale reached this is ``torch.amp.GradScaler`` exactly.

    Everything stays on the scale's device (``torch.where``, no host sync) except the ``raise_at_min_scale`` check,
    one scalar read per step. ``state_dict()`` holds plain Python numbers only (``train.checkpoint`` stores it as
    ``scaler.pt``); ``load_state_dict`` also reads a plain ``torch.amp.GradScaler`` state (no hysteresis keys: the
    configured hysteresis, all of it left).
    """

    def __init__(self, device: str = "cuda", init_scale: float = 2.0**32, growth_factor: float = 2.0,
                 backoff_factor: float = 0.5, growth_interval: int = 1000, hysteresis: int = 2,
                 consecutive_hysteresis: bool = False, min_scale: float = 1.0, raise_at_min_scale: bool = True,
                 enabled: bool = True) -> None:
        if not _positive_int(growth_interval):
            raise ValueError(f"growth_interval must be an int >= 1, got {growth_interval!r}")
        if not _positive_int(hysteresis):
            raise ValueError(f"hysteresis must be an int >= 1, got {hysteresis!r}")
        if not 0 < min_scale <= init_scale:
            raise ValueError(f"min_scale must be in (0, init_scale={init_scale}], got {min_scale!r}")
        super().__init__(device, init_scale=init_scale, growth_factor=growth_factor, backoff_factor=backoff_factor,
                         growth_interval=growth_interval, enabled=enabled)
        self._hysteresis = int(hysteresis)
        self._consecutive_hysteresis = bool(consecutive_hysteresis)
        self._min_scale = float(min_scale)
        self._raise_at_min_scale = bool(raise_at_min_scale)
        self._init_hysteresis_left = self._hysteresis
        self._hysteresis_left: torch.Tensor | None = None

    def _lazy_init_scale_growth_tracker(self, dev: torch.device) -> None:
        super()._lazy_init_scale_growth_tracker(dev)
        self._hysteresis_left = torch.full((), self._init_hysteresis_left, dtype=torch.int32, device=dev)

    def get_hysteresis_left(self) -> int:
        """Overflows still tolerated before the next one cuts the scale (0 when disabled)."""
        if not self._enabled:
            return 0
        return self._init_hysteresis_left if self._hysteresis_left is None else int(self._hysteresis_left.item())

    def update(self, new_scale: float | torch.Tensor | None = None) -> None:
        """Update the scale from this step's overflow (see the class docstring). ``new_scale`` sets the scale by
        hand, as in ``torch.amp.GradScaler``, and leaves the counts alone."""
        if not self._enabled:
            return
        if new_scale is not None:
            super().update(new_scale)
            return
        scale, tracker = self._check_scale_growth_tracker("update")
        found_infs = [found_inf.to(device=scale.device, non_blocking=True)
                      for state in self._per_optimizer_states.values()
                      for found_inf in state["found_inf_per_device"].values()]
        if not found_infs:
            raise AssertionError("No inf checks were recorded prior to update.")
        found = torch.stack(found_infs).sum() > 0
        left = self._hysteresis_left
        cut = found & (left <= 1)
        if self._raise_at_min_scale and bool((cut & (scale <= self._min_scale)).item()):
            raise RuntimeError(f"fp16 overflow with the loss scale already at train.grad_scaler.min_scale "
                               f"({self._min_scale:g}): it cannot be cut further (DeepSpeed stops here too); the "
                               f"gradients overflow without scaling")
        count = torch.where(found, torch.zeros_like(tracker), tracker + 1)
        grow = ~found & (count >= self._growth_interval)
        cut_scale = torch.clamp(scale * self._backoff_factor, min=self._min_scale)
        new = torch.where(cut, cut_scale, torch.where(grow, scale * self._growth_factor, scale))
        restore = (grow | ~found) if self._consecutive_hysteresis else grow
        left.copy_(torch.where(found & (left > 1), left - 1, torch.where(restore, self._hysteresis, left)))
        tracker.copy_(torch.where(grow, torch.zeros_like(count), count))
        super().update(new)  # copies the scale, clears this step's per-optimizer inf records

    def state_dict(self) -> dict[str, Any]:
        """``torch.amp.GradScaler``'s five entries plus ``hysteresis``, ``consecutive_hysteresis``, ``min_scale``,
        ``raise_at_min_scale`` and ``_hysteresis_left``: plain Python numbers. Empty when disabled."""
        if not self._enabled:
            return {}
        return {**super().state_dict(), "hysteresis": self._hysteresis,
                "consecutive_hysteresis": self._consecutive_hysteresis, "min_scale": self._min_scale,
                "raise_at_min_scale": self._raise_at_min_scale, "_hysteresis_left": self.get_hysteresis_left()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not self._enabled:
            return
        super().load_state_dict(state_dict)
        self._hysteresis = int(state_dict.get("hysteresis", self._hysteresis))
        self._consecutive_hysteresis = bool(state_dict.get("consecutive_hysteresis", self._consecutive_hysteresis))
        self._min_scale = float(state_dict.get("min_scale", self._min_scale))
        self._raise_at_min_scale = bool(state_dict.get("raise_at_min_scale", self._raise_at_min_scale))
        self._init_hysteresis_left = int(state_dict.get("_hysteresis_left", self._hysteresis))
        if self._hysteresis_left is not None:
            self._hysteresis_left.fill_(self._init_hysteresis_left)

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        if self._enabled:
            state["_init_hysteresis_left"] = self.get_hysteresis_left()
            state["_hysteresis_left"] = None
        return state


def build_scaler(train_cfg, device: torch.device | str) -> HysteresisGradScaler:
    """The trainer's scaler: enabled under ``train.precision: fp16``, configured by ``train.grad_scaler``
    (``lfvila.train_options.GradScalerConfig``), on ``device``'s type. Disabled (every method a no-op, an empty state)
    under the other precisions."""
    g = train_cfg.grad_scaler
    return HysteresisGradScaler(torch.device(device).type, init_scale=g.init_scale, growth_factor=g.growth_factor,
                                backoff_factor=g.backoff_factor, growth_interval=g.growth_interval,
                                hysteresis=g.hysteresis, consecutive_hysteresis=g.consecutive_hysteresis,
                                min_scale=g.min_scale, raise_at_min_scale=g.raise_at_min_scale,
                                enabled=train_cfg.precision == "fp16")
