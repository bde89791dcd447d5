"""Revertible, per-instance swaps of the fused window attention into existing Swin models.

``apply_window_attention(model, impl="auto", strict=True) -> PatchHandle`` walks ``model`` and replaces, on each
supported block *instance*, the block's whole attention path (cyclic shift, padding, window partition, masked
attention with the relative-position bias, reverse) by one call of :func:`lfvila_kernels.window_attention`. The
block's own ``qkv`` / ``proj`` / ``relative_position_bias_table`` parameters are used as they are, nothing is added to
or removed from the module tree, so ``state_dict()`` keeps its keys and tensors and checkpoints saved before or after
patching load either way. No class or library global is touched: the override is an instance attribute that shadows
the class method, and ``handle.revert()`` deletes it.

Supported blocks (the method overridden on the instance):

    timm ``swin_transformer.SwinTransformerBlock`` (Swin v1)    ``_attn(x)``, x ``(B, H, W, C)``
    transformers ``models.swin.modeling_swin.SwinLayer`` (5.x)  ``forward(hidden_states, input_dimensions, ...)``
    Video-Swin ``SwinTransformerBlock3D``-style blocks          ``forward_part1(x, mask_matrix)``, x ``(B, D, H, W, C)``
        (any module with ``forward_part1``, ``window_size``/``shift_size`` triples and an ``attn`` holding ``qkv``,
        ``proj``, ``relative_position_bias_table``, ``relative_position_index``, ``num_heads``, ``scale``)

Padding order, as each library does it (the fused op itself rolls the unpadded grid, then masks partial windows):
timm rolls the unpadded grid, then zero-pads; transformers and Video-Swin zero-pad, then roll the padded grid. In
all three the padded tokens are attended (as keys with ``qkv(0)``) and the shift mask is built on the padded grid
from the regions ``[0, P-w) [P-w, P-s) [P-s, P)``. So a grid that the window does not divide is padded here in the
library's order and the fused op runs on a divisible grid ``G`` with the library's shift: for transformers and
Video-Swin ``G = pad(x)``; for timm ``G = roll(pad(roll(x, -s)), +s)``, whose roll by ``-s`` is timm's padded grid
and whose wrapped region is timm's ``[P-s, P)``. The relative-position index of all three is
``lfvila_kernels.relative_position_index`` with ``wt = 1`` for the 2D ones; it is checked against each module's own
index buffer when patching.

Refused (``strict=True``: ValueError naming the module and the reason; ``strict=False``: listed in
``handle.skipped``): Swin-V2 blocks (cosine attention with a learnable logit scale and a log-spaced continuous
position-bias MLP), attention dropout > 0 (the fused op has no dropout), subclasses that override the replaced
method, a relative-position index or bias table that is not the standard one, and window-attention modules that sit
outside a supported block. At call time the original path runs instead of the fused one when the fused op cannot
reproduce it exactly: transformers' ``output_attentions=True`` (the fused op never forms the attention matrix) and a
Video-Swin window clipped on the H or W axis (Video-Swin then reads ``relative_position_index[:N, :N]``).
"""

from __future__ import annotations

import functools
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

from .dispatch import IMPLS
from .modules import clip_window, crop_bias_table
from .reference import bias_table_rows, relative_position_index
from .window_attention import window_attention

_V2_BLOCKS = ("SwinTransformerV2Block", "SwinTransformerV2CrBlock", "Swinv2Layer")
_V2_REASON = ("Swin-V2 attention is not supported: cosine attention with a learnable per-head logit scale and a "
              "log-spaced continuous position-bias MLP, while the fused op computes scaled dot-product attention "
              "with a learned bias table")  # fmt: skip
_MARK = "_lfvila_fused"  # attribute of the installed partial: which handle installed it


