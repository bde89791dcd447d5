"""WindowAttention3D: Video-Swin state-dict compatibility, Video-Swin's window-clipping rule, bias-table cropping."""

from __future__ import annotations

import pytest
import torch

from benchmarks.videoswin_eager import VideoSwinWindowAttention3D
from lfvila_kernels import WindowAttention3D, relative_position_index
from lfvila_kernels.modules import clip_window, crop_bias_table
from lfvila_kernels.reference import bias_table_rows

from ._compare import assert_close_verbose


def test_state_dict_keys_and_shapes_match_videoswin():
    ours = WindowAttention3D(64, 4, (8, 7, 7), (0, 3, 3)).state_dict()
    theirs = VideoSwinWindowAttention3D(64, 4, (8, 7, 7), (0, 3, 3)).state_dict()
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in theirs.items()}
    assert torch.equal(ours["relative_position_index"], theirs["relative_position_index"])


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize(
    "grid, window, shift",
    [
        pytest.param((4, 6, 10), (2, 3, 5), (0, 1, 2), id="shifted"),
        pytest.param((4, 6, 10), (2, 3, 5), (0, 0, 0), id="plain"),
        pytest.param((2, 6, 10), (4, 3, 5), (0, 1, 2), id="time-clipped"),  # window T 4 > grid T 2: clip, shift 0
        pytest.param((2, 3, 5), (2, 3, 5), (0, 1, 2), id="window-covers-grid"),  # LF-VILA layer 5: no shift
    ],
)
def test_videoswin_checkpoint_loads_strict_and_matches(impl, grid, window, shift):
    torch.manual_seed(0)
    naive = VideoSwinWindowAttention3D(32, 2, window, shift)
    ours = WindowAttention3D(32, 2, window, shift, impl=impl)
    ours.load_state_dict(naive.state_dict(), strict=True)
    x = torch.randn(2, *grid, 32, requires_grad=True)
    out, out_ref = ours(x), naive(x)
    assert_close_verbose(out, out_ref, atol=2e-5, rtol=1e-5, name="out")
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (x, ours.relative_position_bias_table, ours.qkv.weight), g)
    grads_ref = torch.autograd.grad(out_ref, (x, naive.relative_position_bias_table, naive.qkv.weight), g)
    for name, a, b in zip(("dx", "dtable", "dqkv"), grads, grads_ref):
        assert_close_verbose(a, b, atol=5e-5, rtol=1e-4, name=name)


def test_loading_into_our_module_and_back_roundtrips():
    ours = WindowAttention3D(32, 2, (2, 3, 5))
    naive = VideoSwinWindowAttention3D(32, 2, (2, 3, 5))
    naive.load_state_dict(ours.state_dict(), strict=True)
    for key, value in ours.state_dict().items():
        assert torch.equal(value, naive.state_dict()[key]), key


def test_clip_window_rule():
    assert clip_window((32, 3, 5), (32, 3, 5), (0, 1, 2)) == ((32, 3, 5), (0, 0, 0))
    assert clip_window((32, 6, 10), (8, 3, 5), (0, 1, 2)) == ((8, 3, 5), (0, 1, 2))
    assert clip_window((4, 6, 10), (8, 3, 5), (0, 1, 2)) == ((4, 3, 5), (0, 1, 2))


def test_crop_bias_table_reads_the_same_offsets():
    """Every offset of a clipped window reads the entry the full window's table holds for that offset."""
    window, clipped, nh = (4, 7, 7), (2, 5, 3), 3
    table = torch.randn(bias_table_rows(window), nh)
    cropped = crop_bias_table(table, window, clipped)
    assert cropped.shape == (bias_table_rows(clipped), nh)
    full_index = relative_position_index(window).view(*window, *window)
    small_index = relative_position_index(clipped).view(*clipped, *clipped)
    t, h, w = clipped
    # tokens of the clipped window placed at the same local coordinates inside the full window
    expected = table[full_index[:t, :h, :w, :t, :h, :w].reshape(-1)]
    assert torch.equal(cropped[small_index.reshape(-1)], expected)


def test_crop_bias_table_passes_gradient_to_full_table():
    table = torch.randn(bias_table_rows((4, 3, 5)), 2, requires_grad=True)
    crop_bias_table(table, (4, 3, 5), (2, 3, 5)).sum().backward()
    assert table.grad.sum().item() == bias_table_rows((2, 3, 5)) * 2


def test_attention_dropout_refused():
    with pytest.raises(ValueError, match="attn_drop"):
        WindowAttention3D(32, 2, (2, 3, 5), attn_drop=0.1)


def test_dim_not_divisible_by_heads_refused():
    with pytest.raises(ValueError, match="num_heads"):
        WindowAttention3D(30, 4, (2, 3, 5))
