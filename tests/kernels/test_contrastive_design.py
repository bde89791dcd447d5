"""The contrastive kernels' v2 design, on the CPU: each tiling path (the row tile resident for the whole column loop,
with the b tile shared by both backward products; the resident tile with a feature-chunked backward; the 64-wide
chunked path of wide rows), the column splits of the forward, the partial last tiles, and the rectangular labels'
in-loop one-hot, against the float64 naive loss under the error rule; the launch plan (program count against the
SMs, 5 N^2 d passes at d <= 512, fp32 on its FFMA tiling); fp32 features under autocast (computed in the autocast
dtype, gradients back in fp32, also under torch.compile)."""

from __future__ import annotations

import pytest
import torch
import triton

from lfvila_kernels import _contrastive_launch as fused
from lfvila_kernels import contrastive_loss
from lfvila_kernels.contrastive import autocast_features

from ._compare import RoundedOps, assert_within_eager_error
from .test_contrastive import features, loss_and_grads, naive_loss, ours

# (tiles, n, m, d, labels): every path at interpreter sizes. d = 24 pads to a 32-wide resident row (MASK_K), 37 rows
# leave partial last row and column tiles, programs=8 over 3 row blocks gives 3 row groups x 3 column splits.
PATHS = [
    pytest.param(dict(block_m=16, block_n=16, block_k=32, block_do=32, programs=8), 37, 37, 24, None,
                 id="resident-shared-b-splits"),
    pytest.param(dict(block_m=16, block_n=16, block_k=32, block_do=32, programs=1), 37, 37, 32, None,
                 id="resident-one-program-even-d"),
    pytest.param(dict(block_m=16, block_n=16, block_k=32, block_do=16, programs=2), 33, 33, 24, None,
                 id="resident-chunked-backward"),
    pytest.param(dict(block_m=16, block_n=16, block_k=16, block_do=16, programs=5), 37, 37, 40, None,
                 id="feature-chunks"),
    pytest.param(dict(block_m=16, block_n=16, block_k=32, block_do=32, programs=6), 19, 40, 24, "local",
                 id="rect-labels-resident"),
    pytest.param(dict(block_m=16, block_n=16, block_k=16, block_do=16, programs=6), 5, 23, 24, "dup",
                 id="rect-labels-chunked-dup"),
]


@pytest.mark.parametrize("tiles, n, m, d, labels", PATHS)
def test_paths_match_naive_float64(tiles, n, m, d, labels):
    a, b = features(n, m, d)
    lab = {None: None, "local": torch.arange(m - n, m), "dup": torch.tensor([3, 1, 1, 0, 22])}[labels]
    scale = torch.tensor(20.0, dtype=torch.float64)
    want = loss_and_grads(naive_loss, a, b, scale, torch.float64, labels=lab)
    with RoundedOps():
        eager = loss_and_grads(naive_loss, a, b, scale.float(), torch.float32, labels=lab)
    with fused.override_config(**tiles):
        got = loss_and_grads(ours("triton"), a, b, scale.float(), torch.float32, labels=lab)
    for name, x, y, e in zip(("loss", "da", "db", "dscale"), got, want, eager):
        assert_within_eager_error(name, x, e, y, torch.float32)


def test_fp16_resident_path_within_twice_eager_error():
    a, b = features(37, 37, 24)
    scale = torch.tensor(20.0, dtype=torch.float64)
    want = loss_and_grads(naive_loss, a, b, scale, torch.float64)
    with RoundedOps():
        eager = loss_and_grads(naive_loss, a, b, scale.float(), torch.float16)
    with fused.override_config(block_m=16, block_n=16, block_k=32, block_do=32, programs=8):
        got = loss_and_grads(ours("triton"), a, b, scale.float(), torch.float16)
    for name, x, y, e in zip(("loss", "da", "db", "dscale"), got, want, eager):
        assert_within_eager_error(name, x, e, y, torch.float16)


