"""The training loop shared by every LF-VILA task: ``Trainer(cfg).fit()`` runs one configured job end to end.

It builds the model (``lfvila.models.factory``), checks it against the task (``train.tasks``), wraps it
(``train.dist.wrap_model``), builds the data (``train.data``), the optimizer and schedule (``train.optim``),
resumes (``train.rundir``, ``train.checkpoint``, ``train.resume``), then loops: autocast, gradient accumulation,
clipping, non-finite steps skipped on every rank and counted, checkpoints every ``train.ckpt_every`` steps and at
the end, evaluation of the eval sets every ``train.eval_every`` steps (default: each epoch; ``eval.at_start``: once
before the first step too; ``train.eval_sets``) with the best weights in ``run.dir/best``, and on SIGTERM / SIGUSR1
a checkpoint then a clean exit (``fit`` returns ``{"preempted": True}``). Logging: ``train.metrics``.

The whole job step by step, the task table, and the random streams that make a resumed run repeat the uninterrupted
one bitwise on the CPU: ``docs/training.md``.
"""

from __future__ import annotations

import contextlib
import json
import random
import signal
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from lfvila.config import Config, config_to_dict, save_config
from lfvila.models.factory import build_model

from . import amp, dist, eval_sets, rundir
from . import checkpoint as ckpt
from . import data as tdata
from .dist import unwrap_model
from .metrics import LogWindow, MetricsWriter, batch_tokens, count_step_flops, step_terms
from .optim import apply_frozen_eval, build_optimizer, build_scheduler, freeze
from .resume import check_resume
from .tasks import check_qa_data, check_task


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class _Stop(Exception):
    pass


