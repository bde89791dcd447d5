"""The training loop shared by every LF-VILA task (stage 1, stage 2, retrieval and QA fine-tuning).

``Trainer(cfg).fit()`` runs one configured job end to end, in this order:

1. process group (``train.dist``: torchrun's variables; NCCL / gloo) and seeding (``train.seed`` + rank);
2. the model: ``create_model(model.name, **model.overrides)`` with ``model.attn_impl`` in its video config and
   ``model.loss_impl`` in its own (the losses' ``impl=``; nothing is passed through ``os.environ``),
   the ``model.init`` steps in order (``lfvila.models.convert``), ``train.frozen`` parameters frozen (their modules
   kept in eval mode), gradient checkpointing, then DDP (default) or FSDP2 (``train.distributed: fsdp``:
   ``fully_shard`` per video block and BERT layer, bf16 parameters, fp32 gradient reduction), then ``torch.compile``
   when ``model.compile``;
3. AdamW (fused on CUDA) with the official no-decay groups, a per-step schedule, a GradScaler for fp16;
4. ``run.resume``: ``auto`` continues from the newest complete checkpoint in ``run.dir`` (weights, optimizer,
   scheduler, scaler, RNG, the data position), so the losses after resuming equal the uninterrupted run's, bitwise on
   the CPU (see "Random streams" below). A resume whose config differs from the checkpoint's in a key that changes
   the schedule, the optimizer, the data or the model (:data:`RESUME_FREE` lists the keys that may change) raises a
   ValueError naming each key with its old and new value; ``run.resume_changes: keep`` resumes anyway, with a
   warning, keeping the checkpoint's schedule and optimizer state;
5. the loop: bf16 autocast on CUDA (``train.precision``), gradient accumulation, clipping, a step whose loss (or
   gradient norm) is NaN/inf on any rank is skipped on every rank and counted (``train.max_bad_steps`` in a row stop
   the run), checkpoints every ``train.ckpt_every`` steps and at the end, evaluation every ``train.eval_every``
   steps (default: each epoch) with the best checkpoint saved to ``run.dir/best`` (``save_pretrained``), and on
   SIGTERM / SIGUSR1 a checkpoint then a clean exit (``fit`` returns ``{"preempted": True}``);
6. logging: a progress bar (loss, lr, clips/s, data wait, ETA), ``metrics.jsonl`` (one JSON object per log
   interval and per evaluation), TensorBoard scalars under ``run.dir/tb`` when ``tensorboard`` is installed.

Tasks (``train.task``) and what they train and evaluate:
    ``stage1`` (VPC + MTC), ``stage2`` (MLM + VTM), ``retrieval`` (VPC): evaluated by paragraph <-> video retrieval
        (:func:`evaluate_retrieval`, ``eval.select`` e.g. ``t2v_R@1``);
    ``multichoice`` (How2QA, ``LFVILAForMultipleChoice``: CE over the candidates + ``span_weight`` x span loss) and
    ``classification`` (ActivityNet-QA, VIOLIN, ``LFVILAForClassification``: CE): evaluated by accuracy
        (:func:`evaluate_qa`, ``eval.select: acc``). The loader's QA mode (``lfvila.data.loader``) follows the
        annotation format and must match the task.

Random streams a training step consumes, and how a resumed run gets the same ones:
    saved in the checkpoint (per rank, ``train.persist.capture_rng`` / ``restore_rng``): the global torch CPU
        generator and every CUDA device's, Python ``random`` and numpy's global generator. They feed the model's
        dropout and drop path, MTC's keys / values / negatives (``losses.mtc_sample``) and stage 2's MLM masking
        (``losses.mlm_mask``), all of which draw from the global stream: no module or loss holds a generator of its
        own (the loop passes none);
    a pure function of (seed, epoch, position), nothing saved: the sample order (``EpochSampler``: ``(seed, epoch)``,
        started at the saved batch), each sample's frame jitter / crop / flip (``(seed, epoch, index)``), and the
        DataLoader worker seeds (``SeededDataLoader``: ``(seed, rank, epoch)``; train and eval loaders alike, so
        neither iterating nor evaluating consumes the global stream);
    kept out of the stream: the one-off FLOP count of the first step (``_count_flops``) runs under
        ``torch.random.fork_rng``, so step 1 draws the same numbers whether or not the FLOPs are counted (they are not
        counted under DDP / FSDP);
    not reproduced: DALI's augmentation generators (``data.backend: dali``), reseeded per ``(seed, rank, epoch)``
        but not savable, so a run resumed mid-epoch on DALI batches draws other crops and flips for the rest of that
        epoch (``lfvila.data.dali_loader``).

Throughput: clips/s (videos per second over all ranks), tokens/s (video patch tokens + real text tokens per second),
data wait (% of step time blocked on the loader), and model FLOPs utilisation: the FLOPs of one training step are
counted once with ``torch.utils.flop_counter.FlopCounterMode`` (matmuls and convolutions; the fused Triton attention
is not counted, so MFU is slightly understated) and divided by the step time and the GPU's dense bf16 peak (a small
table by device name; none on a CPU).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import random
import signal
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from lfvila import losses
from lfvila.config import Config, config_to_dict, save_config
from lfvila.eval import both_directions, flatten, gather_by_index
from lfvila.eval.qa import qa_metrics, qa_predictions
from lfvila.models import convert
from lfvila.models.registry import _REGISTRY, model_config

from . import checkpoint as ckpt
from . import data as tdata
from . import dist
from .dist import unwrap_model
from .optim import apply_frozen_eval, build_optimizer, build_scheduler, freeze

log = logging.getLogger(__name__)

QA_TASKS = ("multichoice", "classification")
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


# Config keys a resumed run may change freely: they decide what is logged, saved and evaluated, never what a training
# step computes (entries ending in "." are whole sections). Every other key of model / data / train can change the
# schedule, the optimizer, the data order or the model, and a resume that changes one is refused (run.resume_changes).
RESUME_FREE = ("train.log_every", "train.ckpt_every", "train.eval_every", "train.keep_last", "train.max_bad_steps",
               "data.num_workers", "data.val", "data.test", "eval.", "run.")
_ABSENT = object()


def _flat(tree: dict, prefix: str = "") -> dict:
    """Nested config dicts as ``{"train.lr": 1e-4, "model.overrides.text.vocab_size": 236, ...}`` (lists whole)."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def resume_changes(saved: dict, current: dict) -> list[tuple[str, object, object]]:
    """``(key, checkpoint value, current value)`` for every dotted key outside :data:`RESUME_FREE` whose value differs
    between two ``config_to_dict`` trees (``saved`` through JSON, so tuples compare as lists); a key only one side
    has is paired with ``_ABSENT``. With ``data.format: shards`` a new ``data.num_workers`` is a change too: the
    stream's slots (ranks x workers) decide which samples the rest of the epoch holds (``lfvila.data.shards``)."""
    old, new = _flat(saved), _flat(json.loads(json.dumps(current)))
    shards = tdata.SHARDS in (old.get("data.format"), new.get("data.format"))
    changes = []
    for key in sorted(set(old) | set(new)):
        free = key in RESUME_FREE or key.startswith(tuple(k for k in RESUME_FREE if k.endswith(".")))
        if free and not (shards and key == "data.num_workers"):
            continue
        a, b = old.get(key, _ABSENT), new.get(key, _ABSENT)
        if a != b or (type(a) is not type(b) and not {type(a), type(b)} <= {int, float}):  # 1 == True, 1 == 1.0
            changes.append((key, a, b))
    return changes


