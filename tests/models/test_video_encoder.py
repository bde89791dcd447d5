"""Video encoder (HTWA 3D Swin): official parameter count and schedule, shapes, local branch, kernels on/off,
uint8 normalisation, gradient checkpointing. CPU, small inputs; the Triton path runs under the interpreter."""

import pytest
import torch

import lfvila
from lfvila.models import PatchEmbed3D, PatchMerging, VideoEncoderConfig, create_model, list_models, model_config

OFFICIAL_PARAMS = 89_229_448


@pytest.fixture(scope="module")
def base():
    torch.manual_seed(0)
    return create_model("lfvila-base-video", attn_impl="torch").eval()


def _tiny(**kw):
    torch.manual_seed(0)
    return create_model("lfvila-tiny-video", **{"attn_impl": "torch", **kw})


def test_registry():
    assert {"lfvila-base-video", "lfvila-tiny-video"} <= set(list_models())
    assert model_config("lfvila-base-video") == VideoEncoderConfig(extra={"input": (32, 192, 320)})
    with pytest.raises(ValueError, match="unknown model"):
        create_model("lfvila-nope")
    with pytest.raises(TypeError):
        model_config("lfvila-tiny-video", not_a_field=1)


def test_base_parameter_count_and_official_keys(base):
    assert sum(p.numel() for p in base.parameters()) == OFFICIAL_PARAMS
    keys = set(base.state_dict())
    for k in ("patch_embed.proj.weight", "patch_embed.norm.bias", "layers.2.blocks.13.attn.qkv.weight",
              "layers.0.blocks.1.attn.relative_position_bias_table", "layers.5.blocks.1.attn.relative_position_index",
              "layers.0.blocks.0.norm1.weight", "layers.3.blocks.0.mlp.fc2.bias", "layers.4.downsample.norm.weight",
              "layers.1.downsample.reduction.weight", "norm.weight", "norm_local.weight",
              "local_feat_proj.norm.weight", "local_feat_proj.reduction.weight"):
        assert k in keys, k
    assert not any(".downsample." in k for k in keys if k.startswith(("layers.2.", "layers.3.", "layers.5.")))
    assert base.patch_embed.proj.weight.shape == (128, 3, 1, 8, 8)
    assert base.layers[2].blocks[0].attn.relative_position_bias_table.shape == (15 * 5 * 9, 16)
    assert base.local_feat_proj.reduction.weight.shape == (1024, 2048)
    assert base.norm_local.weight.shape == (1024,)


def test_base_window_schedule_matches_official_rule(base):
    sched = base.window_schedule((32, 24, 40))
    windows = [(2, 3, 5), (4, 3, 5), (8, 3, 5), (16, 3, 5), (16, 3, 5)]
    assert [len(layer) for layer in sched] == [2, 2, 14, 2, 2, 2]
    for i, layer in enumerate(sched[:5]):
        for j, (window, shift) in enumerate(layer):
            assert window == windows[i]
            assert shift == ((0, 1, 2) if j % 2 else (0, 0, 0))
    assert sched[5] == [((32, 3, 5), (0, 0, 0))] * 2
    assert all(shift[0] == 0 for layer in sched for _, shift in layer)  # never a temporal shift
    rates = [blk.drop_path.p for layer in base.layers for blk in layer.blocks]
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.2) and len(rates) == 24


@pytest.mark.parametrize("size, shapes", [
    # the official input: the per-layer table in docs/design.md, "The model" (about 4 s on 2 CPU cores)
    ((32, 192, 320), [(32, 12, 20, 256), (32, 6, 10, 512), (32, 6, 10, 512), (32, 6, 10, 512), (32, 3, 5, 1024),
                      (32, 3, 5, 1024)]),
    # any grid works with the base weights: patch grid 8 x 12 x 20, odd sizes padded by PatchMerging
    ((8, 96, 160), [(8, 6, 10, 256), (8, 3, 5, 512), (8, 3, 5, 512), (8, 3, 5, 512), (8, 2, 3, 1024),
                    (8, 2, 3, 1024)]),
])
def test_base_shapes_through_every_layer(base, size, shapes):
    seen = []
    hooks = [layer.register_forward_hook(lambda m, i, o: seen.append(tuple(o.shape[1:]))) for layer in base.layers]
    try:
        with torch.no_grad():
            out = base(torch.randn(1, 3, *size))
    finally:
        for h in hooks:
            h.remove()
    assert seen == shapes
    assert out.grid.shape == (1, *shapes[-1])
    assert out.local.shape == (1, *shapes[-1])  # layer 2 output -> local_feat_proj (2x2 merge) -> norm_local
    assert torch.isfinite(out.grid).all() and torch.isfinite(out.local).all()


