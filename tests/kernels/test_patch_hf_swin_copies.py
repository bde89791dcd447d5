"""``apply_window_attention`` on transformers' copies of the Swin v1 layer: ``DonutSwinModel``,
``MaskFormerSwinModel`` / ``MaskFormerSwinBackbone`` and CLAP's audio encoder (HTSAT, ``ClapAudioModel``).

transformers 5.25 has three such layers, in the layout of transformers 4 (``attention.self.{query,key,value}``,
``attention.output.dense``): ``DonutSwinLayer`` and ``ClapAudioLayer`` (same code: ``set_shift_and_window_size``
clips the window to a grid side at most the window) and ``MaskFormerSwinLayer`` (never clips: a grid smaller than the
window is padded up to it). Left out: ``Swinv2Layer`` and ``Swin2SRLayer`` (Swin-V2's cosine attention with a
position-bias MLP: another function, refused), DiNAT (neighbourhood attention, no windows), BEiT / Data2Vec-vision
(a relative-position bias over global attention). Mask2Former, OneFormer and UperNet take ``SwinBackbone``
(``test_patch.py``). The rule is ``test_patch.py``'s: fp32 on the CPU, output and every gradient (bias tables
randomised) within twice the unpatched model's error against float64.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from lfvila_kernels.patch import apply_window_attention
from tests.kernels.test_patch import _assert_patched_within_tolerance, _assert_same_state, _fused_calls, _state

transformers = pytest.importorskip("transformers")


def _tiny(model_cls, config_cls, **overrides):
    torch.manual_seed(0)
    model = model_cls(config_cls(**{"image_size": 64, "embed_dim": 16, "depths": [2, 2], "num_heads": [2, 4],
                                    "window_size": 4, **overrides})).eval()  # fmt: skip
    with torch.no_grad():  # transformers initialises the bias tables to zero: make them matter
        for name, p in model.named_parameters():
            if name.endswith("relative_position_bias_table"):
                p.normal_(0, 0.5)
    return model


def _donut(**overrides):
    return _tiny(transformers.DonutSwinModel, transformers.DonutSwinConfig, **overrides)


def _maskformer(**overrides):
    return _tiny(transformers.MaskFormerSwinModel, transformers.MaskFormerSwinConfig, **overrides)


def _run(model, x):
    return model(pixel_values=x).last_hidden_state


def _blocks(depths, prefix="encoder.layers"):
    return [f"{prefix}.{i}.blocks.{j}" for i, d in enumerate(depths) for j in range(d)]


# --------------------------------------------------------------------------------------------------- the rule
@pytest.mark.parametrize("family", ["donut", "maskformer"])
@pytest.mark.parametrize("size", [(64, 64), (60, 68)], ids=["divisible", "odd"])
def test_swin_copies_forward_and_backward_agree(family, size):
    """Window 4; 64 x 64: grids 16 x 16 and 8 x 8; 60 x 68: 15 x 17 and 8 x 9, padded under shifted windows."""
    model = _donut() if family == "donut" else _maskformer()
    x = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(1))
    handle = _assert_patched_within_tolerance(model, x, _run)
    assert handle.patched == _blocks([2, 2]) and handle.skipped == []


def test_maskformer_grid_smaller_than_the_window_is_padded_up():
    """Window 7, three stages on 60 x 68: grids 15 x 17, 8 x 9 and 4 x 5; MaskFormer does not clip, so the last stage
    pads 4 x 5 up to one 7 x 7 window, shifted by 3 in its second block.

    Without qkv biases: the key bias's gradient is zero in exact arithmetic (it adds one constant to every score of
    a query), so what the rule would compare is rounding noise of ~1e-12 against noise, no yardstick; here it came
    out at 2.5x the eager noise. The padded keys are then exact zeros; the other tests keep the biases."""
    model = _maskformer(window_size=7, depths=[2, 2, 2], num_heads=[2, 2, 4], qkv_bias=False)
    x = torch.randn(1, 3, 60, 68, generator=torch.Generator().manual_seed(2))
    handle = _assert_patched_within_tolerance(model, x, _run)
    assert handle.patched == _blocks([2, 2, 2])
    assert [b.shift_size for b in model.encoder.layers[2].blocks] == [0, 3]


def test_clap_audio_encoder_forward_and_backward_agree():
    """HTSAT-Swin (``ClapAudioLayer``): spectrogram 64 x 64 in patches of 4, window 5: grids 16 x 16 and 8 x 8,
    padded to 20 x 20 and 10 x 10 under shifted windows."""
    torch.manual_seed(0)
    config = transformers.ClapAudioConfig(spec_size=64, num_mel_bins=16, window_size=5, patch_size=4,
                                          patch_stride=(4, 4), patch_embeds_hidden_size=16, hidden_size=32,
                                          depths=[2, 2], num_attention_heads=[2, 4], projection_dim=16)  # fmt: skip
    model = transformers.ClapAudioModel(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("relative_position_bias_table"):
                p.normal_(0, 0.5)
    x = torch.randn(1, 1, 100, 16, generator=torch.Generator().manual_seed(3))  # (B, 1, frames, mel bins)
    handle = _assert_patched_within_tolerance(model, x, lambda m, inp: m(input_features=inp).last_hidden_state)
    assert handle.patched == _blocks([2, 2], "audio_encoder.layers")


# --------------------------------------------------------------------------------------------------- call time
def test_donut_window_clipped_to_the_grid():
    """Donut (and CLAP) clip the window to a grid side at most the window. Equal to it (a 4 x 9 grid, window 4): the
    same window with shift 0, fused. Below it the unpatched layer fails on the bias shape, and so does the patched
    one, which runs the original forward then."""
    model = _donut(depths=[2], num_heads=[2])
    x = torch.randn(1, 3, 16, 36, generator=torch.Generator().manual_seed(4))  # grid 4 x 9
    _assert_patched_within_tolerance(model, x, _run)
    assert [b.shift_size for b in model.encoder.layers[0].blocks] == [0, 0]
    small = torch.randn(1, 3, 8, 36)  # grid 2 x 9: window clipped to 2 < 4
    with pytest.raises(RuntimeError) as unpatched:
        _run(_donut(depths=[2], num_heads=[2]), small)
    model = _donut(depths=[2], num_heads=[2])
    with apply_window_attention(model), _fused_calls() as spy, pytest.raises(RuntimeError) as patched:
        _run(model, small)
    assert spy.call_count == 0 and str(patched.value) == str(unpatched.value)


def test_revert_state_dict_output_attentions_and_backbone():
    """Donut: MaskFormer's own encoder cannot return attentions (transformers 5.25 indexes a None there)."""
    model, other = _donut(), _donut()
    x = torch.randn(2, 3, 60, 68, generator=torch.Generator().manual_seed(5))
    layer_cls = type(model.encoder.layers[0].blocks[0])
    original = layer_cls.forward
    with torch.no_grad():
        ref = model(pixel_values=x, output_attentions=True)
        before_sd = _state(model)
        handle = apply_window_attention(model)
        assert layer_cls.forward is original and not any("forward" in m.__dict__ for m in other.modules())
        _assert_same_state(before_sd, _state(model))
        torch.testing.assert_close(_run(model, x), ref.last_hidden_state)
        with _fused_calls() as spy:  # the attention weights are asked for: the original path
            with_attn = model(pixel_values=x, output_attentions=True)
        assert spy.call_count == 0 and len(with_attn.attentions) == 2
        assert all(torch.equal(a, b) for a, b in zip(with_attn.attentions, ref.attentions))
        other.load_state_dict(model.state_dict(), strict=True)
        handle.revert()
        assert not any("forward" in m.__dict__ for m in model.modules())
        assert torch.equal(_run(model, x), ref.last_hidden_state)  # bit-identical once reverted
    backbone = transformers.MaskFormerSwinBackbone(transformers.MaskFormerSwinConfig(
        image_size=64, embed_dim=16, depths=[2, 2], num_heads=[2, 4], window_size=4, out_features=["stage1", "stage2"]))
    with apply_window_attention(backbone) as handle:
        assert handle.patched == _blocks([2, 2], "model.encoder.layers")


