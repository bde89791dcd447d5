"""The geometry the v2 window-attention kernels read instead of decoding tokens per score element: the window ->
token table, the mask classes and the additive bias + mask tiles, against the torch reference's own partition and
shift mask (``reference.window_attention_reference``)."""

from __future__ import annotations

import math

import pytest
import torch

from lfvila_kernels import _window_attention_triton as fused
from lfvila_kernels.reference import _shift_regions, bias_table_rows, relative_position_index

GEOMETRIES = [
    pytest.param((4, 6, 10), (2, 3, 5), (0, 0, 0), id="l0"),
    pytest.param((4, 6, 10), (2, 3, 5), (0, 1, 2), id="l0-shift"),
    pytest.param((8, 6, 5), (8, 3, 5), (0, 1, 0), id="l2-shift"),
    pytest.param((5, 7, 11), (2, 3, 5), (1, 1, 2), id="odd-3d-shift"),
    pytest.param((5, 8, 9), (4, 3, 4), (3, 2, 3), id="odd-large-shift"),
    pytest.param((1, 14, 14), (1, 7, 7), (0, 3, 3), id="swin2d"),
]


def _reference_partition(grid, window, shift):
    """Token index, shift-region code and validity of every window position, the reference's way (roll, pad,
    partition)."""
    T, H, W = grid
    wt, wh, ww = window
    pads = [(-n) % w for n, w in zip(grid, window)]
    Tp, Hp, Wp = T + pads[0], H + pads[1], W + pads[2]
    index = torch.arange(T * H * W).reshape(T, H, W)
    index = torch.roll(index, shifts=tuple(-s for s in shift), dims=(0, 1, 2))
    index = torch.nn.functional.pad(index, (0, pads[2], 0, pads[1], 0, pads[0]), value=-1)
    rt, rh, rw = (_shift_regions(n, p, s, "cpu") for n, p, s in zip(grid, (Tp, Hp, Wp), shift))
    code = rt[:, None, None] * 4 + rh[None, :, None] * 2 + rw[None, None, :]

    def part(x):
        return x.reshape(Tp // wt, wt, Hp // wh, wh, Wp // ww, ww).permute(0, 2, 4, 1, 3, 5).reshape(-1, wt * wh * ww)

    return part(index), part(code), part(index) >= 0


@pytest.mark.parametrize("grid, window, shift", GEOMETRIES)
def test_token_table_and_classes_match_reference_partition(grid, window, shift):
    geo = fused._geometry(grid, window, shift, torch.device("cpu"))
    N = geo["N"]
    index, code, valid = _reference_partition(grid, window, shift)
    assert torch.equal(geo["tok"][:, :N].long(), index)
    assert bool((geo["tok"][:, N:] == -1).all())
    # every window's class tile allows exactly the reference's pairs (for valid queries; others are never stored)
    for w in range(geo["n_win"]):
        allowed = geo["allowed"][geo["cls"][w], :N, :N]
        ref = valid[w][None, :] & (code[w][:, None] == code[w][None, :])
        rows = valid[w]
        assert torch.equal(allowed[rows], ref[rows]), f"window {w}"
        assert bool(allowed.any(1).all()), f"window {w}: a row without any allowed key"
        assert not bool(geo["allowed"][geo["cls"][w], :, N:].any()), "a padded key column is allowed"
    n_classes = len(geo["class_start"]) - 1
    assert n_classes <= 27
    if shift == (0, 0, 0) and all(n % w == 0 for n, w in zip(grid, window)):
        assert n_classes == 1
    # windows in class order, each class contiguous
    order = geo["order"].long()
    assert sorted(order.tolist()) == list(range(geo["n_win"]))
    assert torch.equal(geo["cls"][order], torch.sort(geo["cls"]).values)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_tiles_hold_scaled_bias_and_mask(dtype):
    grid, window, shift, heads = (5, 7, 11), (2, 3, 5), (1, 1, 2), 3
    geo = fused._geometry(grid, window, shift, torch.device("cpu"))
    table = torch.randn(bias_table_rows(window), heads)
    tile = fused._tiles(geo, table, window, dtype)
    N, P = geo["N"], geo["P"]
    assert tile.shape == (len(geo["class_start"]) - 1, heads, P, P) and tile.dtype == dtype
    bias = table[relative_position_index(window).reshape(-1)].reshape(N, N, heads).permute(2, 0, 1) * math.log2(math.e)
    allowed = geo["allowed"][:, None, :N, :N].expand(-1, heads, -1, -1)
    assert torch.equal(tile[:, :, :N, :N][allowed], bias.to(dtype)[None].expand_as(allowed)[allowed])
    assert bool(torch.isneginf(tile[:, :, :N, :N][~allowed]).all())
    assert bool(torch.isneginf(tile[:, :, :, N:]).all())
    # without a table, a shift or padded keys there is nothing to add; padded keys alone need the tile
    plain = fused._geometry((2, 8, 8), (1, 4, 4), (0, 0, 0), torch.device("cpu"))
    assert fused._tiles(plain, None, (1, 4, 4), dtype) is None
    padded = fused._geometry((4, 6, 10), (2, 3, 5), (0, 0, 0), torch.device("cpu"))
    assert bool(torch.isneginf(fused._tiles(padded, None, (2, 3, 5), dtype)[..., 30:]).all())


@pytest.mark.parametrize("B, heads, group", [(1, 2, None), (3, 1, 4), (2, 5, 1)])
def test_groups_cover_items_once_within_one_class(B, heads, group):
    geo = fused._geometry((5, 7, 11), (2, 3, 5), (1, 1, 2), torch.device("cpu"))
    with fused.override_config(**({} if group is None else {"group": group})):
        gstart, gcls = fused._groups(geo, B, heads, torch.device("cpu"))
    starts = gstart.tolist()
    assert starts[0] == 0 and starts[-1] == geo["n_win"] * B and starts == sorted(set(starts))
    win_class = geo["cls"][geo["order"].long()]
    for g in range(gcls.numel()):
        items = torch.arange(starts[g], starts[g + 1])
        assert bool((win_class[items // B] == gcls[g]).all()), f"group {g} mixes classes"
        if group is not None:
            assert items.numel() <= group