class PatchHandle:
    """What :func:`apply_window_attention` changed, and the way back.

    ``patched``: module paths (``model.named_modules()`` names) whose attention runs fused. ``skipped``:
    ``(path, reason)`` for modules left alone (``strict=False``). ``revert()`` restores every patched instance
    (idempotent); the handle is also a context manager that reverts on exit.
    """

    def __init__(self, patched: list[str], skipped: list[tuple[str, str]], undo: list[tuple[nn.Module, str]]):
        self.patched, self.skipped = patched, skipped
        self._undo = undo

    def revert(self) -> None:
        """Delete the instance overrides installed by this handle; the class methods show through again."""
        while self._undo:
            module, attr = self._undo.pop()
            current = module.__dict__.get(attr)
            if current is not None and getattr(current, _MARK, None) is self:
                del module.__dict__[attr]

    @property
    def active(self) -> bool:
        """True until :meth:`revert` has run."""
        return bool(self._undo)

    def __enter__(self) -> PatchHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.revert()

    def __repr__(self) -> str:
        return f"PatchHandle(patched={len(self.patched)}, skipped={len(self.skipped)}, active={self.active})"


# --------------------------------------------------------------------------------------------------- classification
def _library_class(module_name: str, class_name: str):
    """The class if its library is already imported (a model built from it must have imported it), else None."""
    mod = sys.modules.get(module_name)
    return getattr(mod, class_name, None) if mod is not None else None


def _index_reason(index, window) -> str | None:
    """None if a module's relative-position index buffer is the standard one for ``window`` (t, h, w), else why."""
    if index is None or index.device.type == "meta":
        return None
    n = window[0] * window[1] * window[2]
    if index.numel() != n * n or not torch.equal(index.detach().cpu().reshape(n, n), relative_position_index(window)):
        return f"its relative_position_index is not the standard Swin index for window {window}"
    return None


def _table_reason(table, window, heads) -> str | None:
    expected = (bias_table_rows(window), heads)
    if not isinstance(table, torch.Tensor) or tuple(table.shape) != expected:
        got = tuple(table.shape) if isinstance(table, torch.Tensor) else type(table).__name__
        return f"its relative_position_bias_table has shape {got}, expected {expected} for window {window}"
    return None


def _overrides(module, cls, method: str) -> bool:
    return getattr(type(module), method) is not getattr(cls, method)


def _classify_timm(block, cls) -> str | None:
    if _overrides(block, cls, "_attn") or _overrides(block, cls, "forward"):
        return f"{type(block).__name__} overrides timm's SwinTransformerBlock._attn or forward"
    attn = block.attn
    if attn.attn_drop.p > 0:
        return f"attn_drop={attn.attn_drop.p} > 0 (the fused op has no attention dropout)"
    window = (1, *attn.window_size)
    return _table_reason(attn.relative_position_bias_table, window, attn.num_heads) or _index_reason(
        getattr(attn, "relative_position_index", None), window)


