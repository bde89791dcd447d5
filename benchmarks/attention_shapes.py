"""The shape sets of the window-attention benchmark: named lists of :class:`Case` at full (CUDA) and reduced (CPU)
size. benchmarks/README.md ("attention") tables them; ``--shapes NAME`` picks one."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Case:
    """One benchmarked problem: q, k, v ``(batch, *grid, heads, head_dim)`` with ``(T, H, W)``-ordered triples.
    ``name`` is the x value of its rows, ``x_name`` the x axis of its shape set."""

    name: str
    batch: int
    grid: tuple[int, int, int]
    heads: int
    head_dim: int
    window: tuple[int, int, int]
    shift: tuple[int, int, int]
    x_name: str = "layer"

    def describe(self) -> str:
        def x(t):
            return "x".join(map(str, t))

        T, H, W = self.grid
        return (
            f"B={self.batch} T={T} H={H} W={W} heads={self.heads} head_dim={self.head_dim} "
            f"window={x(self.window)} shift={x(self.shift)}"
        )

    @property
    def tokens(self) -> int:
        """Tokens per sample, ``T * H * W``."""
        return self.grid[0] * self.grid[1] * self.grid[2]


def _case(name, x_name, batch, grid, heads, head_dim, window, shift) -> Case:
    """A Case with Video-Swin's clipping rule applied (a window axis >= the grid axis is clipped, its shift 0)."""
    from lfvila_kernels.modules import clip_window  # lazily: importing triton waits for --interpret-ok

    win, sh = clip_window(tuple(grid), tuple(window), tuple(shift))
    return Case(name, batch, tuple(grid), heads, head_dim, win, sh, x_name)


# (name, grid, heads, window) of the six LF-VILA video-encoder layers at 32 frames of 192x320.
LFVILA_LAYERS = (
    ("layer0", (32, 24, 40), 4, (2, 3, 5)),
    ("layer1", (32, 12, 20), 8, (4, 3, 5)),
    ("layer2", (32, 6, 10), 16, (8, 3, 5)),
    ("layer3", (32, 6, 10), 16, (16, 3, 5)),
    ("layer4", (32, 6, 10), 16, (16, 3, 5)),
    ("layer5", (32, 3, 5), 32, (32, 3, 5)),
)


def lfvila_cases(batch: int = 16, frames: int = 32, head_dim: int = 32) -> list[Case]:
    """The shifted block of each LF-VILA layer, at ``frames`` frames (windows clipped to the grid)."""
    return [
        _case(name, "layer", batch, (frames, H, W), heads, head_dim, window, (0, window[1] // 2, window[2] // 2))
        for name, (_, H, W), heads, window in LFVILA_LAYERS
    ]


def video_swin_k400_cases(batch: int = 8, frames: int = 16, head_dim: int = 32) -> list[Case]:
    """Video Swin-T's four stages on a 32-frame 224x224 clip (patch 2x4x4: a 16x56x56 grid), window 8x7x7."""
    stages = ((56, 3), (28, 6), (14, 12), (7, 24))
    return [
        _case(f"stage{i + 1}", "stage", batch, (frames, hw, hw), heads, head_dim, (8, 7, 7), (4, 3, 3))
        for i, (hw, heads) in enumerate(stages)
    ]


def long_form_cases(batch: int = 1, frames: Sequence[int] = (32, 64, 128, 256), head_dim: int = 32) -> list[Case]:
    """LF-VILA's layer-0 attention (grid Tx24x40, 4 heads, window 2x3x5, shift 0x1x2) at growing T."""
    return [_case(str(t), "frames", batch, (t, 24, 40), 4, head_dim, (2, 3, 5), (0, 1, 2)) for t in frames]


SWEEP_WINDOWS = ((2, 3, 5), (4, 3, 5), (8, 3, 5), (8, 6, 5), (8, 6, 10), (16, 8, 8))  # 30 ... 1024 tokens


def window_sweep_cases(batch: int = 4, frames: int = 32, head_dim: int = 32) -> list[Case]:
    """One grid (``frames`` x24x40, 4 heads), windows of 30 to 1024 tokens, each shifted by half on every axis."""
    cases = []
    for window in SWEEP_WINDOWS:
        shift = tuple(w // 2 for w in window)
        cases.append(_case(str(window[0] * window[1] * window[2]), "window_tokens", batch, (frames, 24, 40), 4,
                           head_dim, window, shift))  # fmt: skip
    return cases


def tiny_cases(batch: int = 1, frames: int = 4, head_dim: int = 16) -> list[Case]:
    """Two small problems for smoke tests: a divisible shifted one and a non-divisible shifted one."""
    return [
        Case("tiny-div", batch, (frames, 6, 10), 2, head_dim, (2, 3, 5), (0, 1, 2), "case"),
        Case("tiny-pad", batch, (frames + 1, 5, 7), 2, head_dim, (2, 3, 5), (1, 1, 2), "case"),
    ]


@dataclass(frozen=True)
class ShapeSet:
    """A named list of cases at full size (CUDA) and at reduced size (the CPU), and the providers it adds."""

    full: Callable[..., list[Case]]  # (batch=None, frames=None) -> cases at the real sizes
    reduced: Callable[..., list[Case]]  # the same at CPU sizes
    extra_providers: tuple[str, ...] = ()  # run by default in this set only (e.g. full attention)


def _sized(fn, batch, frames=None):
    def build(batch_override=None, frames_override=None):
        kwargs = {"batch": batch_override or batch}
        if frames_override or frames:
            kwargs["frames"] = frames_override or frames
        return fn(**kwargs)

    return build


def _long_form(batch, frames):
    def build(batch_override=None, frames_override=None):
        return long_form_cases(batch_override or batch, (frames_override,) if frames_override else frames)

    return build


SHAPE_SETS: dict[str, ShapeSet] = {
    "lfvila": ShapeSet(_sized(lfvila_cases, 16, 32), _sized(lfvila_cases, 1, 8)),
    "video-swin-k400": ShapeSet(_sized(video_swin_k400_cases, 8, 16), _sized(video_swin_k400_cases, 1, 8)),
    "long-form": ShapeSet(
        _long_form(1, (32, 64, 128, 256)), _long_form(1, (8, 16, 32, 64)), extra_providers=("full-sdpa",)
    ),
    "window-sweep": ShapeSet(_sized(window_sweep_cases, 4, 32), _sized(window_sweep_cases, 1, 16)),
    "tiny": ShapeSet(_sized(tiny_cases, 1, 4), _sized(tiny_cases, 1, 4)),
}
PUBLIC_SHAPE_SETS = tuple(name for name in SHAPE_SETS if name != "tiny")  # "tiny" is for smoke tests