def _show(value) -> str:
    return "(absent)" if value is _ABSENT else json.dumps(value)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_model(cfg: Config) -> nn.Module:
    """The configured model with its init steps applied (not yet on the device, not wrapped)."""
    name = cfg.model.name
    if name not in _REGISTRY:
        raise ValueError(f"model.name: unknown model {name!r}")
    mcfg = _with_overrides(model_config(name), cfg.model.overrides, "model.overrides")
    video_overrides = {"attn_impl": cfg.model.attn_impl, "grad_checkpointing": cfg.model.grad_checkpointing}
    if hasattr(mcfg, "video"):  # a full model: its losses take model.loss_impl (explicit, never the environment)
        mcfg = dataclasses.replace(mcfg, video=dataclasses.replace(mcfg.video, **video_overrides),
                                   loss_impl=cfg.model.loss_impl)
    else:
        mcfg = dataclasses.replace(mcfg, **video_overrides)
    model = _REGISTRY[name].build(mcfg)
    for step in cfg.model.init:
        if step.kind == "swin2d":
            convert.load_swin2d(model.video_encoder, step.path)
        elif step.kind == "bert":
            convert.load_bert_weights(model.text_encoder, step.path)
        elif step.kind == "checkpoint":
            convert.load_checkpoint(model, step.path)
        elif step.kind == "pretraining":
            convert.init_from_pretraining(model, step.path)
        elif step.kind == "stage1":
            convert.load_stage1(model, step.path)
        elif step.kind == "pretrained":
            path = Path(step.path)
            convert.load_checkpoint(model, path / "model.safetensors" if path.is_dir() else path)
    return model


