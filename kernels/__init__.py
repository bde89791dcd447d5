"""lfvila_kernels: fused Triton kernels for LF-VILA (torch + triton only; never imports ``lfvila``).

Public API:
    window_attention(q, k, v, window, shift=(0, 0, 0), rel_pos_bias=None, scale=None, impl="auto")
        q, k, v ``(B, T, H, W, heads, head_dim)`` -> ``(B, T, H, W, heads, head_dim)``
    WindowAttention3D(dim, num_heads, window, shift, qkv_bias=True, ...)
        ``(B, T, H, W, C)`` -> ``(B, T, H, W, C)``, Video-Swin state-dict compatible
    window_attention_reference(...), relative_position_index(window): the pure-torch oracle and its index
"""

from .modules import WindowAttention3D
from .reference import relative_position_index, window_attention_reference
from .window_attention import window_attention

__all__ = ["WindowAttention3D", "relative_position_index", "window_attention", "window_attention_reference"]
__version__ = "0.1.0"
