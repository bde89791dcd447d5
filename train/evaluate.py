"""Evaluate a checkpoint on a data split: retrieval (R@K, MdR, MnR both ways) or accuracy, by ``train.task``.

    python -m train.evaluate --config train/configs/actnet_ret.yaml --checkpoint runs/actnet_ret/best [--split test]
    python -m train.evaluate --config train/configs/how2qa.yaml --checkpoint runs/how2qa/best --split val
    torchrun --nproc_per_node 8 -m train.evaluate --config ... --checkpoint pretrained/lfvila_stage1.bin

``--checkpoint``: a ``save_pretrained`` directory (``runs/X/best``), a training checkpoint directory
(``runs/X/checkpoints/step_N``), or an official / state-dict file (``.bin`` read with ``weights_only=True``,
``.safetensors``). The model is built from the config (``model.name``, ``model.overrides``). Tasks ``multichoice``,
``classification`` and ``video_classification`` report ``acc`` (percent) and ``n`` (examples, each counted once
across ranks); the others report retrieval metrics. Prints the metrics as JSON and writes them to ``--out`` when given.

``--save-features DIR`` (retrieval-evaluated tasks: ``stage1``, ``stage2``, ``retrieval``; the official
``save_feats``): also writes the video and paragraph features of the split, the very tensors the printed metrics are
computed from, in annotation order, to ``DIR/features.safetensors`` with ``DIR/index.jsonl`` (row -> annotation row,
video id, source row); the format: ``train.features``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from lfvila.models import convert
from lfvila.models.factory import build_model

from . import dist, features
from .cli import parse
from .tasks import check_task, get_task


def main(argv: list[str] | None = None) -> dict:
    extra = argparse.ArgumentParser(add_help=False)
    extra.add_argument("--checkpoint", required=True)
    extra.add_argument("--split", default="test")
    extra.add_argument("--out", default=None)
    extra.add_argument("--save-features", default=None, metavar="DIR")
    known, rest = extra.parse_known_args(argv)
    cfg, _ = parse(rest, "python -m train.evaluate", __doc__)
    cfg.model.init = []
    task = get_task(cfg.train.task)
    if known.save_features:
        features.check_exportable(task)
    env = dist.init(cfg.run.device)
    model = build_model(cfg.model)
    if task.select is not None:  # the model must have the task's head and eval.select must be acc
        check_task(cfg, model)
    path = Path(known.checkpoint)
    if path.is_dir():
        path = path / "model.safetensors"
    convert.load_checkpoint(model, path)
    model.to(env.device)
    autocast = None
    if env.device.type == "cuda" and cfg.train.precision in ("auto", "bf16"):
        autocast = lambda: torch.autocast("cuda", dtype=torch.bfloat16)  # noqa: E731
    tok = task.tokenizer(cfg, model)
    if known.save_features:
        feats, index, rows = features.retrieval_features(model, cfg, tok, known.split, env, autocast)
        metrics = features.retrieval_metrics(feats)
        if env.is_main:
            features.save_features(known.save_features, feats, index, rows,
                                   {"task": cfg.train.task, "split": known.split, "model": cfg.model.name,
                                    "checkpoint": str(known.checkpoint)})
        dist.barrier()
    else:
        metrics = task.evaluate(model, cfg, tok, known.split, env, autocast)
    if env.is_main:
        text = json.dumps({"checkpoint": str(known.checkpoint), "split": known.split, "task": cfg.train.task,
                           **metrics}, indent=2)
        print(text)
        if known.out:
            Path(known.out).write_text(text)
    dist.cleanup()
    return metrics


if __name__ == "__main__":
    main()