def _with_overrides(obj, overrides: dict, where: str):
    """``dataclasses.replace`` with nested dicts applied to nested config dataclasses (``{text: {vocab_size: 200}}``);
    an unknown field raises ValueError naming it."""
    names = {f.name for f in dataclasses.fields(obj)}
    changes = {}
    for key, value in overrides.items():
        if key not in names:
            raise ValueError(f"{where}.{key}: {type(obj).__name__} has no such field")
        current = getattr(obj, key)
        if isinstance(value, dict) and dataclasses.is_dataclass(current):
            value = _with_overrides(current, value, f"{where}.{key}")
        elif isinstance(value, list) and isinstance(current, tuple):
            value = tuple(tuple(v) if isinstance(v, list) else v for v in value)
        changes[key] = value
    return dataclasses.replace(obj, **changes)


def _check_task(cfg: Config, model: nn.Module) -> None:
    from lfvila.models import LFVILA, LFVILARetrieval
    from lfvila.models.tasks import LFVILAForClassification, LFVILAForMultipleChoice

    task = cfg.train.task
    qa = (LFVILAForMultipleChoice, LFVILAForClassification)
    ok = {"stage1": isinstance(model, LFVILA) and not isinstance(model, LFVILARetrieval) and model.cfg.stage == 1,
          "stage2": isinstance(model, LFVILA) and getattr(model, "has_fusion", False)
          and not isinstance(model, (LFVILARetrieval, *qa)),
          "retrieval": isinstance(model, LFVILARetrieval) or (isinstance(model, LFVILA) and model.cfg.stage == 1),
          "multichoice": isinstance(model, LFVILAForMultipleChoice),
          "classification": isinstance(model, LFVILAForClassification)}
    if task not in ok:
        raise ValueError(f"train.task {task!r}: unknown task (known: {', '.join(ok)})")
    if not ok[task]:
        raise ValueError(f"train.task {task!r} does not fit model.name {cfg.model.name!r} ({type(model).__name__})")
    if task in QA_TASKS and cfg.eval.select != "acc":
        raise ValueError(f"eval.select: QA tasks report 'acc' (accuracy, %), got {cfg.eval.select!r}")


def check_qa_data(task: str, dataset, model: nn.Module, where: str) -> None:
    """The loader ``dataset`` (a ``VideoTextDataset``) fits ``task``: its mode is the task's, and every class label
    is one the classifier has (``model.cfg.num_classes``). ``where`` names the split in the error. A loader without
    QA modes (no ``mode``: the DALI loader) passes for the paragraph tasks and is refused for QA."""
    mode = getattr(dataset, "mode", None)
    if mode is None:
        if task in QA_TASKS:
            raise ValueError(f"data.backend: {type(dataset).__name__} makes paragraph batches only; QA tasks need "
                             f"the PyAV DataLoader path (data.backend pyav)")
        return
    want = task if task in QA_TASKS else "paragraph"
    if mode != want:
        fmt = getattr(dataset.annotations, "format_name", "") or type(dataset.annotations).__name__
        raise ValueError(f"data.{where}: train.task {task!r} needs {want} samples, but data.format {fmt!r} gives "
                         f"{mode} samples")
    if task == "classification":
        n = model.cfg.num_classes
        bad = [(i, dataset.annotations[i]["label"]) for i in range(len(dataset))
               if not 0 <= dataset.annotations[i]["label"] < n]
        if bad:
            raise ValueError(f"data.{where}: {len(bad)} labels outside the model's {n} classes (first: row {bad[0][0]}"
                             f" label {bad[0][1]}); set model.overrides.num_classes")


