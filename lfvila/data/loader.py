"""Batches of (video, text) for LF-VILA: a ``torch.utils.data.DataLoader`` with PyAV decoding in its workers.

One sample: the annotation (``datasets.AnnotationDataset``), frame indices from ``sampling`` (eval: uniform; train:
jittered; ``sampling="clips"``: clip i inside sentence i's span, the sentences first merged to ``M`` so that clip i and
sentence i stay paired), the frames decoded exactly (``decode``), the official augmentation on uint8 frames, and the
text tokenised to ``M`` segments of ``L`` tokens (``text``).

Rows with one file per clip (``lfvila_pretrain``: clip k's file and clip k's own transcript): a window of ``clips``
consecutive clips is taken, the official pretraining rule (:func:`plan_clips`): train a start drawn uniformly from
every valid start (``sampling.consecutive_clip_start``; the official ``range(len - clips)`` never drew the last one),
eval start 0, and the clip files and their sentences are cut with the same ``[start:start + clips]``, so sentence i is
the transcript of the clip whose frames sit at position i. Each clip gives ``frames_per_clip`` frames (eval uniform,
train jittered). A row with fewer clips than ``clips`` takes all of them, repeats its last clip's frames to fill the
positions and pads the sentences. ``meta["clip_start"]`` is the window's start, ``meta["clips"]`` the files decoded.

``LoaderConfig.mode`` picks what the text is (``"auto"``: from the annotation samples, see :func:`sample_mode`):

* ``"paragraph"`` (pre-training, retrieval): the paragraph, merged to ``M`` sentences. Batch on the CPU (pinned
  when ``pin_memory``)::

    video          uint8 (B, T, H, W, C)    T = clips * frames_per_clip, (H, W) = size (default 32, 192, 320)
    text_ids       int64 (B, M, L)          [CLS] ... [SEP] [PAD]...; padding sentences all zero
    text_mask      int64 (B, M, L)
    sentence_real  bool  (B, M)
    index          int64 (B,)               the annotation index (to gather eval results across ranks)
    meta           list of dicts            video_id, video path, frame indices, source row

* ``"multichoice"`` (How2QA): per candidate answer c the segments ``[question, answer_c, subtitles...]``, the
  subtitles merged to ``M - 2`` by the same shortest-pair rule (official: M = 8, 6 subtitles, L = 50)::

    text_ids / text_mask  int64 (B, C, M, L)   C candidate answers
    sentence_real         bool  (B, C, M)
    answer                int64 (B,)           index of the correct candidate
    span_labels           int64 (B, T)         1 on the sampled frames inside the question's span
    span_weights          float32 (B, T)       class-balanced weights (``losses.span_frame_labels``)

* ``"classification"`` (ActivityNet-QA, VIOLIN): segments ``[question or statement, subtitles...]``, the subtitles
  merged to ``M - 1`` (official: ActivityNet-QA M = 1, L = 50; VIOLIN M = 5, L = 30)::

    text_ids / text_mask  int64 (B, M, L)
    sentence_real         bool  (B, M)
    label                 int64 (B,)           the class

* ``"video"`` (COIN, LVU video classification, ``lfvila_video_cls``: a ``label`` and no text): no text tensors at all
  (no tokenizer needed), ``label`` int64 (B,) the class.

QA and video samples always take ``T`` frames over the whole video, as the official QA loaders (eval uniform, train
jittered), whatever ``sampling`` says: the clip-aligned rule pairs clips with paragraph sentences, which QA text is
not. The span labels use the sampled frames' true display times (the official code assumed 3 fps).

``to_model_input(batch, device)`` moves it to the device, the video still uint8 ``(B, T, H, W, C)``: the model
normalises it there (ImageNet mean/std; ``VideoEncoder.normalize``, the one place where frames are normalised and
turned channels-first).

A bad video (missing, corrupt or truncated file, clips of different sizes, ...) is handled by ``on_error``:

* ``"raise"`` (default): a :class:`~lfvila.data.decode.DecodeError` naming the file.
* ``"skip"``: logged (file and reason) and counted (``dataset.skips``); its sample is dropped from the batch, which
  is then smaller (``None`` when nothing is left).
* ``"replace"`` (training only; the pretraining configs' default): logged and counted as a skip, then replaced, as the
  official pretraining dataset does, by another sample so that the batch keeps its size. The replacement of index
  ``i`` is drawn from ``(seed, epoch, i, attempt)`` alone (:func:`replacement_index`), never from what was loaded
  before, so it is the same in every worker, with any ``num_workers`` and in a resumed run; its jitter / crop / flip
  / clip window come from their own stream (:func:`replacement_rng`), so it is not a copy of that index's own
  sample. ``meta["replaced"]`` is the index it replaces (``index`` is its own); every failed attempt is another
  counted skip; after ``replace_attempts`` failed attempts the sample is dropped as under ``"skip"``. Evaluation
  never replaces (a duplicate would bias the metrics): ``LoaderConfig`` refuses ``"replace"`` without ``train``.

``max_skip_fraction`` stops a run with too many skips (:class:`~lfvila.data.decode.TooManySkipsError`; counted per
process, i.e. per DataLoader worker).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from . import decode as decoding
from .augment import augment, resize
from .formats import AnnotationDataset
from .samplers import build_sampler
from .sampling import Segment, clip_indices, consecutive_clip_start, jittered_indices, merge_segments, uniform_indices
from .seeded import SeededDataLoader, loader_seed  # noqa: F401  (loader_seed: re-exported)
from .spec import ON_ERROR, SampleSpec  # noqa: F401  (ON_ERROR: re-exported)
from .text import encode_sentences, tokenize_paragraph

MODES = ("auto", "paragraph", "multichoice", "classification", "video")
_REPLACE_INDEX, _REPLACE_DRAWS = 0x5E1EC7, 0x4EF111  # non-zero tags: seed streams of their own (module docstring)
_QA_KEYS = {"answer": torch.int64, "label": torch.int64, "span_labels": torch.int64, "span_weights": torch.float32}
log = logging.getLogger(__name__)


@dataclass
class LoaderConfig(SampleSpec):
    """What a loader produces: the sample (:class:`~lfvila.data.spec.SampleSpec`, shared with the run config's
    ``data`` section) and the loader's own settings. ``train``: training draws (jitter, crop, flip) or evaluation;
    ``augment``: False resizes frames to ``size`` only (no crop / flip), for checks and visualisation; ``backend``:
    the decoder (``lfvila.data.decode``); ``replace_attempts``: the replacements tried for one bad sample under
    ``on_error="replace"`` (module docstring); ``seed``: every per-sample draw comes from ``(seed, epoch, index)``;
    ``mode``: ``"auto"``, ``"paragraph"``, ``"multichoice"``, ``"classification"`` or ``"video"`` (module
    docstring); ``sentences`` is M, the number of text segments, in every mode."""

    train: bool = False
    augment: bool = True
    backend: str = "pyav"
    replace_attempts: int = 3
    seed: int = 0
    mode: str = "auto"

    def __post_init__(self):
        super().__post_init__()
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.on_error == "replace" and not self.train:
            raise ValueError("on_error='replace' is for training only: evaluation must not replace samples (a "
                             "duplicate would bias the metrics); use 'skip' or 'raise'")
        if isinstance(self.replace_attempts, bool) or int(self.replace_attempts) != self.replace_attempts \
                or self.replace_attempts < 1:
            raise ValueError(f"replace_attempts must be a positive integer, got {self.replace_attempts!r}")


def _whole_video(num_frames: int, cfg: LoaderConfig, rng: np.random.Generator) -> list[int]:
    """``cfg.frames`` indices over the whole video: jittered for training, uniform for evaluation."""
    if cfg.train:
        return jittered_indices(num_frames, cfg.frames, rng)
    return uniform_indices(num_frames, cfg.frames)


def plan_frames(path, segments, cfg: LoaderConfig, rng: np.random.Generator) -> list[int]:
    """The frame indices of one single-file video under ``cfg``'s sampling rule (probes the file for its length and
    frame rate; ``segments`` already merged to ``cfg.sentences``). Shared by the DataLoader and DALI paths."""
    info = decoding.probe(path)
    if cfg.sampling == "clips":
        return clip_indices(info.num_frames, info.fps, segments, cfg.clips, cfg.frames_per_clip, cfg.train, rng)
    return _whole_video(info.num_frames, cfg, rng)


@dataclass(frozen=True)
class ClipPlan:
    """What to decode for one row with a file per clip (:func:`plan_clips`). ``start``: index of the window's first
    clip in the row; ``files`` / ``frames``: ``cfg.clips`` clip files and each one's frame indices, position i being
    clip ``start + i`` (a row with fewer clips repeats its last file and frames); ``segments``: the window's
    sentences merged / padded to ``cfg.sentences`` (sentence i is clip ``start + i``'s own text)."""

    start: int
    files: list[str]
    frames: list[list[int]]
    segments: list[Segment]


def plan_clips(sample: dict, cfg: LoaderConfig, rng: np.random.Generator) -> ClipPlan:
    """The clip window and frame indices of an official pretraining row (``sample["clips"]``, one file per clip,
    ``sample["segments"]`` one sentence per clip), the rule of the official ``PreTrainDataset.__getitem__``: train a
    random start (:func:`~lfvila.data.sampling.consecutive_clip_start`, every valid start), eval start 0; clips and
    sentences cut with the same ``[start:start + cfg.clips]``. Each window clip is probed for its length and gives
    ``cfg.frames_per_clip`` indices (eval uniform, train jittered). Draws from ``rng`` in this order: the start (only
    when the row has more than ``cfg.clips`` clips), then each clip's jitter. Shared by the DataLoader and DALI paths.
    A clip that cannot be probed raises its :class:`~lfvila.data.decode.DecodeError`."""
    clips, segments = list(sample["clips"]), list(sample["segments"])
    if len(segments) != len(clips):
        raise ValueError(f"{sample['source']}: {len(clips)} clip files but {len(segments)} sentences (one per clip)")
    start = consecutive_clip_start(len(clips), cfg.clips, rng, train=cfg.train)
    window = clips[start : start + cfg.clips]
    frames = []
    for path in window:
        n = decoding.probe(path).num_frames
        frames.append(jittered_indices(n, cfg.frames_per_clip, rng) if cfg.train
                      else uniform_indices(n, cfg.frames_per_clip))
    pad = cfg.clips - len(window)  # fewer clip files than clips: repeat the last one (documented)
    return ClipPlan(start, window + [window[-1]] * pad, frames + [frames[-1]] * pad,
                    merge_segments(segments[start : start + cfg.clips], cfg.sentences))


def fetch_sample(annotations, index: int, skips: decoding.SkipCounter) -> dict | None:
    """``annotations[index]``, or ``None`` (counted by ``skips``, logged) for a stored row that cannot be parsed when
    it is read (a ValueError such as the ``AnnotationError`` of a bad LMDB row, naming it); under
    ``on_error="raise"`` that error propagates unchanged."""
    try:
        return annotations[index]
    except ValueError as e:
        if skips.on_error == "raise":
            raise
        skips.skip(f"{getattr(annotations, 'annotation_path', 'annotations')} (index {index})", e)
        return None


def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The generator of sample ``index``'s random draws (jitter, crop, flip, clip window) in ``epoch``."""
    return np.random.default_rng((seed, epoch, index))


def replacement_index(n: int, index: int, seed: int, epoch: int, attempt: int) -> int | None:
    """The index that replaces bad sample ``index`` of a dataset of ``n`` at ``attempt`` (1, 2, ...) in ``epoch``
    (``on_error="replace"``): uniform over the other ``n - 1`` indices, drawn from ``(seed, epoch, index, attempt)``
    only, so every worker, loader and resumed run picks the same one. ``None`` when there is no other index."""
    if n < 2:
        return None
    r = int(np.random.default_rng((seed, epoch, index, _REPLACE_INDEX, attempt)).integers(0, n - 1))
    return r + (r >= index)


def replacement_rng(seed: int, epoch: int, index: int, replaced: int) -> np.random.Generator:
    """The generator of the random draws of sample ``index`` loaded as the replacement of ``replaced``: a stream of
    its own (not :func:`sample_rng`), so the replacement is not a copy of ``index``'s own sample of the epoch."""
    return np.random.default_rng((seed, epoch, index, _REPLACE_DRAWS, replaced))


def load_replacement(load, n: int, index: int, cfg: LoaderConfig, epoch: int, where):
    """``on_error="replace"``: the replacement of bad sample ``index`` of ``n``, as ``(other index, what
    load(other, rng) returned)``, trying :func:`replacement_index` for attempts ``1 .. cfg.replace_attempts`` with
    :func:`replacement_rng`; ``load`` returns ``None`` for a sample that fails too (it counts that). ``None`` when
    every attempt failed. Each outcome is logged, naming ``where`` (the annotation file). Both loaders use it."""
    for attempt in range(1, cfg.replace_attempts + 1):
        other = replacement_index(n, index, cfg.seed, epoch, attempt)
        if other is None:
            break
        got = load(other, replacement_rng(cfg.seed, epoch, other, index))
        if got is not None:
            log.warning("%s: index %d (epoch %d) replaced by index %d (attempt %d)", where, index, epoch, other,
                        attempt)
            return other, got
    log.warning("%s: index %d (epoch %d): no replacement loaded in %d attempt(s); dropped from its batch", where,
                index, epoch, cfg.replace_attempts)
    return None


def load_or_replace(load, n: int, index: int, cfg: LoaderConfig, epoch: int, where) -> dict | None:
    """Sample ``index`` of a map-style dataset: ``load(index, sample_rng(seed, epoch, index))``, and under
    ``on_error="replace"`` a failed one replaced by :func:`load_replacement` (``meta["replaced"]`` the index it
    stands for); ``None`` for a sample skipped or not replaced. ``VideoTextDataset`` and ``ShardDataset`` share it."""
    out = load(index, sample_rng(cfg.seed, epoch, index))
    if out is not None or cfg.on_error != "replace":
        return out
    got = load_replacement(load, n, index, cfg, epoch, where)
    if got is None:
        return None
    out = got[1]
    out["meta"]["replaced"] = index
    return out


def sample_mode(sample: dict) -> str:
    """What an annotation sample is for: ``"multichoice"`` (it has candidate ``answers``), ``"classification"`` (a
    ``label`` and a question), ``"video"`` (a ``label`` and no question: video classification) or ``"paragraph"``."""
    if sample.get("answers") is not None:
        return "multichoice"
    if sample.get("label") is not None:
        return "classification" if sample.get("question") is not None else "video"
    return "paragraph"


def span_targets(span: tuple[float, float] | None, starts, ends) -> tuple[torch.Tensor, torch.Tensor]:
    """How2QA span-loss targets for T sampled frames: ``labels`` int64 (T,) (1 where the frame is in the span) and
    class-balanced ``weights`` float32 (T,), the rule of :func:`lfvila.losses.span_frame_labels`.

    ``starts`` / ``ends`` (T,): each sampled frame's display interval in seconds, in sampling order (non-decreasing).
    A frame is in ``span = (start, end)`` seconds when its interval overlaps it (the rule of
    :func:`~lfvila.data.sampling.segment_frame_range`); the in-span frames are the run from the first to the last
    such frame. A span between two sampled frames marks the frame whose centre is nearest to the span's centre.
    ``span`` None: the whole video (the official rule for a missing span).
    """
    from lfvila.losses import span_frame_labels  # lazy: lfvila.losses imports the kernels (and Triton)

    starts, ends = np.asarray(starts, dtype=np.float64), np.asarray(ends, dtype=np.float64)
    t = len(starts)
    if span is None:
        labels, weights = span_frame_labels(None, 1.0, t)
        return labels, weights.float()
    lo, hi = float(span[0]), float(span[1])
    inside = np.flatnonzero((starts < hi) & (ends > lo))
    if inside.size:
        first, last = int(inside[0]), int(inside[-1])
    else:
        first = last = int(np.argmin(np.abs((starts + ends) / 2 - (lo + hi) / 2)))
    # in units of sampled-frame positions (duration T), span_frame_labels marks exactly [first, last]
    labels, weights = span_frame_labels((float(first), float(last + 1)), float(t), t)
    return labels, weights.float()


class VideoTextDataset(Dataset):
    """Decoded, augmented, tokenised samples of an :class:`AnnotationDataset` (see the module docstring).

    ``__getitem__`` returns the sample dict, or ``None`` for a video skipped under ``on_error="skip"`` (or under
    ``"replace"`` when no replacement loaded either). Randomness (jitter, crop, flip, clip window) is drawn from
    ``(seed, epoch, index)`` (:func:`sample_rng`), and a replacement from ``(seed, epoch, index, attempt)``, so a
    sample is reproducible whatever the worker. ``skips`` counts the videos loaded and skipped in this process.
    ``mode`` is the resolved ``cfg.mode`` (``"auto"``: the mode of the first annotation sample).
    """

    def __init__(self, annotations: AnnotationDataset, tokenizer, cfg: LoaderConfig):
        self.annotations, self.tokenizer, self.cfg = annotations, tokenizer, cfg
        self.epoch = 0
        self.skips = decoding.SkipCounter("skip" if cfg.on_error == "replace" else cfg.on_error, cfg.max_skip_fraction)
        mode = cfg.mode
        if mode == "auto":
            mode = sample_mode(annotations[0]) if len(annotations) else "paragraph"
        if mode == "multichoice" and cfg.sentences < 2:
            raise ValueError(f"sentences must be >= 2 for multiple choice (question, answer, subtitles...), "
                             f"got {cfg.sentences}")
        self.mode = mode

    def __len__(self) -> int:
        return len(self.annotations)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _clip_frames(self, sample: dict, rng) -> tuple[torch.Tensor, ClipPlan]:
        """Official pretraining rows (one file per clip): the window's frames, clip-major, and its plan."""
        plan = plan_clips(sample, self.cfg, rng)
        parts: dict[tuple, torch.Tensor] = {}
        keys = [(path, tuple(idx)) for path, idx in zip(plan.files, plan.frames)]
        for path, idx in keys:
            if (path, idx) not in parts:  # a short row repeats its last clip: decoded once
                parts[path, idx] = torch.as_tensor(decoding.decode(path, list(idx), backend=self.cfg.backend))
        if len({tuple(p.shape[1:]) for p in parts.values()}) > 1:
            raise ValueError(f"{sample['source']}: the clips differ in size: "
                             + ", ".join(f"{path} {tuple(p.shape[1:3])}" for (path, _), p in parts.items()))
        return torch.cat([parts[k] for k in keys]), plan

    def _qa_frames(self, sample: dict, rng) -> tuple[torch.Tensor, list, dict]:
        """QA: ``cfg.frames`` frames over the whole video, and the span targets (multiple choice)."""
        path = sample["video"]
        info = decoding.probe(path)
        idx = _whole_video(info.num_frames, self.cfg, rng)
        video = torch.as_tensor(decoding.decode(path, idx, backend=self.cfg.backend))
        extra = {}
        if self.mode == "multichoice":
            times = decoding.frame_times(path)  # (N,) seconds from frame 0
            ends = np.append(times[1:], max(info.duration, times[-1]))
            extra["span_labels"], extra["span_weights"] = span_targets(sample.get("span"), times[idx], ends[idx])
        return video, idx, extra

    def _qa_text(self, sample: dict) -> dict:
        """Token ids / mask / real flags of a QA sample and its target (see the module docstring)."""
        cfg = self.cfg
        question = sample.get("question") or ""
        subtitles = sample.get("subtitles") or []
        if self.mode == "multichoice":
            subs = [s.text for s in merge_segments(subtitles, cfg.sentences - 2)] if cfg.sentences > 2 else []
            answers = sample["answers"]
            texts = [t for a in answers for t in (question, a, *subs)]  # (C * M,) choice-major
            ids, mask = encode_sentences(self.tokenizer, texts, cfg.max_len)
            shape = (len(answers), cfg.sentences)
            target = {"answer": int(sample["answer"])}
        else:
            subs = [s.text for s in merge_segments(subtitles, cfg.sentences - 1)] if cfg.sentences > 1 else []
            texts = [question, *subs]
            ids, mask = encode_sentences(self.tokenizer, texts, cfg.max_len)
            shape = (cfg.sentences,)
            target = {"label": int(sample["label"])}
        real = torch.tensor([t != "" for t in texts], dtype=torch.bool)
        return {"ids": ids.reshape(*shape, cfg.max_len), "mask": mask.reshape(*shape, cfg.max_len),
                "real": real.reshape(shape), **target}

    def __getitem__(self, index: int) -> dict | None:
        where = getattr(self.annotations, "annotation_path", "annotations")
        return load_or_replace(self._load, len(self), index, self.cfg, self.epoch, where)

    def _load(self, index: int, rng: np.random.Generator) -> dict | None:
        """Sample ``index`` with its random draws from ``rng``; ``None`` for a skipped video or row (counted)."""
        sample = fetch_sample(self.annotations, index, self.skips)
        if sample is None:
            return None
        cfg = self.cfg
        qa = self.mode != "paragraph"
        if qa and sample_mode(sample) != self.mode:
            raise ValueError(f"{sample['source']}: a {sample_mode(sample)} sample in a {self.mode} loader "
                             f"(LoaderConfig.mode)")
        if qa and sample.get("clips"):
            raise ValueError(f"{sample['source']}: QA samples need a single video file, not clip files")
        path = sample["video"]
        extra: dict = {}
        meta: dict = {}
        try:
            if qa:
                segments = None
                video, picks, extra = self._qa_frames(sample, rng)
            elif sample.get("clips"):  # one file per clip: a window of consecutive clips, clip i <-> sentence i
                video, plan = self._clip_frames(sample, rng)
                segments, picks = plan.segments, plan.frames
                meta = {"clip_start": plan.start, "clips": plan.files}
            else:
                segments = merge_segments(sample["segments"], cfg.sentences)  # clip i <-> sentence i
                picks = plan_frames(path, segments, cfg, rng)
                video = torch.as_tensor(decoding.decode(path, picks, backend=cfg.backend))
        except (decoding.DecodeError, OSError, ValueError) as e:
            self.skips.skip(path, e)  # raises under on_error="raise" (or when too many were skipped)
            return None
        self.skips.ok()
        if self.mode == "video":  # no text: the class is the whole target
            text, extra["label"] = None, int(sample["label"])
        elif qa:
            text = self._qa_text(sample)
            extra.update({k: text[k] for k in ("answer", "label") if k in text})
        else:
            text = tokenize_paragraph(self.tokenizer, segments, cfg.sentences, cfg.max_len)
        if cfg.augment:
            video = augment(video, cfg.size, cfg.train, rng, cfg.flip)
        elif tuple(video.shape[1:3]) != tuple(cfg.size):
            video = resize(video, cfg.size)
        return {
            "video": video,
            **({} if text is None else {"text_ids": text["ids"], "text_mask": text["mask"],
                                        "sentence_real": text["real"]}),
            "index": index,
            **extra,
            "meta": {"video_id": sample["video_id"], "video": path, "frames": picks, "source": sample["source"],
                     **meta},
        }


def collate(samples: list[dict | None]) -> dict | None:
    """Stack samples into a batch; skipped (``None``) samples are left out; ``None`` if nothing is left. QA targets
    (``answer``, ``label``, ``span_labels``, ``span_weights``) and the text tensors (all modes but ``"video"``) are
    stacked when the samples carry them."""
    samples = [s for s in samples if s is not None]
    if not samples:
        return None
    batch = {"video": torch.stack([s["video"] for s in samples])}  # (B, T, H, W, C) uint8
    if "text_ids" in samples[0]:  # every mode but "video"
        ids = [s["text_ids"] for s in samples]
        if any(x.shape != ids[0].shape for x in ids):  # multiple choice: every sample needs as many candidates
            raise ValueError(f"samples' text shapes differ: {sorted({tuple(x.shape) for x in ids})} (rows "
                             f"{[s['meta']['source'] for s in samples]})")
        batch["text_ids"] = torch.stack(ids)  # (B, M, L); multiple choice (B, C, M, L)
        batch["text_mask"] = torch.stack([s["text_mask"] for s in samples])
        batch["sentence_real"] = torch.stack([s["sentence_real"] for s in samples])  # (B, M) / (B, C, M)
    batch["index"] = torch.tensor([s["index"] for s in samples], dtype=torch.int64)
    for key, dtype in _QA_KEYS.items():
        if key in samples[0]:
            batch[key] = torch.stack([torch.as_tensor(s[key], dtype=dtype) for s in samples])  # (B,) / (B, T)
    batch["meta"] = [s["meta"] for s in samples]
    return batch


def make_loader(dataset, batch_size: int, sampler=None, *, num_workers: int = 0, seed: int = 0, rank: int = 0,
                drop_last: bool = False, pin_memory: bool | None = None, prefetch_factor: int = 2,
                persistent_workers: bool | None = None) -> SeededDataLoader:
    """The one DataLoader of every loader path (annotations, shards in either order): a :class:`SeededDataLoader`
    over ``dataset`` batching with :func:`collate`; ``sampler`` from ``lfvila.data.samplers`` (None: an iterable
    dataset, the shard stream); pinned memory on CUDA machines unless ``pin_memory`` says otherwise."""
    workers = num_workers > 0
    return SeededDataLoader(
        dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers, collate_fn=collate,
        pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory, drop_last=drop_last,
        prefetch_factor=prefetch_factor if workers else None,
        persistent_workers=workers if persistent_workers is None else persistent_workers and workers,
        seed=seed, rank=rank,
    )


def build_loader(annotations: AnnotationDataset, tokenizer, cfg: LoaderConfig, batch_size: int, num_workers: int = 0,
                 rank: int = 0, world_size: int = 1, pin_memory: bool | None = None, prefetch_factor: int = 2,
                 drop_last: bool | None = None, dataset=None) -> DataLoader:
    """A DataLoader over ``annotations`` (or a prebuilt map-style ``dataset`` of the same samples, e.g. a
    ``ShardDataset``) for rank ``rank`` of ``world_size``: the sampler of ``lfvila.data.samplers.build_sampler``.

    Training (``cfg.train``): the resumable ``EpochSampler`` (call ``loader.set_epoch`` each epoch, which sets the
    sampler's, the dataset's and the generator's epoch), ``drop_last`` by default. Evaluation: each rank a disjoint,
    ordered part (no duplicate padding), so gathered results cover the dataset exactly once; use ``batch["index"]``
    to reorder. Either way a :class:`SeededDataLoader` seeded from ``(cfg.seed, rank, epoch)``: iterating it never
    consumes the global torch RNG.
    """
    dataset = VideoTextDataset(annotations, tokenizer, cfg) if dataset is None else dataset
    sampler = build_sampler(len(dataset), train=cfg.train, batch_size=batch_size, rank=rank, world_size=world_size,
                            seed=cfg.seed)
    return make_loader(dataset, batch_size, sampler, num_workers=num_workers, seed=cfg.seed, rank=rank,
                       drop_last=cfg.train if drop_last is None else drop_last, pin_memory=pin_memory,
                       prefetch_factor=prefetch_factor)


def to_model_input(batch: dict, device) -> dict:
    """Move a batch's tensors to ``device`` (non-blocking): ``video`` stays uint8 ``(B, T, H, W, C)`` (a quarter of
    the bytes of float frames over the bus), normalised by the model (``VideoEncoder.normalize``: the one place where
    frames are normalised and turned channels-first); the text tensors and QA targets, where present."""
    out = dict(batch)
    out["video"] = batch["video"].to(device, non_blocking=True)  # (B, T, H, W, C) uint8
    for key in ("text_ids", "text_mask", "sentence_real", "index", *_QA_KEYS):
        if key in batch:
            out[key] = batch[key].to(device, non_blocking=True)
    return out
