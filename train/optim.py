"""AdamW parameter groups, per-step learning-rate schedules and stage-2 freezing (official ``src/optimization/``).

``param_groups`` / ``build_optimizer``: the official two AdamW groups (the official substring no-decay rules as
regexes in ``DEFAULT_NO_DECAY``; ``exclude=OFFICIAL_EXCLUDE`` leaves out ``pooler`` as the official code does);
``build_scheduler``: warmup, then the official linear / cosine / step schedules, per optimizer step, as a ``LambdaLR``;
``freeze`` / ``apply_frozen_eval``: stage-2 freezing (``STAGE2_FROZEN``; which frozen modules keep dropout off:
``train.frozen_eval``, ``frozen_eval_patterns``). Patterns are regexes tested with
``re.search`` on the parameter names of the unwrapped model (no ``module.`` / ``_orig_mod.`` prefix). What the
official code does and where this module differs: ``docs/official.md``, section 5 "Optimization".
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Iterable, Sequence

import torch
import torch.nn as nn

from .dist import unwrap_model

__all__ = [
    "ALL_NORMS_NO_DECAY",
    "DEFAULT_NO_DECAY",
    "NORM_NO_DECAY",
    "OFFICIAL_EXCLUDE",
    "SCHEDULES",
    "STAGE2_EXCLUDE",
    "STAGE2_FROZEN",
    "STAGE2_OFFICIAL_EVAL",
    "LRSchedule",
    "apply_frozen_eval",
    "build_optimizer",
    "build_scheduler",
    "freeze",
    "frozen_eval_patterns",
    "param_groups",
    "stage2_frozen_patterns",
]

#: The official no-decay rules (``optimizer.py``), as regexes equivalent to its substring tests.
DEFAULT_NO_DECAY: tuple[str, ...] = (r"bias", r"LayerNorm\.bias", r"LayerNorm\.weight", r"pos_embed",
                                     r"relative_position_bias_table")
#: The weight of every norm layer not named ``LayerNorm``: ``norm``, ``norm1``, ``norm2``, ``norm_local``, including
#: ``patch_embed.norm``, ``downsample.norm``, ``local_feat_proj.norm``, ``sent_embedding.norm`` and
#: ``video_token_pos.norm``.
NORM_NO_DECAY: tuple[str, ...] = (r"(?:^|\.)(?:norm\d*|norm_local)\.weight$",)
#: Official rules plus every norm weight (the Swin-style "no decay on 1-D parameters" on our models). Not official.
ALL_NORMS_NO_DECAY: tuple[str, ...] = DEFAULT_NO_DECAY + NORM_NO_DECAY
#: The official optimizer drops every parameter whose name contains ``pooler`` in **every** run. That matters in
#: stage 2 (the VTM head reads the pooler) and in QA fine-tuning (the classifier reads it): the pooler keeps its
#: loaded values.
OFFICIAL_EXCLUDE: tuple[str, ...] = (r"pooler",)
STAGE2_EXCLUDE: tuple[str, ...] = OFFICIAL_EXCLUDE

SCHEDULES = ("linear", "cosine", "step", "constant")


def stage2_frozen_patterns(stage1_layers: int = 12) -> tuple[str, ...]:
    """Regexes of the parameters frozen in stage-2 pre-training (official ``_freeze_stage_one_params``).

    The list is: the video encoder, the four projections, ``sent_embedding``, BERT's embeddings and BERT layers
    ``0 .. stage1_layers - 1`` (12 for ``lfvila-base``; ``model.cfg.text.stage1_layers`` in general). The trailing
    ``\\.`` keeps ``layer.1`` from matching ``layer.10``.
    """
    if not isinstance(stage1_layers, numbers.Integral) or isinstance(stage1_layers, bool) or stage1_layers < 1:
        raise ValueError(f"stage1_layers must be a positive int, got {stage1_layers!r}")
    layers = "|".join(str(i) for i in range(int(stage1_layers)))
    return (
        r"^video_encoder\.",
        r"^video_local_proj\.",
        r"^text_local_proj\.",
        r"^video_global_proj\.",
        r"^text_global_proj\.",
        r"^sent_embedding\.",
        r"^text_encoder\.bert\.embeddings\.",
        rf"^text_encoder\.bert\.encoder\.layer\.(?:{layers})\.",
    )


#: ``stage2_frozen_patterns(12)``: the official stage-2 freezing for the BERT-large split 8 / 12 / 24.
STAGE2_FROZEN: tuple[str, ...] = stage2_frozen_patterns(12)
#: The modules the official stage 2 effectively keeps in eval mode after ``model.train()``: only the video encoder,
#: through ``SwinTransformer3D.train()``. For ``apply_frozen_eval``, when reproducing the official run exactly.
STAGE2_OFFICIAL_EVAL: tuple[str, ...] = (r"^video_encoder\.",)


# ----------------------------------------------------------------------------------------------------- helpers


def _compile(patterns: Iterable[str] | str | None, arg: str) -> list[re.Pattern]:
    if patterns is None:
        return []
    if isinstance(patterns, str):
        raise ValueError(f"{arg} must be a sequence of regexes, not a single string ({patterns!r}); wrap it in a tuple")
    out = []
    for p in patterns:
        if not isinstance(p, str):
            raise ValueError(f"{arg}: patterns must be strings, got {p!r}")
        try:
            out.append(re.compile(p))
        except re.error as e:
            raise ValueError(f"{arg}: invalid regex {p!r}: {e}") from e
    return out


def _matches(regexes: Sequence[re.Pattern], name: str) -> bool:
    return any(r.search(name) for r in regexes)


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_real(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x)


# ------------------------------------------------------------------------------------------------ parameter groups


def param_groups(model: nn.Module, weight_decay: float, *, no_decay: Sequence[str] = DEFAULT_NO_DECAY,
                 exclude: Sequence[str] = ()) -> list[dict]:
    """The official two AdamW groups: ``[{params, names, weight_decay}, {params, names, weight_decay: 0.0}]``.

    Each trainable parameter appears in exactly one group, under its first name. Tied parameters (the MLM decoder's
    weight / bias) are therefore counted once, as with the official ``named_parameters()``. Parameters with
    ``requires_grad=False`` are left out, as are those whose name matches an ``exclude`` regex (official: ``pooler``,
    see ``OFFICIAL_EXCLUDE``). A parameter whose name matches a ``no_decay`` regex goes to the second group. The
    decayed group comes first, as in the official code, and empty groups are dropped. ``names`` is for logging;
    ``torch.optim`` keeps unknown group keys as they are.
    """
    if not _is_real(weight_decay) or weight_decay < 0:
        raise ValueError(f"weight_decay must be a finite number >= 0, got {weight_decay!r}")
    nd = _compile(no_decay, "no_decay")
    ex = _compile(exclude, "exclude")
    decay: dict[str, list] = {"params": [], "names": [], "weight_decay": float(weight_decay)}
    zero: dict[str, list] = {"params": [], "names": [], "weight_decay": 0.0}
    for name, p in unwrap_model(model).named_parameters():  # de-duplicated: a tied Parameter once, first name
        if not p.requires_grad or _matches(ex, name):
            continue
        group = zero if _matches(nd, name) else decay
        group["params"].append(p)
        group["names"].append(name)
    return [g for g in (decay, zero) if g["params"]]


def build_optimizer(model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float] = (0.9, 0.98),
                    eps: float = 1e-8, *, fused: bool | None = None, exclude: Sequence[str] = (),
                    no_decay: Sequence[str] = DEFAULT_NO_DECAY) -> torch.optim.AdamW:
    """AdamW over ``param_groups(model, weight_decay, no_decay=no_decay, exclude=exclude)``.

    Defaults are the official betas (0.9, 0.98) and eps 1e-8. ``fused=None`` (auto) uses the fused CUDA kernel when
    every parameter is on CUDA and ``foreach`` otherwise. ``True`` / ``False`` force it either way.
    """
    if not _is_real(lr) or lr <= 0:
        raise ValueError(f"lr must be a finite number > 0, got {lr!r}")
    if not _is_real(eps) or eps < 0:
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    if (not isinstance(betas, (tuple, list)) or len(betas) != 2
            or not all(_is_real(b) and 0.0 <= b < 1.0 for b in betas)):
        raise ValueError(f"betas must be two numbers in [0, 1), got {betas!r}")
    if fused is not None and not isinstance(fused, bool):
        raise ValueError(f"fused must be None, True or False, got {fused!r}")
    groups = param_groups(model, weight_decay, no_decay=no_decay, exclude=exclude)
    if not groups:
        raise ValueError("model has no trainable parameter left for the optimizer (all frozen or matched by exclude)")
    if fused is None:
        fused = all(p.device.type == "cuda" for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                             fused=fused, foreach=not fused)


# --------------------------------------------------------------------------------------------------- schedules


class LRSchedule:
    """The lr multiplier ``f(s)`` of one parameter group (a picklable ``LambdaLR`` lambda; see ``build_scheduler``).

    ``floor`` is the final multiplier: ``min_lr_ratio`` for ``linear``, ``min_lr / lr`` for ``cosine``.
    """

    def __init__(self, schedule: str, total_steps: int, warmup_steps: int, floor: float = 0.0,
                 step_size: int | None = None, gamma: float | None = None, warmup_prefix: bool = False):
        self.schedule = schedule
        self.total_steps = int(total_steps)
        self.warmup_steps = int(warmup_steps)
        self.floor = float(floor)
        self.step_size = step_size
        self.gamma = gamma
        self.warmup_prefix = bool(warmup_prefix)

    def __call__(self, s: int) -> float:
        T, W = self.total_steps, self.warmup_steps
        if s < W:
            return s / W
        if self.schedule == "constant":
            return 1.0
        if self.schedule == "step":
            t = s - W if self.warmup_prefix else s
            return self.gamma ** (t // self.step_size)
        if s >= T:
            return self.floor
        if self.schedule == "linear":
            return 1.0 - (1.0 - self.floor) * (s - W) / (T - W)
        # cosine
        frac = (s - W) / (T - W) if self.warmup_prefix else s / T
        return self.floor + 0.5 * (1.0 - self.floor) * (1.0 + math.cos(math.pi * frac))


def build_scheduler(optimizer: torch.optim.Optimizer, *, schedule: str, total_steps: int, warmup_steps: int,
                    min_lr_ratio: float = 0.01, min_lr: float | None = None, step_size: int | None = None,
                    gamma: float | None = None, warmup_prefix: bool = False) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-step ``LambdaLR``. Call ``scheduler.step()`` once after every ``optimizer.step()``.

    ``s`` is the number of optimizer steps already taken (``scheduler.last_epoch``). The lr that the ``(s+1)``-th
    ``optimizer.step()`` uses is written ``lr(s)``; ``lr`` is a group's initial lr, ``W = warmup_steps`` and
    ``T = total_steps``. The official trainer's ``step_update(global_step)`` after each step gives the same indexing.

    * warmup, every schedule, ``s < W``: ``lr(s) = lr * s / W``. This is timm's warmup from ``warmup_lr_init = 0``
      (official ``WARMUP_LR: 0.``): ``lr(0) = 0``, and ``lr(W)`` would be the full lr.
    * ``linear`` (official ``LinearLRScheduler``): ``lr(s) = lr * (1 - (1 - r) * (s - W) / (T - W))`` for
      ``W <= s < T``, with ``r = min_lr_ratio`` (official 0.01). So ``lr(T) = r * lr``. Past ``T`` it is held at
      ``r * lr``; the official formula keeps decreasing there, but its trainer never goes past ``T``.
    * ``cosine`` (timm ``CosineLRScheduler``, ``cycle_limit=1``, ``warmup_prefix=False``):
      ``lr(s) = m + (lr - m) * (1 + cos(pi * s / T)) / 2`` for ``W <= s < T``, and ``m`` for ``s >= T``. Here
      ``m = min_lr`` (official ``MIN_LR`` 1e-8 for actnet_qa), or ``min_lr_ratio * lr`` when ``min_lr`` is None.
      Note ``s / T``, not ``(s - W) / (T - W)``: the cosine is measured from step 0, as in timm.
    * ``step`` (timm ``StepLRScheduler``): ``lr(s) = lr * gamma ** (s // step_size)`` for ``s >= W``. The official
      values are ``step_size`` = 5 epochs of steps with ``gamma`` 0.25 (ActivityNet / DiDeMo / QuerYD retrieval), and
      1 epoch with 0.5 (Condensed Movies).
    * ``constant``: ``lr(s) = lr`` for ``s >= W`` (not an official schedule).

    ``warmup_prefix=True`` (not official) measures the cosine / step phases from the end of warmup:
    ``(s - W) / (T - W)`` and ``(s - W) // step_size``. Arguments a schedule does not use are ignored (``min_lr``
    outside cosine, ``step_size`` / ``gamma`` outside step), so a loop may pass all of them.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if not _is_int(total_steps) or total_steps < 1:
        raise ValueError(f"total_steps must be an int >= 1, got {total_steps!r}")
    if not _is_int(warmup_steps) or not 0 <= warmup_steps <= total_steps:
        raise ValueError(f"warmup_steps must be an int in [0, total_steps={total_steps}], got {warmup_steps!r}")
    if not _is_real(min_lr_ratio) or not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"min_lr_ratio must be a number in [0, 1], got {min_lr_ratio!r}")
    if not isinstance(warmup_prefix, bool):
        raise ValueError(f"warmup_prefix must be a bool, got {warmup_prefix!r}")
    base_lrs = [g.get("initial_lr", g["lr"]) for g in optimizer.param_groups]
    if schedule == "step":
        if not _is_int(step_size) or step_size < 1:
            raise ValueError(f"step_size must be an int >= 1 for schedule='step', got {step_size!r}")
        if not _is_real(gamma) or gamma <= 0:
            raise ValueError(f"gamma must be a number > 0 for schedule='step', got {gamma!r}")
    floors = [float(min_lr_ratio)] * len(base_lrs)
    if schedule == "cosine" and min_lr is not None:
        if not _is_real(min_lr) or min_lr < 0:
            raise ValueError(f"min_lr must be a number >= 0, got {min_lr!r}")
        if any(min_lr > lr for lr in base_lrs):
            raise ValueError(f"min_lr={min_lr} exceeds a group's lr {max(base_lrs)}")
        floors = [min_lr / lr if lr > 0 else 0.0 for lr in base_lrs]
    fns = [LRSchedule(schedule, total_steps, warmup_steps, floor, step_size, gamma, warmup_prefix) for floor in floors]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fns)


# --------------------------------------------------------------------------------------------------- freezing


def freeze(model: nn.Module, patterns: Sequence[str], *, strict: bool = True) -> list[str]:
    """Set ``requires_grad=False`` on every parameter whose name matches one of the regexes (``re.search``).

    A tied parameter is frozen for all its names; it is matched if any alias matches. Returns the frozen parameters'
    first names, in ``named_parameters()`` order. ``strict``: a pattern that matches no parameter is an error
    (typos); set it to False to allow that. To keep dropout off in the frozen modules, call ``apply_frozen_eval``
    after every ``model.train()``.
    """
    regexes = _compile(patterns, "patterns")
    model = unwrap_model(model)
    hit_ids: set[int] = set()
    used = [False] * len(regexes)
    for name, p in model.named_parameters(remove_duplicate=False):
        for i, r in enumerate(regexes):
            if r.search(name):
                used[i] = True
                hit_ids.add(id(p))
    if strict:
        unused = [r.pattern for r, u in zip(regexes, used) if not u]
        if unused:
            raise ValueError(f"patterns {unused} match no parameter of {type(model).__name__}")
    names = []
    for name, p in model.named_parameters():
        if id(p) in hit_ids:
            p.requires_grad_(False)
            names.append(name)
    return names


def frozen_eval_patterns(setting: str | Sequence[str], frozen: Sequence[str] | None) -> Sequence[str] | None:
    """The ``patterns`` of :func:`apply_frozen_eval` for the ``train.frozen_eval`` setting: ``all`` -> ``frozen``
    (the regexes given to ``freeze``; None: every wholly frozen module), ``official`` -> :data:`STAGE2_OFFICIAL_EVAL`
    (only the video encoder's frozen modules, as the official ``SwinTransformer3D.train()``), ``none`` -> ``()``
    (nothing: every frozen module follows ``model.train()``, dropout on), a list of regexes -> that list."""
    if isinstance(setting, str):
        table = {"all": frozen, "official": STAGE2_OFFICIAL_EVAL, "none": ()}
        if setting not in table:
            raise ValueError(f"train.frozen_eval: must be all, official, none or a list of regexes, got {setting!r}")
        return table[setting]
    return tuple(setting)


def apply_frozen_eval(model: nn.Module, patterns: Sequence[str] | None = None,
                      setting: str | Sequence[str] = "all") -> list[str]:
    """Put the wholly frozen modules in eval mode. Call it after every ``model.train()``, which would undo it.

    A module qualifies when it has parameters and none of them requires grad. With ``patterns``, its qualified name
    followed by ``"."`` must also match one of them (the same regexes as ``freeze``, e.g. ``^video_encoder\\.``).
    With ``patterns=None``, every qualifying module is switched. An empty ``patterns`` does nothing.
    ``setting`` (``train.frozen_eval``, :func:`frozen_eval_patterns`) picks the patterns used: ``all`` (default)
    ``patterns`` itself, ``official`` only the video encoder (:data:`STAGE2_OFFICIAL_EVAL`), ``none`` nothing, or a
    list of regexes instead of ``patterns``.
    Parameterless modules (dropout, drop-path) follow a frozen ancestor, because ``eval()`` recurses; they are never
    switched on their own, so a dropout inside a trainable block stays active. Returns the names of the outermost
    modules switched to eval.
    """
    patterns = frozen_eval_patterns(setting, patterns)
    if patterns is not None and not len(patterns):
        return []
    regexes = _compile(patterns, "patterns")
    done: list[str] = []
    for name, m in unwrap_model(model).named_modules():
        if not name or any(name.startswith(d + ".") for d in done):
            continue
        params = list(m.parameters())
        if not params or any(p.requires_grad for p in params):
            continue
        if patterns is not None and not _matches(regexes, name + "."):
            continue
        m.eval()
        done.append(name)
    return done
