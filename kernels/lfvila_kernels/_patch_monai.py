"""MONAI's Swin blocks (``monai.networks.nets.swin_unetr.SwinTransformerBlock``, in ``SwinUNETR`` and
``SwinTransformer``, 2-D and 3-D) for :func:`lfvila_kernels.patch.apply_window_attention`.

MONAI's ``forward_part1(x, mask_matrix)`` is Video-Swin's: ``norm1``, ``get_window_size`` (a window axis at least
the grid is clipped to the grid, shift 0 there), zero-padding at the end of each axis, a roll of the padded grid by
``-shift``, window partition, attention with the bias ``table[index[:N, :N]]`` and the -100 mask that ``BasicLayer``
builds by ``compute_mask`` over the padded grid, reverse, roll back, crop. So the fused path is
:func:`._patch_common.pad_then_roll_part1`, for ``x (B, D, H, W, C)`` and ``(B, H, W, C)`` alike (a 2-D window
``(h, w)`` is the fused op's ``(1, h, w)``). ``use_v2`` (a residual conv block before each stage),
``use_checkpoint`` (MONAI checkpoints ``self.forward_part1``, the override) and ``use_flash_attention``
(``scaled_dot_product_attention`` on the same scores under ``no_grad``) leave the function unchanged; Hyena stages
hold no window attention and are passed over. MONAI is recognised only when already imported.
"""

from __future__ import annotations

from ._patch_common import index_reason, library_class, overrides, table_reason, triple

MODULE = "monai.networks.nets.swin_unetr"


def block_class():
    """MONAI's ``SwinTransformerBlock`` when MONAI's Swin module is imported, else None."""
    return library_class(MODULE, "SwinTransformerBlock")


def classify(block, cls) -> str | None:
    """None if the MONAI ``block`` can be patched, else why not."""
    if overrides(block, cls, "forward_part1"):
        return f"{type(block).__name__} overrides MONAI's SwinTransformerBlock.forward_part1"
    attn = block.attn
    attn_cls = library_class(MODULE, "WindowAttention")
    if attn_cls is not None and (not isinstance(attn, attn_cls) or overrides(attn, attn_cls, "forward")):
        return f"its attn ({type(attn).__name__}) is not MONAI's WindowAttention or overrides its forward"
    if attn.attn_drop.p > 0:
        return f"attn_drop={attn.attn_drop.p} > 0 (the fused op has no attention dropout)"
    if len(attn.window_size) not in (2, 3) or len(block.shift_size) != len(attn.window_size):
        return f"window_size {tuple(attn.window_size)} / shift_size {tuple(block.shift_size)}: not 2-D or 3-D"
    window = triple(attn.window_size)
    if triple(block.window_size) != window:
        return f"attn.window_size {tuple(attn.window_size)} differs from the block's {tuple(block.window_size)}"
    return table_reason(attn.relative_position_bias_table, window, attn.num_heads) or index_reason(
        getattr(attn, "relative_position_index", None), window)