# --------------------------------------------------------------------------------------------------- refusals
def test_refusals_name_the_module_and_the_reason():
    with pytest.raises(ValueError, match=r"encoder\.layers\.0\.blocks\.0: attention_probs_dropout_prob=0\.1 > 0"):
        apply_window_attention(_donut(attention_probs_dropout_prob=0.1))

    model = _donut()
    layer = model.encoder.layers[0].blocks[1]

    class Custom(type(layer)):
        def forward(self, *args, **kwargs):
            return super().forward(*args, **kwargs)

    layer.__class__ = Custom
    model.encoder.layers[1].blocks[0].layer_scale = nn.Identity()  # a part the Swin-copy layout does not have
    handle = apply_window_attention(model, strict=False)
    assert handle.skipped[0] == ("encoder.layers.0.blocks.1",
                                 "Custom overrides transformers' modeling_donut_swin.DonutSwinLayer.forward")
    path, reason = handle.skipped[1]
    assert path == "encoder.layers.1.blocks.0" and "extra ['layer_scale']" in reason
    assert handle.patched == ["encoder.layers.0.blocks.0", "encoder.layers.1.blocks.1"]
    handle.revert()

    swin2sr = transformers.Swin2SRModel(transformers.Swin2SRConfig(image_size=16, embed_dim=16, depths=[2],
                                                                   num_heads=[2], window_size=4))  # fmt: skip
    with pytest.raises(ValueError, match=r"encoder\.stages\.0\.layers\.0: Swin-V2 attention is not supported"):
        apply_window_attention(swin2sr)
