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
"""

from .contrastive import contrastive_loss, distributed_contrastive_loss
from .modules import ContrastiveLoss, WindowAttention3D
from .reference import relative_position_index, window_attention_reference
from .window_attention import window_attention

__all__ = [
    "ContrastiveLoss",
    "WindowAttention3D",
    "contrastive_loss",
    "distributed_contrastive_loss",
    "relative_position_index",
    "window_attention",
    "window_attention_reference",
]
__version__ = "0.1.0"
