"""``lfvila_kernels.patch.apply_window_attention`` on timm Swin and transformers Swin, and the helpers and rule that
``test_patch_videoswin.py`` (a Video-Swin layer), ``test_patch_monai.py`` and ``test_patch_hf_swin_copies.py`` use.

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

import lfvila_kernels._patch_common as patch_common
from lfvila_kernels import relative_position_index, window_attention
from lfvila_kernels.patch import apply_window_attention
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
    """A spy on the fused op as the patched blocks call it (every family through ``_patch_common.fused_heads``):
    ``spy.call_count``."""
    return mock.patch.object(patch_common, "window_attention", wraps=window_attention)


def _assert_patched_within_tolerance(model, x, run, impl="auto", fused_calls=None):
    """The documented rule (tests/kernels/_compare.py): the patched fp32 model's error against the unpatched float64
    model is at most 2 x the unpatched fp32 model's error + the floor. Both fp32 runs go through RoundedOps, so every
    op but our Triton kernels is correctly rounded: the yardstick is the same on every CPU, and what differs between
    the two runs is the attention alone (with ``impl="torch"`` that is a different composition of rounded torch ops:
    the check is then one of the function computed). ``fused_calls``: how many patched blocks take the fused path
    (default: all of them; a block whose window the library clips in a way the fused op does not express runs the
    library's own path)."""
    oracle, g64 = _fwd_bwd(copy.deepcopy(model).double(), x.double(), run)
    with RoundedOps():
        eager, g32 = _fwd_bwd(model, x, run)
    with apply_window_attention(model, impl=impl) as handle, _fused_calls() as spy, RoundedOps():
        assert handle.patched
        fused, gfused = _fwd_bwd(model, x, run)
        assert spy.call_count == (len(handle.patched) if fused_calls is None else fused_calls)  # each ran fused once
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
            "print(sorted(m for m in ('timm', 'transformers', 'open_clip', 'monai', 'lfvila') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "[]"