@pytest.mark.parametrize("tiles", [PATHS[0].values[0], PATHS[3].values[0]], ids=["resident", "chunked"])
def test_splits_deterministic(tiles):
    a, b = features(37, 37, 24, seed=3)
    scale = torch.tensor(20.0)
    with fused.override_config(**tiles):
        first = loss_and_grads(ours("triton"), a, b, scale, torch.float32)
        second = loss_and_grads(ours("triton"), a, b, scale, torch.float32)
    for name, x, y in zip(("loss", "da", "db", "dscale"), first, second):
        assert torch.equal(x, y), f"{name} differs between two identical runs"


# ----------------------------------------------------------------------------------------------------- the plan
def _passes(n, d, dtype):
    """Multiply-add passes over the N x N x d logit volume of a forward + backward: the forward's logits once; per
    backward side one logit recompute per feature chunk (the chunks' programs each recompute the tile) and one
    dlogits @ b."""
    cfg, block_do = fused._bwd_tiles(n, n, d, dtype)
    chunks = triton.cdiv(d, block_do)
    return 1 + 2 * (chunks + 1)


@pytest.mark.parametrize("d", [64, 256, 384, 512])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_rows_up_to_512_resident_and_five_passes(d, dtype):
    cfg = fused._tiles(32768, 32768, d, dtype)
    assert cfg["hoist"] and cfg["block_k"] >= d
    assert fused._bwd_tiles(32768, 32768, d, dtype)[1] >= d  # block_do = d: one backward program per row block
    assert _passes(32768, d, dtype) == 5


def test_wide_rows_and_fp32_keep_chunks():
    assert not fused._tiles(32768, 32768, 1024, torch.bfloat16)["hoist"]
    assert _passes(32768, 1024, torch.bfloat16) == 7  # block_do 512: (3 + 2c) with c = 2
    cfg = fused._tiles(32768, 32768, 512, torch.float32)  # IEEE fp32: FFMA, 64-wide chunks (see _for_dtype)
    assert (cfg["hoist"], cfg["block_k"], cfg["block_do"]) == (False, 64, 256)


@pytest.mark.parametrize("n, d", [(32768, 512), (4096, 512), (65536, 256), (1024, 128)])
def test_forward_programs_cover_the_sms(monkeypatch, n, d):
    """With 132 SMs: at least one forward program per SM wherever there are that many tiles (row groups x column
    splits), and the column partials within max(64 MB, the features' bytes)."""
    monkeypatch.setattr(fused, "_device_programs", lambda device: 132)
    cfg = fused._tiles(n, n, d, torch.bfloat16)
    rb, cb = triton.cdiv(n, cfg["block_m"]), triton.cdiv(n, cfg["block_n"])
    g, s, per_split = fused._fwd_grid(rb, cb, n, 2 * n * d * 2, True, torch.device("cpu"))
    assert g * s >= min(132, rb * cb)
    assert g <= rb and (s - 1) * per_split < cb <= s * per_split
    assert g * n * 8 <= max(64 << 20, 2 * n * d * 2)
    assert fused._fwd_grid(rb, cb, n, 2 * n * d * 2, True, torch.device("cpu")) == (g, s, per_split)
    if n == 32768:
        assert (g, s) == (132, 1)


# -------------------------------------------------------------------------------------------------- autocast
def _spy_launch(monkeypatch):
    seen = []
    original = fused._launch_fwd
    monkeypatch.setattr(fused, "_launch_fwd",
                        lambda a, b, scale, labels: seen.append((a.dtype, b.dtype)) or original(a, b, scale, labels))
    return seen


def test_autocast_fp32_features_run_in_the_autocast_dtype(monkeypatch):
    """fp16 autocast on the CPU (the interpreter computes fp16; bf16 arithmetic it does not emulate): the kernels see
    fp16 features, the result equals the op on features cast by hand, and the gradients come back in fp32."""
    seen = _spy_launch(monkeypatch)
    a, b = features(20, 20, 24)
    a, b = a.float().requires_grad_(), b.float().requires_grad_()
    with torch.autocast("cpu", dtype=torch.float16):
        loss = contrastive_loss(a, b, temperature=0.05, impl="triton")
    da, db = torch.autograd.grad(loss, (a, b))
    assert seen == [(torch.float16, torch.float16)]
    assert loss.dtype == torch.float32 and da.dtype == torch.float32 and db.dtype == torch.float32
    a16, b16 = a.detach().half().requires_grad_(), b.detach().half().requires_grad_()
    ref = contrastive_loss(a16, b16, temperature=0.05, impl="triton")
    ref_da, ref_db = torch.autograd.grad(ref, (a16, b16))
    assert torch.equal(loss, ref)
    assert torch.equal(da, ref_da.float()) and torch.equal(db, ref_db.float())


