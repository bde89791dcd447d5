"""Run configuration: typed dataclasses, YAML files, dotted command-line overrides, the resolved config on disk.

A run's config is one :class:`Config` with five sections, written in YAML::

    model:  {name: lfvila-base, overrides: {stage: 1}, attn_impl: auto, init: [{kind: swin2d, path: ...}]}
    data:   {format: activitynet_captions, video_root: ..., train: ..., val: ..., test: ..., vocab: ...}
    train:  {task: stage1, epochs: 10, batch_size: 16, lr: 5.0e-5, schedule: linear, warmup_epochs: 1, ...}
    eval:   {sets: [{name: val, split: val, metrics: [retrieval, losses]}], select: val/t2v_R@1, at_start: true}
    run:    {dir: runs/NAME, resume: auto}

``load_config(path, ["--train.lr", "1e-4", "--run.dir=runs/x"])`` reads the file (``defaults:`` may name another
YAML file, relative to this one, whose values this file overrides), applies the overrides (values parsed as YAML
scalars / lists), and validates everything: an unknown key or a value of the wrong type raises :class:`ConfigError`
naming the dotted key. ``save_config(cfg, path)`` writes the resolved config (what actually ran) as YAML.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from lfvila import train_options
from lfvila.data.spec import SampleSpec

__all__ = [
    "Config",
    "ConfigError",
    "DataConfig",
    "EvalConfig",
    "EvalSet",
    "InitStep",
    "ModelConfig",
    "RunConfig",
    "TASKS",
    "TrainConfig",
    "config_to_dict",
    "from_dict",
    "load_config",
    "parse_overrides",
    "save_config",
    "to_dict",
]

TASKS = ("stage1", "stage2", "retrieval", "multichoice", "classification", "video_classification")
INIT_KINDS = ("swin2d", "bert", "checkpoint", "pretraining", "stage1", "pretrained")


class ConfigError(ValueError):
    """An invalid configuration; the message starts with the dotted key (``train.lr: ...``)."""


@dataclass
class InitStep:
    """One initialisation step, applied in order before training (``lfvila.models.convert``):
    ``swin2d`` (2D Swin into the video encoder), ``bert`` (BERT weights into the text encoder), ``checkpoint`` (an
    official or our state dict, strict), ``pretraining`` (a pre-training checkpoint into a task model),
    ``stage1`` (a stage-1 checkpoint into a stage-2 model: the fusion parts may be missing), ``pretrained`` (a
    ``save_pretrained`` directory or a run's checkpoint directory, strict). ``resize_windows``: the last four may
    load a checkpoint of other window sizes, bias tables resampled (``convert.load_checkpoint``)."""

    kind: str
    path: str
    resize_windows: bool = False

    def __post_init__(self):
        if self.kind not in INIT_KINDS:
            raise ConfigError(f"kind: must be one of {INIT_KINDS}, got {self.kind!r}")


@dataclass
class ModelConfig:
    """``name``: a registered variant or alias (``lfvila.models.list_models()``, ``list_aliases()``); ``overrides``:
    its config fields (``create_model(name, **overrides)``, e.g. ``num_classes`` of a classification head);
    ``attn_impl`` / ``loss_impl``: ``auto | triton | torch`` for the window attention and the contrastive loss;
    ``grad_checkpointing`` per video block; ``compile``: ``torch.compile``."""

    name: str = "lfvila-base"
    overrides: dict = field(default_factory=dict)
    attn_impl: str = "auto"
    loss_impl: str = "auto"
    grad_checkpointing: bool = False
    compile: bool = False
    init: list[InitStep] = field(default_factory=list)

    def __post_init__(self):
        for name in ("attn_impl", "loss_impl"):
            if getattr(self, name) not in ("auto", "triton", "torch"):
                raise ConfigError(f"{name}: must be auto, triton or torch, got {getattr(self, name)!r}")


@dataclass
class DataConfig(SampleSpec):
    """The sample (:class:`~lfvila.data.spec.SampleSpec`: size, clips, frames_per_clip, sentences, max_len,
    sampling, flip, on_error, max_skip_fraction; the loaders' ``LoaderConfig`` shares these very fields), the
    annotations (``format``: a ``lfvila.data.formats`` registry name, or ``shards``: ``train`` / ``val`` / ``test``
    are ``index.json`` files of WebDataset tar shards, ``lfvila.data.shards``) and the loader (``lfvila.data.loader``).
    ``on_error: replace`` replaces training samples; evaluation skips them (``train.data``). ``backend``: ``pyav``
    (the DataLoader), ``dali`` or ``auto`` (``train.data``). ``shard_buffer``: shards only, the samples in each
    worker's shuffle buffer (memory: about that many samples' encoded bytes per worker). ``shard_order``: shards
    only, ``stream`` (``ShardStream``: each worker reads whole shards front to back, its own seeded order) or
    ``sampler`` (``ShardDataset``: samples read by seeking, in the training sampler's order, so the batches are those
    of the jsonl / LMDB path of the same annotations)."""

    format: str = "activitynet_captions"
    video_root: str = ""
    train: str | None = None
    val: str | None = None
    test: str | None = None
    vocab: str = ""
    format_kwargs: dict = field(default_factory=dict)
    backend: str = "pyav"
    num_workers: int = 4
    shard_buffer: int = 256
    shard_order: str = "stream"

    def __post_init__(self):
        try:
            super().__post_init__()
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if self.shard_buffer < 0:
            raise ConfigError(f"shard_buffer: must be >= 0, got {self.shard_buffer}")
        if self.shard_order not in ("stream", "sampler"):
            raise ConfigError(f"shard_order: must be stream or sampler, got {self.shard_order!r}")
        if self.backend not in ("pyav", "dali", "auto"):
            raise ConfigError(f"backend: must be pyav, dali or auto, got {self.backend!r}")


@dataclass
class TrainConfig:
    """Optimisation (official defaults: AdamW lr 5e-5, betas 0.9/0.98, wd 0.05, batch 16 per GPU, linear schedule
    with one warmup epoch). ``max_steps`` caps the run (None: ``epochs`` full epochs). ``precision``: ``auto`` is bf16
    autocast on CUDA and fp32 on the CPU; ``fp16`` scales the loss (``grad_scaler``, ``lfvila.train_options``).
    ``fsdp_reshard_after_forward: false``: FSDP2 as ZeRO-2. ``frozen``: regexes of frozen parameters; ``frozen_eval``:
    which frozen modules stay in eval mode (``all``, ``official``: the video encoder's, ``none``, module regexes).
    ``exclude``: regexes of parameters left out of the optimizer; default ``["pooler"]``, the official rule in every
    task (``optimization/optimizer.py`` drops every parameter named ``pooler``)."""

    task: str = "stage1"
    epochs: int = 10
    max_steps: int | None = None
    batch_size: int = 16
    grad_accum: int = 1
    lr: float = 5e-5
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-8
    weight_decay: float = 0.05
    schedule: str = "linear"
    warmup_epochs: float = 1.0
    warmup_steps: int | None = None
    min_lr_ratio: float = 0.01
    min_lr: float = 1e-8
    step_epochs: float = 5.0
    step_gamma: float = 0.25
    clip_grad_norm: float | None = None
    precision: str = "auto"
    grad_scaler: train_options.GradScalerConfig = field(default_factory=train_options.GradScalerConfig)
    distributed: str = "ddp"
    fsdp_reshard_after_forward: bool = True
    seed: int = 42
    log_every: int = 10
    ckpt_every: int = 500
    keep_last: int = 3
    eval_every: int | None = None
    max_bad_steps: int = 10
    frozen: list[str] = field(default_factory=list)
    frozen_eval: str | list[str] = "all"
    exclude: list[str] = field(default_factory=lambda: ["pooler"])

    def __post_init__(self):
        checks = {
            "task": self.task in TASKS,
            "schedule": self.schedule in ("linear", "cosine", "step", "constant"),
            "precision": self.precision in ("auto", "bf16", "fp16", "fp32"),
            "distributed": self.distributed in ("ddp", "fsdp"),
        }
        for name, ok in checks.items():
            if not ok:
                raise ConfigError(f"{name}: invalid value {getattr(self, name)!r}")
        for name in ("epochs", "batch_size", "grad_accum", "log_every", "ckpt_every", "keep_last", "max_bad_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ConfigError(f"lr: must be positive, got {self.lr}")
        if problem := train_options.check(self):  # grad_scaler, frozen_eval
            raise ConfigError(problem)


EVAL_METRICS = ("task", "retrieval", "accuracy", "losses")
SPLITS = ("train", "val", "test")


@dataclass
class EvalSet:
    """One named eval set (``eval.sets``), reported as ``NAME/metric``. Its rows: ``annotations`` (a file), else
    the file of ``data.<split>``; read with the data section overridden by ``data`` (any ``data`` key but ``vocab``:
    ``format``, ``video_root``, ``format_kwargs``, ``sampling``, ``sentences``, ...), so a stage-1 run can evaluate
    ActivityNet paragraphs in their own format beside its pre-training rows. ``metrics``: ``task`` (the task's own
    evaluation: retrieval, or accuracy for the QA and classification tasks), ``retrieval`` (paragraph <-> video,
    both ways), ``accuracy`` (QA / classification), ``losses`` (the task's losses as ``val_<loss>``; stage 2 adds
    ``mlm_acc`` and ``vtm_acc``). ``batch_size``: None is ``eval.batch_size``."""

    name: str
    split: str = "val"
    annotations: str | None = None
    data: dict = field(default_factory=dict)
    metrics: list[str] = field(default_factory=lambda: ["task"])
    batch_size: int | None = None

    def __post_init__(self):
        if not self.name or "/" in self.name:
            raise ConfigError(f"name: a non-empty name without '/', got {self.name!r}")
        if self.split not in SPLITS:
            raise ConfigError(f"split: must be one of {SPLITS}, got {self.split!r}")
        bad = [m for m in self.metrics if m not in EVAL_METRICS]
        if bad or not self.metrics:
            raise ConfigError(f"metrics: a non-empty list of {EVAL_METRICS}, got {self.metrics!r}")
        if "vocab" in self.data:
            raise ConfigError("data.vocab: an eval set uses the run's tokenizer (data.vocab)")
        from_dict(DataConfig, self.data, "data")  # names and types; applied onto the run's data section at run time
        if self.batch_size is not None and self.batch_size < 1:
            raise ConfigError(f"batch_size: must be >= 1, got {self.batch_size}")


@dataclass
class EvalConfig:
    """``sets``: the named eval sets (:class:`EvalSet`), each evaluated every ``train.eval_every`` steps; none (the
    default): one set named ``split`` (``val``) with the task's evaluation, skipped when ``data.<split>`` is unset.
    ``select``: the metric that picks the best weights (``run.dir/best``), ``SET/metric`` (``val/t2v_R@1``,
    ``val/val_loss``) or a bare metric of the first set (``t2v_R@1``, ``acc``). ``select_mode``: ``max``, ``min``,
    or ``auto``: minimised for a loss (``loss`` in the name, ``val_*``) or a rank (``MdR``, ``MnR``), else maximised.
    ``at_start``: evaluate once before the first step, as the official runners (a resumed run never repeats it).
    ``test_split``: the split reported at the end with the best weights, by the task's evaluation (None: none).
    ``batch_size``: None is ``train.batch_size``."""

    split: str = "val"
    test_split: str | None = "test"
    select: str = "t2v_R@1"
    select_mode: str = "auto"
    batch_size: int | None = None
    sets: list[EvalSet] = field(default_factory=list)
    at_start: bool = False

    def __post_init__(self):
        if self.select_mode not in ("auto", "max", "min"):
            raise ConfigError(f"select_mode: must be auto, max or min, got {self.select_mode!r}")
        names = [s.name for s in self.sets]
        if len(set(names)) != len(names):
            raise ConfigError(f"sets: names must be unique, got {names}")
        if "/" in self.select and self.select.split("/", 1)[0] not in (names or [self.split]):
            raise ConfigError(f"select: {self.select!r} names no eval set (sets: {', '.join(names or [self.split])})")


@dataclass
class RunConfig:
    """``dir``: the run directory (checkpoints, metrics.jsonl, TensorBoard, config.yaml); ``resume``: ``auto``
    (newest complete checkpoint in ``dir``, if any), ``none``, or a checkpoint path.

    ``resume_changes``: what a resume does when this config differs from the checkpoint's in a key that changes the
    schedule, the optimizer, the data or the model (``train.max_steps``, ``train.lr``, ``train.batch_size``,
    ``data.train``, ``model.*``, ...; ``train.resume.RESUME_FREE`` lists the keys that may change, such as logging,
    checkpointing, evaluation, ``data.num_workers`` and ``run.*``). ``refuse`` (default): a ValueError naming each
    changed key with its old and new value, because the checkpoint's scheduler and optimizer would silently keep the
    old schedule and hyperparameters. ``keep``: resume anyway, logging a warning that names the keys; the
    checkpoint's lr schedule, optimizer state and data position are kept."""

    dir: str = "runs/default"
    resume: str = "auto"
    resume_changes: str = "refuse"
    tensorboard: bool = True
    progress: bool = True
    device: str = "auto"

    def __post_init__(self):
        if self.resume_changes not in ("refuse", "keep"):
            raise ConfigError(f"resume_changes: must be refuse or keep, got {self.resume_changes!r}")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run: RunConfig = field(default_factory=RunConfig)


# ------------------------------------------------------------------------------------------------ conversion


# ------------------------------------------------------------------------------------------------ dict <-> dataclass
# The one converter between config dataclasses and plain dicts, for the run config (YAML), the model configs
# (``config.json`` of ``save_pretrained``) and the model overrides (``model.overrides``, applied onto a variant's
# config). Hooks let a caller encode / decode values of types this module does not know (transformers' BertConfig).


def _type_name(hint) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def _convert(value, hint, key: str, decode=None, base=None):
    """``value`` (from YAML or JSON) as type ``hint``, or ConfigError naming ``key``. A dict for a dataclass hint is
    converted by :func:`from_dict` (onto ``base``, that field's current value, when given); ``decode(value, hint)``
    may return a value for hints this function does not know (``NotImplemented``: not handled)."""
    if decode is not None:
        out = decode(value, hint)
        if out is not NotImplemented:
            return out
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key, decode, base if dataclasses.is_dataclass(base) else None)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: cannot be {value!r}")
    if dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return value
        return from_dict(hint, value, key, base=base if isinstance(base, hint) else None, decode=decode)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r} ({type(value).__name__})")
        args = typing.get_args(hint)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{key}: expected {len(args)} values, got {len(value)}")
            return tuple(_convert(v, a, f"{key}[{i}]", decode) for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else typing.Any
        out = [_convert(v, item, f"{key}[{i}]", decode) for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r} ({type(value).__name__})")
        return dict(value)
    if hint is typing.Any:
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "5e-5" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif hint is str:
        if isinstance(value, str):
            return value
    raise ConfigError(f"{key}: expected {_type_name(hint)}, got {value!r} ({type(value).__name__})")


def from_dict(cls, data, where: str = "", *, base=None, decode=None):
    """Dataclass ``cls`` from the plain dict ``data``, every value checked and converted by its field's type (nested
    dataclasses from nested dicts, lists into tuples, YAML's ``"5e-5"`` into a float). Unknown keys and wrong types
    raise :class:`ConfigError` naming the dotted key under ``where``.

    ``base``: an instance of ``cls`` the dict overrides (``model.overrides`` onto a variant's config): only the keys
    given change, nested dicts override nested dataclasses field by field; without it, the fields not given take their
    defaults. ``decode(value, hint)``: values of types this module does not know (see :func:`_convert`)."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(f"{prefix}{unknown[0]}: unknown key (known: {', '.join(sorted(names))})")
    kwargs = {k: _convert(v, hints[k], f"{where}.{k}" if where else k, decode,
                          None if base is None else getattr(base, k)) for k, v in data.items()}
    try:
        return cls(**kwargs) if base is None else dataclasses.replace(base, **kwargs)
    except ConfigError as e:
        raise ConfigError(f"{where}.{e}" if where else str(e)) from None


def to_dict(obj, encode=None):
    """A config dataclass as plain dicts / lists (YAML- and JSON-ready): dataclasses by field, tuples as lists, dict
    keys as strings. ``encode(value)``, asked first for every value, turns values of other types into plain ones
    (``NotImplemented``: not one of them; a value of no known type raises a TypeError naming it)."""
    def walk(v):
        out = NotImplemented if encode is None else encode(v)  # first: a foreign type may be a dataclass too
        if out is not NotImplemented:
            return out
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            return {f.name: walk(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [walk(x) for x in v]
        if isinstance(v, dict):
            return {str(k): walk(x) for k, x in v.items()}
        if v is None or isinstance(v, (bool, int, float, str)):
            return v
        raise TypeError(f"cannot serialise config value {v!r} of type {type(v).__name__}")
    return walk(obj)


config_to_dict = to_dict


def _merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for k, v in top.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _read_yaml(path: Path, seen: tuple = ()) -> dict:
    if path.resolve() in seen:
        raise ConfigError(f"defaults: circular reference through {path}")
    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config ({e.strerror or e})") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML ({e})") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    parent = data.pop("defaults", None)
    if parent:
        data = _merge(_read_yaml(path.parent / parent, seen + (path.resolve(),)), data)
    return data


def parse_overrides(args: list[str]) -> dict:
    """``["--train.lr", "1e-4", "--run.dir=runs/x"]`` -> nested dict; values parsed as YAML (``1e-4`` a float,
    ``[1, 2]`` a list, ``null`` None, ``true`` a bool)."""
    out: dict = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise ConfigError(f"{arg}: expected --section.key value")
        if "=" in arg:
            key, raw = arg[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(args):
                raise ConfigError(f"{arg[2:]}: missing value")
            key, raw = arg[2:], args[i + 1]
            i += 2
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{key}: conflicts with another override")
        node[parts[-1]] = value
    return out


def load_config(path=None, overrides: list[str] | dict | None = None) -> Config:
    """The validated :class:`Config` from YAML ``path`` (None: the defaults) and ``overrides``: every key and type,
    then the data section's shapes against the model's (``lfvila.models.factory.check_data_shapes``: a
    :class:`ConfigError` naming both keys)."""
    data = _read_yaml(Path(path)) if path is not None else {}
    if overrides:
        data = _merge(data, parse_overrides(overrides) if isinstance(overrides, list) else overrides)
    cfg = from_dict(Config, data)
    from lfvila.models.factory import check_data_shapes  # the model side: torch, transformers

    try:
        check_data_shapes(cfg.model, cfg.data)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return cfg


def save_config(cfg: Config, path) -> None:
    """Write the resolved config as YAML (what the run actually used)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        yaml.safe_dump(config_to_dict(cfg), f, sort_keys=False)
