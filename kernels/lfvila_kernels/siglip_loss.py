"""A drop-in for open_clip's ``SigLipLoss`` backed by the fused :func:`lfvila_kernels.sigmoid_loss`.

Same constructor as open_clip 3.3 (``cache_labels``, ``rank``, ``world_size``, ``dist_impl``) and the same
``forward(image_features, text_features, logit_scale, logit_bias, output_dict=False)``, so an open_clip training
script changes one import line::

    from lfvila_kernels.siglip_loss import SigLipLoss  # was: from open_clip.loss import SigLipLoss

The loss is open_clip's: the rank's own block ``-sum logsigmoid(y * (logit_scale * image @ text.T + logit_bias)) / n``
(``y`` +1 on the diagonal, -1 elsewhere), plus, across processes (``world_size > 1``, torch.distributed initialised),
one all-negative block per other rank's text features, each also divided by the local ``n``. How the other ranks'
text reaches this rank (``dist_impl``), as in open_clip:

    "bidir"  (default) text passed both ways round the ring: ``(world - 1) // 2`` bidirectional exchanges
             (``batch_isend_irecv`` to and from both neighbours), plus one exchange to the right for an even world
    "shift"  text passed to the right ``world - 1`` times
    "reduce" one autograd all-reduce per rank (``torch.distributed.nn.all_reduce``)
    "gather" one autograd all-gather (``torch.distributed.nn.all_gather``); the other ranks' blocks are then one
             rectangular call of the fused op

The exchanges are differentiable: each one's backward sends the gradient back the way the features came, so every
rank's text features get the gradient of every rank's loss that used them. The logits are never materialised
(O((n + m) * d) extra memory instead of several n x n matrices per block).

Differences from open_clip, all by design: the loss is fp32 for fp16/bf16 features (open_clip returns the features'
dtype); ``cache_labels`` is accepted and has nothing to cache (the labels are index arithmetic inside the op). This
module does not import open_clip.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn

from .dispatch import IMPLS
from .siglip import sigmoid_loss

DIST_IMPLS = ("bidir", "shift", "reduce", "gather")


def neighbour_exchange(from_rank: int, to_rank: int, tensor: torch.Tensor, group=None) -> torch.Tensor:
    """Send ``tensor`` to ``to_rank`` and return the same-shaped tensor received from ``from_rank`` (no gradient)."""
    received = torch.empty_like(tensor)
    ops = [dist.P2POp(dist.isend, tensor.contiguous(), to_rank, group=group),
           dist.P2POp(dist.irecv, received, from_rank, group=group)]  # fmt: skip
    for request in dist.batch_isend_irecv(ops):
        request.wait()
    return received


def neighbour_exchange_bidir(left_rank: int, right_rank: int, to_left: torch.Tensor, to_right: torch.Tensor,
                             group=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Send ``to_left`` left and ``to_right`` right; return ``(from_right, from_left)`` (no gradient)."""
    from_left, from_right = torch.empty_like(to_right), torch.empty_like(to_left)
    ops = [dist.P2POp(dist.isend, to_right.contiguous(), right_rank, group=group),
           dist.P2POp(dist.isend, to_left.contiguous(), left_rank, group=group),
           dist.P2POp(dist.irecv, from_right, right_rank, group=group),
           dist.P2POp(dist.irecv, from_left, left_rank, group=group)]  # fmt: skip
    for request in dist.batch_isend_irecv(ops):
        request.wait()
    return from_right, from_left


class _NeighbourExchange(torch.autograd.Function):
    """:func:`neighbour_exchange` whose backward sends the gradient back to ``from_rank``."""

    @staticmethod
    def forward(ctx, from_rank, to_rank, group, tensor):
        ctx.from_rank, ctx.to_rank, ctx.group = from_rank, to_rank, group
        return neighbour_exchange(from_rank, to_rank, tensor, group)

    @staticmethod
    def backward(ctx, grad):
        return None, None, None, _NeighbourExchange.apply(ctx.to_rank, ctx.from_rank, ctx.group, grad)


class _NeighbourExchangeBidir(torch.autograd.Function):
    """:func:`neighbour_exchange_bidir` whose backward returns both gradients to the ranks they came from."""

    @staticmethod
    def forward(ctx, left_rank, right_rank, group, to_left, to_right):
        ctx.left_rank, ctx.right_rank, ctx.group = left_rank, right_rank, group
        return neighbour_exchange_bidir(left_rank, right_rank, to_left, to_right, group)

    @staticmethod
    def backward(ctx, grad_from_right, grad_from_left):
        # swapping the roles of the neighbours: the gradient of from_right goes right, that of from_left goes left,
        # and what comes back is (the gradient of to_left, that of to_right)
        return (None, None, None) + _NeighbourExchangeBidir.apply(ctx.right_rank, ctx.left_rank, ctx.group,
                                                                  grad_from_right, grad_from_left)


