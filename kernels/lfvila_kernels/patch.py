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
    transformers' Swin-copy layers (``DonutSwinLayer``,          ``forward(hidden_states, input_dimensions, ...)``
        ``MaskFormerSwinLayer``, ``ClapAudioLayer``), by structure: ``_patch_hf_copies.py``
    MONAI ``nets.swin_unetr.SwinTransformerBlock`` (2-D, 3-D)   ``forward_part1(x, mask_matrix)``: ``_patch_monai.py``
    Video-Swin ``SwinTransformerBlock3D``-style blocks          ``forward_part1(x, mask_matrix)``, x ``(B, D, H, W, C)``
        (any module with ``forward_part1``, ``window_size``/``shift_size`` triples and an ``attn`` holding ``qkv``,
        ``proj``, ``relative_position_bias_table``, ``relative_position_index``, ``num_heads``, ``scale``)

Padding order, as each library does it (the fused op itself rolls the unpadded grid, then masks partial windows):
timm rolls the unpadded grid, then zero-pads; transformers (and its copies), MONAI and Video-Swin zero-pad, then roll
the padded grid. In all of them the padded tokens are attended (as keys with ``qkv(0)``) and the shift mask is built
on the padded grid from the regions ``[0, P-w) [P-w, P-s) [P-s, P)``. So a grid that the window does not divide is
padded here in the library's order and the fused op runs on a divisible grid ``G`` with the library's shift: for
transformers, MONAI and Video-Swin ``G = pad(x)``; for timm ``G = roll(pad(roll(x, -s)), +s)``, whose roll by ``-s``
is timm's padded grid and whose wrapped region is timm's ``[P-s, P)``. The relative-position index of all of them is
``lfvila_kernels.relative_position_index`` with ``wt = 1`` for the 2D ones; it is checked against each module's own
index buffer when patching.

