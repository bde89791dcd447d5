"""Throughput and model FLOPs utilisation, and where the logged rows go.

Per log interval (:class:`LogWindow`): the mean of each scalar loss term, clips/s (videos per second over all ranks),
tokens/s (video patch tokens + real text tokens per second), data wait (% of step time blocked on the loader), the
step time, and model FLOPs utilisation: the FLOPs of one training step are counted once with
``torch.utils.flop_counter.FlopCounterMode`` (:func:`count_step_flops`: matmuls and convolutions; the fused Triton
attention is not counted, so MFU is slightly understated) and divided by the step time and the GPU's dense bf16 peak
(:data:`PEAK_BF16_TFLOPS`, by device name; none on a CPU). Steps skipped as non-finite are not in the means.

Rows go to ``metrics.jsonl`` (one JSON object per log interval and per evaluation) and, when ``tensorboard`` is
installed, to TensorBoard scalars under ``run.dir/tb`` (:class:`MetricsWriter`, main rank only).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path

import torch

LOSS_TERMS = ("loss", "vpc", "mtc", "mlm", "vtm", "ce", "span")  # scalar model outputs logged per step

PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "H800": 989.0, "A100": 312.0, "A800": 312.0, "L40S": 362.0,
                    "L4": 121.0, "A10": 125.0}


def peak_tflops(device: torch.device) -> float | None:
    """Dense bf16 tensor-core peak of ``device`` (TFLOP/s) from a small table, None when unknown or a CPU."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_BF16_TFLOPS.items():
        if key in name:
            return value
    return None


def count_step_flops(step: Callable[[], None], device: torch.device) -> int:
    """FLOPs of one call of ``step`` (a forward and backward) under ``FlopCounterMode``. The call runs under
    ``torch.random.fork_rng``, so the random numbers it draws (dropout, MTC) are drawn again by the real step: the
    checkpointed stream is the training steps' alone, and step 1 is the same whether or not FLOPs are counted."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    cuda = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda, device_type="cuda"), counter:
        step()
    return counter.get_total_flops()


def batch_tokens(batch: dict, patch_hw: tuple[int, int]):
    """Video patch tokens + real text tokens (none in a batch without text) of ``batch``, as a device scalar where
    there is text (no host sync on the hot path)."""
    b, _, t, h, w = batch["video"].shape
    video = b * t * math.ceil(h / patch_hw[0]) * math.ceil(w / patch_hw[1])
    return batch["text_mask"].sum() + video if "text_mask" in batch else video


def step_terms(out: dict) -> dict[str, torch.Tensor]:
    """The logged scalar terms (:data:`LOSS_TERMS`) of a model output, detached fp32 device scalars."""
    return {k: v.detach().float() for k, v in out.items()
            if isinstance(v, torch.Tensor) and v.ndim == 0 and k in LOSS_TERMS}


class LogWindow:
    """Sums over the steps of one log interval; :meth:`row` turns them into the logged means (one host sync)."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.time = self.wait = 0.0
        self.clips, self.tokens, self.steps = 0, 0, 0
        self.terms: dict = {}

    def add(self, elapsed: float, waited: float, clips: int, tokens, terms: dict) -> None:
        self.time += elapsed
        self.wait += waited
        self.clips += clips
        self.tokens += tokens
        self.steps += 1
        for k, v in terms.items():
            self.terms[k] = self.terms.get(k, 0.0) + v

    def row(self, *, state: dict, lr: float, flops_per_step: int | None, device: torch.device,
            world_size: int) -> dict | None:
        """The interval's row (None without a step), then a reset."""
        if not self.steps:
            return None
        n, secs = self.steps, max(self.time, 1e-9)
        row = {"step": state["step"], "epoch": state["epoch"], **{k: float(v) / n for k, v in self.terms.items()},
               "lr": lr, "clips_per_s": self.clips / secs, "tokens_per_s": float(self.tokens) / secs,
               "data_wait_pct": 100.0 * self.wait / secs, "step_time_s": secs / n, "bad_steps": state["bad_steps"],
               "skipped_batches": state["skipped_batches"], "time": time.time()}
        if flops_per_step is not None:
            peak = peak_tflops(device)
            row["tflops_per_s"] = flops_per_step * n / secs / 1e12 * world_size
            row["mfu"] = row["tflops_per_s"] / (peak * world_size) if peak else None
        if device.type == "cuda":
            row["max_mem_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
        self.reset()
        return row


class MetricsWriter:
    """``metrics.jsonl`` in ``run_dir`` and TensorBoard scalars (``tensorboard``: on when installed); writes only
    where ``enabled`` (the main rank). ``log`` reports that TensorBoard is missing, once."""

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool, log: Callable[[str], None] = print):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.enabled, self.tensorboard, self.log = enabled, tensorboard, log
        self._tb = None

    def write(self, row: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if not self.tensorboard:
            return
        if self._tb is None:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(self.path.parent / "tb"))
            except ImportError:
                self.log("tensorboard is not installed: TensorBoard scalars are off (metrics.jsonl has them)")
                self._tb = False
        if self._tb:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)) and v is not None and math.isfinite(v):
                    self._tb.add_scalar(k, v, row["step"])

    def close(self) -> None:
        if self._tb:
            self._tb.close()