class SigLipLoss(nn.Module):
    """open_clip's ``SigLipLoss``, fused. ``forward(image_features (n, d), text_features (n, d), logit_scale,
    logit_bias)`` -> the scalar loss (or ``{"contrastive_loss": loss}`` with ``output_dict=True``). ``logit_scale``
    is the already exponentiated scale (open_clip's model returns ``logit_scale.exp()``), ``logit_bias`` the bias or
    None; each a one-element tensor (which receives its gradient) or a float.

    ``impl``: ``"auto"`` (Triton on CUDA, the chunked torch path elsewhere), ``"triton"``, ``"torch"``.
    """

    def __init__(self, cache_labels: bool = False, rank: int = 0, world_size: int = 1, dist_impl: str | None = None,
                 *, impl: str = "auto"):
        super().__init__()
        if not isinstance(world_size, int) or world_size < 1:
            raise ValueError(f"world_size must be an int >= 1, got {world_size!r}")
        if not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ValueError(f"rank must be an int in [0, world_size={world_size}), got {rank!r}")
        if dist_impl is not None and dist_impl not in DIST_IMPLS:
            raise ValueError(f"dist_impl must be one of {DIST_IMPLS} or None (bidir), got {dist_impl!r}")
        if impl not in IMPLS:
            raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
        self.cache_labels, self.rank, self.world_size = cache_labels, rank, world_size
        self.dist_impl = dist_impl or "bidir"
        self.impl = impl
        self.prev_num_logits = 0  # open_clip's (unused) label-cache state, kept for code that reads it
        self.labels = {}

    def _loss(self, image_features, text_features, logit_scale, logit_bias=None, negative_only=False):
        return sigmoid_loss(image_features, text_features, logit_scale, logit_bias, negative_only=negative_only,
                            impl=self.impl)

    def forward(self, image_features, text_features, logit_scale, logit_bias, output_dict: bool = False):
        loss = self._loss(image_features, text_features, logit_scale, logit_bias)
        if self.world_size > 1:
            self._check_group()
            loss = loss + self._other_ranks_loss(image_features, text_features, logit_scale, logit_bias)
        return {"contrastive_loss": loss} if output_dict else loss

    def _check_group(self) -> None:
        if not (dist.is_available() and dist.is_initialized()):
            raise ValueError(f"world_size={self.world_size} needs an initialised torch.distributed process group")
        if dist.get_world_size() != self.world_size or dist.get_rank() != self.rank:
            raise ValueError(f"SigLipLoss(rank={self.rank}, world_size={self.world_size}) disagrees with the process "
                             f"group (rank {dist.get_rank()} of {dist.get_world_size()})")  # fmt: skip

    def _other_ranks_loss(self, image, text, logit_scale, logit_bias):
        """The all-negative blocks of this rank's images against every other rank's text."""
        world, rank = self.world_size, self.rank
        right, left = (rank + 1) % world, (rank - 1 + world) % world
        negatives = lambda t: self._loss(image, t, logit_scale, logit_bias, negative_only=True)  # noqa: E731
        total = 0
        if self.dist_impl == "bidir":
            to_left = to_right = text
            num_bidir, remainder = divmod(world - 1, 2)
            for _ in range(num_bidir):
                received = _NeighbourExchangeBidir.apply(left, right, None, to_left, to_right)
                for t in received:
                    total = total + negatives(t)
                to_left, to_right = received
            if remainder:
                total = total + negatives(_NeighbourExchange.apply(left, right, None, to_right))
        elif self.dist_impl == "shift":
            to_right = text
            for _ in range(world - 1):
                to_right = _NeighbourExchange.apply(left, right, None, to_right)
                total = total + negatives(to_right)
        elif self.dist_impl == "reduce":
            from torch.distributed.nn.functional import all_reduce

            for i in range(world):
                from_i = all_reduce(text * (rank == i), dist.ReduceOp.SUM)
                # as open_clip: the own block too, weighted 0, so that every rank's graph (and so the order of the
                # backward all-reduces) is the same
                total = total + float(i != rank) * negatives(from_i)
        else:  # gather
            from torch.distributed.nn.functional import all_gather

            everyone = all_gather(text)
            total = negatives(torch.cat([t for i, t in enumerate(everyone) if i != rank]))  # ((world - 1) n, d)
        return total

    def extra_repr(self) -> str:
        return f"rank={self.rank}, world_size={self.world_size}, dist_impl={self.dist_impl!r}, impl={self.impl!r}"
