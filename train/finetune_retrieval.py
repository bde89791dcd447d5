"""Paragraph-to-video retrieval fine-tuning (ActivityNet Captions, DiDeMo, QuerYD, Condensed Movies): VPC only.

    python -m train.finetune_retrieval --config train/configs/actnet_ret.yaml [--model.init ...] [--run.dir ...]
    torchrun --nproc_per_node 8 -m train.finetune_retrieval --config train/configs/didemo_ret.yaml

The best checkpoint is chosen on ``eval.split`` (a validation split) and reported on ``eval.test_split``.
"""

from __future__ import annotations

from .cli import parse
from .loop import Trainer


def main(argv: list[str] | None = None) -> dict:
    cfg, _ = parse(argv, "python -m train.finetune_retrieval", __doc__, task="retrieval")
    return Trainer(cfg).fit()


if __name__ == "__main__":
    main()
