"""``VideoEncoder`` against an independent, naive Video-Swin forward that reads an official-key state dict.

The naive code below is written from the official ``SwinTransformer3D`` semantics (``microsoft/XPretrain``,
``LF-VILA/src/models/video_encoder.py``; ``docs/official.md``), not from ours: it patchifies with a reshape
and a matmul, rolls by ``-shift`` with ``torch.roll``, partitions windows by reshape, builds the ``-100`` shift mask by
Video-Swin's region slicing (``(0, -w), (-w, -s), (-s, None)`` per axis), indexes the 3D bias table with a
relative-position index computed here from token coordinates, and writes LayerNorm and exact GELU out by hand. Only
``VideoEncoder`` / ``VideoEncoderConfig`` / the tiny config come from ``lfvila``, to build the model being checked.

Scope and known, deliberate differences:
  * Grids. Our window attention masks the missing keys of a partial window; Video-Swin zero-pads the grid and lets
    tokens attend to the padding. Every case here therefore uses a patch grid that each (clipped) window divides, so
    no partial window ever occurs (PatchMerging's own zero-padding of an odd H or W is the same in both and is used).
  * Spatially clipped windows. When Video-Swin's ``get_window_size`` shrinks a window on the H or W axis (window >=
    grid), the official attention reads ``relative_position_index[:N, :N]`` of the *configured* window: the first N
    tokens in raster order, which are not the tokens of the clipped window, so their offsets are wrong. Ours reads the
    bias of each true offset (the centre of the table). The naive forward implements both (``bias_mode="official"``
    and ``"offset"``); where only the time axis is clipped the two coincide (the first N raster tokens are exactly
    the first frames). ``lfvila-tiny`` at 8 x 64 x 96 clips layer 5's window (16, 2, 3) to (8, 1, 2), so there ours
    equals the naive ``offset`` forward and differs from the ``official`` one in the final grid only. At the official
    input (32 x 192 x 320) no window is clipped spatially, so the official weights see identical computations.
"""

from __future__ import annotations

import functools
import itertools
import math
import re

import pytest
import torch

from lfvila.models.registry import _tiny_video_config
from lfvila.models.video_encoder import VideoEncoder, VideoEncoderConfig

PREFIX = "video_encoder."
LN_EPS = 1e-5  # nn.LayerNorm's default, used by every norm of the official encoder

# ----------------------------------------------------------------------------------------------------------------------
# Naive Video-Swin forward, reading weights by official key names
# ----------------------------------------------------------------------------------------------------------------------


def naive_relative_index(window) -> torch.Tensor:
    """Video-Swin's relative-position index of a ``(wt, wh, ww)`` window: ``(N, N)`` long, entry ``(i, j)`` = table
    row of the offset ``coord_i - coord_j``, rows ordered row-major over ``(2wt-1, 2wh-1, 2ww-1)`` offset grids."""
    return offset_rows(window, window)


def offset_rows(tokens_window, table_window) -> torch.Tensor:
    """Table rows (of a ``table_window`` bias table) of the offsets between the tokens of a ``tokens_window`` window.

    Tokens are enumerated in raster order over ``(t, h, w)``; offsets are query minus key.
    """
    coords = torch.tensor(list(itertools.product(*(range(n) for n in tokens_window))))  # (N, 3)
    rel = coords[:, None, :] - coords[None, :, :] + torch.tensor([w - 1 for w in table_window])  # (N, N, 3), >= 0
    span_h, span_w = 2 * table_window[1] - 1, 2 * table_window[2] - 1
    return rel[..., 0] * span_h * span_w + rel[..., 1] * span_w + rel[..., 2]


def clipped(grid, window, shift):
    """``get_window_size``: an axis whose window is >= the feature size takes the feature size and shift 0."""
    w = tuple(g if g <= wi else wi for g, wi in zip(grid, window))
    s = tuple(0 if g <= wi else si for g, wi, si in zip(grid, window, shift))
    return w, s


def layer_norm(x, sd, name):
    mean = x.mean(-1, keepdim=True)
    var = (x - mean).pow(2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + LN_EPS) * sd[name + ".weight"] + sd[name + ".bias"]


def linear(x, sd, name):
    y = x @ sd[name + ".weight"].t()
    return y + sd[name + ".bias"] if name + ".bias" in sd else y


