"""transformers' copies of the Swin v1 layer in the layout before transformers 5 (``DonutSwinLayer``,
``MaskFormerSwinLayer``, ``ClapAudioLayer``) for :func:`lfvila_kernels.patch.apply_window_attention`.

Recognised by structure, not by name: a layer whose class comes from ``transformers.models.*`` and whose child
modules are exactly ``layernorm_before``, ``attention`` (``self``: ``query`` / ``key`` / ``value`` / ``dropout`` with
``relative_position_bias_table`` and ``relative_position_index``; ``output``: ``dense`` / ``dropout``), ``drop_path``,
``layernorm_after``, ``intermediate``, ``output``. Two forwards are reproduced, told apart by their signature:

    forward(hidden_states, input_dimensions, output_attentions=False, always_partition=False)   Donut, Clap
        calls ``set_shift_and_window_size`` first (a grid whose smaller side is at most the window: window = that
        side, shift 0), unless ``always_partition``;
    forward(hidden_states, input_dimensions, output_attentions=False)                            MaskFormer
        never clips: a grid smaller than the window is padded up to it.

Both are otherwise line for line transformers' ``SwinLayer`` of 4.x: ``layernorm_before``, zero-pad the bottom and
right to multiples of the window (``maybe_pad``), roll the padded grid by ``-shift``, attend with the bias table and
the -100 mask of the padded grid (``get_attn_mask``: regions ``[0, P-w) [P-w, P-s) [P-s, P)``), ``output.dense``,
reverse, roll back, crop, ``shortcut + drop_path(attn)``, then ``h + output(intermediate(layernorm_after(h)))`` (no
drop path on the MLP branch). So the fused op runs on ``pad(x)`` with the layer's shift, as for ``SwinLayer``. The
scores are scaled by ``attention_head_size ** -0.5`` (transformers divides by its square root).

At call time the original forward runs when ``output_attentions`` is set (the fused op forms no attention matrix)
or when the window was clipped below the table's (transformers then fails on the bias shape, as unpatched).
"""

from __future__ import annotations

import inspect

import torch.nn as nn

from ._patch_common import fused_heads, index_reason, overrides, pad_end, table_reason

_LAYER = {"layernorm_before", "attention", "drop_path", "layernorm_after", "intermediate", "output"}
_ATTENTION = {"self", "output"}
_SELF = {"query", "key", "value", "dropout"}
_SELF_OUTPUT = {"dense", "dropout"}
_SIGNATURES = {("hidden_states", "input_dimensions", "output_attentions", "always_partition"): "partitioning",
               ("hidden_states", "input_dimensions", "output_attentions"): "fixed"}  # fmt: skip


def _library_base(module):
    """The first class of ``type(module)``'s MRO that comes from ``transformers.models`` and defines ``forward``."""
    return next((c for c in type(module).__mro__
                 if c.__module__.startswith("transformers.models.") and "forward" in c.__dict__), None)  # fmt: skip


def _children(module) -> set[str]:
    return {name for name, _ in module.named_children()}


def is_copy(module) -> bool:
    """Whether ``module`` is laid out as a transformers Swin-copy layer (see the module docstring)."""
    att = getattr(module, "attention", None)
    sa = getattr(att, "self", None)
    return (_library_base(module) is not None and isinstance(sa, nn.Module)
            and all(hasattr(sa, n) for n in ("query", "key", "value", "relative_position_bias_table"))
            and all(hasattr(module, n) for n in ("layernorm_before", "layernorm_after", "intermediate")))  # fmt: skip


def flavour(layer) -> str | None:
    """``"partitioning"`` or ``"fixed"`` (the two forwards above), or None for another signature."""
    params = tuple(inspect.signature(type(layer).forward).parameters)[1:]
    return _SIGNATURES.get(params)


