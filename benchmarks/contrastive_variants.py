"""Contrastive-loss providers for ``benchmarks.bench_contrastive``: each a ``Provider(make, refusal)``, imported
lazily, as the attention providers live in ``benchmarks.attention_variants``. Add your own loss by adding an entry
to :data:`PROVIDERS` (``make(a, b)`` returns a zero-argument forward giving the scalar loss of a, b ``(N, d)`` at logit
scale :data:`SCALE`).

    naive      lfvila_kernels.reference.contrastive_loss_naive: materialised (N, N) logits + F.cross_entropy
    chunked    lfvila_kernels.contrastive_loss(impl="torch"): row chunks, logits recomputed in backward
    ours       lfvila_kernels.contrastive_loss(impl="triton"): the fused Triton kernels (CUDA; on the CPU only
               under TRITON_INTERPRET=1)
    open_clip  open_clip.loss.ClipLoss()(a, b, logit_scale) (pip open_clip_torch): two materialised logit matrices
    inf-cl     inf_cl.cal_inf_loss (pip inf-cl), once per direction, averaged: Triton, CUDA only, fp32 inside
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from benchmarks import harness

TEMPERATURE = 0.05
SCALE = 1.0 / TEMPERATURE

Forward = Callable[[], torch.Tensor]


@dataclass(frozen=True)
class Provider:
    """``make(a, b) -> forward``: ``forward()`` returns the scalar loss of a, b ``(N, d)`` at logit scale 20.
    ``refusal(device, dtype) -> reason or None``: why the provider cannot run here (a ``skipped`` row), if known."""

    make: Callable[[torch.Tensor, torch.Tensor], Forward]
    refusal: Callable[[torch.device, torch.dtype], str | None] | None = None


def make_naive(a, b):
    from lfvila_kernels.reference import contrastive_loss_naive

    def forward():
        row_ce, col_ce = contrastive_loss_naive(a, b, SCALE)
        return 0.5 * (row_ce.mean() + col_ce.mean())

    return forward


def _make_ours(impl: str):
    def make(a, b):
        from lfvila_kernels import contrastive_loss  # lazily: a missing op is a failed row, not a crash

        return lambda: contrastive_loss(a, b, temperature=TEMPERATURE, impl=impl)

    return make


def make_open_clip(a, b):
    from open_clip.loss import ClipLoss

    loss_fn = ClipLoss()  # one process: world_size=1, logits computed per image and per text
    logit_scale = torch.tensor(SCALE, device=a.device)  # the already exponentiated scale, as CLIP passes it
    return lambda: loss_fn(a, b, logit_scale)


def make_inf_cl(a, b):
    from inf_cl import cal_inf_loss

    d = a.shape[1]
    head_dim = next((h for h in (256, 128, 64, 32, 16) if d % h == 0), None)
    if head_dim is None:
        raise ValueError(f"Inf-CL needs a feature dim divisible by 16, 32, 64, 128 or 256; got d={d}")
    scale = torch.tensor(SCALE, device=a.device)

    def forward():  # cal_inf_loss is one direction (a -> b), mean over rows
        ab = cal_inf_loss(a, b, scale=scale, head_dim=head_dim)
        ba = cal_inf_loss(b, a, scale=scale, head_dim=head_dim)
        return 0.5 * (ab + ba)

    return forward


def _inf_cl_refusal(device, dtype):
    if device.type != "cuda":
        return "Inf-CL's Triton kernels need CUDA tensors (inf_cl asserts q.is_cuda)"
    return harness.import_refusal("inf_cl", "pip install inf-cl")


PROVIDERS: dict[str, Provider] = {
    "naive": Provider(make_naive),
    "chunked": Provider(_make_ours("torch")),
    "ours": Provider(_make_ours("triton"), harness.triton_refusal),
    "open_clip": Provider(
        make_open_clip, lambda device, dtype: harness.import_refusal("open_clip", "pip install open_clip_torch")
    ),
    "inf-cl": Provider(make_inf_cl, _inf_cl_refusal),
}
