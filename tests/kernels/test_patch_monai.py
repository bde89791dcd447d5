"""``apply_window_attention`` on MONAI's ``SwinUNETR`` and its encoder ``SwinTransformer`` (2-D and 3-D).

The rule of ``test_patch.py`` (fp32 on the CPU, both fp32 runs under ``RoundedOps``): the patched model's error
against the float64 model is at most twice the unpatched fp32 model's plus the floor, for the output and the gradient
of the input and of every parameter (the bias tables included, randomised so that they matter).

Which stages the fused op runs. MONAI's ``get_window_size`` clips a window axis that is at least the grid to the
grid (shift 0 there) and then reads ``relative_position_index[:N, :N]`` of the full window. Where those first N
tokens form the clipped window's own box (every axis after the first one longer than 1 whole), that is the centre of
the table and the block runs fused; elsewhere (e.g. a 3-D stage of 4^3 or 2^3 tokens under a 7^3 or 4^3 window) the
patched block runs MONAI's own path, and the tests count the fused calls to say which. SwinUNETR needs every input
side divisible by 32, so its 3-D stage grids are input/2, /4, /8, /16: no input below 128^3 pads its last 3-D stage
with window 7; 2-D inputs of 128^2 pad (window 7) or divide (window 4) all four stages.
"""

from __future__ import annotations

import copy

import pytest
import torch

from lfvila_kernels.patch import apply_window_attention
from tests.kernels.test_patch import _assert_patched_within_tolerance, _assert_same_state, _fused_calls, _state

monai_nets = pytest.importorskip("monai.networks.nets", reason="monai is not installed (pip install --no-deps monai)")
swin_unetr = pytest.importorskip("monai.networks.nets.swin_unetr")


def _randomise_tables(model):
    with torch.no_grad():  # MONAI initialises the bias tables with std 0.02: make them matter
        for name, p in model.named_parameters():
            if name.endswith("relative_position_bias_table"):
                p.normal_(0, 0.5)
    return model


def _unetr(window, dims=3, **kwargs):
    torch.manual_seed(0)
    model = monai_nets.SwinUNETR(in_channels=1, out_channels=2, feature_size=12, depths=(2, 2, 2, 2),
                                 num_heads=(1, 1, 2, 2), window_size=window, spatial_dims=dims, **kwargs)  # fmt: skip
    return _randomise_tables(model.eval())


def _encoder(window, dims=3, **kwargs):
    torch.manual_seed(0)
    model = swin_unetr.SwinTransformer(in_chans=1, embed_dim=12, window_size=(window,) * dims, patch_size=(2,) * dims,
                                       depths=(2, 2, 2, 2), num_heads=(1, 1, 2, 2), spatial_dims=dims, **kwargs)
    return _randomise_tables(model.eval())  # fmt: skip


def _run(model, x):
    return model(x)


def _encoder_run(model, x):  # the five feature maps, one tensor
    return torch.cat([f.flatten(1) for f in model(x)], 1)


BLOCKS = [f"layers{i}.0.blocks.{j}" for i in range(1, 5) for j in range(2)]


