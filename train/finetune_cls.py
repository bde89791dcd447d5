"""Long-form video classification fine-tuning from a stage-1 checkpoint: COIN (180 tasks), LVU relationship (4),
scene (6) and way of speaking (5); CE on the video alone (``LFVILAForVideoClassification``, no text).

    python -m train.finetune_cls --config train/configs/coin_cls.yaml [--model.init ...] [--run.dir ...]
    torchrun --nproc_per_node 8 -m train.finetune_cls --config train/configs/lvu_scene_cls.yaml

The best checkpoint is chosen by accuracy on ``eval.split`` (each example counted once across ranks). Offline on
synthetic data (lfvila-tiny):

    python -m lfvila.data.synthetic data/synthetic && python -m lfvila.data.synthetic_cls data/synthetic
    python -m train.finetune_cls --config train/configs/demo_video_cls.yaml
"""

from __future__ import annotations

from .cli import parse
from .loop import Trainer


def main(argv: list[str] | None = None) -> dict:
    cfg, _ = parse(argv, "python -m train.finetune_cls", __doc__, task="video_classification")
    return Trainer(cfg).fit()


if __name__ == "__main__":
    main()
