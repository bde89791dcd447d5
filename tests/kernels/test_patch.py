"""``lfvila_kernels.patch.apply_window_attention`` on timm Swin, transformers Swin and a Video-Swin block.

The documented tolerance (fp32, the house rule of the kernel tests): the patched model's error against the unpatched
model run in float64 is at most twice the unpatched fp32 model's own error (plus a 2e-6 floor), for the output and
for the gradient of every parameter and of the input. Odd input sizes make the blocks pad, so the padding order of
each library (timm rolls then pads; transformers and Video-Swin pad then roll) is exercised with shifted windows.

timm without torchvision: timm imports torchvision at the top of its package (FrozenBatchNorm2d, data transforms)
although its Swin code never uses it. PyPI's only torchvision for torch 2.13 (0.28.0) is built against CUDA torch
and cannot load on this project's CPU build of torch, so CI installs timm with ``--no-deps`` and :func:`_import_timm`
imports it once with an inert stand-in for torchvision (every attribute a class that raises when used), removed from
``sys.modules`` right after. Where torchvision works, timm is imported as it is.
"""

from __future__ import annotations

import copy
import functools
import importlib.abc
import importlib.machinery
import importlib.util
import subprocess
import sys
from unittest import mock

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import lfvila_kernels.patch as patch_module
from lfvila_kernels import relative_position_index, window_attention
from lfvila_kernels.patch import PatchHandle, apply_window_attention
from tests.kernels._compare import RoundedOps, assert_within_eager_error

TIMM_ODD = (200, 232)  # patch grid 50 x 58: every stage pads its 7 x 7 windows, shifted blocks included


# --------------------------------------------------------------------------------------------------- timm import
# The inert torchvision stand-in is the benchmark's (benchmarks/bench_dropin.py), one definition for both.
from benchmarks.bench_dropin import _InertTorchvision as _InertFinder  # noqa: E402


@functools.cache
def _import_timm():
    """timm, or a skip when it is not installed (see the module docstring for the torchvision stand-in)."""
    if importlib.util.find_spec("timm") is None:
        pytest.skip("timm is not installed (pip install --no-deps timm)")
    try:
        import timm
    except Exception:  # ImportError, or RuntimeError from a torchvision built for another torch
        for name in [m for m in sys.modules if m.split(".")[0] in ("timm", "torchvision")]:
            del sys.modules[name]
        finder = _InertFinder()
        sys.meta_path.insert(0, finder)
        try:
            import timm
        finally:
            sys.meta_path.remove(finder)
            for name in [m for m in sys.modules if m.split(".")[0] == "torchvision"]:
                del sys.modules[name]
    return timm


@pytest.fixture(scope="module")
def timm():
    return _import_timm()


