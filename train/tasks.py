"""The task table: what each ``train.task`` trains and how it is evaluated, one :class:`Task` entry per task.

    ``stage1`` (VPC + MTC), ``stage2`` (MLM + VTM), ``retrieval`` (VPC): paragraph batches, evaluated by paragraph
        <-> video retrieval (:func:`evaluate_retrieval`, ``eval.select`` e.g. ``t2v_R@1``);
    ``multichoice`` (How2QA, ``LFVILAForMultipleChoice``: CE over the candidates + ``span_weight`` x span loss) and
    ``classification`` (ActivityNet-QA, VIOLIN, ``LFVILAForClassification``: CE): QA batches (the loader's QA mode,
        which follows the annotation format and must match the task), evaluated by accuracy (:func:`evaluate_qa`,
        ``eval.select: acc``);
    ``video_classification`` (COIN, LVU, ``LFVILAForVideoClassification``: CE on the video alone): the loader's
        ``video`` mode (``lfvila_video_cls``: no text tensors, no tokenizer, ``data.vocab`` unused), evaluated by
        accuracy (:func:`evaluate_qa` with the task's ``predict``, ``eval.select: acc``).

During training the loop evaluates the named eval sets of ``eval.sets`` (``train.eval_sets``: these evaluations,
the validation losses by the same loss functions, MLM / VTM accuracy, selection by ``eval.select``).

A new task is one entry of :data:`TASKS`: which models fit it, its loss on a batch, its evaluation, the loader mode
it needs, the metric it is selected on and whether its batches carry text (``Task.text``: the tokenizer and the
token count). The trainer (``train.loop``) and ``train.evaluate`` read nothing else.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn

from lfvila import losses
from lfvila.config import Config
from lfvila.eval.qa import qa_metrics, qa_predictions
from lfvila.models import (
    LFVILA,
    LFVILAForClassification,
    LFVILAForMultipleChoice,
    LFVILAForVideoClassification,
    LFVILARetrieval,
)

from . import data as tdata
from . import dist, features
from .dist import unwrap_model


@torch.no_grad()
def evaluate_qa(model: nn.Module, cfg: Config, tok, split: str, env: dist.DistEnv, autocast=None) -> dict:
    """QA accuracy of ``model`` on data split ``split``: ``{"acc": percent, "n": examples}``. Each rank predicts its
    disjoint part; the per-example results are gathered by annotation index, each example counted once
    (:func:`lfvila.eval.qa_metrics`, not the official mean of per-batch accuracies). Multiple choice: argmax over the
    candidates; classification (QA or video, the task's ``predict``): argmax over the classes."""
    task = get_task(cfg.train.task)
    was_training = model.training
    model.eval()
    loader = tdata.eval_loader(cfg, tok, split, env.rank, env.world_size)
    check_qa_data(task.name, loader.dataset, model, split)
    preds, labels, index = qa_predictions(model, tdata.Prefetcher(loader, env.device), task.label, autocast,
                                          env.device, forward=task.predict)
    metrics = qa_metrics(preds, labels, index=index)
    model.train(was_training)
    return metrics


@torch.no_grad()
def evaluate_retrieval(model: nn.Module, cfg: Config, tok, split: str, env: dist.DistEnv, autocast=None) -> dict:
    """Retrieval metrics of ``model`` (``encode_video(...)["global"]``, ``encode_text(...)["paragraph"]``) on data
    split ``split``: each rank embeds its disjoint part, the rows are gathered by annotation index (every sample once;
    ``train.features.retrieval_features``, the tensors ``--save-features`` exports), and the paragraph x video
    similarities give ``t2v_*`` / ``v2t_*`` R@1/5/10/50, MdR, MnR (``lfvila.eval``)."""
    feats, _, _ = features.retrieval_features(model, cfg, tok, split, env, autocast)
    return features.retrieval_metrics(feats)


# --------------------------------------------------------------------------------------------------- losses
# (model, batch, tokenizer, generator=None) -> the model's outputs, "loss" the scalar to minimise. ``model`` may be
# wrapped (DDP, FSDP2, torch.compile); the batch is on the device. ``generator`` is given by the evaluation of the
# validation losses alone (``train.eval_sets.evaluate_losses``): the random draws (MTC positions, MLM masking) come
# from it instead of the global stream, the contrastive loss is this rank's batch (evaluation batches differ in count
# between ranks: no collective), and stage 2 adds the accuracy counts. Training calls them without it.


def _paragraph(model, batch, tok, generator=None):
    kw = {} if generator is None else {"distributed": False}
    if generator is not None and not isinstance(unwrap_model(model), LFVILARetrieval):
        kw["generator"] = generator  # MTC's draws (forward_stage1)
    return model(batch["video"], batch["text_ids"], batch["text_mask"], batch["sentence_real"], **kw)


def _retrieval(model, batch, tok, generator=None):
    out = _paragraph(model, batch, tok, generator)
    return out if "vpc" in out and out["loss"] is out["vpc"] else {"loss": out["vpc"], "vpc": out["vpc"]}


def _stage2(model, batch, tok, generator=None):
    """MLM masking on the device (special tokens and padding never masked), then MLM + VTM."""
    ids, mask = batch["text_ids"], batch["text_mask"]
    special = (tok.cls_id, tok.sep_id, tok.pad_id, tok.mask_id, tok.unk_id)
    masked, labels = losses.mlm_mask(ids, mask, mask_token_id=tok.mask_id,
                                     vocab_size=unwrap_model(model).text_encoder.config.vocab_size,
                                     special_ids=special, generator=generator)
    kw = {} if generator is None else {"stats": True}
    return model(batch["video"], masked, mask, labels, batch["sentence_real"], **kw)


def _multichoice(model, batch, tok, generator=None):
    return model(batch["video"], batch["text_ids"], batch["text_mask"], labels=batch["answer"],
                 span_labels=batch["span_labels"], span_weights=batch["span_weights"], real=batch["sentence_real"])


def _classification(model, batch, tok, generator=None):
    return model(batch["video"], batch["text_ids"], batch["text_mask"], labels=batch["label"],
                 real=batch["sentence_real"])


def _video_classification(model, batch, tok, generator=None):
    return model(batch["video"], labels=batch["label"])


def _video_logits(model, batch):
    return model(batch["video"])


# --------------------------------------------------------------------------------------------------- the table
_QA = (LFVILAForMultipleChoice, LFVILAForClassification)


def _text_model(m: nn.Module) -> bool:
    return isinstance(m, LFVILA) and m.text_tower


@dataclass(frozen=True)
class Task:
    """``fits(model)``: the model can train this task; ``loss(model, batch, tok, generator=None)``: its outputs on a
    batch (``generator``: the validation losses' draws, ``train.eval_sets``);
    ``evaluate(model, cfg, tok, split, env, autocast)``: its metrics on a split; ``mode``: the loader's sample mode
    it needs (``paragraph``, ``multichoice``, ``classification``, ``video``); ``label``: the batch key of a QA answer
    or class; ``select``: the only ``eval.select`` it accepts (None: any of its metrics); ``text``: its batches
    carry text (a tokenizer from ``data.vocab``; False: ``tok`` is None); ``predict(model, batch)``: the outputs
    (``logits``) :func:`evaluate_qa` scores (None: the text QA call)."""

    name: str
    fits: Callable[[nn.Module], bool]
    loss: Callable[[nn.Module, dict, object], dict]
    evaluate: Callable[..., dict]
    mode: str = "paragraph"
    label: str | None = None
    select: str | None = None
    text: bool = True
    predict: Callable[[nn.Module, dict], dict] | None = None

    @property
    def qa(self) -> bool:
        """A question-answering task (text QA batches; the ``train.finetune_qa`` entry point)."""
        return self.text and self.mode != "paragraph"

    def tokenizer(self, cfg: Config, model: nn.Module):
        """The tokenizer of ``data.vocab``, checked to fit ``model``'s text encoder; None for a task without text
        (``data.vocab`` is then not read)."""
        if not self.text:
            return None
        tok = tdata.tokenizer(cfg)
        model_vocab = unwrap_model(model).text_encoder.config.vocab_size
        if tok.vocab_size > model_vocab:
            raise ValueError(f"model.overrides.text.vocab_size: the model has {model_vocab} token ids but data.vocab "
                             f"({cfg.data.vocab}) has {tok.vocab_size}")
        return tok


TASKS: dict[str, Task] = {t.name: t for t in (
    Task("stage1", lambda m: _text_model(m) and not isinstance(m, LFVILARetrieval) and m.cfg.stage == 1,
         _paragraph, evaluate_retrieval),
    Task("stage2", lambda m: isinstance(m, LFVILA) and getattr(m, "has_fusion", False)
         and not isinstance(m, (LFVILARetrieval, *_QA)), _stage2, evaluate_retrieval),
    Task("retrieval", lambda m: isinstance(m, LFVILARetrieval) or (_text_model(m) and m.cfg.stage == 1),
         _retrieval, evaluate_retrieval),
    Task("multichoice", lambda m: isinstance(m, LFVILAForMultipleChoice), _multichoice, evaluate_qa,
         mode="multichoice", label="answer", select="acc"),
    Task("classification", lambda m: isinstance(m, LFVILAForClassification), _classification, evaluate_qa,
         mode="classification", label="label", select="acc"),
    Task("video_classification", lambda m: isinstance(m, LFVILAForVideoClassification), _video_classification,
         evaluate_qa, mode="video", label="label", select="acc", text=False, predict=_video_logits),
)}
QA_TASKS = tuple(name for name, t in TASKS.items() if t.qa)


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"train.task {name!r}: unknown task (known: {', '.join(TASKS)})")
    return TASKS[name]


