"""Feature export for analysis (official ``TRAINING.save_feats``, ``tools/trainer_retrieval.py``):
``python -m train.evaluate --save-features DIR``.

The official evaluation saves ``text_global_feats.npy``, ``video_global_feats.npy`` and ``indexes.npy`` (gathered
across ranks, cut to the dataset length). Ours writes, atomically (each file to a temporary name, fsynced, then
renamed; the index file last):

* ``DIR/features.safetensors``: ``video`` float32 ``(N, E)`` (``encode_video(...)["global"]``), ``paragraph``
  float32 ``(N, E)`` (``encode_text(...)["paragraph"]``), both L2-normalised, and ``index`` int64 ``(N,)``, the
  annotation row of each feature row; rows sorted by annotation row, each once, across every rank
  (``lfvila.eval.gather_by_index``). ``N``: the split's samples (fewer only where ``data.on_error`` skipped some).
  These are the tensors the retrieval metric reads: ``paragraph @ video.T`` is its similarity matrix (paragraph
  ``i`` belongs to video ``i``). Metadata: ``task``, ``split``, ``checkpoint``, ``model``, ``rows``, and
  ``index_sha256``, the digest of the index file written with it.
* ``DIR/index.jsonl``: one JSON object per feature row, in row order: ``row``, ``index`` (the annotation row),
  ``video_id``, ``source`` (``"<annotation file>: <line>"``: the paragraph's row).

Only the tasks evaluated by retrieval (``stage1``, ``stage2``, ``retrieval``) have these features; the QA and
classification tasks are refused (:func:`check_exportable`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path

import torch
import torch.distributed as tdist
import torch.nn as nn

from lfvila.config import Config
from lfvila.eval import both_directions, flatten, gather_by_index

from . import data as tdata
from . import dist

__all__ = ["FEATURES_FILE", "INDEX_FILE", "check_exportable", "gather_features", "load_features",
           "retrieval_features", "retrieval_metrics", "save_features"]

FEATURES_FILE = "features.safetensors"
INDEX_FILE = "index.jsonl"


def check_exportable(task) -> None:
    """A ValueError unless ``task`` (a ``train.tasks.Task``) is evaluated by retrieval, i.e. has video and paragraph
    features."""
    from .tasks import evaluate_retrieval

    if task.evaluate is not evaluate_retrieval:
        raise ValueError(f"--save-features: train.task {task.name!r} is evaluated by accuracy and has no retrieval "
                         f"features (video and paragraph embeddings); the export covers stage1, stage2 and retrieval")


def gather_features(local: dict[str, torch.Tensor], index: torch.Tensor, meta: list[dict]
                    ) -> tuple[dict[str, torch.Tensor], torch.Tensor, list[dict]]:
    """Every rank's rows in annotation order, each once (a collective under ``torch.distributed``).

    ``local``: name -> ``(n, ...)`` this rank's rows; ``index`` int64 ``(n,)`` their annotation rows; ``meta``: ``n``
    dicts with ``video_id`` and ``source``. Returns the gathered tensors ``(N, ...)``, the sorted indexes ``(N,)`` and
    one ``{row, index, video_id, source}`` per row: the first occurrence of a repeated index in rank order, as
    ``gather_by_index`` keeps it."""
    if len(meta) != index.numel():
        raise ValueError(f"meta has {len(meta)} entries for {index.numel()} rows")
    gathered, idx = gather_by_index(local, index)
    pairs = list(zip(index.tolist(), ({"video_id": m.get("video_id"), "source": m.get("source")} for m in meta)))
    if tdist.is_available() and tdist.is_initialized() and tdist.get_world_size() > 1:
        every: list = [None] * tdist.get_world_size()
        tdist.all_gather_object(every, pairs)
        pairs = [p for rank in every for p in rank]
    first: dict[int, dict] = {}
    for i, m in pairs:
        first.setdefault(i, m)
    rows = [{"row": r, "index": i, **first[i]} for r, i in enumerate(idx.tolist())]
    return gathered, idx, rows


@torch.no_grad()
def retrieval_features(model: nn.Module, cfg: Config, tok, split: str, env: dist.DistEnv, autocast=None
                       ) -> tuple[dict[str, torch.Tensor], torch.Tensor, list[dict]]:
    """``({"video": (N, E), "paragraph": (N, E)}, index (N,), rows)`` of data split ``split``: the embeddings the
    retrieval evaluation (``train.tasks.evaluate_retrieval``) computes, batch for batch the same calls (each rank its
    disjoint part of the eval loader, fp32, gathered by annotation row: :func:`gather_features`)."""
    was_training = model.training
    model.eval()
    loader = tdata.eval_loader(cfg, tok, split, env.rank, env.world_size)
    video, text, index, meta = [], [], [], []
    for batch in tdata.Prefetcher(loader, env.device):
        if batch is None:
            continue
        with autocast() if autocast is not None else contextlib.nullcontext():
            v = model.encode_video(batch["video"])["global"]
            t = model.encode_text(batch["text_ids"], batch["text_mask"], batch["sentence_real"])["paragraph"]
        video.append(v.float())
        text.append(t.float())
        index.append(batch["index"])
        meta.extend(batch["meta"])
    model.train(was_training)
    d = model.cfg.embed_dim
    local = {"video": torch.cat(video) if video else torch.zeros(0, d, device=env.device),
             "paragraph": torch.cat(text) if text else torch.zeros(0, d, device=env.device)}
    idx = torch.cat(index) if index else torch.zeros(0, dtype=torch.long, device=env.device)
    return gather_features(local, idx, meta)


def retrieval_metrics(feats: dict[str, torch.Tensor]) -> dict:
    """The retrieval metrics of exported features (``t2v_*`` / ``v2t_*``, as ``evaluate_retrieval``)."""
    return flatten(both_directions((feats["paragraph"] @ feats["video"].T).cpu()))


def save_features(directory, feats: dict[str, torch.Tensor], index: torch.Tensor, rows: list[dict],
                  metadata: dict[str, str] | None = None) -> Path:
    """Write ``features.safetensors`` and ``index.jsonl`` into ``directory`` (created), atomically (see the module
    docstring); returns the directory. Call it on one rank."""
    from safetensors.torch import save_file

    from lfvila.models.weights import fsync_dir, write_file  # the model library: only when writing

    n = index.numel()
    if {k: tuple(v.shape[:1]) for k, v in feats.items()} != {"video": (n,), "paragraph": (n,)} or len(rows) != n:
        raise ValueError(f"save_features: video, paragraph, index and rows must have {n} rows each, got "
                         f"{ {k: tuple(v.shape) for k, v in feats.items()} } and {len(rows)} rows")
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows)
    tensors = {"video": feats["video"].detach().float().cpu().contiguous(),
               "paragraph": feats["paragraph"].detach().float().cpu().contiguous(),
               "index": index.detach().to(torch.int64).cpu().contiguous()}
    meta = {**(metadata or {}), "rows": str(n), "index_sha256": hashlib.sha256(text.encode()).hexdigest()}
    tmp_features, tmp_index = out / f".{FEATURES_FILE}.tmp", out / f".{INDEX_FILE}.tmp"

    def write_index(path: Path) -> None:
        path.write_text(text, encoding="utf-8")

    try:
        write_file(tmp_features, lambda p: save_file(tensors, str(p), metadata=meta))
        write_file(tmp_index, write_index)
        os.replace(tmp_features, out / FEATURES_FILE)
        os.replace(tmp_index, out / INDEX_FILE)
        fsync_dir(out)
    finally:
        for tmp in (tmp_features, tmp_index):
            tmp.unlink(missing_ok=True)
    return out


def load_features(directory) -> tuple[dict[str, torch.Tensor], list[dict], dict[str, str]]:
    """``(tensors, rows, metadata)`` of a :func:`save_features` directory; a ValueError naming the file when the
    index file is not the one written with the features."""
    from safetensors import safe_open

    path = Path(directory) / FEATURES_FILE
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        metadata = f.metadata() or {}
    text = (Path(directory) / INDEX_FILE).read_text(encoding="utf-8")
    if hashlib.sha256(text.encode()).hexdigest() != metadata.get("index_sha256"):
        raise ValueError(f"{Path(directory) / INDEX_FILE}: not the index written with {path}")
    return tensors, [json.loads(line) for line in text.splitlines()], metadata