@torch.no_grad()
def evaluate_qa(model: nn.Module, cfg: Config, tok, split: str, env: dist.DistEnv, autocast=None) -> dict:
    """QA accuracy of ``model`` on data split ``split``: ``{"acc": percent, "n": examples}``. Each rank predicts its
    disjoint part; the per-example results are gathered by annotation index, each example counted once
    (:func:`lfvila.eval.qa_metrics`, not the official mean of per-batch accuracies). Multiple choice: argmax over the
    candidates; classification: argmax over the classes."""
    task = cfg.train.task
    was_training = model.training
    model.eval()
    loader = tdata.eval_loader(cfg, tok, split, env.rank, env.world_size)
    check_qa_data(task, loader.dataset, model, split)
    preds, labels, index = qa_predictions(model, tdata.Prefetcher(loader, env.device),
                                          "answer" if task == "multichoice" else "label", autocast, env.device)
    metrics = qa_metrics(preds, labels, index=index)
    model.train(was_training)
    return metrics


@torch.no_grad()
def evaluate_retrieval(model: nn.Module, cfg: Config, tok, split: str, env: dist.DistEnv, autocast=None) -> dict:
    """Retrieval metrics of ``model`` (``encode_video(...)["global"]``, ``encode_text(...)["paragraph"]``) on data
    split ``split``: each rank embeds its disjoint part, the rows are gathered by annotation index (every sample once),
    and the paragraph x video similarities give ``t2v_*`` / ``v2t_*`` R@1/5/10/50, MdR, MnR (``lfvila.eval``)."""
    was_training = model.training
    model.eval()
    loader = tdata.eval_loader(cfg, tok, split, env.rank, env.world_size)
    feats = {"video": [], "text": []}
    index = []
    for batch in tdata.Prefetcher(loader, env.device):
        if batch is None:
            continue
        with autocast() if autocast is not None else contextlib.nullcontext():
            v = model.encode_video(batch["video"])["global"]
            t = model.encode_text(batch["text_ids"], batch["text_mask"], batch["sentence_real"])["paragraph"]
        feats["video"].append(v.float())
        feats["text"].append(t.float())
        index.append(batch["index"])
    d = model.cfg.embed_dim
    local = {k: torch.cat(v) if v else torch.zeros(0, d, device=env.device) for k, v in feats.items()}
    idx = torch.cat(index) if index else torch.zeros(0, dtype=torch.long, device=env.device)
    gathered, _ = gather_by_index(local, idx)
    model.train(was_training)
    sim = gathered["text"] @ gathered["video"].T
    return flatten(both_directions(sim.cpu()))


class _Stop(Exception):
    pass