def check_task(cfg: Config, model: nn.Module) -> Task:
    """The task of ``train.task``, after checking that ``model`` fits it and ``eval.select`` (``metric`` or
    ``SET/metric``) is one it reports."""
    task = get_task(cfg.train.task)
    if not task.fits(model):
        raise ValueError(f"train.task {task.name!r} does not fit model.name {cfg.model.name!r} "
                         f"({type(model).__name__})")
    if task.select is not None and cfg.eval.select.rsplit("/", 1)[-1] != task.select:
        who = "QA tasks report" if task.qa else f"train.task {task.name!r} reports"
        raise ValueError(f"eval.select: {who} {task.select!r} (accuracy, %), got {cfg.eval.select!r}")
    return task


def check_qa_data(task: str, dataset, model: nn.Module, where: str) -> None:
    """The loader ``dataset`` (a ``VideoTextDataset``) fits ``task``: its mode is the task's, and every class label
    is one the classifier has (``model.cfg.num_classes``). ``where`` names the split in the error. A loader without
    QA modes (no ``mode``: the DALI loader) passes for the paragraph tasks and is refused for the others."""
    want = get_task(task).mode
    mode = getattr(dataset, "mode", None)
    if mode is None:
        if want != "paragraph":
            raise ValueError(f"data.backend: {type(dataset).__name__} makes paragraph batches only; QA and video "
                             f"tasks need the PyAV DataLoader path (data.backend pyav)")
        return
    if mode != want:
        fmt = getattr(dataset.annotations, "format_name", "") or type(dataset.annotations).__name__
        raise ValueError(f"data.{where}: train.task {task!r} needs {want} samples, but data.format {fmt!r} gives "
                         f"{mode} samples")
    if get_task(task).label == "label":  # class labels (QA or video classification)
        n = model.cfg.num_classes
        bad = [(i, dataset.annotations[i]["label"]) for i in range(len(dataset))
               if not 0 <= dataset.annotations[i]["label"] < n]
        if bad:
            raise ValueError(f"data.{where}: {len(bad)} labels outside the model's {n} classes (first: row {bad[0][0]}"
                             f" label {bad[0][1]}); set model.overrides.num_classes")
