"""Video QA fine-tuning from a stage-2 checkpoint: How2QA (multiple choice with the span loss), VIOLIN and
ActivityNet-QA (classification).

    python -m train.finetune_qa --config train/configs/how2qa.yaml [--model.init ...] [--run.dir ...]
    python -m train.finetune_qa --config train/configs/violin_qa.yaml --train.batch_size 12
    torchrun --nproc_per_node 8 -m train.finetune_qa --config train/configs/actnet_qa.yaml

The best checkpoint is chosen by accuracy on ``eval.split`` (a validation split) and reported on
``eval.test_split``; accuracy counts every example once across ranks. Offline on synthetic data (lfvila-tiny):

    python -m lfvila.data.synthetic data/synthetic && python -m lfvila.data.synthetic_qa data/synthetic
    python -m train.finetune_qa --config train/configs/how2qa.yaml --model.name lfvila-tiny-multichoice \\
        --model.init '[]' --data.video_root data/synthetic/videos --data.train data/synthetic/qa/how2qa_train.jsonl \\
        --data.val data/synthetic/qa/how2qa_val.jsonl --data.test data/synthetic/qa/how2qa_test.jsonl \\
        --data.vocab data/synthetic/vocab.txt --data.size '[64, 96]' --data.frames_per_clip 2 --data.max_len 8 ...
"""

from __future__ import annotations

from .cli import parse
from .loop import Trainer
from .tasks import QA_TASKS


def main(argv: list[str] | None = None) -> dict:
    cfg, _ = parse(argv, "python -m train.finetune_qa", __doc__, task=QA_TASKS)
    return Trainer(cfg).fit()


if __name__ == "__main__":
    main()
