"""Evaluation during training: the named eval sets of ``eval.sets``, their metrics, the selection of the best weights.

Every ``train.eval_every`` steps (and once before the first step with ``eval.at_start``) the loop evaluates each set
(:func:`evaluate_all`) and logs its metrics as ``SET/metric``. A set reads its own rows in its own format: the run's
data section with the set's ``data`` overrides, its ``annotations`` as the file of ``data.<split>``
(:func:`resolve`), so a stage-1 run evaluates zero-shot ActivityNet paragraph retrieval (``lfvila_retrieval`` rows,
uniform sampling) beside its pre-training val rows. Its metrics, by ``metrics``:

    ``task``       the task's own evaluation (``train.tasks``: retrieval, or accuracy for QA and classification);
    ``retrieval``  paragraph <-> video R@1/5/10/50, MdR, MnR both ways (:func:`train.tasks.evaluate_retrieval`);
    ``accuracy``   QA / classification accuracy (:func:`train.tasks.evaluate_qa`);
    ``losses``     the task's losses on the set, ``val_<term>`` (:func:`evaluate_losses`): ``val_loss`` and, per
                   task, ``val_vpc`` / ``val_mtc``, ``val_mlm`` / ``val_vtm``, ``val_ce`` / ``val_span``; stage 2
                   adds ``mlm_acc`` (every masked token, the official ``mlm_acc``) and ``vtm_acc`` (every pair), %.

The best weights (``run.dir/best``) are those of the evaluation with the best ``eval.select`` (:func:`selection`:
``SET/metric``, or a bare metric of the first set), maximised or minimised by ``eval.select_mode`` (``auto``: losses
and ranks minimised). Without ``eval.sets`` the run has one set named ``eval.split`` with the task's evaluation
(skipped when that split has no file): the configs written before eval sets run as they did.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.distributed as tdist
import torch.nn as nn

from lfvila.config import Config, DataConfig, from_dict
from lfvila.models.factory import check_data_shapes

from . import data as tdata
from . import dist
from .dist import unwrap_model
from .metrics import LOSS_TERMS
from .tasks import Task, evaluate_qa, evaluate_retrieval, get_task

RANK_METRICS = ("MdR", "MnR")  # retrieval ranks: lower is better
_COUNTS = ("mlm_hits", "mlm_tokens", "vtm_hits", "vtm_pairs")


@dataclass(frozen=True)
class EvalSetRun:
    """One eval set, ready to run: ``cfg`` is the run config with the set's data section and batch size, so the
    evaluators read its rows as the split ``split``; ``metrics``: the kinds it reports (``lfvila.config.EvalSet``)."""

    name: str
    cfg: Config
    split: str
    metrics: tuple[str, ...]


def resolve(cfg: Config) -> list[EvalSetRun]:
    """The eval sets of ``cfg`` (``eval.sets``; without them ``eval.split`` with the task's evaluation, none when
    ``data.<split>`` is unset). A set without a file, a data section that does not fit the model, or a metric the
    task cannot report is a ValueError naming ``eval.sets[i]``."""
    if not cfg.eval.sets:
        split = cfg.eval.split
        return [EvalSetRun(split, cfg, split, ("task",))] if getattr(cfg.data, split, None) else []
    task, out = get_task(cfg.train.task), []
    for i, s in enumerate(cfg.eval.sets):
        where = f"eval.sets[{i}]"
        overrides = dict(s.data) if s.annotations is None else {**s.data, s.split: s.annotations}
        data: DataConfig = from_dict(DataConfig, overrides, f"{where}.data", base=cfg.data)
        if not getattr(data, s.split, None):
            raise ValueError(f"{where}.annotations: eval set {s.name!r} has no file (neither annotations nor "
                             f"data.{s.split})")
        try:
            check_data_shapes(cfg.model, data)
        except ValueError as e:
            raise ValueError(f"{where}.data: {e}") from None
        if "retrieval" in s.metrics and task.mode != "paragraph":
            raise ValueError(f"{where}.metrics: retrieval needs paragraph batches; train.task {task.name!r} has "
                             f"{task.mode} batches")
        if "accuracy" in s.metrics and task.label is None:
            raise ValueError(f"{where}.metrics: accuracy needs a QA or classification task, not {task.name!r}")
        evaluation = dataclasses.replace(cfg.eval, batch_size=s.batch_size or cfg.eval.batch_size)
        out.append(EvalSetRun(s.name, dataclasses.replace(cfg, data=data, eval=evaluation), s.split, tuple(s.metrics)))
    return out


def selection(cfg: Config, sets: list[EvalSetRun]) -> tuple[str, str]:
    """``(key, mode)``: the logged metric ``SET/metric`` that ``eval.select`` names (a bare metric: of the first set)
    and ``max`` or ``min`` (``eval.select_mode``; ``auto``: ``min`` for a loss, a name with ``loss`` or ``val_``
    first, and for the ranks ``MdR`` / ``MnR``, ``max`` otherwise)."""
    key = cfg.eval.select
    if "/" not in key:
        key = f"{sets[0].name if sets else cfg.eval.split}/{key}"
    mode = cfg.eval.select_mode
    if mode == "auto":
        metric = key.rsplit("/", 1)[1]
        mode = "min" if "loss" in metric or metric.startswith("val_") or metric.endswith(RANK_METRICS) else "max"
    return key, mode


def better(value: float, best: float | None, mode: str) -> bool:
    """Whether ``value`` beats ``best`` (None: nothing yet) under ``mode``; NaN never does."""
    if math.isnan(value):
        return False
    return best is None or (value > best if mode == "max" else value < best)


@contextlib.contextmanager
def unsharded(model: nn.Module):
    """The unwrapped ``model`` (DDP, FSDP2, torch.compile removed); under FSDP2 the root's parameters unsharded for
    the duration (the blocks unshard in their own hooks)."""
    model = unwrap_model(model)
    sharded = dist.is_sharded(model)
    if sharded:
        model.unshard()
    try:
        yield model
    finally:
        if sharded:
            model.reshard()


def evaluate_losses(model: nn.Module, cfg: Config, tok, split: str, env: dist.DistEnv, autocast=None) -> dict:
    """The task's losses on data split ``split`` in eval mode, by the training step's own loss code
    (``Task.loss`` with a generator): ``{"val_loss": ..., "val_<term>": ...}`` for each term the model returns, and
    for stage 2 ``mlm_acc`` / ``vtm_acc`` (%).

    Each term is its mean over the whole set: the batch means weighted by what they average (the matched masked
    tokens for MLM, the samples otherwise), summed over ranks in one all-reduce (:func:`loss_sums`: counts and sums,
    not a mean of means). The random draws (MTC positions, MLM masking) come from a generator seeded with
    ``(train.seed, rank)`` anew at every call, so two evaluations of the same weights give the same numbers and the
    training stream is untouched. The contrastive losses are taken per evaluation batch (``eval.batch_size``) of each
    rank: their negatives are that batch, so their values depend on the batch size (and, under DDP, on the rank
    split)."""
    sums = loss_sums(model, cfg, tok, split, env, autocast)
    if tdist.is_available() and tdist.is_initialized() and tdist.get_world_size() > 1:
        tdist.all_reduce(sums)
    return loss_metrics(sums)


@torch.no_grad()
def loss_sums(model: nn.Module, cfg: Config, tok, split: str, env: dist.DistEnv, autocast=None) -> torch.Tensor:
    """This rank's part of :func:`evaluate_losses`, float64 ``(2 * len(LOSS_TERMS) + 4,)``: per loss term its
    weighted sum, then its weight; then ``mlm_hits``, ``mlm_tokens``, ``vtm_hits``, ``vtm_pairs``. No collective
    (the ranks' parts may hold different numbers of batches)."""
    task: Task = get_task(cfg.train.task)
    was_training = model.training
    model.eval()
    loader = tdata.eval_loader(cfg, tok, split, env.rank, env.world_size)
    generator = torch.Generator(env.device).manual_seed(cfg.train.seed + 1_000_003 * env.rank)
    n = len(LOSS_TERMS)
    sums = torch.zeros(2 * n + len(_COUNTS), dtype=torch.float64, device=env.device)
    for batch in tdata.Prefetcher(loader, env.device):
        if batch is None:
            continue
        with autocast() if autocast is not None else contextlib.nullcontext():
            out = task.loss(model, batch, tok, generator)
        b = batch["video"].shape[0]
        for i, term in enumerate(LOSS_TERMS):
            if isinstance(out.get(term), torch.Tensor):
                weight = out["mlm_loss_tokens"] if term == "mlm" and "mlm_loss_tokens" in out else b
                sums[i] += out[term].double() * weight
                sums[n + i] += weight
        if "vtm_hits" in out:
            out = {**out, "vtm_pairs": b}
        for j, key in enumerate(_COUNTS):
            if key in out:
                sums[2 * n + j] += out[key]
    model.train(was_training)
    return sums


def loss_metrics(sums: torch.Tensor) -> dict[str, float]:
    """The metrics of :func:`evaluate_losses` from the sums of :func:`loss_sums` over every rank."""
    n, values = len(LOSS_TERMS), sums.tolist()
    metrics = {f"val_{t}": values[i] / values[n + i] for i, t in enumerate(LOSS_TERMS) if values[n + i] > 0}
    counts = dict(zip(_COUNTS, values[2 * n:]))
    for name, hits, total in (("mlm_acc", "mlm_hits", "mlm_tokens"), ("vtm_acc", "vtm_hits", "vtm_pairs")):
        if counts[total] > 0:
            metrics[name] = 100.0 * counts[hits] / counts[total]
    return metrics


EVALUATORS = {"retrieval": evaluate_retrieval, "accuracy": evaluate_qa, "losses": evaluate_losses}


def evaluate_all(model: nn.Module, sets: list[EvalSetRun], task: Task, tok, env: dist.DistEnv,
                 autocast=None) -> dict[str, float]:
    """Every metric of every set of ``sets`` (:func:`resolve`) on the unwrapped ``model``, as ``{"SET/metric": v}``."""
    out = {}
    for s in sets:
        for kind in s.metrics:
            evaluate = task.evaluate if kind == "task" else EVALUATORS[kind]
            out.update({f"{s.name}/{k}": v for k, v in evaluate(model, s.cfg, tok, s.split, env, autocast).items()})
    return out


def summary(metrics: dict[str, float]) -> str:
    """The evaluation's log line: R@1 / R@5 / MdR, accuracies and losses of every set."""
    keep = [(k, v) for k, v in metrics.items()
            if k.endswith(("R@1", "R@5", "MdR", "acc")) or k.rsplit("/", 1)[-1].startswith("val_")]
    return ", ".join(f"{k} {v:.4f}" if "/val_" in k else f"{k} {v:.2f}" for k, v in keep)
