"""What one sample is, defined once: :class:`SampleSpec`, the fields the run config's ``data`` section
(``lfvila.config.DataConfig``) and the loaders' settings (``lfvila.data.loader.LoaderConfig``) share. Both subclass
it, so a field is declared, documented and validated here only, and the training loop hands the config's values to
the loaders with :func:`spec_fields` instead of copying them one by one. Imports nothing heavy (the config module
reads it).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

__all__ = ["ON_ERROR", "SAMPLING", "SampleSpec", "spec_fields"]

SAMPLING = ("uniform", "clips")
ON_ERROR = ("raise", "skip", "replace")


@dataclass
class SampleSpec:
    """``size`` (H, W) of the frames after augmentation; ``clips`` x ``frames_per_clip`` frames (T); ``sentences`` M
    text segments of at most ``max_len`` tokens L. ``sampling``: ``"uniform"`` (the retrieval rule: eval uniform,
    train jittered over the whole video) or ``"clips"`` (clip i inside sentence i's span; paragraph samples only).
    ``flip``: the training augmentation's horizontal flip (official: on; off where captions name left / right).
    ``on_error`` for a bad video: ``"raise"``, ``"skip"`` (counted, the batch is smaller) or ``"replace"`` (training
    only: replaced by a deterministic other sample); ``max_skip_fraction`` stops a run that skips more."""

    size: tuple[int, int] = (192, 320)
    clips: int = 4
    frames_per_clip: int = 8
    sentences: int = 4
    max_len: int = 50
    sampling: str = "uniform"
    flip: bool = True
    on_error: str = "raise"
    max_skip_fraction: float = 0.05

    def __post_init__(self):
        """Raises ValueError, the message starting with the field's name."""
        if self.sampling not in SAMPLING:
            raise ValueError(f"sampling: must be 'uniform' or 'clips', got {self.sampling!r}")
        if self.on_error not in ON_ERROR:
            raise ValueError(f"on_error: must be one of {ON_ERROR}, got {self.on_error!r}")
        if not 0.0 <= self.max_skip_fraction <= 1.0:
            raise ValueError(f"max_skip_fraction: must be in [0, 1], got {self.max_skip_fraction}")
        for name in ("clips", "frames_per_clip", "sentences", "max_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")

    @property
    def frames(self) -> int:
        return self.clips * self.frames_per_clip


def spec_fields(obj) -> dict:
    """The :class:`SampleSpec` fields of ``obj`` (a ``DataConfig`` or a ``LoaderConfig``) as keyword arguments."""
    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(SampleSpec)}