def classify(layer) -> str | None:
    """None if the Swin-copy ``layer`` can be patched, else why not."""
    base = _library_base(layer)
    name = f"{base.__module__.rsplit('.', 1)[-1]}.{base.__name__}"
    if type(layer) is not base and overrides(layer, base, "forward"):
        return f"{type(layer).__name__} overrides transformers' {name}.forward"
    kind = flavour(layer)
    if kind is None:
        return (f"{name}.forward{inspect.signature(type(layer).forward)} is not one of the Swin-copy forwards "
                "reproduced here (Donut / Clap, MaskFormer)")  # fmt: skip
    if kind == "partitioning" and not callable(getattr(layer, "set_shift_and_window_size", None)):
        return f"{name} takes always_partition but has no set_shift_and_window_size"
    att, sa = layer.attention, layer.attention.self
    for module, path, expected in ((layer, "", _LAYER), (att, "attention.", _ATTENTION), (sa, "attention.self.", _SELF),
                                   (att.output, "attention.output.", _SELF_OUTPUT)):  # fmt: skip
        if _children(module) != expected:
            extra, missing = sorted(_children(module) - expected), sorted(expected - _children(module))
            return (f"{path or name + ' '}has child modules {sorted(_children(module))}, not the Swin-copy layout "
                    f"{sorted(expected)} (extra {extra}, missing {missing})")  # fmt: skip
    if sa.dropout.p > 0:
        return f"attention_probs_dropout_prob={sa.dropout.p} > 0 (the fused op has no attention dropout)"
    window = (1, *(int(w) for w in sa.window_size))
    return table_reason(sa.relative_position_bias_table, window, sa.num_attention_heads) or index_reason(
        getattr(sa, "relative_position_index", None), window)


def _fused(layer, impl, hidden_states, input_dimensions):
    """The layer's forward with the fused attention: ``hidden_states (B, H*W, C)`` -> ``(B, H*W, C)``, or None when
    the window was clipped below the table's (the caller then runs the original forward)."""
    sa = layer.attention.self
    ws, s = int(layer.window_size), int(layer.shift_size)
    if (ws, ws) != tuple(int(w) for w in sa.window_size):
        return None
    H, W = input_dimensions
    B, _, C = hidden_states.shape
    shortcut = hidden_states
    x = layer.layernorm_before(hidden_states).view(B, H, W, C)
    x, _ = pad_end(x, (ws, ws), (1, 2))  # transformers' maybe_pad: (B, Hp, Wp, C)
    Hp, Wp = x.shape[1], x.shape[2]
    nh = sa.num_attention_heads
    q, k, v = (proj(x).view(B, 1, Hp, Wp, nh, -1) for proj in (sa.query, sa.key, sa.value))
    scale = sa.attention_head_size**-0.5
    out = fused_heads(q, k, v, (1, ws, ws), (0, s, s), sa.relative_position_bias_table, scale, impl)
    out = out.view(B, Hp, Wp, C)[:, :H, :W]  # (B, H, W, C)
    out = layer.attention.output(out, x).reshape(B, H * W, C)  # dense + dropout, per token: crop first
    hidden_states = shortcut + layer.drop_path(out)
    return hidden_states + layer.output(layer.intermediate(layer.layernorm_after(hidden_states)))


def forward_partitioning(layer, impl, hidden_states, input_dimensions, output_attentions=False,
                         always_partition=False):  # fmt: skip
    """Donut / Clap ``forward``, fused: ``hidden_states (B, H*W, C)`` -> ``((B, H*W, C),)``."""
    if not output_attentions:
        if not always_partition:
            layer.set_shift_and_window_size(input_dimensions)
        out = _fused(layer, impl, hidden_states, input_dimensions)
        if out is not None:
            return (out,)
    return type(layer).forward(layer, hidden_states, input_dimensions, output_attentions, always_partition)


def forward_fixed(layer, impl, hidden_states, input_dimensions, output_attentions=False):
    """MaskFormer ``forward``, fused: ``hidden_states (B, H*W, C)`` -> ``((B, H*W, C),)``."""
    out = None if output_attentions else _fused(layer, impl, hidden_states, input_dimensions)
    if out is not None:
        return (out,)
    return type(layer).forward(layer, hidden_states, input_dimensions, output_attentions)


FORWARDS = {"partitioning": forward_partitioning, "fixed": forward_fixed}