class Trainer:
    """One configured training job; see the module docstring. ``fit()`` returns the final metrics."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.env = dist.init(cfg.run.device)
        self.device = self.env.device
        seed_everything(cfg.train.seed + self.env.rank)
        self.run_dir = Path(cfg.run.dir)
        resume = ckpt.resolve_resume(self.run_dir, cfg.run.resume)
        if resume is not None:  # before config.yaml is replaced: a refused resume leaves the run directory as it was
            self._check_resume_config(resume)
        if self.env.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.run_dir / "config.yaml")
        dist.barrier()
        self.precision = cfg.train.precision
        if self.precision == "auto":
            self.precision = "bf16" if self.device.type == "cuda" else "fp32"
        if self.precision in ("bf16", "fp16") and self.device.type != "cuda":
            raise ValueError(f"train.precision={self.precision} needs CUDA (use fp32 or auto on the CPU)")

        model = build_model(cfg)
        _check_task(cfg, model)
        self.frozen = list(cfg.train.frozen)
        freeze(model, self.frozen)
        model.to(self.device)
        self.raw_model = model
        self.model = self._wrap(model)

        self.tok = tdata.tokenizer(cfg)
        model_vocab = model.text_encoder.config.vocab_size
        if self.tok.vocab_size > model_vocab:
            raise ValueError(f"model.overrides.text.vocab_size: the model has {model_vocab} token ids but data.vocab "
                             f"({cfg.data.vocab}) has {self.tok.vocab_size}")
        self.loader, self.sampler = tdata.train_loader(cfg, self.tok, self.env.rank, self.env.world_size,
                                                       self.env.device)
        check_qa_data(cfg.train.task, getattr(self.loader, "dataset", self.loader), model, "train")
        self.batches_per_epoch = self.sampler.batches_per_epoch()
        if self.batches_per_epoch < cfg.train.grad_accum:
            raise ValueError(f"train.batch_size {cfg.train.batch_size} x grad_accum {cfg.train.grad_accum} exceeds "
                             f"the {self.sampler.per_rank} training samples per rank")
        self.steps_per_epoch = self.batches_per_epoch // cfg.train.grad_accum
        total = self.steps_per_epoch * cfg.train.epochs
        self.total_steps = min(total, cfg.train.max_steps) if cfg.train.max_steps else total
        t = cfg.train
        self.optimizer = build_optimizer(self.model, t.lr, t.weight_decay, t.betas, t.eps, exclude=tuple(t.exclude))
        warmup = t.warmup_steps if t.warmup_steps is not None else round(t.warmup_epochs * self.steps_per_epoch)
        self.scheduler = build_scheduler(
            self.optimizer, schedule=t.schedule, total_steps=self.total_steps, warmup_steps=min(warmup,
                                                                                                 self.total_steps),
            min_lr_ratio=t.min_lr_ratio, min_lr=t.min_lr,
            step_size=max(1, round(t.step_epochs * self.steps_per_epoch)), gamma=t.step_gamma)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.precision == "fp16")
        self.state = {"step": 0, "epoch": 0, "batch": 0, "bad_steps": 0, "bad_in_row": 0, "skipped_batches": 0,
                      "best": None, "best_step": None}
        if resume is not None:
            self.state.update(ckpt.load_checkpoint(resume, model=self.model, optimizer=self.optimizer,
                                                   scheduler=self.scheduler, scaler=self.scaler))
            self._log(f"resumed from {resume} at step {self.state['step']}")
        self._stop_signal = None
        self._flops_per_step = None
        self._tb = None

    # ----------------------------------------------------------------------------------------------- setup

    def _check_resume_config(self, path: Path) -> None:
        """Compare this run's config with the one the checkpoint at ``path`` was written under (its ``state.json``),
        before anything is loaded. The loaded scheduler keeps the checkpoint's schedule (its ``LRSchedule`` state:
        total and warmup steps, shape) and the optimizer the checkpoint's hyperparameters, whatever the new config
        says, and a changed batch size, seed or dataset moves the data position: so a change outside
        :data:`RESUME_FREE` is refused (ValueError naming each key, old -> new) unless ``run.resume_changes: keep``,
        which logs the keys instead. Every rank reads the same file, so every rank decides alike."""
        saved = ckpt.read_state(path).get("config")
        if not isinstance(saved, dict):
            if self.env.is_main:
                log.warning("%s records no config: cannot check that this run's config matches it", path)
            return
        changes = resume_changes(saved, config_to_dict(self.cfg))
        if not changes:
            return
        listing = "; ".join(f"{key}: {_show(old)} -> {_show(new)}" for key, old, new in changes)
        if self.cfg.run.resume_changes == "keep":
            if self.env.is_main:
                log.warning("resuming from %s although the config changed (run.resume_changes: keep): %s. The "
                            "checkpoint's lr schedule, optimizer state and hyperparameters and its data position are "
                            "kept; the losses will follow neither config's uninterrupted run", path, listing)
            return
        raise ValueError(f"run.resume: {path} was written under another config; these keys change the schedule, the "
                         f"optimizer, the data or the model (checkpoint -> now): {listing}. Resume with the "
                         f"checkpoint's values, start a new run.dir, or set run.resume_changes: keep to continue with "
                         f"the checkpoint's schedule and optimizer state")

    def _wrap(self, model: nn.Module) -> nn.Module:
        if self.env.distributed:
            if self.cfg.train.distributed == "fsdp":
                from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

                policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if self.precision == "bf16" else None,
                                              reduce_dtype=torch.float32)
                for layer in model.video_encoder.layers:
                    for block in layer.blocks:
                        fully_shard(block, mp_policy=policy)
                for layer in model.text_encoder.bert.encoder.layer:
                    fully_shard(layer, mp_policy=policy)
                fully_shard(model, mp_policy=policy)
            else:
                from torch.nn.parallel import DistributedDataParallel

                # Some parameters get no gradient by construction (e.g. the MLM head in stage 1, the local branch in
                # retrieval), so DDP must look for unused ones.
                model = DistributedDataParallel(model, device_ids=[self.device.index] if self.device.type == "cuda"
                                                else None, find_unused_parameters=True)
        if self.cfg.model.compile:
            model = torch.compile(model)
        return model

    def _autocast(self):
        if self.precision in ("bf16", "fp16") and self.cfg.train.distributed != "fsdp":
            dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
            return torch.autocast(self.device.type, dtype=dtype)
        return contextlib.nullcontext()

    def _log(self, message: str) -> None:
        if self.env.is_main:
            print(f"[lfvila] {message}", flush=True)

    def _write_metrics(self, row: dict) -> None:
        if not self.env.is_main:
            return
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.cfg.run.tensorboard:
            if self._tb is None:
                try:
                    from torch.utils.tensorboard import SummaryWriter

                    self._tb = SummaryWriter(str(self.run_dir / "tb"))
                except ImportError:
                    self._log("tensorboard is not installed: TensorBoard scalars are off (metrics.jsonl has them)")
                    self._tb = False
            if self._tb:
                for k, v in row.items():
                    if k != "step" and isinstance(v, (int, float)) and v is not None and math.isfinite(v):
                        self._tb.add_scalar(k, v, row["step"])

    def _on_signal(self, signum, frame):
        self._stop_signal = signum

    # ----------------------------------------------------------------------------------------------- steps

    def _loss(self, batch: dict) -> dict[str, torch.Tensor]:
        task = self.cfg.train.task
        video, ids, mask, real = batch["video"], batch["text_ids"], batch["text_mask"], batch["sentence_real"]
        if task == "stage1":
            return self.model(video, ids, mask, real)
        if task == "retrieval":
            out = self.model(video, ids, mask, real)
            return out if "vpc" in out and out["loss"] is out["vpc"] else {"loss": out["vpc"], "vpc": out["vpc"]}
        if task == "multichoice":
            return self.model(video, ids, mask, labels=batch["answer"], span_labels=batch["span_labels"],
                              span_weights=batch["span_weights"], real=real)
        if task == "classification":
            return self.model(video, ids, mask, labels=batch["label"], real=real)
        # stage 2: MLM masking on the device (special tokens and padding never masked)
        tok = self.tok
        special = (tok.cls_id, tok.sep_id, tok.pad_id, tok.mask_id, tok.unk_id)
        masked, labels = losses.mlm_mask(ids, mask, mask_token_id=tok.mask_id,
                                         vocab_size=unwrap_model(self.model).text_encoder.config.vocab_size,
                                         special_ids=special)
        return self.model(video, masked, mask, labels, real)

    def _count_flops(self, batch: dict) -> None:
        from torch.utils.flop_counter import FlopCounterMode

        counter = FlopCounterMode(display=False)
        # the extra forward draws random numbers (dropout, MTC): fork the RNGs so that step 1 draws what it would
        # draw without the count (distributed runs skip it) and the checkpointed stream is the training steps' alone
        cuda = [self.device.index or 0] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda, device_type="cuda"):
            with counter, self._autocast():
                out = self._loss(batch)
            with counter:
                out["loss"].backward()
        self.optimizer.zero_grad(set_to_none=True)
        self._flops_per_step = counter.get_total_flops() * self.cfg.train.grad_accum

    def _tokens(self, batch: dict) -> torch.Tensor:
        """Video patch tokens + real text tokens of ``batch``, as a device scalar (no host sync on the hot path)."""
        b, _, t, h, w = batch["video"].shape
        ph, pw = unwrap_model(self.model).video_encoder.cfg.patch_size[1:]
        return batch["text_mask"].sum() + b * t * math.ceil(h / ph) * math.ceil(w / pw)

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
            if self._tb:
                self._tb.close()

    def _fit(self) -> dict:
        cfg, t = self.cfg, self.cfg.train
        eval_every = t.eval_every or self.steps_per_epoch
        has_eval = bool(getattr(cfg.data, cfg.eval.split, None))
        from tqdm.auto import tqdm

        bar = tqdm(total=self.total_steps, initial=self.state["step"], disable=not (self.env.is_main
                                                                                   and cfg.run.progress),
                   dynamic_ncols=True, desc=t.task)
        window = {"time": 0.0, "wait": 0.0, "clips": 0, "tokens": 0, "steps": 0, "terms": {}}
        preempted = False
        try:
            while self.state["step"] < self.total_steps:
                epoch = self.state["epoch"]
                self.sampler.set_position(epoch, self.state["batch"])
                tdata.set_epoch(self.loader, epoch)
                self.model.train()
                apply_frozen_eval(self.model, self.frozen)
                prefetch = tdata.Prefetcher(self.loader, self.device)
                micro, step_start, wait_start = [], time.perf_counter(), 0.0
                for batch in prefetch:
                    self.state["batch"] += 1
                    if dist.any_true(batch is None, self.device):
                        self.state["skipped_batches"] += 1
                        continue
                    micro.append(batch)
                    if len(micro) < t.grad_accum:
                        continue
                    if self._flops_per_step is None and self.state["step"] == 0 and not self.env.distributed:
                        self._count_flops(micro[0])
                    terms, bad = self._step(micro)
                    elapsed = time.perf_counter() - step_start
                    waited, wait_start = prefetch.wait - wait_start, prefetch.wait
                    clips = sum(b["video"].shape[0] for b in micro) * self.env.world_size
                    tokens = sum(self._tokens(b) for b in micro) * self.env.world_size
                    micro, step_start = [], time.perf_counter()
                    if not bad:
                        window["time"] += elapsed
                        window["wait"] += waited
                        window["clips"] += clips
                        window["tokens"] += tokens
                        window["steps"] += 1
                        for k, v in terms.items():
                            window["terms"][k] = window["terms"].get(k, 0.0) + v
                    self.state["step"] += 1
                    bar.update(1)
                    step = self.state["step"]
                    if step % t.log_every == 0 or step == self.total_steps:
                        self._flush(window, bar)
                    if self.state["batch"] >= self.batches_per_epoch - (self.batches_per_epoch % t.grad_accum):
                        self.state["epoch"] += 1
                        self.state["batch"] = 0
                    if has_eval and (step % eval_every == 0 or step == self.total_steps):
                        self._evaluate_and_select(cfg.eval.split)
                        self.model.train()
                        apply_frozen_eval(self.model, self.frozen)
                    stop = dist.any_true(self._stop_signal is not None, self.device)
                    if step % t.ckpt_every == 0 or step == self.total_steps or stop:
                        self._save()
                    if stop:
                        raise _Stop
                    if step >= self.total_steps or self.state["batch"] == 0:
                        break
                if self.state["batch"] != 0 and self.state["step"] < self.total_steps:  # loader ran dry early
                    self.state["epoch"] += 1
                    self.state["batch"] = 0
        except _Stop:
            preempted = True
            self._log(f"signal {self._stop_signal}: checkpoint written at step {self.state['step']}, exiting")
        finally:
            bar.close()
        result = {"step": self.state["step"], "preempted": preempted, "bad_steps": self.state["bad_steps"],
                  "best": self.state["best"], "best_step": self.state["best_step"]}
        if not preempted and cfg.eval.test_split and getattr(cfg.data, cfg.eval.test_split, None):
            best = self.run_dir / "best" / "model.safetensors"
            if best.exists():
                self._load_weights(best)
            metrics = self.evaluate(cfg.eval.test_split)
            result["test"] = metrics
            self._write_metrics({"step": self.state["step"], **{f"test/{k}": v for k, v in metrics.items()}})
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
            for k, v in out.items():
                if isinstance(v, torch.Tensor) and v.ndim == 0 and k in LOSS_TERMS:
                    terms[k] = terms.get(k, 0.0) + v.detach().float() / len(micro)
        grad_norm = None
        if not bad and t.clip_grad_norm:
            self.scaler.unscale_(self.optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(
                [p for p in self.model.parameters() if p.grad is not None], t.clip_grad_norm)
            bad |= not bool(torch.isfinite(grad_norm)) and self.precision != "fp16"
        bad = dist.any_true(bad, self.device)
        if bad:
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
            return terms, True
        self.state["bad_in_row"] = 0
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        if grad_norm is not None:
            terms["grad_norm"] = grad_norm.detach()
        return terms, False

    def _flush(self, window: dict, bar=None) -> None:
        """Write the log interval's means (one host sync for all of them) and refresh the progress bar."""
        if not window["steps"]:
            return
        n, secs = window["steps"], max(window["time"], 1e-9)
        row = {"step": self.state["step"], "epoch": self.state["epoch"],
               **{k: float(v) / n for k, v in window["terms"].items()},
               "lr": self.scheduler.get_last_lr()[0], "clips_per_s": window["clips"] / secs,
               "tokens_per_s": float(window["tokens"]) / secs, "data_wait_pct": 100.0 * window["wait"] / secs,
               "step_time_s": secs / n, "bad_steps": self.state["bad_steps"],
               "skipped_batches": self.state["skipped_batches"], "time": time.time()}
        peak = peak_tflops(self.device)
        if self._flops_per_step is not None:
            row["tflops_per_s"] = self._flops_per_step * n / secs / 1e12 * self.env.world_size
            row["mfu"] = row["tflops_per_s"] / (peak * self.env.world_size) if peak else None
        if self.device.type == "cuda":
            row["max_mem_mb"] = torch.cuda.max_memory_allocated(self.device) / 2**20
        self._write_metrics(row)
        if bar is not None:
            bar.set_postfix(loss=f"{row.get('loss', float('nan')):.4f}", lr=f"{row['lr']:.2e}",
                            clips_s=f"{row['clips_per_s']:.1f}", wait=f"{row['data_wait_pct']:.0f}%")
        window.update({"time": 0.0, "wait": 0.0, "clips": 0, "tokens": 0, "steps": 0, "terms": {}})

    def _save(self) -> None:
        ckpt.save_checkpoint(self.run_dir, self.state["step"], model=self.model, optimizer=self.optimizer,
                             scheduler=self.scheduler, scaler=self.scaler,
                             state={**self.state, "config": config_to_dict(self.cfg)},
                             keep_last=self.cfg.train.keep_last)

    # ----------------------------------------------------------------------------------------------- evaluation

    def evaluate(self, split: str) -> dict:
        """The task's metrics on ``split``: QA accuracy (:func:`evaluate_qa`) for the QA tasks, else
        paragraph-to-video and video-to-paragraph retrieval (:func:`evaluate_retrieval`). Under FSDP2 the root's
        parameters are unsharded for the duration (the blocks unshard in their own hooks)."""
        model = unwrap_model(self.model)
        fsdp = hasattr(model, "unshard") and hasattr(model, "reshard")
        if fsdp:
            model.unshard()
        run = evaluate_qa if self.cfg.train.task in QA_TASKS else evaluate_retrieval
        try:
            return run(model, self.cfg, self.tok, split, self.env, self._autocast)
        finally:
            if fsdp:
                model.reshard()

    def _load_weights(self, path: Path) -> None:
        """Strictly load a weights file into the (possibly FSDP2-sharded) model."""
        model = unwrap_model(self.model)
        if hasattr(model, "reshard"):
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

            plain = _REGISTRY[self.cfg.model.name].build(model.cfg)
            convert.load_checkpoint(plain, path)  # strict key / shape checks on an unsharded copy
            set_model_state_dict(model, plain.state_dict(), options=StateDictOptions(full_state_dict=True))
        else:
            convert.load_checkpoint(model, path)

    def _save_best(self) -> None:
        """``run.dir/best`` (``save_pretrained``) from the full, unsharded weights (gathered under FSDP2)."""
        model = unwrap_model(self.model)
        if hasattr(model, "reshard"):  # FSDP2: gather a full CPU state dict (collective), rank 0 writes
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            if self.env.is_main:
                plain = _REGISTRY[self.cfg.model.name].build(model.cfg)
                plain.load_state_dict(full)
                convert.save_pretrained(plain, self.run_dir / "best")
        elif self.env.is_main:
            convert.save_pretrained(model, self.run_dir / "best")
        dist.barrier()

    def _evaluate_and_select(self, split: str) -> None:
        metrics = self.evaluate(split)
        key = self.cfg.eval.select
        if key not in metrics:
            raise ValueError(f"eval.select: {key!r} is not among the metrics {sorted(metrics)}")
        self._write_metrics({"step": self.state["step"], **{f"{split}/{k}": v for k, v in metrics.items()}})
        self._log(f"step {self.state['step']} {split}: " + ", ".join(
            f"{k} {v:.2f}" for k, v in metrics.items() if k.endswith(("R@1", "R@5", "MdR", "acc"))))
        if self.state["best"] is None or metrics[key] > self.state["best"]:
            self.state["best"], self.state["best_step"] = metrics[key], self.state["step"]
            self._save_best()
