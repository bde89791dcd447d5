"""SigLIP-loss providers for ``benchmarks.bench_siglip``: each a ``Provider(make, refusal)`` (the contrastive
benchmark's interface: ``make(a, b)`` returns a zero-argument forward giving the scalar loss of a, b ``(N, d)``),
at logit scale :data:`SCALE` and bias :data:`BIAS` (SigLIP's initial values).

    open_clip  open_clip.loss.SigLipLoss()(a, b, scale, bias) (pip open_clip_torch): materialised (N, N) logits and
               labels, F.logsigmoid. Where the package does not import (its __init__ needs torchvision), its
               torch-only loss.py is loaded by itself
    chunked    lfvila_kernels.sigmoid_loss(impl="torch"): row chunks, logits recomputed in the backward
    ours       lfvila_kernels.sigmoid_loss(impl="triton"): the fused Triton kernels (CUDA; on the CPU only under
               TRITON_INTERPRET=1)
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import torch

from benchmarks import harness
from benchmarks.contrastive_variants import Provider

SCALE, BIAS = 10.0, -10.0


@functools.cache
def open_clip_siglip_class():
    """open_clip's ``SigLipLoss``: from the package, or from its ``loss.py`` alone (it imports torch only)."""
    try:
        from open_clip.loss import SigLipLoss

        return SigLipLoss
    except Exception:
        spec = importlib.util.find_spec("open_clip")
        if spec is None or not spec.submodule_search_locations:
            raise
        path = Path(next(iter(spec.submodule_search_locations))) / "loss.py"
        module_spec = importlib.util.spec_from_file_location("_open_clip_loss_file", path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
        return module.SigLipLoss


def _params(device):
    return torch.tensor(SCALE, device=device), torch.tensor(BIAS, device=device)


def make_open_clip(a, b):
    loss_fn = open_clip_siglip_class()()  # one process: world_size=1
    scale, bias = _params(a.device)
    return lambda: loss_fn(a, b, scale, bias)


def _make_ours(impl: str):
    def make(a, b):
        from lfvila_kernels import sigmoid_loss  # lazily: a missing op is a failed row, not a crash

        scale, bias = _params(a.device)
        return lambda: sigmoid_loss(a, b, scale, bias, impl=impl)

    return make


def _open_clip_refusal(device, dtype):
    if importlib.util.find_spec("open_clip") is None:
        return "open_clip cannot be imported (not installed); pip install --no-deps open_clip_torch"
    return None


PROVIDERS: dict[str, Provider] = {
    "open_clip": Provider(make_open_clip, _open_clip_refusal),
    "chunked": Provider(_make_ours("torch")),
    "ours": Provider(_make_ours("triton"), harness.triton_refusal),
}
