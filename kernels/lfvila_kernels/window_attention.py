"""HTWA: fused 3D shifted-window attention (Hierarchical Temporal Window Attention), the public op.

``window_attention(q, k, v, window, shift, rel_pos_bias, scale, impl)`` computes Video-Swin's shifted-window attention
on a ``(B, T, H, W)`` token grid without any roll/pad/partition/reverse copies. The Triton kernels live in
``_window_attention_kernels.py``, their launchers and the ``torch.library`` registration (so
``torch.compile(fullgraph=True)`` sees one opaque op with a fake implementation and an autograd formula) in
``_window_attention_launch.py``; this file holds the argument checks and the dispatch between the fused path and
the torch paths: ``_window_attention_torch`` (the same geometry and bias + mask tiles through
``scaled_dot_product_attention``) for geometries with a shift mask or partial windows, where it is faster, else
``reference.window_attention_reference`` (also the oracle, and what ``torch.compile`` traces).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ._window_attention_torch import takes_masked_path, window_attention_torch
from .dispatch import select_impl
from .reference import bias_table_rows, window_attention_reference

TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_HEAD_DIM = 256


def _triple(name: str, value) -> tuple[int, int, int]:
    if isinstance(value, int) or not isinstance(value, Sequence) or len(value) != 3:
        raise ValueError(f"{name} must be a sequence of three ints (t, h, w), got {value!r}")
    if not all(isinstance(x, int) and not isinstance(x, bool) for x in value):
        raise ValueError(f"{name} must hold ints, got {value!r}")
    return tuple(int(x) for x in value)


def check_window_attention_args(q, k, v, window, shift, rel_pos_bias, scale) -> tuple:
    """Validate a ``window_attention`` call; return ``(window, shift, scale)`` normalised. Raises ValueError."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 6:
            raise ValueError(f"{name} must have 6 dims (B, T, H, W, heads, head_dim), got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {t.dtype}")
        if t.numel() == 0:
            raise ValueError(f"{name} is empty (shape {tuple(t.shape)})")
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must have a contiguous last dim (stride 1), got strides {t.stride()}")
    for name, t in (("k", k), ("v", v)):
        if t.shape != q.shape:
            raise ValueError(f"{name} shape {tuple(t.shape)} differs from q shape {tuple(q.shape)}")
        if t.dtype != q.dtype:
            raise ValueError(f"{name} dtype {t.dtype} differs from q dtype {q.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} device {t.device} differs from q device {q.device}")
    B, T, H, W, nh, hd = q.shape
    if hd > MAX_HEAD_DIM:
        raise ValueError(f"head_dim {hd} exceeds the supported maximum {MAX_HEAD_DIM}")
    window = _triple("window", window)
    shift = _triple("shift", shift)
    for axis, w, s, n in zip("THW", window, shift, (T, H, W)):
        if w <= 0:
            raise ValueError(f"window must be positive on every axis, got {window}")
        if w > n:
            raise ValueError(f"window {window} is larger than the grid (T, H, W) = {(T, H, W)} on axis {axis}")
        if not 0 <= s < w:
            raise ValueError(f"shift must satisfy 0 <= shift < window on every axis, got {shift} for window {window}")
    if rel_pos_bias is not None:
        if not isinstance(rel_pos_bias, torch.Tensor) or not rel_pos_bias.is_floating_point():
            raise ValueError("rel_pos_bias must be a floating-point tensor ((2wt-1)(2wh-1)(2ww-1), heads)")
        expected = (bias_table_rows(window), nh)
        if tuple(rel_pos_bias.shape) != expected:
            raise ValueError(
                f"rel_pos_bias must have shape {expected} for window {window} and {nh} heads, "
                f"got {tuple(rel_pos_bias.shape)}"
            )
        if rel_pos_bias.device != q.device:
            raise ValueError(f"rel_pos_bias device {rel_pos_bias.device} differs from q device {q.device}")
    if scale is None:
        scale = hd**-0.5
    elif isinstance(scale, torch.Tensor) or not isinstance(scale, (int, float)) or not scale > 0:
        raise ValueError(f"scale must be a positive float, got {scale!r}")
    return window, shift, float(scale)


def window_attention(q, k, v, window, shift=(0, 0, 0), rel_pos_bias=None, scale=None, impl: str = "auto"):
    """Shifted-window 3D attention over a ``(B, T, H, W)`` token grid (Video-Swin semantics, HTWA windows).

    Args:
        q, k, v: ``(B, T, H, W, heads, head_dim)``, fp32/fp16/bf16 (fp64 on the torch path), any strides with a
            contiguous last dim: views of one fused qkv projection ``(B, T, H, W, 3, heads, head_dim)`` are read in
            place.
        window: ``(wt, wh, ww)`` tokens per window; ``1 <= w <= grid axis``.
        shift: ``(st, sh, sw)`` cyclic shift, ``0 <= s < w``. Tokens are rolled by ``-shift``, partitioned into
            windows, attended, and rolled back; a token that the roll wrapped around (original coordinate
            ``< shift`` on an axis) never attends to one that it did not, on any axis (Swin's shift mask).
        rel_pos_bias: optional learnable table ``((2wt-1)(2wh-1)(2ww-1), heads)``, indexed as Video-Swin does
            (relative offset query minus key, row-major over (t, h, w)); it receives its gradient.
        scale: softmax scale, default ``head_dim ** -0.5``.
        impl: ``"auto"`` (Triton on CUDA, torch elsewhere; ``LFVILA_KERNELS`` overrides), ``"triton"``, ``"torch"``.

    Returns:
        ``(B, T, H, W, heads, head_dim)`` in the original token order, q's dtype, contiguous.

    A grid not divisible by the window ends in partial windows whose missing keys are masked out. Video-Swin instead
    zero-pads the grid before rolling and lets tokens attend to the zero padding; on divisible grids both agree.
    """
    window, shift, scale = check_window_attention_args(q, k, v, window, shift, rel_pos_bias, scale)
    if select_impl(impl, q.device, q.dtype, TRITON_DTYPES) == "torch":
        # under torch.compile the plan's data-dependent setup would break the graph: the reference's static ops
        if not torch.compiler.is_compiling() and takes_masked_path(q.shape[1:4], window, shift, q.device):
            return window_attention_torch(q, k, v, window, shift, rel_pos_bias, scale)
        return window_attention_reference(q, k, v, window, shift, rel_pos_bias, scale)
    from . import _window_attention_launch as fused

    return fused.window_attention_op(q, k, v, rel_pos_bias, list(window), list(shift), scale)
