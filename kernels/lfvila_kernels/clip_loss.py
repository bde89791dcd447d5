"""A drop-in for open_clip's ``ClipLoss`` backed by the fused :func:`lfvila_kernels.contrastive_loss`.

Same constructor (``local_loss``, ``gather_with_grad``, ``cache_labels``, ``rank``, ``world_size``, ``use_horovod``)
and the same ``forward(image_features, text_features, logit_scale, logit_bias=None, output_dict=False)``, so an
open_clip training script changes one import line::

    from lfvila_kernels.clip_loss import ClipLoss  # was: from open_clip.loss import ClipLoss (or open_clip.ClipLoss)

The loss is open_clip's: with ``logits = logit_scale * image @ text.T`` and the positives on the diagonal,
``(CE(logits_per_image, labels) + CE(logits_per_text, labels)) / 2``, each a mean over rows. Across processes
(``world_size > 1``, torch.distributed initialised) the features are all-gathered as open_clip gathers them:

    gather_with_grad=True    ``torch.distributed.nn.functional.all_gather``: the backward returns to every rank the
                             gradient of its own rows from all ranks' losses
    gather_with_grad=False   a plain ``all_gather`` without gradients; without ``local_loss`` the rank's own slot is
                             replaced by its local tensors so that they keep their gradient

    local_loss=False         every rank computes the loss of the whole global batch (N_global x N_global logits)
    local_loss=True          every rank computes its n local rows against the gathered columns in both directions,
                             positives at ``rank * n + i`` (all ranks must hold the same n)

The logits are never materialised (O((N + M) * d) extra memory instead of two N x M matrices). Differences from
open_clip, all by design: the loss is fp32 for fp16/bf16 features (open_clip returns the features' dtype);
``use_horovod=True`` is refused (use torch.distributed); ``cache_labels`` is accepted and has nothing to cache (the
labels are index arithmetic inside the op); ``logit_bias`` must hold one element (a constant added to every logit
cancels in both cross-entropies: the loss does not depend on it and its gradient is zero).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .contrastive import contrastive_loss
from .dispatch import IMPLS


class ClipLoss(nn.Module):
    """open_clip's ``ClipLoss``, fused. ``forward(image_features (n, d), text_features (n, d), logit_scale)`` -> the
    scalar loss (or ``{"contrastive_loss": loss}`` with ``output_dict=True``); ``logit_scale`` is the already
    exponentiated scale (CLIP's ``logit_scale.exp()``), a one-element tensor or a float; it receives its gradient.

    ``impl``: ``"auto"`` (Triton on CUDA, the chunked torch reference elsewhere), ``"triton"``, ``"torch"``.
    """

    def __init__(self, local_loss: bool = False, gather_with_grad: bool = False, cache_labels: bool = False,
                 rank: int = 0, world_size: int = 1, use_horovod: bool = False, *, impl: str = "auto"):
        super().__init__()
        if use_horovod:
            raise ValueError("use_horovod=True is not supported by lfvila_kernels.clip_loss.ClipLoss: run the "
                             "processes with torch.distributed (torchrun) and pass use_horovod=False")
        if not isinstance(world_size, int) or world_size < 1:
            raise ValueError(f"world_size must be an int >= 1, got {world_size!r}")
        if not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ValueError(f"rank must be an int in [0, world_size={world_size}), got {rank!r}")
        if impl not in IMPLS:
            raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
        self.local_loss, self.gather_with_grad, self.cache_labels = local_loss, gather_with_grad, cache_labels
        self.rank, self.world_size, self.use_horovod, self.impl = rank, world_size, use_horovod, impl

    def forward(self, image_features, text_features, logit_scale, logit_bias=None, output_dict: bool = False):
        scale = _as_scale(logit_scale, image_features)
        if self.world_size == 1:
            loss = contrastive_loss(image_features, text_features, logit_scale=scale, impl=self.impl)
        else:
            all_image, all_text = self._gather(image_features, text_features)
            if self.local_loss:
                n = image_features.shape[0]
                labels = torch.arange(n, device=image_features.device) + n * self.rank
                per_image = contrastive_loss(image_features, all_text, logit_scale=scale, labels=labels, impl=self.impl)
                per_text = contrastive_loss(text_features, all_image, logit_scale=scale, labels=labels, impl=self.impl)
                loss = (per_image + per_text) / 2
            else:
                loss = contrastive_loss(all_image, all_text, logit_scale=scale, impl=self.impl)
        if logit_bias is not None:
            loss = loss + _constant_bias(logit_bias) * 0  # no effect on the value; a zero gradient, as in open_clip
        return {"contrastive_loss": loss} if output_dict else loss

    def _gather(self, image_features, text_features):
        """``(all_image (world * n, d), all_text (world * n, d))`` in rank order, open_clip's gather semantics."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise ValueError(f"world_size={self.world_size} needs an initialised torch.distributed process group")
        if dist.get_world_size() != self.world_size or dist.get_rank() != self.rank:
            raise ValueError(f"ClipLoss(rank={self.rank}, world_size={self.world_size}) disagrees with the process "
                             f"group (rank {dist.get_rank()} of {dist.get_world_size()})")  # fmt: skip
        if self.gather_with_grad:
            from torch.distributed.nn.functional import all_gather

            return (torch.cat(all_gather(image_features), dim=0), torch.cat(all_gather(text_features), dim=0))
        gathered = []
        for local in (image_features, text_features):
            parts = [torch.zeros_like(local) for _ in range(self.world_size)]
            dist.all_gather(parts, local.detach())
            if not self.local_loss:
                parts[self.rank] = local  # the local rows keep their gradient
            gathered.append(torch.cat(parts, dim=0))
        return gathered[0], gathered[1]

    def extra_repr(self) -> str:
        return (f"local_loss={self.local_loss}, gather_with_grad={self.gather_with_grad}, rank={self.rank}, "
                f"world_size={self.world_size}, impl={self.impl!r}")  # fmt: skip


def _as_scale(logit_scale, features) -> torch.Tensor:
    if isinstance(logit_scale, (int, float)) and not isinstance(logit_scale, bool):
        dtype = torch.float64 if features.dtype == torch.float64 else torch.float32
        return torch.tensor(float(logit_scale), dtype=dtype, device=features.device)
    if not isinstance(logit_scale, torch.Tensor) or logit_scale.numel() != 1:
        got = tuple(logit_scale.shape) if isinstance(logit_scale, torch.Tensor) else type(logit_scale).__name__
        raise ValueError(f"logit_scale must be a float or a one-element tensor (the exponentiated scale), got {got}")
    return logit_scale


def _constant_bias(logit_bias) -> torch.Tensor | float:
    if isinstance(logit_bias, torch.Tensor):
        if logit_bias.numel() != 1:
            raise ValueError(f"logit_bias must hold one element (a constant added to every logit), got shape "
                             f"{tuple(logit_bias.shape)}; per-logit biases are not supported")  # fmt: skip
        return logit_bias.reshape(())
    if isinstance(logit_bias, (int, float)) and not isinstance(logit_bias, bool):
        return 0.0
    raise ValueError(f"logit_bias must be a number or a one-element tensor, got {type(logit_bias).__name__}")