def gelu_exact(x):
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def partition(x, window):
    """``(B, T, H, W, C) -> (B * nWin, N, C)``, windows ordered (t, h, w)-major, tokens raster inside a window."""
    B, T, H, W, C = x.shape
    wt, wh, ww = window
    x = x.reshape(B, T // wt, wt, H // wh, wh, W // ww, ww, C).permute(0, 1, 3, 5, 2, 4, 6, 7)
    return x.reshape(-1, wt * wh * ww, C)


def unpartition(x, window, B, T, H, W):
    wt, wh, ww = window
    x = x.reshape(B, T // wt, H // wh, W // ww, wt, wh, ww, -1).permute(0, 1, 4, 2, 5, 3, 6, 7)
    return x.reshape(B, T, H, W, -1)


def shift_mask(grid, window, shift, dtype) -> torch.Tensor:
    """Video-Swin's ``compute_mask``: region labels from the three slices per axis, ``-100`` between regions.

    ``(nWin, N, N)``. With ``s == 0`` the slice ``(-s, None)`` is the whole axis, so that axis adds no region.
    """
    labels = torch.zeros(grid, dtype=dtype)
    region = 0
    for st in (slice(-window[0]), slice(-window[0], -shift[0]), slice(-shift[0], None)):
        for sh in (slice(-window[1]), slice(-window[1], -shift[1]), slice(-shift[1], None)):
            for sw in (slice(-window[2]), slice(-window[2], -shift[2]), slice(-shift[2], None)):
                labels[st, sh, sw] = region
                region += 1
    win = partition(labels[None, ..., None], window)[..., 0]  # (nWin, N)
    diff = win[:, None, :] - win[:, :, None]
    return torch.where(diff != 0, torch.full_like(diff, -100.0), torch.zeros_like(diff))


def attention(x, sd, name, heads, cfg_window, window, shift, bias_mode):
    """Shifted-window attention block part: roll, partition, MHSA + bias (+ mask), unpartition, roll back."""
    B, T, H, W, C = x.shape
    assert all(n % w == 0 for n, w in zip((T, H, W), window)), "naive forward needs grids the windows divide"
    shifted = any(s > 0 for s in shift)
    if shifted:
        x = torch.roll(x, shifts=tuple(-s for s in shift), dims=(1, 2, 3))
    xw = partition(x, window)  # (Bw, N, C)
    Bw, N, _ = xw.shape
    hd = C // heads
    qkv = linear(xw, sd, name + ".qkv").reshape(Bw, N, 3, heads, hd).permute(2, 0, 3, 1, 4)  # (3, Bw, heads, N, hd)
    q, k, v = qkv[0] * hd**-0.5, qkv[1], qkv[2]
    scores = q @ k.transpose(-1, -2)  # (Bw, heads, N, N)
    table = sd[name + ".relative_position_bias_table"]
    if bias_mode == "official":  # the configured window's index, cut to the first N tokens (Video-Swin)
        rows = naive_relative_index(cfg_window)[:N, :N]
    elif bias_mode == "offset":  # the true offsets of the clipped window's tokens, in the configured table
        rows = offset_rows(window, cfg_window)
    else:
        raise ValueError(bias_mode)
    scores = scores + table[rows.reshape(-1)].reshape(N, N, heads).permute(2, 0, 1)
    if shifted:
        mask = shift_mask((T, H, W), window, shift, x.dtype)  # (nWin, N, N)
        scores = (scores.reshape(B, -1, heads, N, N) + mask[None, :, None]).reshape(Bw, heads, N, N)
    out = torch.softmax(scores, dim=-1) @ v  # (Bw, heads, N, hd)
    out = linear(out.transpose(1, 2).reshape(Bw, N, C), sd, name + ".proj")
    out = unpartition(out, window, B, T, H, W)
    if shifted:
        out = torch.roll(out, shifts=shift, dims=(1, 2, 3))
    return out


def patch_merge(x, sd, name):
    """Spatial 2x2 merge: zero-pad odd H/W at the end, concat [0::2,0::2] [1::2,0::2] [0::2,1::2] [1::2,1::2]."""
    B, T, H, W, C = x.shape
    if H % 2:
        x = torch.cat([x, x.new_zeros(B, T, 1, W, C)], dim=2)
    if W % 2:
        x = torch.cat([x, x.new_zeros(B, T, x.shape[2], 1, C)], dim=3)
    x = torch.cat([x[:, :, 0::2, 0::2], x[:, :, 1::2, 0::2], x[:, :, 0::2, 1::2], x[:, :, 1::2, 1::2]], dim=-1)
    return linear(layer_norm(x, sd, name + ".norm"), sd, name + ".reduction")


def patch_embed(video, sd, patch):
    """Conv3d with kernel = stride = patch as patchify + matmul, then LayerNorm: ``(B, 3, T, H, W) -> (B, T', H', W',
    C)``."""
    B, Cin, T, H, W = video.shape
    pt, ph, pw = patch
    assert T % pt == 0 and H % ph == 0 and W % pw == 0
    x = video.reshape(B, Cin, T // pt, pt, H // ph, ph, W // pw, pw).permute(0, 2, 4, 6, 1, 3, 5, 7)
    weight = sd["patch_embed.proj.weight"]
    x = x.reshape(B, T // pt, H // ph, W // pw, -1) @ weight.reshape(weight.shape[0], -1).t()
    return layer_norm(x + sd["patch_embed.proj.bias"], sd, "patch_embed.norm")


def naive_forward(video, sd, cfg: VideoEncoderConfig, bias_mode: str = "official"):
    """The official forward. Returns ``(grid, intended_local, schedule)``: the normed final grid, the intended local
    feature (``norm_local(local_feat_proj(input of the first layer whose temporal window > local_window))``, which
    the official loop computes and then drops) and the ``(window, shift)`` each block used."""
    x = patch_embed(video, sd, cfg.patch_size)
    local, schedule = None, []
    for i, (depth, heads, window) in enumerate(zip(cfg.depths, cfg.num_heads, cfg.window_size)):
        if local is None and window[0] > cfg.local_window:
            local = layer_norm(patch_merge(x, sd, "local_feat_proj"), sd, "norm_local")
        half = tuple(w // 2 for w in window)
        layer_shift = (0, half[1], half[2]) if cfg.temporal_no_shifting else half
        win, shift = clipped(x.shape[1:4], window, layer_shift)  # once per layer, as BasicLayer.forward
        for j in range(depth):
            blk = f"layers.{i}.blocks.{j}"
            s = shift if j % 2 else (0, 0, 0)
            schedule.append((win, s))
            x = x + attention(layer_norm(x, sd, blk + ".norm1"), sd, blk + ".attn", heads, window, win, s, bias_mode)
            h = gelu_exact(linear(layer_norm(x, sd, blk + ".norm2"), sd, blk + ".mlp.fc1"))
            x = x + linear(h, sd, blk + ".mlp.fc2")
        if i in cfg.downsample_stages:
            x = patch_merge(x, sd, f"layers.{i}.downsample")
    return layer_norm(x, sd, "norm"), local, schedule


# ----------------------------------------------------------------------------------------------------------------------
# Random official-key state dicts
# ----------------------------------------------------------------------------------------------------------------------


def official_state_dict(cfg: VideoEncoderConfig, seed: int = 0, dtype=torch.float64) -> dict[str, torch.Tensor]:
    """A checkpoint-style ``video_encoder.*`` dict with the official names and shapes (``SwinTransformer3D``'s
    formulas), every parameter random at a scale where it matters, then the prefix stripped."""
    g = torch.Generator().manual_seed(seed)
    sd = {}

    def randn(*shape, std, mean=0.0):
        return torch.randn(*shape, generator=g, dtype=dtype) * std + mean

    def ln(name, dim):
        sd[PREFIX + name + ".weight"] = randn(dim, std=0.2, mean=1.0)
        sd[PREFIX + name + ".bias"] = randn(dim, std=0.2)

    def lin(name, out_dim, in_dim, bias=True):
        sd[PREFIX + name + ".weight"] = randn(out_dim, in_dim, std=0.08)
        if bias:
            sd[PREFIX + name + ".bias"] = randn(out_dim, std=0.1)

    E = cfg.embed_dim
    sd[PREFIX + "patch_embed.proj.weight"] = randn(E, cfg.in_chans, *cfg.patch_size, std=0.1)
    sd[PREFIX + "patch_embed.proj.bias"] = randn(E, std=0.1)
    ln("patch_embed.norm", E)
    for i, (depth, heads, window) in enumerate(zip(cfg.depths, cfg.num_heads, cfg.window_size)):
        dim = int(E * 2 ** cfg.stages[i])
        rows = math.prod(2 * w - 1 for w in window)
        for j in range(depth):
            blk = f"layers.{i}.blocks.{j}"
            ln(blk + ".norm1", dim)
            sd[PREFIX + blk + ".attn.relative_position_bias_table"] = randn(rows, heads, std=0.5)
            sd[PREFIX + blk + ".attn.relative_position_index"] = naive_relative_index(window)
            lin(blk + ".attn.qkv", 3 * dim, dim)
            lin(blk + ".attn.proj", dim, dim)
            ln(blk + ".norm2", dim)
            lin(blk + ".mlp.fc1", int(dim * cfg.mlp_ratio), dim)
            lin(blk + ".mlp.fc2", dim, int(dim * cfg.mlp_ratio))
        if i in cfg.downsample_stages:
            ln(f"layers.{i}.downsample.norm", 4 * dim)
            lin(f"layers.{i}.downsample.reduction", 2 * dim, 4 * dim, bias=False)
    num_features = int(E * 2 ** cfg.stages[-1])  # official: norm and norm_local are both this wide
    ln("norm", num_features)
    ln("norm_local", num_features)
    local_dim = E * 2**2  # official: local_feat_proj = PatchMerging(embed_dim * 2 ** 2)
    ln("local_feat_proj.norm", 4 * local_dim)
    lin("local_feat_proj.reduction", 2 * local_dim, 4 * local_dim, bias=False)
    return {k[len(PREFIX):]: v for k, v in sd.items()}


def build_ours(cfg: VideoEncoderConfig, sd, *, compat: bool, impl: str, dtype) -> VideoEncoder:
    cfg = VideoEncoderConfig(**{**cfg.__dict__, "attn_impl": impl, "drop_path_rate": 0.0, "compat_official": compat})
    model = VideoEncoder(cfg).to(dtype)  # cast first: loading float64 values into fp32 parameters would round them
    ours = model.state_dict()
    for key, index in sd.items():  # the buffers must already agree: loading overwrites them
        if key.endswith("relative_position_index"):
            assert torch.equal(ours[key], index), key
    model.load_state_dict(sd, strict=True)
    return model.eval()


# ----------------------------------------------------------------------------------------------------------------------
# Cases
# ----------------------------------------------------------------------------------------------------------------------

TINY = _tiny_video_config()

# name -> (config, input (T, H, W), whether some window is clipped on H or W with a smaller size, expected schedule
# summary: per layer, the (window, shift) of its shifted block j = 1).
CASES = {
    # patch grid 8x8x12. Layer 2 (grid 8x2x3, window (4,2,3)): H and W windows cover the grid, so its shift (0,1,1)
    # is clipped to 0; layers 3-4 windows equal the grid; layer 4's merge pads W 3 -> 4; layer 5 (grid 8x1x2)
    # clips (16,2,3) to (8,1,2): spatial clipping, where the official bias indexing differs from ours.
    "tiny-8x64x96": (TINY, (8, 64, 96), True, [
        ((1, 2, 3), (0, 1, 1)), ((2, 2, 3), (0, 1, 1)), ((4, 2, 3), (0, 0, 0)), ((8, 2, 3), (0, 0, 0)),
        ((8, 2, 3), (0, 0, 0)), ((8, 1, 2), (0, 0, 0))]),
    # patch grid 8x16x24: layers 0-4 shift with masks, layers 3-4 windows span all 8 frames; layer 5 (grid 8x2x3)
    # clips (16,2,3) to (8,2,3) in time only and its shift to 0. Official and offset bias indexing coincide.
    "tiny-8x128x192": (TINY, (8, 128, 192), False, [
        ((1, 2, 3), (0, 1, 1)), ((2, 2, 3), (0, 1, 1)), ((4, 2, 3), (0, 1, 1)), ((8, 2, 3), (0, 1, 1)),
        ((8, 2, 3), (0, 1, 1)), ((8, 2, 3), (0, 0, 0))]),
    # 4 frames: layers 3-5 have temporal windows 8, 8, 16 > T = 4, clipped to 4 while layers 3-4 keep their spatial
    # shift (0,1,1) and mask: time-only clipping of the window size together with a live shift.
    "tiny-4x128x192": (TINY, (4, 128, 192), False, [
        ((1, 2, 3), (0, 1, 1)), ((2, 2, 3), (0, 1, 1)), ((4, 2, 3), (0, 1, 1)), ((4, 2, 3), (0, 1, 1)),
        ((4, 2, 3), (0, 1, 1)), ((4, 2, 3), (0, 0, 0))]),
}

F64_ATOL = 1e-10  # float64 end to end: the two forwards differ only by summation order (~1e-14 on O(1) outputs)


def _video(size, batch=2, seed=1, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, *size, generator=g, dtype=dtype)


def _check_schedule(schedule, cfg, expected):
    per_layer = [schedule[sum(cfg.depths[:i]) + 1] for i in range(len(cfg.depths))]  # block j = 1 of every layer
    assert per_layer == expected
    assert all(schedule[sum(cfg.depths[:i])][1] == (0, 0, 0) for i in range(len(cfg.depths)))  # even blocks: none


def test_naive_index_is_video_swin_and_mask_regions():
    """Sanity of the naive helpers on hand-checkable facts (so a bug there cannot hide behind a shared mistake)."""
    idx = naive_relative_index((2, 2, 3))  # table (3, 3, 5) = 45 rows
    assert idx.shape == (12, 12) and idx.min() == 0 and idx.max() == 44
    assert idx[0, 0] == idx[5, 5] == 1 * 15 + 1 * 5 + 2  # zero offset: the centre row
    assert idx[11, 0] == 44 and idx[0, 11] == 0  # offsets (+1, +1, +2) and (-1, -1, -2)
    # time-only clipping: the first N raster tokens of the big window are the clipped window's tokens
    assert torch.equal(naive_relative_index((8, 2, 3))[:24, :24], offset_rows((4, 2, 3), (8, 2, 3)))
    # spatial clipping: they are not
    assert not torch.equal(naive_relative_index((16, 2, 3))[:16, :16], offset_rows((8, 1, 2), (16, 2, 3)))
    mask = shift_mask((1, 4, 6), (1, 2, 3), (0, 1, 1), torch.float64)  # 2 x 2 windows of 6 tokens
    assert mask.shape == (4, 6, 6)
    assert (mask[0] == 0).all()  # the top-left window holds no wrapped token
    assert set(mask.unique().tolist()) == {0.0, -100.0}
    # window 1 (h 0-1, w 3-5): W regions {3, 4} and {5} -> 4 + 2 tokens, 16 + 4 same-region pairs of 36
    assert (mask[1] != 0).sum() == 36 - 20
    # window 3 (h 2-3, w 3-5): regions of 2, 1, 2, 1 tokens -> 4 + 1 + 4 + 1 same-region pairs
    assert (mask[3] != 0).sum() == 36 - 10


@functools.cache
def _naive_case(case):
    """State dict, input and both naive forwards of a case, shared by its ``compat`` variants."""
    cfg, size, _, _ = CASES[case]
    sd, video = official_state_dict(cfg), _video(size)
    grid, local, schedule = naive_forward(video, sd, cfg, bias_mode="offset")
    official_grid, official_local, _ = naive_forward(video, sd, cfg, bias_mode="official")
    return sd, video, grid, local, schedule, official_grid, official_local


@pytest.mark.parametrize("compat", [False, True], ids=["fixed", "compat"])
@pytest.mark.parametrize("case", list(CASES))
def test_matches_naive_float64(case, compat):
    cfg, size, spatial_clip, expected = CASES[case]
    sd, video, grid, local, schedule, official_grid, official_local = _naive_case(case)
    model = build_ours(cfg, sd, compat=compat, impl="torch", dtype=torch.float64)
    with torch.no_grad():
        out = model(video)
    _check_schedule(schedule, cfg, expected)
    assert [w for layer in model.window_schedule(tuple(n // p for n, p in zip(size, cfg.patch_size)))
            for w in layer] == schedule
    assert out.grid.dtype == torch.float64 and out.grid.shape == grid.shape
    torch.testing.assert_close(out.grid, grid, rtol=0, atol=F64_ATOL)
    if compat:
        assert out.local is out.grid  # the official loop's reset: local is the final grid
    else:
        assert out.local.shape == local.shape
        torch.testing.assert_close(out.local, local, rtol=0, atol=F64_ATOL)
        assert (out.local - out.grid).abs().max() > 0.1  # the intended branch really is a different feature

    torch.testing.assert_close(official_local, local, rtol=0, atol=0)  # local layer precedes any spatial clipping
    if spatial_clip:
        # Ours reads the true offsets' biases on a spatially clipped window; Video-Swin's [:N, :N] cut does not.
        assert (official_grid - out.grid).abs().max() > 1e-2
    else:
        torch.testing.assert_close(out.grid, official_grid, rtol=0, atol=F64_ATOL)


def test_random_weights_matter():
    """Every parameter group moves the output: a naive forward that ignored one would be caught by the match."""
    cfg = TINY
    sd = official_state_dict(cfg)
    video = _video((2, 32, 48), batch=1)  # small: 14 forwards; patch grid 2x4x6, every parameter group still used
    grid, local, _ = naive_forward(video, sd, cfg, bias_mode="offset")
    groups = ["relative_position_bias_table", "norm1.bias", "norm2.weight", "qkv.bias", "proj.bias", "fc1.bias",
              "fc2.weight", "downsample.norm.bias", "downsample.reduction", "patch_embed.norm.bias",
              "patch_embed.proj.bias"]
    for group in groups:
        changed = {k: (v * 0 if v.is_floating_point() else v) if group in k else v for k, v in sd.items()}
        g2, l2, _ = naive_forward(video, changed, cfg, bias_mode="offset")
        assert (g2 - grid).abs().max() > 1e-3, group
    for name in ("norm_local.bias", "local_feat_proj.norm.weight"):
        changed = {**sd, name: sd[name] * 0.5}
        assert (naive_forward(video, changed, cfg, bias_mode="offset")[1] - local).abs().max() > 1e-3, name


# fp32 through the Triton kernels vs the float64 naive forward. Every op sees O(1) inputs (LayerNorm outputs, weights
# std <= 0.5) and the outputs are O(1) (|grid| <= ~4); fp32 rounding (eps 1.2e-7) accumulates over 12 blocks of
# reductions of length <= 1024. Observed: 3.3e-6 for the Triton path and 3.0e-6 for our torch path in fp32, so the
# kernel adds nothing beyond fp32 rounding. atol 3e-5 (+ rtol 1e-5) leaves ~10x headroom, while a wrong bias row, mask
# or window moves the output by >= 0.4 (measured with the float64 cases), five orders of magnitude more.
F32_ATOL, F32_RTOL = 3e-5, 1e-5


def test_triton_float32_matches_naive():
    # Smallest tiny input with shifted windows: patch grid 2x4x6, layer 0 shifts (0,1,1) with a mask; layers 1-5 are
    # clipped (layer 2 onwards on H and W too, so the local feature already differs from Video-Swin's indexing and the
    # naive forward reads the offset-bias rows). CPU: Triton's interpreter (tests/conftest.py), about 6 s.
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg, size = TINY, (2, 32, 48)
    sd = official_state_dict(cfg)
    model = build_ours(cfg, sd, compat=False, impl="triton", dtype=torch.float32).to(device)
    video = _video(size)
    matmul_tf32 = torch.backends.cuda.matmul.allow_tf32
    try:  # on a GPU keep fp32 products IEEE (the kernel does; cuDNN's conv and cuBLAS must not use TF32 either)
        torch.backends.cuda.matmul.allow_tf32 = False
        with torch.no_grad(), torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
            out = model(video.float().to(device))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul_tf32
    grid, local, schedule = naive_forward(video, sd, cfg, bias_mode="offset")
    assert schedule[1] == ((1, 2, 3), (0, 1, 1))
    assert out.grid.dtype == torch.float32
    torch.testing.assert_close(out.grid.cpu().double(), grid, rtol=F32_RTOL, atol=F32_ATOL)
    torch.testing.assert_close(out.local.cpu().double(), local, rtol=F32_RTOL, atol=F32_ATOL)


def test_mismatched_state_dict_names_the_keys():
    cfg = TINY
    sd = official_state_dict(cfg, dtype=torch.float32)
    renamed_from, renamed_to = "layers.1.blocks.1.attn.qkv.weight", "layers.1.blocks.1.attn.qkv_weight"
    sd[renamed_to] = sd.pop(renamed_from)
    wrong = "layers.3.blocks.0.attn.relative_position_bias_table"
    sd[wrong] = sd[wrong][:-1]
    model = VideoEncoder(cfg)
    with pytest.raises(RuntimeError) as info:
        model.load_state_dict(sd, strict=True)
    msg = str(info.value)
    assert re.search(r"Missing key\(s\).*" + re.escape(renamed_from), msg)
    assert re.search(r"Unexpected key\(s\).*" + re.escape(renamed_to), msg)
    assert re.search(r"size mismatch for " + re.escape(wrong), msg)
    # the untouched official dict loads (prefix stripped), and a dict that keeps the prefix does not
    clean = official_state_dict(cfg, dtype=torch.float32)
    model.load_state_dict(clean, strict=True)
    with pytest.raises(RuntimeError, match="Missing key"):
        model.load_state_dict({PREFIX + k: v for k, v in clean.items()}, strict=True)
