"""A model from its configuration section: ``build_model(cfg.model)`` (``lfvila.config.ModelConfig``).

The one place where a configured model is made, for training, evaluation and the demo alike:

1. the variant's config (``model.name``: a name of ``lfvila.models.list_models()`` or an alias of ``list_aliases()``,
   whose preset comes first) with ``model.overrides`` applied, nested dicts into nested config dataclasses
   (``registry.with_overrides``; an unknown key raises naming it);
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
    if not registry.is_registered(model_cfg.name):
        raise ValueError(f"model.name: unknown model {model_cfg.name!r} (known: {', '.join(registry.list_models())}; "
                         f"aliases: {', '.join(registry.list_aliases())})")
    model = registry.build(model_cfg.name, model_config_from(model_cfg))
    convert.apply_init(model, model_cfg.init)
    return model


def check_data_shapes(model_cfg, data_cfg) -> None:
    """The data section's shapes against the model's, once, at config load (``lfvila.config.load_config``): a
    ValueError naming both keys instead of a shape error deep in the first step. For a full model, with ``T =
    data.clips x data.frames_per_clip`` frames:

    * ``T`` splits into the model's ``num_clips`` clips (its clip features average ``T / num_clips`` frames);
    * a model that fuses video into the text (stage 2, QA) has a position for every frame: ``T <=
      text.num_frames``;
    * a model with a text tower has a position for every token: ``data.max_len <= text.max_position_embeddings``
      per sentence and ``data.sentences x data.max_len`` of them per paragraph, and a sentence embedding for every
      sentence: ``data.sentences <= text.sent_type_vocab``.
    """
    mcfg = model_config_from(model_cfg)
    if not hasattr(mcfg, "text"):  # the video encoder alone: any frame count
        return
    cls = registry.model_class(model_cfg.name)
    frames = data_cfg.clips * data_cfg.frames_per_clip
    where = f"data.clips x data.frames_per_clip = {data_cfg.clips} x {data_cfg.frames_per_clip} = {frames} frames"
    if getattr(cls, "projections", ()) and frames % mcfg.num_clips:
        raise ValueError(f"{where} do not split into the model's {mcfg.num_clips} clips (model.overrides.num_clips)")
    fusion = getattr(cls, "fusion", None)
    if (mcfg.stage == 2 if fusion is None else fusion) and frames > mcfg.text.num_frames:
        raise ValueError(f"{where} exceed the model's {mcfg.text.num_frames} frame positions "
                         f"(model.overrides.text.num_frames)")
    if not getattr(cls, "text_tower", True):
        return
    positions = mcfg.text.max_position_embeddings
    if data_cfg.max_len > positions:
        raise ValueError(f"data.max_len = {data_cfg.max_len} tokens exceed the model's {positions} positions "
                         f"(model.overrides.text.max_position_embeddings)")
    if data_cfg.sentences * data_cfg.max_len > positions:
        raise ValueError(f"data.sentences x data.max_len = {data_cfg.sentences} x {data_cfg.max_len} paragraph tokens "
                         f"exceed the model's {positions} positions (model.overrides.text.max_position_embeddings)")
    if data_cfg.sentences > mcfg.text.sent_type_vocab:
        raise ValueError(f"data.sentences = {data_cfg.sentences} exceed the model's {mcfg.text.sent_type_vocab} "
                         f"sentence embeddings (model.overrides.text.sent_type_vocab)")

