"""A model from its configuration section: ``build_model(cfg.model)`` (``lfvila.config.ModelConfig``).

The one place where a configured model is made, for training, evaluation and the demo alike:

1. the variant's config (``model.name``, ``lfvila.models.list_models()``) with ``model.overrides`` applied, nested
   dicts into nested config dataclasses (``registry.with_overrides``; an unknown key raises naming it);
2. the implementation and memory switches, explicit fields of the model's own config (never the environment):
   ``attn_impl`` and ``grad_checkpointing`` in the video encoder's, ``loss_impl`` in a full model's (the losses'
   ``impl=``);
3. the module, then the ``model.init`` chain in order (``convert.apply_init``).

The model is on the CPU, in fp32, not wrapped (DDP / FSDP2 and ``torch.compile`` are the trainer's).
"""

from __future__ import annotations

import dataclasses

import torch.nn as nn

from . import convert, registry


def model_config_from(model_cfg):
    """The variant's config dataclass for ``model_cfg`` (steps 1 and 2 above)."""
    mcfg = registry.with_overrides(registry.model_config(model_cfg.name), model_cfg.overrides, "model.overrides")
    video = {"attn_impl": model_cfg.attn_impl, "grad_checkpointing": model_cfg.grad_checkpointing}
    if hasattr(mcfg, "video"):  # a full model: video encoder, text encoder and the losses
        return dataclasses.replace(mcfg, video=dataclasses.replace(mcfg.video, **video),
                                   loss_impl=model_cfg.loss_impl)
    return dataclasses.replace(mcfg, **video)  # the video encoder alone


def build_model(model_cfg) -> nn.Module:
    """The configured model with its init steps applied (see the module docstring)."""
    if model_cfg.name not in registry.list_models():
        raise ValueError(f"model.name: unknown model {model_cfg.name!r} (known: {', '.join(registry.list_models())})")
    model = registry.build(model_cfg.name, model_config_from(model_cfg))
    convert.apply_init(model, model_cfg.init)
    return model