def test_no_autocast_or_half_inputs_unchanged(monkeypatch):
    seen = _spy_launch(monkeypatch)
    a, b = (x.float() for x in features(8, 8, 16))
    contrastive_loss(a, b, impl="triton")
    with torch.autocast("cpu", dtype=torch.float16):
        contrastive_loss(a.half(), b.half(), impl="triton")
    assert seen == [(torch.float32, torch.float32), (torch.float16, torch.float16)]


def test_autocast_bf16_dispatches_bf16():
    a, b = torch.randn(4, 8), torch.randn(4, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x, y = autocast_features(a, b)
    assert x.dtype == y.dtype == torch.bfloat16
    assert autocast_features(a, b)[0].dtype == torch.float32
    assert autocast_features(a.double(), b.double())[0].dtype == torch.float64


def test_autocast_under_torch_compile_fullgraph(monkeypatch):
    seen = _spy_launch(monkeypatch)
    torch._dynamo.reset()
    a, b = (x.float().requires_grad_() for x in features(16, 16, 16))

    def fn(a, b):
        with torch.autocast("cpu", dtype=torch.float16):
            return contrastive_loss(a, b, temperature=0.05, impl="triton")

    eager = fn(a, b)
    compiled = torch.compile(fn, fullgraph=True)(a, b)
    grads = torch.autograd.grad(compiled, (a, b))
    assert all(dt == (torch.float16, torch.float16) for dt in seen) and len(seen) >= 2
    assert torch.equal(compiled.detach(), eager.detach())
    assert all(g.dtype == torch.float32 for g in grads)
    torch._dynamo.reset()


# -------------------------------------------------------------------------------------------------- dispatch
def test_chunked_dispatch_rule():
    from lfvila_kernels.contrastive import chunked_wins

    big = (32768, 32768)
    assert chunked_wins("cuda", torch.float32, *big, 1024, autocast=False)
    assert not chunked_wins("cuda", torch.float32, *big, 512, autocast=False)  # fused: 7 passes, within the model
    assert not chunked_wins("cuda", torch.float32, *big, 1024, autocast=True)  # cast to half: fused
    assert not chunked_wins("cuda", torch.bfloat16, *big, 2048, autocast=False)
    assert not chunked_wins("cuda", torch.float32, 2048, 2048, 1024, autocast=False)  # 2^22 logits: launch-bound
    assert not chunked_wins("cpu", torch.float32, *big, 1024, autocast=False)


@pytest.mark.parametrize("impl, env, want", [("auto", "", "chunked"), ("triton", "", "fused"),
                                             ("auto", "triton", "fused")])
def test_chunked_dispatch_only_for_auto(monkeypatch, impl, env, want):
    """Where the rule fires, impl="auto" takes the chunked path; impl="triton" and LFVILA_KERNELS=triton keep the
    fused kernels (the rule faked on, since it fires on CUDA only)."""
    from lfvila_kernels import contrastive as cl

    calls = []
    monkeypatch.setattr(cl, "chunked_wins", lambda *args, **kw: True)
    monkeypatch.setattr(cl, "contrastive_ce_fused", lambda *args: calls.append("fused") or (torch.zeros(4), None))
    monkeypatch.setattr(cl, "contrastive_ce_chunked",
                        lambda *args, **kw: calls.append("chunked") or (torch.zeros(4), None))
    if env:
        monkeypatch.setenv("LFVILA_KERNELS", env)
    else:
        monkeypatch.delenv("LFVILA_KERNELS", raising=False)
    monkeypatch.setattr(cl, "select_impl", lambda *args: "triton")
    cl.contrastive_loss(torch.randn(4, 8), torch.randn(4, 8), labels=torch.arange(4), impl=impl)
    assert calls == [want]