class Trainer:
    """One configured training job; see the module docstring. ``fit()`` returns the final metrics."""

    def __init__(self, cfg: Config):
        self.cfg, t = cfg, cfg.train
        self.env = dist.init(cfg.run.device)
        self.device = self.env.device
        seed_everything(t.seed + self.env.rank)
        self.run_dir = Path(cfg.run.dir)
        resume = rundir.resolve_resume(self.run_dir, cfg.run.resume)
        if resume is not None:  # before config.yaml is replaced: a refused resume leaves the run directory as it was
            check_resume(cfg, resume, self.env.is_main)
        if self.env.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.run_dir / "config.yaml")
        dist.barrier()
        self.precision = t.precision
        if self.precision == "auto":
            self.precision = "bf16" if self.device.type == "cuda" else "fp32"
        if self.precision in ("bf16", "fp16") and self.device.type != "cuda":
            raise ValueError(f"train.precision={self.precision} needs CUDA (use fp32 or auto on the CPU)")

        model = build_model(cfg.model)
        self.task = check_task(cfg, model)
        self.eval_sets = eval_sets.resolve(cfg)
        self.select = eval_sets.selection(cfg, self.eval_sets)  # ("SET/metric", "max" | "min")
        self.frozen = list(t.frozen)
        freeze(model, self.frozen)
        model.to(self.device)
        self.raw_model = model
        self.model = dist.wrap_model(model, self.env, t.distributed, self.precision, cfg.model.compile,
                                     reshard_after_forward=t.fsdp_reshard_after_forward)

        self.tok = self.task.tokenizer(cfg, model)  # None for a task without text
        self.loader, self.sampler = tdata.train_loader(cfg, self.tok, self.env.rank, self.env.world_size,
                                                       self.env.device)
        check_qa_data(t.task, getattr(self.loader, "dataset", self.loader), model, "train")
        self.batches_per_epoch = self.sampler.batches_per_epoch()
        if self.batches_per_epoch < t.grad_accum:
            raise ValueError(f"train.batch_size {t.batch_size} x grad_accum {t.grad_accum} exceeds "
                             f"the {self.sampler.per_rank} training samples per rank")
        self.steps_per_epoch = self.batches_per_epoch // t.grad_accum
        total = self.steps_per_epoch * t.epochs
        self.total_steps = min(total, t.max_steps) if t.max_steps else total
        self.optimizer = build_optimizer(self.model, t.lr, t.weight_decay, t.betas, t.eps, exclude=tuple(t.exclude))
        warmup = t.warmup_steps if t.warmup_steps is not None else round(t.warmup_epochs * self.steps_per_epoch)
        self.scheduler = build_scheduler(
            self.optimizer, schedule=t.schedule, total_steps=self.total_steps,
            warmup_steps=min(warmup, self.total_steps), min_lr_ratio=t.min_lr_ratio, min_lr=t.min_lr,
            step_size=max(1, round(t.step_epochs * self.steps_per_epoch)), gamma=t.step_gamma)
        self.scaler = amp.build_scaler(t, self.device)
        self.state = {"step": 0, "epoch": 0, "batch": 0, "bad_steps": 0, "bad_in_row": 0, "skipped_batches": 0,
                      "best": None, "best_step": None, "last_eval": None}
        if resume is not None:
            self.state.update(ckpt.load_checkpoint(resume, model=self.model, optimizer=self.optimizer,
                                                   scheduler=self.scheduler, scaler=self.scaler))
            self._log(f"resumed from {resume} at step {self.state['step']}")
        self._stop_signal = None
        self._flops_per_step = None
        self._window = LogWindow()
        self._metrics = MetricsWriter(self.run_dir, self.env.is_main, cfg.run.tensorboard, self._log)

    # ----------------------------------------------------------------------------------------------- helpers

    def _autocast(self):
        if self.precision in ("bf16", "fp16") and self.cfg.train.distributed != "fsdp":
            dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
            return torch.autocast(self.device.type, dtype=dtype)
        return contextlib.nullcontext()

    def _log(self, message: str) -> None:
        if self.env.is_main:
            print(f"[lfvila] {message}", flush=True)

    def _on_signal(self, signum, frame):
        self._stop_signal = signum

    def _train_mode(self) -> None:
        self.model.train()
        apply_frozen_eval(self.model, self.frozen, self.cfg.train.frozen_eval)

    def _next_epoch(self) -> None:
        self.state["epoch"] += 1
        self.state["batch"] = 0

    def _loss(self, batch: dict) -> dict[str, torch.Tensor]:
        return self.task.loss(self.model, batch, self.tok)

    def _count_flops(self, batch: dict) -> None:
        def step():
            with self._autocast():
                out = self._loss(batch)
            out["loss"].backward()

        self._flops_per_step = count_step_flops(step, self.device) * self.cfg.train.grad_accum
        self.optimizer.zero_grad(set_to_none=True)

    # ----------------------------------------------------------------------------------------------- fit

    def fit(self) -> dict:
        handlers = {}
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            try:
                handlers[sig] = signal.signal(sig, self._on_signal)
            except ValueError:  # not the main thread
                pass
        try:
            return self._fit()
        finally:
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
            self._metrics.close()

    def _fit(self) -> dict:
        from tqdm.auto import tqdm

        self._bar = tqdm(total=self.total_steps, initial=self.state["step"], dynamic_ncols=True,
                         disable=not (self.env.is_main and self.cfg.run.progress), desc=self.cfg.train.task)
        preempted = False
        try:
            fresh = self.state["step"] == 0 and self.state["last_eval"] is None  # a resumed run evaluated already
            if self.cfg.eval.at_start and self.eval_sets and fresh:
                self._evaluate_and_select()
            while self.state["step"] < self.total_steps:
                self._epoch()
        except _Stop:
            preempted = True
            self._log(f"signal {self._stop_signal}: checkpoint written at step {self.state['step']}, exiting")
        finally:
            self._bar.close()
        return self._finish(preempted)

    def _epoch(self) -> None:
        """The rest of the current epoch (from ``state["batch"]``), or until training ends."""
        grad_accum = self.cfg.train.grad_accum
        self.sampler.set_position(self.state["epoch"], self.state["batch"])
        tdata.set_epoch(self.loader, self.state["epoch"])
        self._train_mode()
        prefetch = tdata.Prefetcher(self.loader, self.device)
        micro, step_start, wait_start = [], time.perf_counter(), 0.0
        for batch in prefetch:
            self.state["batch"] += 1
            if dist.any_true(batch is None, self.device):
                self.state["skipped_batches"] += 1
                continue
            micro.append(batch)
            if len(micro) < grad_accum:
                continue
            if self._flops_per_step is None and self.state["step"] == 0 and not self.env.distributed:
                self._count_flops(micro[0])
            terms, bad = self._step(micro)
            elapsed, waited, wait_start = time.perf_counter() - step_start, prefetch.wait - wait_start, prefetch.wait
            if not bad:
                world = self.env.world_size
                patch = unwrap_model(self.model).video_encoder.cfg.patch_size[1:]
                self._window.add(elapsed, waited, sum(b["video"].shape[0] for b in micro) * world,
                                 sum(batch_tokens(b, patch) for b in micro) * world, terms)
            micro, step_start = [], time.perf_counter()
            if self._after_step():
                return
        if self.state["batch"] != 0 and self.state["step"] < self.total_steps:  # the loader ran dry early
            self._next_epoch()

    def _after_step(self) -> bool:
        """Count the step, then log, evaluate, checkpoint as due; True when the epoch or the training is over."""
        t = self.cfg.train
        self.state["step"] += 1
        self._bar.update(1)
        step, last = self.state["step"], self.state["step"] == self.total_steps
        if step % t.log_every == 0 or last:
            self._flush()
        if self.state["batch"] >= self.batches_per_epoch - (self.batches_per_epoch % t.grad_accum):
            self._next_epoch()
        if self.eval_sets and (step % (t.eval_every or self.steps_per_epoch) == 0 or last):
            self._evaluate_and_select()
            self._train_mode()
        stop = dist.any_true(self._stop_signal is not None, self.device)
        if step % t.ckpt_every == 0 or last or stop:
            self._save()
        if stop:
            raise _Stop
        return step >= self.total_steps or self.state["batch"] == 0

    def _finish(self, preempted: bool) -> dict:
        """The result (``result.json``), after the test split's evaluation with the best weights."""
        cfg = self.cfg
        result = {"step": self.state["step"], "preempted": preempted, "bad_steps": self.state["bad_steps"],
                  "best": self.state["best"], "best_step": self.state["best_step"]}
        if not preempted and cfg.eval.test_split and getattr(cfg.data, cfg.eval.test_split, None):
            best = self.run_dir / "best" / "model.safetensors"
            if best.exists():
                dist.load_weights(unwrap_model(self.model), best, cfg.model.name)
            metrics = self.evaluate(cfg.eval.test_split)
            result["test"] = metrics
            self._metrics.write({"step": self.state["step"], **{f"test/{k}": v for k, v in metrics.items()}})
        if self.env.is_main:
            with open(self.run_dir / "result.json", "w") as f:
                json.dump(result, f, indent=2)
        return result

    def _step(self, micro: list[dict]) -> tuple[dict[str, torch.Tensor], bool]:
        """One optimizer step over the micro-batches; returns (mean loss terms, skipped?)."""
        t = self.cfg.train
        terms: dict[str, torch.Tensor] = {}  # device scalars: read on the host only when logged
        bad = False
        for i, batch in enumerate(micro):
            sync = contextlib.nullcontext()
            if i < len(micro) - 1 and hasattr(self.model, "no_sync"):
                sync = self.model.no_sync()
            with sync:
                with self._autocast():
                    out = self._loss(batch)
                loss = out["loss"]
                finite = bool(torch.isfinite(loss.detach()))
                bad |= not finite
                if finite:
                    self.scaler.scale(loss / len(micro)).backward()
            for k, v in step_terms(out).items():
                terms[k] = terms.get(k, 0.0) + v / len(micro)
        grad_norm = None
        if not bad and t.clip_grad_norm:
            self.scaler.unscale_(self.optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(
                [p for p in self.model.parameters() if p.grad is not None], t.clip_grad_norm)
            bad |= not bool(torch.isfinite(grad_norm)) and self.precision != "fp16"
        if dist.any_true(bad, self.device):
            self._skip_step()
            return terms, True
        self.state["bad_in_row"] = 0
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        if grad_norm is not None:
            terms["grad_norm"] = grad_norm.detach()
        return terms, False

    def _skip_step(self) -> None:
        """A non-finite step on some rank: no update anywhere, counted; ``train.max_bad_steps`` in a row stop."""
        t = self.cfg.train
        self.optimizer.zero_grad(set_to_none=True)
        self.state["bad_steps"] += 1
        self.state["bad_in_row"] += 1
        self._log(f"step {self.state['step']}: non-finite loss or gradient, step skipped "
                  f"({self.state['bad_in_row']} in a row, {self.state['bad_steps']} in total)")
        if self.state["bad_in_row"] >= t.max_bad_steps:
            self._save()
            raise RuntimeError(f"{t.max_bad_steps} non-finite steps in a row (train.max_bad_steps): stopping")
        with warnings.catch_warnings():  # a skipped step still advances the schedule (it counts as a step)
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step()`")
            self.scheduler.step()

    def _flush(self) -> None:
        """Write the log interval's means (one host sync for all of them) and refresh the progress bar."""
        row = self._window.row(state=self.state, lr=self.scheduler.get_last_lr()[0],
                               flops_per_step=self._flops_per_step, device=self.device,
                               world_size=self.env.world_size)
        if row is None:
            return
        self._metrics.write(row)
        self._bar.set_postfix(loss=f"{row.get('loss', float('nan')):.4f}", lr=f"{row['lr']:.2e}",
                              clips_s=f"{row['clips_per_s']:.1f}", wait=f"{row['data_wait_pct']:.0f}%")

    def _save(self) -> None:
        ckpt.save_checkpoint(self.run_dir, self.state["step"], model=self.model, optimizer=self.optimizer,
                             scheduler=self.scheduler, scaler=self.scaler,
                             state={**self.state, "config": config_to_dict(self.cfg)},
                             keep_last=self.cfg.train.keep_last)

    # ----------------------------------------------------------------------------------------------- evaluation

    def evaluate(self, split: str) -> dict:
        """The task's metrics on data split ``split`` (``train.tasks``: QA accuracy or retrieval both ways); under
        FSDP2 the root's parameters unsharded for the duration (``eval_sets.unsharded``)."""
        with eval_sets.unsharded(self.model) as model:
            return self.task.evaluate(model, self.cfg, self.tok, split, self.env, self._autocast)

    def _evaluate_and_select(self) -> None:
        """Every eval set (``train.eval_sets``), logged as ``SET/metric``; the best weights by ``eval.select``."""
        with eval_sets.unsharded(self.model) as model:
            metrics = eval_sets.evaluate_all(model, self.eval_sets, self.task, self.tok, self.env, self._autocast)
        (key, mode), step = self.select, self.state["step"]
        self.state["last_eval"] = step
        self._metrics.write({"step": step, **metrics})
        self._log(f"step {step}: {eval_sets.summary(metrics)}")
        if key not in metrics:
            raise ValueError(f"eval.select: {key!r} is not among the metrics {sorted(metrics)}")
        if eval_sets.better(metrics[key], self.state["best"], mode):
            self.state["best"], self.state["best_step"] = metrics[key], step
            dist.save_pretrained(unwrap_model(self.model), self.run_dir / "best", self.cfg.model.name,
                                 self.env.is_main)
