"""LF-VILA pre-training, stage 1 (VPC + MTC) or stage 2 (MLM + VTM on the frozen stage-1 encoders).

    python -m train.pretrain --config train/configs/pretrain_stage1.yaml [--train.lr 1e-4 --run.dir runs/s1 ...]
    python -m train.pretrain --config train/configs/pretrain_stage2.yaml --model.init '[{kind: bert, path: ...}, ...]'
    torchrun --nproc_per_node 8 -m train.pretrain --config train/configs/pretrain_stage1.yaml    # DDP, 8 GPUs
    torchrun --nnodes 4 --nproc_per_node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 -m train.pretrain ...
    python -m train.pretrain --config ... --train.distributed fsdp                                # FSDP2

``--run.resume auto`` (the default) continues from the newest complete checkpoint in ``run.dir``.
"""

from __future__ import annotations

from .cli import parse
from .loop import Trainer


def main(argv: list[str] | None = None) -> dict:
    cfg, _ = parse(argv, "python -m train.pretrain", __doc__, task=("stage1", "stage2"))
    return Trainer(cfg).fit()


if __name__ == "__main__":
    main()
