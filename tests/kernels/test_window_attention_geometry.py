"""The geometry the v2 window-attention kernels read instead of decoding tokens per score element: the window ->
token table, the mask classes and the additive bias + mask tiles, against the torch reference's own partition and
shift mask (``reference.window_attention_reference``)."""

from __future__ import annotations

import math

import pytest
import torch

from lfvila_kernels import _window_attention_launch as fused
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
    scale = 32**-0.5
    tile = fused._tiles(geo, table, window, dtype, scale)
    N, P = geo["N"], geo["P"]
    assert tile.shape == (len(geo["class_start"]) - 1, heads, P, P) and tile.dtype == dtype
    bias = table[relative_position_index(window).reshape(-1)].reshape(N, N, heads).permute(2, 0, 1) * (1.0 / scale)
    allowed = geo["allowed"][:, None, :N, :N].expand(-1, heads, -1, -1)
    assert torch.equal(tile[:, :, :N, :N][allowed], bias.to(dtype)[None].expand_as(allowed)[allowed])
    assert bool(torch.isneginf(tile[:, :, :N, :N][~allowed]).all())
    assert bool(torch.isneginf(tile[:, :, :, N:]).all())
    # without a table, a shift or padded keys there is nothing to add; padded keys alone need the tile
    plain = fused._geometry((2, 8, 8), (1, 4, 4), (0, 0, 0), torch.device("cpu"))
    assert fused._tiles(plain, None, (1, 4, 4), dtype, scale) is None
    padded = fused._geometry((4, 6, 10), (2, 3, 5), (0, 0, 0), torch.device("cpu"))
    assert bool(torch.isneginf(fused._tiles(padded, None, (2, 3, 5), dtype, scale)[..., 30:]).all())


@pytest.mark.parametrize("B, heads, group, size", [(1, 2, None, None), (3, 1, 4, None), (2, 5, 1, None),
                                                   (3, 2, 1, 7), (4, 1, None, 2)])
def test_groups_cover_items_once_within_one_class(B, heads, group, size):
    """``size`` (the split backward's bias-gradient groups) takes precedence over the ``group`` override."""
    geo = fused._geometry((5, 7, 11), (2, 3, 5), (1, 1, 2), torch.device("cpu"))
    with fused.override_config(**({} if group is None else {"group": group})):
        grp, largest = fused._groups(geo, B, heads, torch.device("cpu"), size)
    group = size or group
    win_class = geo["cls"][geo["order"].long()].tolist()
    seen = []
    for g, (j0, nj, b0, nb, cls) in enumerate(grp.tolist()):
        assert nj >= 1 and nb >= 1 and (nj == 1 or (b0, nb) == (0, B)), f"group {g}: not whole windows or one window"
        seen += [(j, b) for j in range(j0, j0 + nj) for b in range(b0, b0 + nb)]
        assert all(win_class[j] == cls for j in range(j0, j0 + nj)), f"group {g} mixes classes"
        if group is not None:
            assert nj * nb <= group
        assert nj * nb <= largest
    assert seen == [(j, b) for j in range(geo["n_win"]) for b in range(B)]  # every item once, in item order


@pytest.mark.parametrize("grid, window, shift", GEOMETRIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_tile_kernel_equals_the_torch_tiles(grid, window, shift, dtype):
    """``_window_attention_tile_kernel`` (what the launchers use) builds the same tile as the torch ``_tiles``, bit for
    bit, and its transpose for the fused backward; also without a table (mask alone) and from a bf16 table. bf16:
    Triton's interpreter rounds fp32 -> bf16 toward zero (compiled code rounds to nearest even, as torch does), so there
    the kernel's tile is compared in fp32 and its bf16 cast within one bf16 step
    (tests/kernels/test_window_attention_gpu.py checks the compiled bf16 tile bit for bit)."""
    geo = fused._geometry(grid, window, shift, torch.device("cpu"))
    for table in (torch.randn(bias_table_rows(window), 3), torch.randn(bias_table_rows(window), 2).bfloat16(), None):
        want = fused._tiles(geo, table, window, dtype, 0.3)
        got = fused._tile(geo, table, window, dtype, 0.3)
        if want is None:
            assert got is None
            continue
        assert got.dtype == dtype and got.shape == want.shape
        got_t = fused._tile(geo, table, window, dtype, 0.3, transpose=True)
        if dtype == torch.bfloat16 and fused.interpreting():
            assert torch.equal(fused._tile(geo, table, window, torch.float32, 0.3),
                               fused._tiles(geo, table, window, torch.float32, 0.3))
            assert torch.equal(torch.isneginf(got), torch.isneginf(want))
            finite = ~torch.isneginf(want)
            step = want[finite].float().abs() * 2.0**-7 + 1e-30
            assert bool(((got[finite].float() - want[finite].float()).abs() <= step).all())
            assert torch.equal(got_t, got.transpose(-1, -2))
        else:
            assert torch.equal(got, want)
            assert torch.equal(got_t, want.transpose(-1, -2))


@pytest.mark.parametrize("window, splits, heads", [((2, 3, 5), 3, 2), ((2, 3, 5), 1, 40), ((3, 2, 3), 2, 3)])
def test_bias_grad_kernel_folds_partials_onto_the_table(window, splits, heads):
    """``_window_attention_bias_grad_kernel``: the table gradient is the sum over splits and over every pair of a table
    row of the dense partials (the gradient of the gather ``table[index]``), and bitwise repeatable. The fold depends on
    the window alone; 40 heads take two head blocks."""
    geo = fused._geometry(window, window, (0, 0, 0), torch.device("cpu"))
    N, P = geo["N"], geo["P"]
    partials = torch.randn(splits, heads, P, P)
    partials[..., N:, :] = float("nan")  # padded rows and columns are never read
    partials[..., :, N:] = float("nan")
    got = fused._bias_grad(partials, geo, window)
    dense = partials[..., :N, :N].double().sum(0).reshape(heads, N * N)  # (heads, N * N)
    want = torch.zeros(bias_table_rows(window), heads, dtype=torch.float64)
    want.index_add_(0, relative_position_index(window).reshape(-1), dense.t())
    assert got.shape == want.shape and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5 * math.sqrt(N * splits))
    assert torch.equal(fused._bias_grad(partials, geo, window), got)
