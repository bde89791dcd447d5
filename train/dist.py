"""Process-group setup for ``torchrun`` (and plain single-process runs).

``torchrun --nproc_per_node N [--nnodes K --rdzv-endpoint HOST:PORT] -m train.pretrain ...`` sets ``RANK``,
``WORLD_SIZE`` and ``LOCAL_RANK``; :func:`init` then joins the default group (NCCL on CUDA, gloo on the CPU) and pins
this process to ``cuda:LOCAL_RANK``. Without those variables it is a single process on ``cuda`` (when available) or
the CPU, and nothing is initialised.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn


@dataclass
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init(device: str = "auto", timeout_minutes: float = 30.0) -> DistEnv:
    """Join the process group started by ``torchrun`` (if any) and pick this rank's device.

    ``device``: ``auto`` (``cuda:LOCAL_RANK`` when CUDA is available, else CPU), ``cpu`` or ``cuda``."""
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, got {device!r}")
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise RuntimeError("run.device=cuda but CUDA is not available")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(minutes=timeout_minutes),
                                device_id=dev if use_cuda else None)
    return DistEnv(rank, world, local_rank, dev)


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def any_true(flag: bool, device: torch.device) -> bool:
    """True on every rank when ``flag`` is true on any rank (one small all-reduce; local value when alone)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return bool(flag)
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def all_reduce_flags(flags: list[bool], device: torch.device) -> list[bool]:
    """Element-wise OR of boolean flags over ranks in one all-reduce (e.g. [bad loss, stop signal])."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [bool(f) for f in flags]
    t = torch.tensor([1.0 if f else 0.0 for f in flags], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v > 0) for v in t.tolist()]


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module whose parameters the optimizer holds: DDP / DataParallel ``.module`` and ``torch.compile``'s
    ``_orig_mod`` removed (in any nesting). An FSDP2 (``fully_shard``) model is its own root and is returned as is."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def wrap_model(model: nn.Module, env: DistEnv, strategy: str, precision: str, compile: bool = False, *,
               reshard_after_forward: bool = True) -> nn.Module:
    """The model as the training step runs it. Several ranks: ``strategy`` ``fsdp`` (FSDP2) or ``ddp`` (DDP with
    ``find_unused_parameters``: some parameters get no gradient by construction, e.g. the MLM head in stage 1, the
    local branch in retrieval). Then ``torch.compile`` when ``compile``.

    FSDP2: ``fully_shard`` per video block and BERT layer, then the root. Parameters, gradients and optimizer state
    are sharded fp32 between steps; a block's parameters are all-gathered for its forward and cast to bf16 / fp16
    under ``precision: bf16`` / ``fp16`` (no autocast then: the loop's ``_autocast`` is off under FSDP, so fp16 runs
    fp16 weights and activations, as DeepSpeed fp16); gradients are reduce-scattered in fp32.
    ``reshard_after_forward`` (``train.fsdp_reshard_after_forward``): True frees the gathered parameters after each
    block's forward and gathers them again for its backward (ZeRO-3); False keeps them from the forward to the
    backward, one all-gather per block and step, gradients and optimizer state sharded: the ZeRO-2 counterpart
    (DeepSpeed's ZeRO-2 keeps the fp16 parameters replicated all the time; here they are sharded between steps, and
    gathered for the whole forward-backward). ``docs/training.md``, "fp16 and ZeRO-2"."""
    if not isinstance(reshard_after_forward, bool):
        raise ValueError(f"train.fsdp_reshard_after_forward must be a bool, got {reshard_after_forward!r}")
    if env.distributed:
        if strategy == "fsdp":
            from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

            param_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
            policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
            kw = {"mp_policy": policy, "reshard_after_forward": reshard_after_forward}
            for layer in model.video_encoder.layers:
                for block in layer.blocks:
                    fully_shard(block, **kw)
            text = getattr(model, "text_encoder", None)  # None: a video-only model
            for layer in text.bert.encoder.layer if text is not None else ():
                fully_shard(layer, **kw)
            fully_shard(model, **kw)
        else:
            model = nn.parallel.DistributedDataParallel(
                model, device_ids=[env.device.index] if env.device.type == "cuda" else None,
                find_unused_parameters=True)
    if compile:
        model = torch.compile(model)
    return model


def is_sharded(model: nn.Module) -> bool:
    """Whether ``model`` (unwrapped) is an FSDP2 root."""
    return hasattr(model, "unshard") and hasattr(model, "reshard")


def load_weights(model: nn.Module, path, name: str) -> None:
    """Strictly load a weights file into ``model`` (unwrapped; variant ``name``). An FSDP2-sharded model loads
    through an unsharded copy built from its config, where the strict key and shape checks run."""
    from lfvila.models import convert, registry

    if not is_sharded(model):
        convert.load_checkpoint(model, path)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    plain = registry.build(name, model.cfg)
    convert.load_checkpoint(plain, path)
    set_model_state_dict(model, plain.state_dict(), options=StateDictOptions(full_state_dict=True))


def save_pretrained(model: nn.Module, directory, name: str, is_main: bool) -> None:
    """``save_pretrained`` of the full weights of ``model`` (unwrapped; variant ``name``) by the main rank. Under
    FSDP2 the full state is gathered to the CPU first (a collective: every rank calls this). Ends with a barrier."""
    from lfvila.models import convert, registry

    if is_sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if is_main:
            plain = registry.build(name, model.cfg)
            plain.load_state_dict(full)
            convert.save_pretrained(plain, directory)
    elif is_main:
        convert.save_pretrained(model, directory)
    barrier()
