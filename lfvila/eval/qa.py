"""QA / classification accuracy, counting every example exactly once (also across ranks).

Shapes (torch or numpy):

* ``outputs``  float logits (N, C) (C answer classes for open-ended QA such as ActivityNet-QA, or C candidate answers
  for multiple choice such as How2QA / VIOLIN: the same metric), or int predictions (N,).
* ``labels``   int (N,).
* ``index``    int64 (N,) dataset indices, for the distributed case (see :func:`qa_metrics`).

Every example counts: a label the model cannot predict (an out-of-vocabulary answer encoded as -1 or -100, say)
is simply wrong, unless ``ignore_index`` names it, in which case those rows are left out of both counts.

The official trainers (``tools/trainer_qa_*.py``) all-gathered the per-batch accuracies of every rank and averaged
them. That is biased twice: the sampler pads the last round with repeated examples, which are counted again, and a
short last batch weighs as much as a full one. Here each rank keeps its per-example correctness, :func:`qa_metrics`
gathers it with :func:`~lfvila.eval.distributed.gather_by_index` (duplicates removed) and divides the number of
correct examples by the number of distinct examples.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch

from .distributed import gather_by_index

__all__ = ["accuracy", "correct", "predictions_of", "qa_metrics", "qa_predictions"]


def _tensor(x) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))


def predictions_of(outputs) -> torch.Tensor:
    """int64 (N,): ``argmax(-1)`` of float logits (N, C), or the int predictions (N,) themselves."""
    out = _tensor(outputs)
    if out.is_floating_point():
        if out.ndim != 2:
            raise ValueError(f"logits must be (N, C), got shape {tuple(out.shape)}")
        return out.argmax(dim=-1)
    if out.ndim != 1:
        raise ValueError(f"integer predictions must be (N,), got shape {tuple(out.shape)}")
    return out.to(torch.int64)


def correct(outputs, labels, ignore_index: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(bool (N,) prediction == label, bool (N,) counted): the per-example result to gather across ranks."""
    pred = predictions_of(outputs)
    lab = _tensor(labels).reshape(-1).to(device=pred.device, dtype=torch.int64)
    if lab.numel() != pred.numel():
        raise ValueError(f"{pred.numel()} predictions but {lab.numel()} labels")
    counted = torch.ones_like(lab, dtype=torch.bool) if ignore_index is None else lab != ignore_index
    return (pred == lab) & counted, counted


def accuracy(outputs, labels, ignore_index: int | None = None) -> float:
    """Fraction in [0, 1] of correct examples (logits (N, C) or predictions (N,) against labels (N,)); NaN if none."""
    ok, counted = correct(outputs, labels, ignore_index)
    n = int(counted.sum())
    return float(ok.sum()) / n if n else float("nan")


def qa_metrics(outputs, labels, index=None, ignore_index: int | None = None, group=None,
               num_samples: int | None = None) -> dict[str, float]:
    """``{"acc": percent, "n": examples counted}``.

    Without ``index``: this process's examples, as given. With ``index`` (N,) (the loader batch's ``index``
    concatenated over batches): the examples of every rank of ``torch.distributed`` (or of this process alone
    when it is not initialised) are gathered and each dataset index is counted once; every rank gets the same
    result. ``num_samples`` checks that the gathered indices are exactly ``0 .. num_samples - 1``.
    """
    ok, counted = correct(outputs, labels, ignore_index)
    if index is not None:
        gathered, _ = gather_by_index({"correct": ok, "counted": counted}, _tensor(index).to(ok.device), group=group,
                                      num_samples=num_samples)
        ok, counted = gathered["correct"], gathered["counted"]
    n = int(counted.sum())
    return {"acc": 100.0 * float(ok.sum()) / n if n else float("nan"), "n": n}


def _qa_forward(model, batch: dict) -> dict:
    return model(batch["video"], batch["text_ids"], batch["text_mask"], real=batch["sentence_real"])


@torch.no_grad()
def qa_predictions(model, batches, target: str, autocast=None, device=None, forward=None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run a QA model (``LFVILAForMultipleChoice`` / ``LFVILAForClassification``: ``model(video, ids, mask,
    real=...)["logits"]``, (B, C) either way) over ``batches`` (device batches of ``lfvila.data.loader`` in a QA mode;
    ``None`` entries, all-skipped batches, are passed over) -> ``(predictions int64 (N,), labels int64 (N,), index
    int64 (N,))`` with the labels read from ``batch[target]`` (``"answer"`` or ``"label"``). ``forward(model, batch)``
    replaces that call for other models (video classification: ``model(batch["video"])``). ``autocast``: a
    context-manager factory (None: none). A rank without batches returns empty tensors on ``device``, ready for
    :func:`qa_metrics` (a collective every rank must join)."""
    forward = _qa_forward if forward is None else forward
    preds, labels, index = [], [], []
    for batch in batches:
        if batch is None:
            continue
        with autocast() if autocast is not None else contextlib.nullcontext():
            out = forward(model, batch)
        preds.append(predictions_of(out["logits"].float()))
        labels.append(batch[target].reshape(-1).to(torch.int64))
        index.append(batch["index"])

    def cat(parts):
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64, device=device)

    return cat(preds), cat(labels), cat(index)