# --------------------------------------------------------------------------------------------------- helpers
def _fwd_bwd(model, x, run):
    """``run(model, x) -> output``; returns the output and the gradients of the input and every parameter."""
    model.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    out = run(model, x)
    # a loss that touches every output with a different weight
    weights = torch.linspace(-1, 1, out.numel(), dtype=out.dtype, device=out.device).reshape(out.shape)
    (out * weights).sum().backward()
    grads = {"input": x.grad}
    grads.update({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    return out.detach(), grads


def _fused_calls():
    """A spy on the fused op as the patched blocks call it: ``spy.call_count``."""
    return mock.patch.object(patch_module, "window_attention", wraps=window_attention)


def _assert_patched_within_tolerance(model, x, run, impl="auto"):
    """The documented rule (tests/kernels/_compare.py): the patched fp32 model's error against the unpatched float64
    model is at most 2 x the unpatched fp32 model's error + the floor. Both fp32 runs go through RoundedOps, so every
    op but our Triton kernels is correctly rounded: the yardstick is the same on every CPU, and what differs between
    the two runs is the attention alone (with ``impl="torch"`` that is a different composition of rounded torch ops:
    the check is then one of the function computed)."""
    oracle, g64 = _fwd_bwd(copy.deepcopy(model).double(), x.double(), run)
    with RoundedOps():
        eager, g32 = _fwd_bwd(model, x, run)
    with apply_window_attention(model, impl=impl) as handle, _fused_calls() as spy, RoundedOps():
        assert handle.patched
        fused, gfused = _fwd_bwd(model, x, run)
        assert spy.call_count == len(handle.patched)  # every patched block ran fused, once
    assert_within_eager_error("output", fused, eager, oracle, torch.float32)
    assert set(gfused) == set(g32) == set(g64)
    for name in g64:
        assert_within_eager_error(f"grad {name}", gfused[name], g32[name], g64[name], torch.float32)
    return handle


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_same_state(a, b):
    assert list(a) == list(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _timm_run(model, x):
    return model(x)


def _hf_run(model, x):
    return model(pixel_values=x).last_hidden_state


def _hf_swin(**overrides):
    from transformers import SwinConfig, SwinModel

    torch.manual_seed(0)
    model = SwinModel(SwinConfig(**overrides)).eval()
    with torch.no_grad():  # transformers initialises the bias tables to zero: make them matter
        for name, p in model.named_parameters():
            if name.endswith("relative_position_bias_table"):
                p.normal_(0, 0.5)
    return model


def _timm_swin(timm, name="swin_tiny_patch4_window7_224", **kwargs):
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, **kwargs).eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith("relative_position_bias_table"):
                p.normal_(0, 0.5)
    return model


def _pads_with_shift(blocks) -> bool:
    """Whether some shifted block sees a grid its window does not divide (so the padding order matters)."""
    return any(any(s) and any(r % w for r, w in zip(res, win)) for res, win, s in blocks)


# --------------------------------------------------------------------------------------------------- index mapping
@pytest.mark.parametrize("window", [(7, 7), (3, 5), (4, 2)])
def test_2d_bias_index_of_timm_and_transformers_is_ours_with_one_frame(timm, window):
    from timm.models.swin_transformer import get_relative_position_index
    from transformers.models.swin.modeling_swin import SwinRelativePositionBias

    ours = relative_position_index((1, *window))
    assert torch.equal(get_relative_position_index(*window), ours)
    hf = SwinRelativePositionBias(2, window).relative_position_index
    assert torch.equal(hf.reshape(ours.shape), ours)


# --------------------------------------------------------------------------------------------------- timm
@pytest.mark.parametrize("size", [(224, 224), TIMM_ODD], ids=["224", "odd"])
def test_timm_swin_tiny_forward_and_backward_agree(timm, size):
    model = _timm_swin(timm, img_size=size)
    blocks = [(b.input_resolution, b.window_size, b.shift_size) for b in model.modules()
              if isinstance(b, timm.models.swin_transformer.SwinTransformerBlock)]  # fmt: skip
    assert _pads_with_shift(blocks) == (size == TIMM_ODD)
    x = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(1))
    handle = _assert_patched_within_tolerance(model, x, _timm_run)
    assert handle.patched == [f"layers.{i}.blocks.{j}" for i, d in enumerate((2, 2, 6, 2)) for j in range(d)]
    assert handle.skipped == [] and not handle.active


def test_timm_revert_state_dict_and_other_instances(timm):
    from timm.models.swin_transformer import SwinTransformerBlock

    original_attn = SwinTransformerBlock._attn
    model, other = _timm_swin(timm), _timm_swin(timm)
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        before, before_sd = model(x), _state(model)
        handle = apply_window_attention(model)
        block = model.layers[1].blocks[1]
        assert "_attn" in block.__dict__ and "_attn" not in other.layers[1].blocks[1].__dict__
        assert SwinTransformerBlock._attn is original_attn  # the class (and timm's module) is untouched
        _assert_same_state(before_sd, _state(model))
        patched = model(x)
        torch.testing.assert_close(patched, before, rtol=1e-5, atol=1e-5)
        # a checkpoint saved after patching loads into an unpatched model and vice versa (strict)
        other.load_state_dict(model.state_dict(), strict=True)
        model.load_state_dict(_timm_swin(timm).state_dict(), strict=True)
        model.load_state_dict(before_sd, strict=True)
        handle.revert()
        handle.revert()  # idempotent
        assert "_attn" not in block.__dict__
        assert torch.equal(model(x), before)  # bit-identical once reverted
        assert torch.equal(other(x), before)
    assert repr(handle) == "PatchHandle(patched=12, skipped=0, active=False)"


def _tiny_timm_swin(**kwargs):
    from timm.models.swin_transformer import SwinTransformer

    torch.manual_seed(0)  # grid 9 x 11 for 36 x 44 inputs: padded, shifted windows
    return SwinTransformer(img_size=(36, 44), patch_size=4, embed_dim=16, depths=(2,), num_heads=(2,), window_size=7,
                           num_classes=5, **kwargs).eval()  # fmt: skip


def test_timm_torch_compile_of_the_patched_model(timm):
    """fullgraph: the per-instance override traces without graph breaks; forward and backward match eager.

    aot_eager, not inductor: what this checks is the trace of the override (dynamo + AOTAutograd, where a graph break
    or a wrong backward would show). Inductor sees our op as an opaque custom op, and it compiles and runs it, forward
    and backward, in test_window_attention.py::test_torch_compile_fullgraph; here it would only add 30-70 s of C++
    compilation of timm's own layers on a 2-core CPU."""
    backend = "aot_eager"
    model = _tiny_timm_swin()
    x = torch.randn(2, 3, 36, 44, generator=torch.Generator().manual_seed(5))
    ref, ref_grads = _fwd_bwd(model, x, _timm_run)
    with apply_window_attention(model):
        compiled = torch.compile(model, fullgraph=True, backend=backend)
        out, grads = _fwd_bwd(model, x, lambda m, inp: compiled(inp))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-5, msg=name)


