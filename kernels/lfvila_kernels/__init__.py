"""lfvila_kernels: fused Triton kernels for LF-VILA (torch + triton only; never imports ``lfvila``).

Public API:
    window_attention(q, k, v, window, shift=(0, 0, 0), rel_pos_bias=None, scale=None, impl="auto")
        q, k, v ``(B, T, H, W, heads, head_dim)`` -> ``(B, T, H, W, heads, head_dim)``
    WindowAttention3D(dim, num_heads, window, shift, qkv_bias=True, ...)
        ``(B, T, H, W, C)`` -> ``(B, T, H, W, C)``, Video-Swin state-dict compatible
    window_attention_reference(...), relative_position_index(window): the pure-torch oracle and its index
    contrastive_loss(a, b, temperature=0.05, logit_scale=None, labels=None, reduction="mean", ...)
        a ``(N, d)``, b ``(M, d)`` -> scalar symmetric InfoNCE, O(N + M) memory
    distributed_contrastive_loss(a_local, b_local, group=None, ...): the same over the global batch of all ranks
    ContrastiveLoss(temperature=0.05, learnable=False, ...): the module, optional learnable temperature
    sigmoid_loss(a, b, logit_scale, logit_bias=None, negative_only=False, impl="auto")
        a ``(N, d)``, b ``(N, d)`` (``(M, d)`` with negative_only) -> scalar SigLIP loss, logits never stored

Drop-ins for other models (submodules, loaded on first use; they never import timm, transformers or open_clip):
    patch.apply_window_attention(model, impl="auto", strict=True) -> PatchHandle (``.patched``, ``.skipped``,
        ``.revert()``, context manager): the fused window attention swapped, per instance, into timm Swin v1,
        transformers Swin and Video-Swin blocks; state dict unchanged
    clip_loss.ClipLoss(local_loss=False, gather_with_grad=False, cache_labels=False, rank=0, world_size=1):
        open_clip's ``ClipLoss``, fused; ``forward(image (n, d), text (n, d), logit_scale) -> loss``
    siglip_loss.SigLipLoss(cache_labels=False, rank=0, world_size=1, dist_impl=None): open_clip's ``SigLipLoss``,
        fused, neighbour exchange included; ``forward(image (n, d), text (n, d), logit_scale, logit_bias) -> loss``
"""

import importlib

if __name__ != "lfvila_kernels":
    # A second copy under another name (e.g. ``kernels.lfvila_kernels`` from the checkout root) would re-register the
    # ``lfvila_kernels::*`` torch.library ops with its own module state, silently replacing the first copy's: refuse.
    raise ImportError(f"lfvila_kernels was imported as {__name__!r}; import it as lfvila_kernels")

from .contrastive import contrastive_loss, distributed_contrastive_loss
from .modules import ContrastiveLoss, WindowAttention3D
from .reference import relative_position_index, window_attention_reference
from .siglip import sigmoid_loss
from .window_attention import window_attention

__all__ = [
    "ContrastiveLoss",
    "WindowAttention3D",
    "contrastive_loss",
    "distributed_contrastive_loss",
    "relative_position_index",
    "sigmoid_loss",
    "window_attention",
    "window_attention_reference",
]
__version__ = "0.1.0"

_LAZY = {"patch": "patch", "clip_loss": "clip_loss", "apply_window_attention": "patch", "PatchHandle": "patch",
         "ClipLoss": "clip_loss", "siglip_loss": "siglip_loss", "SigLipLoss": "siglip_loss"}  # fmt: skip


def __getattr__(name: str):
    """``lfvila_kernels.patch``, ``clip_loss``, ``siglip_loss`` and their main names, imported on first access."""
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module = importlib.import_module(f".{_LAZY[name]}", __name__)
    return module if name == _LAZY[name] else getattr(module, name)