def _classify_hf(layer, cls) -> str | None:
    if _overrides(layer, cls, "forward"):
        return f"{type(layer).__name__} overrides transformers' SwinLayer.forward"
    att = layer.attention
    if not all(hasattr(att, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj", "relative_position_bias")):
        return ("this transformers SwinLayer has no attention.{q,k,v,o}_proj / relative_position_bias (the "
                "transformers 5 layout); older layouts are not supported")  # fmt: skip
    if att.attention_dropout > 0:
        return f"attention_probs_dropout_prob={att.attention_dropout} > 0 (the fused op has no attention dropout)"
    rpb = att.relative_position_bias
    window = (1, *rpb.window_size)
    return _table_reason(rpb.relative_position_bias_table, window, att.num_attention_heads) or _index_reason(
        rpb.relative_position_index, window)


def _is_videoswin(block) -> bool:
    attn = getattr(block, "attn", None)
    triple = lambda v: isinstance(v, (tuple, list)) and len(v) == 3  # noqa: E731
    return (callable(getattr(block, "forward_part1", None)) and isinstance(attn, nn.Module)
            and all(hasattr(attn, n) for n in ("qkv", "proj", "relative_position_bias_table", "num_heads", "scale"))
            and triple(getattr(block, "window_size", None)) and triple(getattr(block, "shift_size", None)))


def _classify_videoswin(block) -> str | None:
    attn = block.attn
    drop = getattr(getattr(attn, "attn_drop", None), "p", 0.0)
    if drop > 0:
        return f"attn_drop={drop} > 0 (the fused op has no attention dropout)"
    window = tuple(int(w) for w in attn.window_size)
    if window != tuple(int(w) for w in block.window_size):
        return f"attn.window_size {window} differs from the block's window_size {tuple(block.window_size)}"
    return _table_reason(attn.relative_position_bias_table, window, attn.num_heads) or _index_reason(
        getattr(attn, "relative_position_index", None), window)


def _is_v2(module) -> bool:
    if type(module).__name__ in _V2_BLOCKS:
        return True
    has_cpb = any(hasattr(module, n) for n in ("cpb_mlp", "continuous_position_bias_mlp", "meta_mlp"))
    return has_cpb and isinstance(getattr(module, "logit_scale", None), torch.Tensor)


def _classify(model: nn.Module):
    """``[(path, module, kind, reason)]``: kind in timm | hf | videoswin | None; reason None when patchable."""
    from .modules import WindowAttention3D

    timm_cls = _library_class("timm.models.swin_transformer", "SwinTransformerBlock")
    hf_cls = _library_class("transformers.models.swin.modeling_swin", "SwinLayer")
    found, covered = [], []
    for path, module in model.named_modules():
        if any(p == "" or path.startswith(p + ".") for p in covered):  # inside a block already classified
            continue
        if any(getattr(module.__dict__.get(a), _MARK, None) is not None for a in ("_attn", "forward", "forward_part1")):
            found.append((path, module, None, "already patched by another handle"))
        elif timm_cls is not None and isinstance(module, timm_cls):
            found.append((path, module, "timm", _classify_timm(module, timm_cls)))
        elif hf_cls is not None and isinstance(module, hf_cls):
            found.append((path, module, "hf", _classify_hf(module, hf_cls)))
        elif _is_v2(module):
            found.append((path, module, None, _V2_REASON))
        elif _is_videoswin(module):
            found.append((path, module, "videoswin", _classify_videoswin(module)))
        elif isinstance(module, WindowAttention3D):
            covered.append(path)  # ours, already fused
            continue
        elif isinstance(getattr(module, "relative_position_bias_table", None), torch.Tensor):
            found.append((path, module, None, f"a window-attention module ({type(module).__name__}) outside a "
                          "supported Swin block: the fused op replaces the block's shift/pad/partition path"))
        else:
            continue
        covered.append(path)
    return found


# --------------------------------------------------------------------------------------------------- public entry
def apply_window_attention(model: nn.Module, impl: str = "auto", strict: bool = True) -> PatchHandle:
    """Swap the fused window attention into every supported Swin block of ``model``, per instance.

    Args:
        model: any ``nn.Module`` holding timm Swin (v1) blocks, transformers ``SwinLayer``s or Video-Swin-style
            ``SwinTransformerBlock3D`` blocks (see the module docstring); the library is never imported here.
        impl: ``"auto"`` (Triton on CUDA, the torch reference elsewhere; ``LFVILA_KERNELS`` overrides), ``"triton"``,
            ``"torch"``: passed to every :func:`lfvila_kernels.window_attention` call.
        strict: True: any unsupported window-attention module (or none found at all) raises ValueError naming
            the module path and the reason, and nothing is patched. False: such modules are left as they are and
            listed in ``handle.skipped``.

    Returns a :class:`PatchHandle` (``patched``, ``skipped``, ``revert()``, context manager). Shapes, dtypes,
    devices and ``state_dict()`` are unchanged; outputs agree with the unpatched model up to float rounding.
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be an nn.Module, got {type(model).__name__}")
    found = _classify(model)
    refused = [(path or "<root>", reason) for path, _, _, reason in found if reason is not None]
    todo = [(path, module, kind) for path, module, kind, reason in found if reason is None]
    if strict and refused:
        lines = "\n".join(f"  {p}: {r}" for p, r in refused)
        raise ValueError(f"apply_window_attention(strict=True): {len(refused)} module(s) cannot be patched "
                         f"(strict=False skips and lists them):\n{lines}")  # fmt: skip
    if strict and not todo:
        raise ValueError(f"apply_window_attention found no supported window-attention block in "
                         f"{type(model).__name__} (timm Swin v1, transformers SwinLayer, Video-Swin blocks)")
    handle = PatchHandle([], refused, [])
    for path, module, kind in todo:
        attr, fn = {"timm": ("_attn", _timm_attn), "hf": ("forward", _hf_forward),
                    "videoswin": ("forward_part1", _videoswin_part1)}[kind]  # fmt: skip
        override = functools.partial(fn, module, impl)
        setattr(override, _MARK, handle)  # partial objects take attributes; marks whose override this is
        module.__dict__[attr] = override  # an instance attribute shadows the class method; nothing registered
        handle._undo.append((module, attr))
        handle.patched.append(path or "<root>")
    return handle


# --------------------------------------------------------------------------------------------------- fused paths
def _pad_end(x: torch.Tensor, window, dims) -> tuple[torch.Tensor, bool]:
    """Zero-pad channels-last ``x`` at the end of ``dims`` (consecutive, ending before the channel dim) to multiples
    of ``window`` (one entry per dim). Returns ``(x or the padded copy, whether anything was padded)``."""
    pads = {d: (-x.shape[d]) % w for d, w in zip(dims, window)}
    if not any(pads.values()):
        return x, False
    spec = [0, 0]  # F.pad lists (before, after) pairs from the last dim backwards: channels first
    for d in range(x.dim() - 2, min(dims) - 1, -1):
        spec += [0, pads.get(d, 0)]
    return F.pad(x, spec), True


def _fused_heads(q, k, v, window, shift, table, scale, impl) -> torch.Tensor:
    """q, k, v ``(B, T, H, W, heads, hd)`` on a grid the window divides -> ``(B, T, H, W, heads * hd)``."""
    out = window_attention(q, k, v, window, shift, table, scale, impl=impl)
    return out.flatten(-2)


def _timm_attn(block, impl, x: torch.Tensor) -> torch.Tensor:
    """timm ``SwinTransformerBlock._attn``, fused. ``x (B, H, W, C)`` after ``norm1`` -> ``(B, H, W, C)``.

    timm rolls the unpadded grid and then pads; ``G = roll(pad(roll(x, -s)), +s)`` is the grid whose roll by
    ``-s`` is timm's padded, shifted grid (``G = x`` when nothing is padded).
    """
    attn = block.attn
    if tuple(attn.window_size) != tuple(block.window_size):
        return type(block)._attn(block, x)  # a resized block whose table no longer matches: timm's own path
    (wh, ww), (sh, sw) = tuple(block.window_size), tuple(block.shift_size)
    B, H, W, _ = x.shape
    shifted = bool(sh or sw)
    if (-H) % wh or (-W) % ww:
        g = torch.roll(x, shifts=(-sh, -sw), dims=(1, 2)) if shifted else x
        g, padded = _pad_end(g, (wh, ww), (1, 2))  # timm's padded, shifted grid (B, Hp, Wp, C)
        if shifted:
            g = torch.roll(g, shifts=(sh, sw), dims=(1, 2))
    else:
        g, padded = x, False
    Hp, Wp = g.shape[1], g.shape[2]
    qkv = attn.qkv(g).view(B, 1, Hp, Wp, 3, attn.num_heads, -1)  # (B, 1, Hp, Wp, 3, heads, hd)
    q, k, v = qkv.unbind(4)
    out = _fused_heads(q, k, v, (1, wh, ww), (0, sh, sw), attn.relative_position_bias_table, attn.scale, impl)
    out = out.view(B, Hp, Wp, -1)  # G's order
    if padded:
        if shifted:
            out = torch.roll(out, shifts=(-sh, -sw), dims=(1, 2))  # timm's padded, shifted order
        out = out[:, :H, :W]
        if shifted:
            out = torch.roll(out, shifts=(sh, sw), dims=(1, 2))
    return attn.proj_drop(attn.proj(out))


def _hf_forward(layer, impl, hidden_states, input_dimensions, always_partition=False, **kwargs):
    """transformers ``SwinLayer.forward``, fused: ``hidden_states (B, H*W, C)`` -> ``((B, H*W, C), None)``.

    transformers pads, then rolls the padded grid, so the fused op runs on ``pad(x)`` with the layer's shift. With
    ``output_attentions`` requested the original forward runs (the fused op never forms attention weights).
    """
    att = layer.attention
    if kwargs.get("output_attentions", getattr(att.config, "output_attentions", False)):
        return type(layer).forward(layer, hidden_states, input_dimensions, always_partition, **kwargs)
    if not always_partition:
        layer.set_shift_and_window_size(input_dimensions)
    ws, s = int(layer.window_size), int(layer.shift_size)
    rpb = att.relative_position_bias
    if (ws, ws) != tuple(rpb.window_size):  # a window clamped below the table's: transformers' path, as unpatched
        return type(layer).forward(layer, hidden_states, input_dimensions, always_partition, **kwargs)
    H, W = input_dimensions
    B, _, C = hidden_states.shape
    shortcut = hidden_states
    x = layer.layernorm_before(hidden_states).view(B, H, W, C)
    x, _ = _pad_end(x, (ws, ws), (1, 2))  # (B, Hp, Wp, C)
    Hp, Wp = x.shape[1], x.shape[2]
    nh = att.num_attention_heads
    q, k, v = (proj(x).view(B, 1, Hp, Wp, nh, -1) for proj in (att.q_proj, att.k_proj, att.v_proj))
    out = _fused_heads(q, k, v, (1, ws, ws), (0, s, s), rpb.relative_position_bias_table, att.scaling, impl)
    out = out.view(B, Hp, Wp, -1)[:, :H, :W]  # (B, H, W, C)
    out = layer.dropout(att.o_proj(out)).reshape(B, H * W, C)
    hidden_states = shortcut + layer.drop_path(out)
    hidden_states = layer.dropout(layer.mlp(layer.layernorm_after(hidden_states))) + hidden_states
    return hidden_states, None


def _videoswin_part1(block, impl, x: torch.Tensor, mask_matrix=None) -> torch.Tensor:
    """Video-Swin ``SwinTransformerBlock3D.forward_part1``, fused: ``x (B, D, H, W, C)`` -> ``(B, D, H, W, C)``
    (``norm1`` included, as there). Video-Swin pads, then rolls the padded grid, so the fused op runs on
    ``pad(x)``; ``mask_matrix`` (Video-Swin's shift mask) is implied by the shift and not read.
    """
    attn = block.attn
    B, D, H, W, C = x.shape
    full = tuple(int(w) for w in attn.window_size)
    window, shift = clip_window((D, H, W), tuple(block.window_size), tuple(block.shift_size))
    if window[1:] != full[1:]:  # Video-Swin's index[:N, :N] on a spatially clipped window: its own path
        return type(block).forward_part1(block, x, mask_matrix)
    x = block.norm1(x)
    x, _ = _pad_end(x, window, (1, 2, 3))  # (B, Dp, Hp, Wp, C)
    Dp, Hp, Wp = x.shape[1:4]
    qkv = attn.qkv(x).view(B, Dp, Hp, Wp, 3, attn.num_heads, -1)  # (B, Dp, Hp, Wp, 3, heads, hd)
    q, k, v = qkv.unbind(4)
    table = crop_bias_table(attn.relative_position_bias_table, full, window)  # time-clipped: Video-Swin's rows
    out = _fused_heads(q, k, v, window, shift, table, float(attn.scale), impl).view(B, Dp, Hp, Wp, -1)
    return attn.proj_drop(attn.proj(out[:, :D, :H, :W]))
