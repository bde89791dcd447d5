"""2D Swin -> 3D video encoder inflation (``lfvila.models.swin2d``): key mapping, patch / bias-table values, the
timm layout, errors, file loading, and the full Swin-B -> lfvila-base shapes on the meta device. CPU, seconds."""

import re

import pytest
import torch
import torch.nn.functional as F

from lfvila.models import VideoEncoder, VideoEncoderConfig
from lfvila.models.registry import _tiny_video_config
from lfvila.models.swin2d import detect_layout, inflate_swin2d, load_swin2d
from lfvila_kernels.reference import relative_position_index


def swin2d_state_dict(embed=32, depths=(2, 2, 6, 2), heads=(2, 4, 8, 16), window=7, img=224, classes=10,
                      device="cpu", seed=0):
    """Every key the original Microsoft Swin repo saves (head, attn_mask and relative_position_index included)."""
    g = torch.Generator().manual_seed(seed)

    def t(*shape):
        return torch.empty(shape, device="meta") if device == "meta" else torch.randn(shape, generator=g)

    sd = {"patch_embed.proj.weight": t(embed, 3, 4, 4), "patch_embed.proj.bias": t(embed),
          "patch_embed.norm.weight": t(embed), "patch_embed.norm.bias": t(embed)}
    for s, (d, nh) in enumerate(zip(depths, heads)):
        dim, res = embed * 2**s, img // 4 // 2**s
        w = min(window, res)  # Microsoft clips the window to the resolution (and then does not shift)
        for j in range(d):
            p = f"layers.{s}.blocks.{j}."
            sd.update({p + "norm1.weight": t(dim), p + "norm1.bias": t(dim),
                       p + "attn.relative_position_bias_table": t((2 * w - 1) ** 2, nh),
                       p + "attn.relative_position_index": torch.zeros(w * w, w * w, dtype=torch.long, device=device),
                       p + "attn.qkv.weight": t(3 * dim, dim), p + "attn.qkv.bias": t(3 * dim),
                       p + "attn.proj.weight": t(dim, dim), p + "attn.proj.bias": t(dim),
                       p + "norm2.weight": t(dim), p + "norm2.bias": t(dim),
                       p + "mlp.fc1.weight": t(4 * dim, dim), p + "mlp.fc1.bias": t(4 * dim),
                       p + "mlp.fc2.weight": t(dim, 4 * dim), p + "mlp.fc2.bias": t(dim)})
            if j % 2 and res > w:
                sd[p + "attn_mask"] = t((res // w) ** 2, w * w, w * w)
        if s < len(depths) - 1:
            p = f"layers.{s}.downsample."
            sd.update({p + "reduction.weight": t(2 * dim, 4 * dim), p + "norm.weight": t(4 * dim),
                       p + "norm.bias": t(4 * dim)})
    last = embed * 2 ** (len(depths) - 1)
    sd.update({"norm.weight": t(last), "norm.bias": t(last), "head.weight": t(classes, last), "head.bias": t(classes)})
    return sd


def to_timm(sd):
    """timm's ``checkpoint_filter_fn`` on a Microsoft dict: drop the index / mask buffers, move each downsample to the
    start of the next stage, rename the head; no weight is permuted."""
    out = {}
    for k, v in sd.items():
        if "relative_position_index" in k or "attn_mask" in k:
            continue
        k = re.sub(r"layers\.(\d+)\.downsample", lambda m: f"layers.{int(m.group(1)) + 1}.downsample", k)
        out[k.replace("head.", "head.fc.")] = v
    return out


@pytest.fixture(scope="module")
def src():
    return swin2d_state_dict()


@pytest.fixture(scope="module")
def inflated(src):
    return inflate_swin2d({"model": src}, _tiny_video_config())


def test_loads_strict_and_runs(inflated):
    enc = VideoEncoder(_tiny_video_config(), attn_impl="torch").eval()
    enc.load_state_dict(inflated, strict=True)
    with torch.no_grad():
        out = enc(torch.randn(1, 3, 4, 32, 48))
    assert out.grid.shape == (1, 4, 1, 1, 256) and torch.isfinite(out.grid).all()


def test_blocks_downsamplers_norms_in_order(src, inflated):
    pairs = {"layers.0.blocks.1": "layers.0.blocks.1", "layers.1.blocks.0": "layers.1.blocks.0",
             "layers.2.blocks.1": "layers.2.blocks.1", "layers.3.blocks.0": "layers.2.blocks.2",
             "layers.3.blocks.1": "layers.2.blocks.3", "layers.4.blocks.0": "layers.2.blocks.4",
             "layers.4.blocks.1": "layers.2.blocks.5", "layers.5.blocks.0": "layers.3.blocks.0",
             "layers.5.blocks.1": "layers.3.blocks.1",
             "layers.0.downsample": "layers.0.downsample", "layers.1.downsample": "layers.1.downsample",
             "layers.4.downsample": "layers.2.downsample", "local_feat_proj": "layers.2.downsample",
             "norm": "norm", "norm_local": "norm", "patch_embed.norm": "patch_embed.norm"}
    for ours, theirs in pairs.items():
        keys = [k for k in inflated if k.startswith(ours + ".") and "relative_position" not in k]
        assert keys
        for k in keys:
            assert torch.equal(inflated[k], src[theirs + k[len(ours):]]), k
    assert torch.equal(inflated["patch_embed.proj.bias"], src["patch_embed.proj.bias"])
    assert not any(k.startswith("head") or "attn_mask" in k for k in inflated)
    for i, w in enumerate(_tiny_video_config().window_size):
        assert torch.equal(inflated[f"layers.{i}.blocks.1.attn.relative_position_index"], relative_position_index(w))


def test_patch_kernel_tiled_over_quarter(src, inflated):
    w2, b2, w3 = src["patch_embed.proj.weight"], src["patch_embed.proj.bias"], inflated["patch_embed.proj.weight"]
    assert w3.shape == (32, 3, 1, 8, 8)
    for dy in (0, 4):
        for dx in (0, 4):
            torch.testing.assert_close(w3[:, :, 0, dy:dy + 4, dx:dx + 4], w2 / 4, rtol=0, atol=0)
    # An 8x8 patch made of four equal 4x4 tiles gives the 2D conv's output on one tile.
    tile = torch.randn(1, 3, 4, 4)
    y2 = F.conv2d(tile, w2, b2, stride=4)
    y3 = F.conv3d(tile.repeat(1, 1, 2, 2)[:, :, None], w3, b2, stride=(1, 8, 8))
    torch.testing.assert_close(y3[:, :, 0], y2)


def test_bias_table_resized_then_repeated_over_time(src, inflated):
    cfg = _tiny_video_config()
    for (i, j), (s, j2) in {(2, 0): (2, 0), (3, 1): (2, 3), (5, 0): (3, 0), (0, 1): (0, 1)}.items():
        wt, wh, ww = cfg.window_size[i]
        table2 = src[f"layers.{s}.blocks.{j2}.attn.relative_position_bias_table"]  # (13 * 13, heads)
        nh = table2.shape[1]
        ref2 = F.interpolate(table2.t().reshape(1, nh, 13, 13), size=(2 * wh - 1, 2 * ww - 1), mode="bicubic",
                             align_corners=False)[0]  # (heads, 2wh-1, 2ww-1)
        table3 = inflated[f"layers.{i}.blocks.{j}.attn.relative_position_bias_table"]
        assert table3.shape == ((2 * wt - 1) * (2 * wh - 1) * (2 * ww - 1), nh)
        # Via the 3D index: the bias of query a for key b is the 2D bias of their (dh, dw), whatever their dt.
        coords = torch.stack(torch.meshgrid(torch.arange(wt), torch.arange(wh), torch.arange(ww), indexing="ij"))
        rel = coords.flatten(1)[:, :, None] - coords.flatten(1)[:, None, :]  # (3, N, N)
        got = table3[relative_position_index((wt, wh, ww))]  # (N, N, heads)
        want = ref2[:, rel[1] + wh - 1, rel[2] + ww - 1].permute(1, 2, 0)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        assert len(rel[0].unique()) == 2 * wt - 1


def test_timm_layout_inflates_identically(src, inflated):
    timm_sd = to_timm(src)
    assert detect_layout(timm_sd) == "timm" and detect_layout(src) == "microsoft"
    for layout in ("auto", "timm"):
        out = inflate_swin2d(timm_sd, _tiny_video_config(), layout=layout)
        assert out.keys() == inflated.keys()
        assert all(torch.equal(out[k], inflated[k]) for k in out)
    with pytest.raises(ValueError, match="wrong layout"):
        inflate_swin2d(timm_sd, _tiny_video_config(), layout="microsoft")
    with pytest.raises(ValueError, match="no downsample in stage 0"):
        inflate_swin2d(src, _tiny_video_config(), layout="timm")


def test_timm_patch_merging_order_is_microsofts():
    """timm >= 0.9 ``PatchMerging.forward``: ``reshape(B, H/2, 2, W/2, 2, C).permute(0, 1, 3, 4, 2, 5).flatten(3)``
    equals Microsoft's (and our) ``cat([x[0::2, 0::2], x[1::2, 0::2], x[0::2, 1::2], x[1::2, 1::2]])``."""
    x = torch.randn(2, 6, 8, 5)
    B, H, W, C = x.shape
    timm = x.reshape(B, H // 2, 2, W // 2, 2, C).permute(0, 1, 3, 4, 2, 5).flatten(3)
    ms = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
    assert torch.equal(timm, ms)


def test_errors_name_the_problem(src):
    cfg = _tiny_video_config()
    short = {k: v for k, v in src.items() if not k.startswith(("layers.2.blocks.4.", "layers.2.blocks.5."))}
    with pytest.raises(ValueError, match=r"depth mismatch: 2D depths \(2, 2, 4, 2\).*\(2, 2, 2, 2, 2, 2\)"):
        inflate_swin2d(short, cfg)
    wide = VideoEncoderConfig(**{**cfg.__dict__, "embed_dim": 64})
    with pytest.raises(ValueError, match=r"layers\.4\.blocks\.0 has width 256, its source layers\.2\.blocks\.4 has"):
        inflate_swin2d(src, wide)
    heads = VideoEncoderConfig(**{**cfg.__dict__, "num_heads": (2, 4, 8, 8, 4, 16)})
    with pytest.raises(ValueError, match=r"layers\.4\.blocks\.1 has 4 heads"):
        inflate_swin2d(src, heads)
    gone = {k: v for k, v in src.items() if k not in ("layers.2.blocks.3.mlp.fc1.weight", "norm.bias")}
    with pytest.raises(ValueError, match=r"missing 2D keys.*layers\.2\.blocks\.3\.mlp\.fc1\.weight.*norm\.bias"):
        inflate_swin2d(gone, cfg)
    timm_gone = {k: v for k, v in to_timm(src).items() if k != "layers.2.downsample.norm.weight"}
    with pytest.raises(ValueError, match=r"missing 2D keys \(timm layout\): \['layers\.2\.downsample\.norm\.weight'\]"):
        inflate_swin2d(timm_gone, cfg)
    bent = {**src, "layers.1.blocks.0.attn.proj.weight": torch.zeros(64, 63)}
    with pytest.raises(ValueError, match=r"layers\.1\.blocks\.0\.attn\.proj\.weight: inflated \(64, 63\) vs encoder "
                                         r"\(64, 64\)"):
        inflate_swin2d(bent, cfg)


def test_dtypes(src):
    cfg = _tiny_video_config()
    half = inflate_swin2d({k: v.half() if v.is_floating_point() else v for k, v in src.items()}, cfg)
    double = inflate_swin2d({k: v.double() if v.is_floating_point() else v for k, v in src.items()}, cfg)
    assert {v.dtype for v in half.values()} == {torch.float32, torch.long}
    assert {v.dtype for v in double.values()} == {torch.float64, torch.long}


def test_load_from_files(src, inflated, tmp_path):
    from safetensors.torch import save_file

    torch.save({"model": src}, tmp_path / "swin.pth")
    save_file({k: v.contiguous() for k, v in to_timm(src).items()}, str(tmp_path / "swin.safetensors"))
    for name, layout in (("swin.pth", "microsoft"), ("swin.safetensors", "timm")):
        enc = VideoEncoder(_tiny_video_config(), attn_impl="torch")
        report = load_swin2d(enc, tmp_path / name)
        assert report["layout"] == layout
        assert ("head.weight" if layout == "microsoft" else "head.fc.weight") in report["dropped"]
        sd = enc.state_dict()
        assert all(torch.equal(sd[k], inflated[k]) for k in sd)
    torch.save({k: v for k, v in src.items() if k != "patch_embed.proj.weight"}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match=r"bad\.pth: missing 2D keys.*patch_embed\.proj\.weight"):
        load_swin2d(VideoEncoder(_tiny_video_config()), tmp_path / "bad.pth")


def test_meta_build_leaves_the_index_cache_on_cpu(src):
    cfg = VideoEncoderConfig(**{**_tiny_video_config().__dict__,
                                "window_size": ((3, 2, 3), (2, 2, 3), (4, 2, 3), (8, 2, 3), (8, 2, 3), (16, 2, 3))})
    inflate_swin2d(src, cfg)  # builds VideoEncoder(cfg) on the meta device internally (nothing cached before)
    assert relative_position_index((3, 2, 3)).device.type == "cpu"
    assert VideoEncoder(cfg).layers[0].blocks[0].attn.relative_position_index.device.type == "cpu"


def test_swin_b_into_lfvila_base_shapes_on_meta():
    src = swin2d_state_dict(embed=128, depths=(2, 2, 18, 2), heads=(4, 8, 16, 32), window=12, img=384,
                            classes=21841, device="meta")
    cfg = VideoEncoderConfig()
    out = inflate_swin2d(src, cfg)
    with torch.device("meta"):
        enc = VideoEncoder(cfg)
    want = enc.state_dict()
    assert out.keys() == want.keys()
    assert all(out[k].shape == want[k].shape for k in want)
    assert out["layers.2.blocks.0.attn.relative_position_bias_table"].shape == (15 * 5 * 9, 16)
    assert out["patch_embed.proj.weight"].shape == (128, 3, 1, 8, 8)
    enc.load_state_dict(out, strict=True, assign=True)
