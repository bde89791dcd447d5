"""Evaluation as the LF-VILA paper reports it: paragraph<->video retrieval (R@K, MdR, MnR) and QA accuracy, with
per-example results gathered across ranks by dataset index (each example counted once).

Typical use under ``torch.distributed`` (each rank evaluates its own shard)::

    feats, idx = gather_by_index({"text": text_feats, "video": video_feats}, batch_indices)  # (N, D) each
    metrics = flatten(both_directions(feats["text"].float() @ feats["video"].float().T))  # {"t2v_R@1": ...}
"""

from .distributed import gather_by_index, sort_unique_by_index
from .qa import accuracy, correct, predictions_of, qa_metrics
from .retrieval import TIE_MODES, both_directions, flatten, rank_of_matches, retrieval_metrics

__all__ = [
    "TIE_MODES",
    "accuracy",
    "both_directions",
    "correct",
    "flatten",
    "gather_by_index",
    "predictions_of",
    "qa_metrics",
    "rank_of_matches",
    "retrieval_metrics",
    "sort_unique_by_index",
]