Refused (``strict=True``: ValueError naming the module and the reason; ``strict=False``: listed in
``handle.skipped``): Swin-V2 blocks (timm's, transformers' ``Swinv2Layer`` and ``Swin2SRLayer``: cosine attention
with a learnable logit scale and a log-spaced continuous position-bias MLP), attention dropout > 0 (the fused op has
no dropout), subclasses that override the replaced method, a relative-position index or bias table that is not the
standard one, a Swin-copy layer with parts or a forward signature the copies do not have, and window-attention
modules that sit outside a supported block. At call time the original path runs instead of the fused one when the
fused op cannot reproduce it exactly: transformers' ``output_attentions=True`` (the fused op never forms the
attention matrix), a transformers window clipped below its table, and a Video-Swin or MONAI window clipped to the grid
where ``relative_position_index[:N, :N]``, which they read, is not the clipped window's own index
(``_patch_common.reads_sub_window``: an axis after the first one longer than 1 is clipped).
"""

from __future__ import annotations

import functools

import torch
import torch.nn as nn

from . import _patch_hf_copies, _patch_monai
from ._patch_common import (
    MARK,
    fused_heads,
    index_reason,
    library_class,
    overrides,
    pad_end,
    pad_then_roll_part1,
    table_reason,
)
from .dispatch import IMPLS

_V2_BLOCKS = ("SwinTransformerV2Block", "SwinTransformerV2CrBlock", "Swinv2Layer", "Swin2SRLayer")
_V2_REASON = ("Swin-V2 attention is not supported: cosine attention with a learnable per-head logit scale and a "
              "log-spaced continuous position-bias MLP, while the fused op computes scaled dot-product attention "
              "with a learned bias table")  # fmt: skip


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
            if current is not None and getattr(current, MARK, None) is self:
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
def _classify_timm(block, cls) -> str | None:
    if overrides(block, cls, "_attn") or overrides(block, cls, "forward"):
        return f"{type(block).__name__} overrides timm's SwinTransformerBlock._attn or forward"
    attn = block.attn
    if attn.attn_drop.p > 0:
        return f"attn_drop={attn.attn_drop.p} > 0 (the fused op has no attention dropout)"
    window = (1, *attn.window_size)
    return table_reason(attn.relative_position_bias_table, window, attn.num_heads) or index_reason(
        getattr(attn, "relative_position_index", None), window)


def _classify_hf(layer, cls) -> str | None:
    if overrides(layer, cls, "forward"):
        return f"{type(layer).__name__} overrides transformers' SwinLayer.forward"
    att = layer.attention
    if not all(hasattr(att, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj", "relative_position_bias")):
        return ("this transformers SwinLayer has no attention.{q,k,v,o}_proj / relative_position_bias (the "
                "transformers 5 layout); older layouts are not supported")  # fmt: skip
    if att.attention_dropout > 0:
        return f"attention_probs_dropout_prob={att.attention_dropout} > 0 (the fused op has no attention dropout)"
    rpb = att.relative_position_bias
    window = (1, *rpb.window_size)
    return table_reason(rpb.relative_position_bias_table, window, att.num_attention_heads) or index_reason(
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
    return table_reason(attn.relative_position_bias_table, window, attn.num_heads) or index_reason(
        getattr(attn, "relative_position_index", None), window)


def _is_v2(module) -> bool:
    if type(module).__name__ in _V2_BLOCKS:
        return True
    has_cpb = any(hasattr(module, n) for n in ("cpb_mlp", "continuous_position_bias_mlp", "meta_mlp"))
    return has_cpb and isinstance(getattr(module, "logit_scale", None), torch.Tensor)


def _classify(model: nn.Module):
    """``[(path, module, override, reason)]``: override the ``(method name, fused function)`` to install, None for a
    refused module; reason None when patchable."""
    from .modules import WindowAttention3D

    timm_cls = library_class("timm.models.swin_transformer", "SwinTransformerBlock")
    hf_cls = library_class("transformers.models.swin.modeling_swin", "SwinLayer")
    monai_cls = _patch_monai.block_class()
    found, covered = [], []
    for path, module in model.named_modules():
        if any(p == "" or path.startswith(p + ".") for p in covered):  # inside a block already classified
            continue
        if any(getattr(module.__dict__.get(a), MARK, None) is not None for a in ("_attn", "forward", "forward_part1")):
            found.append((path, module, None, "already patched by another handle"))
        elif timm_cls is not None and isinstance(module, timm_cls):
            found.append((path, module, ("_attn", _timm_attn), _classify_timm(module, timm_cls)))
        elif hf_cls is not None and isinstance(module, hf_cls):
            found.append((path, module, ("forward", _hf_forward), _classify_hf(module, hf_cls)))
        elif monai_cls is not None and isinstance(module, monai_cls):
            reason = _patch_monai.classify(module, monai_cls)
            found.append((path, module, ("forward_part1", pad_then_roll_part1), reason))
        elif _is_v2(module):
            found.append((path, module, None, _V2_REASON))
        elif _patch_hf_copies.is_copy(module):
            reason = _patch_hf_copies.classify(module)
            fn = None if reason else _patch_hf_copies.FORWARDS[_patch_hf_copies.flavour(module)]
            found.append((path, module, ("forward", fn), reason))
        elif _is_videoswin(module):
            found.append((path, module, ("forward_part1", pad_then_roll_part1), _classify_videoswin(module)))
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
    todo = [(path, module, override) for path, module, override, reason in found if reason is None]
    if strict and refused:
        lines = "\n".join(f"  {p}: {r}" for p, r in refused)
        raise ValueError(f"apply_window_attention(strict=True): {len(refused)} module(s) cannot be patched "
                         f"(strict=False skips and lists them):\n{lines}")  # fmt: skip
    if strict and not todo:
        raise ValueError(f"apply_window_attention found no supported window-attention block in "
                         f"{type(model).__name__} (timm Swin v1, transformers SwinLayer and its Swin-copy layers, "
                         "MONAI Swin, Video-Swin blocks)")
    handle = PatchHandle([], refused, [])
    for path, module, (attr, fn) in todo:
        override = functools.partial(fn, module, impl)
        setattr(override, MARK, handle)  # partial objects take attributes; marks whose override this is
        module.__dict__[attr] = override  # an instance attribute shadows the class method; nothing registered
        handle._undo.append((module, attr))
        handle.patched.append(path or "<root>")
    return handle


# --------------------------------------------------------------------------------------------------- fused paths
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
        g, padded = pad_end(g, (wh, ww), (1, 2))  # timm's padded, shifted grid (B, Hp, Wp, C)
        if shifted:
            g = torch.roll(g, shifts=(sh, sw), dims=(1, 2))
    else:
        g, padded = x, False
    Hp, Wp = g.shape[1], g.shape[2]
    qkv = attn.qkv(g).view(B, 1, Hp, Wp, 3, attn.num_heads, -1)  # (B, 1, Hp, Wp, 3, heads, hd)
    q, k, v = qkv.unbind(4)
    out = fused_heads(q, k, v, (1, wh, ww), (0, sh, sw), attn.relative_position_bias_table, attn.scale, impl)
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
    x, _ = pad_end(x, (ws, ws), (1, 2))  # (B, Hp, Wp, C)
    Hp, Wp = x.shape[1], x.shape[2]
    nh = att.num_attention_heads
    q, k, v = (proj(x).view(B, 1, Hp, Wp, nh, -1) for proj in (att.q_proj, att.k_proj, att.v_proj))
    out = fused_heads(q, k, v, (1, ws, ws), (0, s, s), rpb.relative_position_bias_table, att.scaling, impl)
    out = out.view(B, Hp, Wp, -1)[:, :H, :W]  # (B, H, W, C)
    out = layer.dropout(att.o_proj(out)).reshape(B, H * W, C)
    hidden_states = shortcut + layer.drop_path(out)
    hidden_states = layer.dropout(layer.mlp(layer.layernorm_after(hidden_states))) + hidden_states
    return hidden_states, None