def test_timm_triton_kernels_through_the_interpreter(timm):
    from lfvila_kernels.dispatch import interpreting

    if not (torch.cuda.is_available() or interpreting()):
        pytest.skip("needs CUDA or TRITON_INTERPRET=1")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = _tiny_timm_swin().to(device)
    x = torch.randn(1, 3, 36, 44, device=device)
    _assert_patched_within_tolerance(model, x, _timm_run, impl="triton")


def test_timm_swin_v2_and_attention_dropout_are_refused(timm):
    v2 = _timm_swin(timm, "swinv2_tiny_window8_256")
    with pytest.raises(ValueError, match=r"layers\.0\.blocks\.0: Swin-V2 attention is not supported: cosine"):
        apply_window_attention(v2)
    handle = apply_window_attention(v2, strict=False)
    assert handle.patched == [] and len(handle.skipped) == 12
    assert all("logit scale" in reason and "position-bias MLP" in reason for _, reason in handle.skipped)

    dropout = _timm_swin(timm, attn_drop_rate=0.1)
    with pytest.raises(ValueError, match=r"layers\.0\.blocks\.0: attn_drop=0\.1 > 0 \(the fused op has no"):
        apply_window_attention(dropout)

    # strict: nothing is patched when one module is refused; strict=False patches the rest and lists the refused
    mixed = nn.ModuleDict({"v1": _timm_swin(timm), "v2": v2})
    with pytest.raises(ValueError, match=r"12 module\(s\) cannot be patched"):
        apply_window_attention(mixed)
    assert not any("_attn" in m.__dict__ for m in mixed.modules())
    with apply_window_attention(mixed, strict=False) as handle:
        assert len(handle.patched) == 12 and all(p.startswith("v1.") for p in handle.patched)
        assert [p for p, _ in handle.skipped] == [f"v2.layers.{i}.blocks.{j}" for i, d in enumerate((2, 2, 6, 2))
                                                  for j in range(d)]  # fmt: skip
        with pytest.raises(ValueError, match="already patched by another handle"):
            apply_window_attention(mixed.v1)