def _stage_grids(side, stages=4):
    """The attention grid side of each stage: patch 2, then halved (rounding up) by each PatchMerging."""
    grids = [-(-side // 2)]
    for _ in range(stages - 1):
        grids.append(-(-grids[-1] // 2))
    return grids


# --------------------------------------------------------------------------------------------------- 3-D
@pytest.mark.parametrize("window, fused", [(4, 6), (7, 4)], ids=["window4-divides", "window7-pads"])
def test_monai_3d_encoder_forward_and_backward_agree(window, fused):
    """32^3: stage grids 16, 8, 4, 2. Window 4 divides 16 and 8 and is the grid at 4 (shift 0); window 7 pads 16 -> 21
    and 8 -> 14. Below that MONAI's clipped window reads a non-box part of the table: its own path."""
    grids = _stage_grids(32)
    assert grids == [16, 8, 4, 2]
    pads = [g > window and g % window != 0 for g in grids]
    assert pads == ([False] * 4 if window == 4 else [True, True, False, False])
    model = _encoder(window)
    x = torch.randn(1, 1, 32, 32, 32, generator=torch.Generator().manual_seed(1))
    handle = _assert_patched_within_tolerance(model, x, _encoder_run, fused_calls=fused)
    assert handle.patched == BLOCKS and handle.skipped == []


@pytest.mark.slow
@pytest.mark.parametrize("window, fused", [(4, 8), (7, 6)], ids=["window4-divides", "window7-pads"])
def test_monai_swin_unetr_64_cubed_forward_and_backward_agree(window, fused):
    """The whole SwinUNETR at 64^3 (stage grids 32, 16, 8, 4): window 4 divides every stage (the last one is the
    window, shift 0); window 7 pads 32, 16 and 8, and the 4^3 stage runs MONAI's clipped path."""
    model = _unetr(window)
    x = torch.randn(1, 1, 64, 64, 64, generator=torch.Generator().manual_seed(2))
    handle = _assert_patched_within_tolerance(model, x, _run, fused_calls=fused)
    assert handle.patched == [f"swinViT.{b}" for b in BLOCKS]


# --------------------------------------------------------------------------------------------------- 2-D
@pytest.mark.parametrize("window", [4, 7], ids=["window4-divides", "window7-pads"])
def test_monai_2d_encoder_every_stage_fused(window):
    """128^2: stage grids 64, 32, 16, 8: window 4 divides each, window 7 pads each (shifted blocks included), and
    every block runs fused."""
    grids = _stage_grids(128)
    assert all((g % window == 0) == (window == 4) and g > window for g in grids)
    model = _encoder(window, dims=2)
    x = torch.randn(1, 1, 128, 128, generator=torch.Generator().manual_seed(3))
    handle = _assert_patched_within_tolerance(model, x, _encoder_run)
    assert handle.patched == BLOCKS


def test_monai_2d_swin_unetr_v2_forward_and_backward_agree():
    """The whole 2-D SwinUNETR with ``use_v2`` (a residual conv block before each stage, which leaves the attention
    as it is), 32 x 64, window 7: stage grids 16 x 32 and 8 x 16 pad; 4 x 8 pads in width with the height clipped
    (the leading axis: fused); 2 x 4 is clipped in width: MONAI's path (6 fused blocks of 8)."""
    model = _unetr(7, dims=2, use_v2=True)
    x = torch.randn(1, 1, 32, 64, generator=torch.Generator().manual_seed(3))
    handle = _assert_patched_within_tolerance(model, x, _run, fused_calls=6)
    assert handle.patched == [f"swinViT.{b}" for b in BLOCKS]


def test_monai_2d_window_clipped_in_height_reads_the_centre_of_the_table():
    """10 x 32 with window 7: stage grids 5 x 16, 3 x 8, 2 x 4, 1 x 2, every height clipped (shift 0 there). Where
    the width is whole (16 and 8 pad) or the height is 1, MONAI's index[:N, :N] is the clipped box's own index: fused,
    within the rule (blocks of stages 1, 2, 4); 2 x 4 runs MONAI's path. Clipped in width instead (32 x 10), the
    first N tokens are no box at any stage: MONAI's path, bit for bit."""
    model = _encoder(7, dims=2)
    x = torch.randn(1, 1, 10, 32, generator=torch.Generator().manual_seed(4))
    _assert_patched_within_tolerance(model, x, _encoder_run, fused_calls=6)
    xt = x.transpose(2, 3).contiguous()
    with torch.no_grad():
        ref = model(xt)
        with apply_window_attention(model), _fused_calls() as spy:
            out = model(xt)
    assert spy.call_count == 0
    assert all(torch.equal(a, b) for a, b in zip(out, ref))


# --------------------------------------------------------------------------------------------------- handle
def test_monai_revert_state_dict_checkpointing_and_other_instances():
    block_cls = swin_unetr.SwinTransformerBlock
    original = block_cls.forward_part1
    model, other = _unetr(7, dims=2, use_checkpoint=True), _unetr(7, dims=2)
    x = torch.randn(1, 1, 64, 128, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        before, before_sd = model(x), _state(model)
        handle = apply_window_attention(model)
        assert block_cls.forward_part1 is original and not any("forward_part1" in m.__dict__ for m in other.modules())
        _assert_same_state(before_sd, _state(model))
        with _fused_calls() as spy:
            torch.testing.assert_close(model(x), before)
        assert spy.call_count == 8
        other.load_state_dict(model.state_dict(), strict=True)
        model.load_state_dict(before_sd, strict=True)
    # MONAI's use_checkpoint checkpoints self.forward_part1, the override: recomputed fused in the backward
    with _fused_calls() as spy:
        model(x.requires_grad_(True)).sum().backward()
    assert spy.call_count == 16 and x.grad is not None
    handle.revert()
    with torch.no_grad():
        assert torch.equal(model(x), before)  # bit-identical once reverted
    assert not any("forward_part1" in m.__dict__ for m in model.modules())


def test_monai_refusals():
    with pytest.raises(ValueError, match=r"swinViT\.layers1\.0\.blocks\.0: attn_drop=0\.1 > 0 \(the fused op has no"):
        apply_window_attention(_unetr(4, dims=2, attn_drop_rate=0.1))

    class Custom(swin_unetr.SwinTransformerBlock):
        def forward_part1(self, x, mask_matrix):
            return super().forward_part1(x, mask_matrix) * 2

    model = _encoder(4, dims=2)
    block = model.layers1[0].blocks[1]
    block.__class__ = Custom
    model.layers2[0].blocks[0].attn.relative_position_index.fill_(0)
    handle = apply_window_attention(model, strict=False)
    assert handle.skipped == [
        ("layers1.0.blocks.1", "Custom overrides MONAI's SwinTransformerBlock.forward_part1"),
        ("layers2.0.blocks.0", "its relative_position_index is not the standard Swin index for window (1, 4, 4)")]
    assert len(handle.patched) == 6 and "layers1.0.blocks.1" not in handle.patched
    handle.revert()
    with pytest.raises(ValueError, match=r"2 module\(s\) cannot be patched"):
        apply_window_attention(copy.deepcopy(model))