def test_local_branch_and_compat_official():
    model = _tiny().eval()
    assert model.local_layer == 2
    x = torch.randn(2, 3, 8, 64, 96)
    with torch.no_grad():
        out = model(x)
        assert out.grid.shape == (2, 8, 1, 2, 256)
        assert out.local.shape == (2, 8, 1, 2, 256)  # layer 2 output (2 x 3 x 128) -> PatchMerging -> norm_local
        assert not torch.allclose(out.local, out.grid)
        model.compat_official = True
        off = model(x)
    torch.testing.assert_close(off.grid, out.grid)
    assert off.local is off.grid  # the official loop's reset: "local" is the final grid


def test_local_branch_gets_gradient_only_when_fixed():
    model = _tiny(drop_path_rate=0.0)
    model(torch.randn(1, 3, 8, 32, 48)).local.sum().backward()
    assert model.local_feat_proj.reduction.weight.grad is not None
    model.zero_grad(set_to_none=True)
    model.compat_official = True
    model(torch.randn(1, 3, 8, 32, 48)).local.sum().backward()
    assert model.local_feat_proj.reduction.weight.grad is None


def test_kernels_on_off_forward_backward_agree():
    x = torch.randn(1, 3, 4, 32, 48)  # patch grid 4 x 4 x 6: windows clip and shift, tiny for the interpreter
    outs, grads = [], []
    for impl in ("torch", "triton"):
        model = _tiny(drop_path_rate=0.0).train()
        for layer in model.layers:
            for blk in layer.blocks:
                blk.attn.impl = impl
        out = model(x)
        (out.grid.square().mean() + out.local.square().mean()).backward()
        outs.append((out.grid.detach(), out.local.detach()))
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-4)
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-3, atol=1e-5, msg=name)


def test_uint8_input_equals_prenormalised_float():
    model = _tiny().eval()
    video = torch.randint(0, 256, (2, 8, 64, 96, 3), dtype=torch.uint8)  # (B, T, H, W, C) as decoded
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1, 1)
    ref = (video.permute(0, 4, 1, 2, 3).float() / 255.0 - mean) / std  # (B, C, T, H, W), as to_model_input
    with torch.no_grad():
        a, b = model(video), model(ref)
    torch.testing.assert_close(a.grid, b.grid, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a.local, b.local, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="uint8 video"):
        model(video.permute(0, 4, 1, 2, 3))


def test_gradient_checkpointing_same_gradients():
    x = torch.randn(2, 3, 8, 32, 48)
    grads = []
    for ckpt in (False, True):
        model = _tiny(grad_checkpointing=ckpt).train()  # drop path on: checkpoint must replay the same RNG
        torch.manual_seed(1)
        out = model(x)
        (out.grid.sum() + out.local.sum()).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], msg=name)


def test_patch_embed_pads_and_patch_merging_order():
    embed = PatchEmbed3D((1, 8, 8), 3, 16)
    assert embed(torch.randn(1, 3, 3, 20, 27)).shape == (1, 3, 3, 4, 16)  # ceil(20/8), ceil(27/8)
    merge = PatchMerging(1)
    with torch.no_grad():
        merge.reduction.weight.zero_()
        merge.reduction.weight[0] = torch.tensor([1.0, 10.0, 100.0, 1000.0])
        merge.norm.weight.fill_(1.0)
    x = torch.arange(9.0).view(1, 1, 3, 3, 1)  # odd H, W: zero-padded to 4 x 4; neighbours (0,0) (1,0) (0,1) (1,1)
    out = merge(x)
    assert out.shape == (1, 1, 2, 2, 2)
    padded = torch.nn.functional.pad(x, (0, 0, 0, 1, 0, 1))
    first = torch.stack([padded[0, 0, 0, 0, 0], padded[0, 0, 1, 0, 0], padded[0, 0, 0, 1, 0], padded[0, 0, 1, 1, 0]])
    normed = torch.nn.functional.layer_norm(first, (4,))
    torch.testing.assert_close(out[0, 0, 0, 0, 0], (normed * torch.tensor([1.0, 10.0, 100.0, 1000.0])).sum())


def test_lfvila_create_model_reexport():
    model = lfvila.create_model("lfvila-tiny-video", attn_impl="torch", depths=(1, 1, 1, 1, 1, 1))
    assert len(model.layers[2].blocks) == 1