# --------------------------------------------------------------------------------------------------- transformers
@pytest.mark.parametrize("size", [(224, 224), (200, 232)], ids=["224", "odd"])
def test_transformers_swin_forward_and_backward_agree(size):
    model = _hf_swin()
    blocks, res = [], (-(-size[0] // 4), -(-size[1] // 4))  # the patch grid, halved (rounding up) at every merge
    for stage in model.encoder.layers:
        blocks += [(res, (b.window_size, b.window_size), (b.shift_size, b.shift_size)) for b in stage.blocks]
        res = (-(-res[0] // 2), -(-res[1] // 2))
    x = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(3))
    handle = _assert_patched_within_tolerance(model, x, _hf_run)
    assert handle.patched == [f"encoder.layers.{i}.blocks.{j}" for i, d in enumerate((2, 2, 6, 2)) for j in range(d)]
    assert _pads_with_shift(blocks) == (size != (224, 224))


def test_transformers_revert_state_dict_compile_and_output_attentions():
    model = _hf_swin(image_size=64, embed_dim=16, depths=[2, 2], num_heads=[2, 4], window_size=4,
                     attn_implementation="eager")  # fmt: skip
    x = torch.randn(2, 3, 60, 68, generator=torch.Generator().manual_seed(4))  # grids 15 x 17 and 8 x 9: padded
    with torch.no_grad():
        ref = model(pixel_values=x, output_attentions=True)
        before_sd = _state(model)
        handle = apply_window_attention(model)
        _assert_same_state(before_sd, _state(model))
        out = model(pixel_values=x).last_hidden_state
        torch.testing.assert_close(out, ref.last_hidden_state, rtol=1e-5, atol=1e-5)
        # output_attentions needs the attention weights: the patched layers run their original path then
        with _fused_calls() as spy:
            with_attn = model(pixel_values=x, output_attentions=True)
        assert spy.call_count == 0
        assert len(with_attn.attentions) == 2
        for a, b in zip(with_attn.attentions, ref.attentions):
            assert torch.equal(a, b)
        compiled = torch.compile(model, backend="aot_eager")
        torch.testing.assert_close(compiled(pixel_values=x).last_hidden_state, ref.last_hidden_state,
                                   rtol=1e-4, atol=1e-5)  # fmt: skip
        handle.revert()
        assert not any("forward" in m.__dict__ for m in model.modules())
        assert torch.equal(model(pixel_values=x, output_attentions=True).last_hidden_state, ref.last_hidden_state)


def test_transformers_swin_v2_and_attention_dropout_are_refused():
    from transformers import Swinv2Config, Swinv2Model

    v2 = Swinv2Model(Swinv2Config(image_size=32, embed_dim=16, depths=[2], num_heads=[2], window_size=4))
    with pytest.raises(ValueError, match=r"encoder\.layers\.0\.blocks\.0: Swin-V2 attention is not supported"):
        apply_window_attention(v2)
    handle = apply_window_attention(v2, strict=False)
    assert handle.patched == [] and [p for p, _ in handle.skipped] == ["encoder.layers.0.blocks.0",
                                                                       "encoder.layers.0.blocks.1"]  # fmt: skip
    dropout = _hf_swin(image_size=32, embed_dim=16, depths=[2], num_heads=[2], window_size=4,
                       attention_probs_dropout_prob=0.1)  # fmt: skip
    with pytest.raises(ValueError, match=r"attention_probs_dropout_prob=0\.1 > 0"):
        apply_window_attention(dropout)
    with pytest.raises(ValueError, match="no supported window-attention block in Linear"):
        apply_window_attention(nn.Linear(2, 2))
    assert apply_window_attention(nn.Linear(2, 2), strict=False).patched == []
    with pytest.raises(ValueError, match="impl must be one of"):
        apply_window_attention(v2, impl="cuda")


# --------------------------------------------------------------------------------------------------- Video-Swin
# A Video-Swin block written here from the published algorithm (Liu et al., "Video Swin Transformer"): the block
# layer-norms, zero-pads the grid to multiples of the window, rolls the padded grid by -shift, partitions it, attends
# with the 3D relative-position bias and the -100 shift mask of the padded grid, reverses, rolls back and crops.
def _vs_window_size(grid, window, shift):
    w, s = list(window), list(shift)
    for i, n in enumerate(grid):
        if n <= window[i]:
            w[i], s[i] = n, 0
    return tuple(w), tuple(s)


def _vs_partition(x, window):  # (B, D, H, W, C) -> (B * nW, N, C)
    B, D, H, W, C = x.shape
    x = x.view(B, D // window[0], window[0], H // window[1], window[1], W // window[2], window[2], C)
    return x.permute(0, 1, 3, 5, 2, 4, 6, 7).reshape(-1, window[0] * window[1] * window[2], C)


def _vs_reverse(windows, window, B, D, H, W):  # (B * nW, N, C) -> (B, D, H, W, C)
    x = windows.view(B, D // window[0], H // window[1], W // window[2], *window, -1)
    return x.permute(0, 1, 4, 2, 5, 3, 6, 7).reshape(B, D, H, W, -1)


def _vs_mask(padded, window, shift):  # (nW, N, N): 0 within a shift region, -100 across
    img = torch.zeros(1, *padded, 1)
    cnt = 0
    for d in (slice(-window[0]), slice(-window[0], -shift[0]), slice(-shift[0], None)):
        for h in (slice(-window[1]), slice(-window[1], -shift[1]), slice(-shift[1], None)):
            for w in (slice(-window[2]), slice(-window[2], -shift[2]), slice(-shift[2], None)):
                img[:, d, h, w, :] = cnt
                cnt += 1
    ids = _vs_partition(img, window).squeeze(-1)
    diff = ids[:, None, :] - ids[:, :, None]
    return diff.masked_fill(diff != 0, -100.0).masked_fill(diff == 0, 0.0)


class _VSAttention(nn.Module):
    def __init__(self, dim, window, num_heads, attn_drop=0.0):
        super().__init__()
        self.dim, self.window_size, self.num_heads = dim, window, num_heads
        self.scale = (dim // num_heads) ** -0.5
        rows = (2 * window[0] - 1) * (2 * window[1] - 1) * (2 * window[2] - 1)
        self.relative_position_bias_table = nn.Parameter(torch.randn(rows, num_heads) * 0.5)
        coords = torch.stack(torch.meshgrid(*[torch.arange(w) for w in window], indexing="ij")).flatten(1)
        rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)  # (N, N, 3), query minus key
        rel = rel + torch.tensor([w - 1 for w in window])
        strides = torch.tensor([(2 * window[1] - 1) * (2 * window[2] - 1), 2 * window[2] - 1, 1])
        self.register_buffer("relative_position_index", (rel * strides).sum(-1))
        self.qkv = nn.Linear(dim, 3 * dim)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(0.0)

    def forward(self, x, mask=None):  # (B * nW, N, C)
        B_, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B_, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        bias = self.relative_position_bias_table[self.relative_position_index[:N, :N].reshape(-1)].reshape(N, N, -1)
        attn = attn + bias.permute(2, 0, 1)
        if mask is not None:
            nW = mask.shape[0]
            attn = (attn.view(B_ // nW, nW, self.num_heads, N, N) + mask[None, :, None]).view(-1, self.num_heads, N, N)
        attn = self.attn_drop(attn.softmax(-1))
        return self.proj_drop(self.proj((attn @ v).transpose(1, 2).reshape(B_, N, C)))


class _VSBlock(nn.Module):
    def __init__(self, dim, num_heads, window, shift, attn_drop=0.0):
        super().__init__()
        self.window_size, self.shift_size = window, shift
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = _VSAttention(dim, window, num_heads, attn_drop)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward_part1(self, x, mask_matrix):
        B, D, H, W, C = x.shape
        window, shift = _vs_window_size((D, H, W), self.window_size, self.shift_size)
        x = self.norm1(x)
        pads = [(-n) % w for n, w in zip((D, H, W), window)]
        x = F.pad(x, (0, 0, 0, pads[2], 0, pads[1], 0, pads[0]))
        Dp, Hp, Wp = x.shape[1:4]
        if any(shift):
            x = torch.roll(x, shifts=tuple(-s for s in shift), dims=(1, 2, 3))
        out = self.attn(_vs_partition(x, window), mask=mask_matrix if any(shift) else None)
        x = _vs_reverse(out, window, B, Dp, Hp, Wp)
        if any(shift):
            x = torch.roll(x, shifts=shift, dims=(1, 2, 3))
        return x[:, :D, :H, :W].contiguous()

    def forward(self, x, mask_matrix):
        x = x + self.forward_part1(x, mask_matrix)
        return x + self.mlp(self.norm2(x))


class _VSLayer(nn.Module):
    """Two blocks (the second shifted by half a window in H and W) sharing the shift mask of the padded grid."""

    def __init__(self, dim=16, num_heads=2, window=(2, 3, 4), attn_drop=0.0):
        super().__init__()
        shift = (0, window[1] // 2, window[2] // 2)
        self.window_size, self.shift_size = window, shift
        self.blocks = nn.ModuleList([_VSBlock(dim, num_heads, window, (0, 0, 0), attn_drop),
                                     _VSBlock(dim, num_heads, window, shift, attn_drop)])  # fmt: skip

    def forward(self, x):  # (B, D, H, W, C)
        window, shift = _vs_window_size(x.shape[1:4], self.window_size, self.shift_size)
        padded = [-(-n // w) * w for n, w in zip(x.shape[1:4], window)]
        mask = _vs_mask(padded, window, shift).to(device=x.device, dtype=x.dtype) if any(shift) else None
        for block in self.blocks:
            x = block(x, mask)
        return x


def _vs_run(model, x):
    return model(x)


@pytest.mark.parametrize("grid, impl", [((4, 6, 8), "auto"), ((5, 7, 9), "auto"), ((1, 7, 9), "auto"),
                                        ((3, 4, 5), "triton")], ids=["divisible", "odd", "one-frame", "odd-triton"])
def test_video_swin_block_forward_and_backward_agree(grid, impl):
    from lfvila_kernels.dispatch import interpreting

    if impl == "triton" and not (torch.cuda.is_available() or interpreting()):
        pytest.skip("needs CUDA or TRITON_INTERPRET=1")
    device = "cuda" if impl == "triton" and torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    model = _VSLayer().to(device)
    x = torch.randn(2, *grid, 16).to(device)
    handle = _assert_patched_within_tolerance(model, x, _vs_run, impl=impl)
    assert handle.patched == ["blocks.0", "blocks.1"]


def test_video_swin_spatially_clipped_window_runs_the_original_path():
    torch.manual_seed(0)
    model = _VSLayer(window=(2, 8, 4))
    x = torch.randn(1, 4, 5, 9, 16)  # H = 5 <= 8: Video-Swin clips the window to 5 and reads index[:N, :N]
    with torch.no_grad():
        ref = model(x)
        with apply_window_attention(model), _fused_calls() as spy:
            assert torch.equal(model(x), ref)
        assert spy.call_count == 0


def test_video_swin_state_dict_and_refusals():
    torch.manual_seed(0)
    model = _VSLayer()
    before = _state(model)
    with apply_window_attention(model) as handle:
        assert isinstance(handle, PatchHandle)
        _assert_same_state(before, _state(model))
        model.load_state_dict(before, strict=True)
    with pytest.raises(ValueError, match=r"blocks\.0: attn_drop=0\.2 > 0"):
        apply_window_attention(_VSLayer(attn_drop=0.2))
    odd_index = _VSLayer()
    odd_index.blocks[1].attn.relative_position_index.fill_(0)
    with pytest.raises(ValueError, match=r"blocks\.1: its relative_position_index is not the standard Swin index"):
        apply_window_attention(odd_index)
    block = _VSLayer().blocks[1]  # a block by itself: the root module
    with apply_window_attention(block) as handle:
        assert handle.patched == ["<root>"] and handle.skipped == []
        assert "forward_part1" in block.__dict__
    assert "forward_part1" not in block.__dict__
    orphan = nn.Sequential(_VSAttention(16, (2, 3, 4), 2))
    handle = apply_window_attention(orphan, strict=False)
    assert handle.skipped == [("0", "a window-attention module (_VSAttention) outside a supported Swin block: the "
                                    "fused op replaces the block's shift/pad/partition path")]  # fmt: skip


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("library", ["timm", "transformers"])
def test_patched_swin_with_the_triton_kernel_on_cuda(library, dtype):
    """On a GPU, in half precision: the Triton kernel in timm's / transformers' Swin-T (odd input, so shifted windows
    are padded) is within 2x the unpatched model's own error against the float64 model, output and gradients."""
    if library == "timm":
        model, run = _timm_swin(_import_timm()), _timm_run
    else:
        model, run = _hf_swin(), _hf_run
    x = torch.randn(2, 3, *TIMM_ODD, generator=torch.Generator().manual_seed(0))
    oracle, g64 = _fwd_bwd(copy.deepcopy(model).cuda().double(), x.cuda().double(), run)
    model = model.cuda().to(dtype)
    xh = x.cuda().to(dtype)
    eager, gh = _fwd_bwd(model, xh, run)
    with apply_window_attention(model, impl="triton") as handle:
        assert handle.patched
        fused, gfused = _fwd_bwd(model, xh, run)
    assert_within_eager_error("output", fused, eager, oracle, dtype)
    for name in g64:
        assert_within_eager_error(f"grad {name}", gfused[name], gh[name], g64[name], dtype)


def test_kernels_package_never_imports_the_model_libraries():
    code = ("import sys, lfvila_kernels, lfvila_kernels.patch, lfvila_kernels.clip_loss;"
            "print(sorted(m for m in ('timm', 'transformers', 'open_clip', 'lfvila') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "[]"
