"""The DALI loading path: encoded file bytes and frame indices in, decoded + augmented batches out.

On a GPU the frames are decoded by NVDEC (DALI's ``mixed`` video decoder) and cropped, flipped and resized on the
GPU, so the CPU only reads files and plans frame indices. On the CPU, DALI's CPU backend runs the
same pipeline for the codecs it decodes (VP8 / VP9 / MJPEG), which is how it is tested without a GPU.

It yields what ``loader.build_loader`` + ``loader.to_model_input`` yield::

    video          uint8 (B, T, H, W, C) on the device (the video encoder normalises: ``VideoEncoder.normalize``, the
                   one place where frames are normalised)
    text_ids       int64 (B, M, L), text_mask int64 (B, M, L), sentence_real bool (B, M), index int64 (B,)
    meta           list of dicts (video_id, video path, frame indices, source row)

Augmentation matches the official one: train RandomResizedCrop to ``size`` (area 0.8-1, aspect 3/4-4/3, the same box
for every frame of a video) and a horizontal flip with p = 0.5 (DALI's own random generators, seeded per rank: the
draws differ from the DataLoader path's, the distribution is the same); eval resize 240x428, centre crop 216x385,
resize to ``size``.

Rows with one file per clip (official pretraining rows, ``lfvila_pretrain``) take the DataLoader path's clip window
(``loader.plan_clips``: the same start, files, frame indices and sentences for the same ``(seed, epoch, index)``);
the pipeline then has one input per clip position, decodes each clip file and concatenates them along time (the clips
must share one frame size), and every meta also carries ``clip_start`` and ``clips``. A loader serves one kind of
row, the kind of its first annotation sample.

Bad videos follow ``cfg.on_error`` as in the DataLoader path (``loader`` module docstring): ``"replace"`` fills the
slot of a bad sample with the replacement :func:`~lfvila.data.loader.replacement_index` picks, planned with
:func:`~lfvila.data.loader.replacement_rng`, the DataLoader path's choice, and marks it ``meta["replaced"]``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from . import decode as decoding
from .formats import AnnotationDataset
from .loader import (
    LoaderConfig,
    fetch_sample,
    load_replacement,
    plan_clips,
    plan_frames,
    sample_rng,
)
from .samplers import build_sampler
from .sampling import Segment, merge_segments
from .text import tokenize_paragraph


def _pipeline(cfg: LoaderConfig, batch_size: int, device: str, num_threads: int, seed: int, files: int = 1):
    """The pipeline; ``files`` encoded inputs per sample (``encoded{k}`` / ``frames{k}``), decoded and concatenated
    along time (a row with one file per clip has ``cfg.clips``)."""
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types
    from nvidia.dali import Pipeline

    gpu = None if device == "cpu" else (torch.device(device).index or 0)
    pipe = Pipeline(batch_size=batch_size, num_threads=num_threads, device_id=gpu, seed=seed,
                    prefetch_queue_depth=1, exec_async=False, exec_pipelined=False)
    with pipe:
        parts = []
        for k in range(files):
            encoded = fn.external_source(name=f"encoded{k}", dtype=types.UINT8, ndim=1)
            frames = fn.external_source(name=f"frames{k}", dtype=types.INT32, ndim=1)
            parts.append(fn.decoders.video(encoded, frames=frames, device="cpu" if gpu is None else "mixed"))
        video = parts[0] if files == 1 else fn.cat(*parts, axis=0)  # (T, H, W, C)
        if cfg.train:
            video = fn.random_resized_crop(video, size=list(cfg.size), random_area=[0.8, 1.0],
                                           random_aspect_ratio=[3 / 4, 4 / 3])
            mirror = fn.random.coin_flip(probability=0.5 if cfg.flip else 0.0)
        else:
            video = fn.resize(video, size=[240, 428])
            video = fn.crop(video, crop=[216, 385])
            video = fn.resize(video, size=list(cfg.size))
            mirror = 0
        video = fn.flip(video, horizontal=mirror)  # uint8 (T, H, W, C): the encoder normalises
        pipe.set_outputs(video)
    pipe.build()
    return pipe


@dataclass
class _Plan:
    """One sample to decode: ``files`` (paths) with their ``data`` (bytes) and ``frames`` (indices), one entry per
    pipeline input; ``frames_meta`` the meta's ``frames`` (a flat list, or one list per clip); ``extra`` more meta."""

    index: int
    sample: dict
    segments: list[Segment]
    files: list[str]
    frames: list[list[int]]
    data: list[np.ndarray]
    frames_meta: list
    extra: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        """What an error names: the file, or a clip row's files."""
        return self.files[0] if len(set(self.files)) == 1 else ", ".join(dict.fromkeys(self.files))


class DaliLoader:
    """Iterate batches of ``annotations`` for rank ``rank`` of ``world_size`` through a DALI pipeline on ``device``.

    Sharding and order are the DataLoader path's (``lfvila.data.samplers.build_sampler``): training shuffles per
    epoch (``set_epoch``), evaluation gives each rank a disjoint ordered part. Frame indices (and clip windows) are
    planned with ``loader.plan_frames`` (``loader.plan_clips``) and ``(seed, epoch, index)`` as in the DataLoader
    path. A video that cannot be read is skipped and counted under ``cfg.on_error="skip"`` (the batch is smaller),
    replaced under ``"replace"`` (module docstring) or raises a ``DecodeError`` naming it.

    ``sampler``: any iterable of annotation indices for this rank (the training loop passes its resumable
    ``EpochSampler``) instead of the default ones. ``set_epoch`` reseeds DALI's generators from ``(seed, rank, epoch)``:
    the augmentation of an epoch does not depend on where the previous one stopped, but DALI's generator state cannot
    be saved, so a run resumed mid-epoch draws other crops and flips for the rest of that epoch (same samples).
    Nothing here draws from the global torch / numpy / ``random`` generators (the sampler, the frame plans and DALI
    have their own), so iterating this loader leaves the stream that the training steps consume, and that the
    checkpoint saves, untouched.
    """

    def __init__(self, annotations: AnnotationDataset, tokenizer, cfg: LoaderConfig, batch_size: int,
                 device: str = "cuda", rank: int = 0, world_size: int = 1, num_threads: int = 4, sampler=None):
        if decoding.DaliDecoder.available(device) is not None:
            raise RuntimeError(f"the DALI loader cannot run on {device}: {decoding.DaliDecoder.available(device)}")
        self.annotations, self.tokenizer, self.cfg = annotations, tokenizer, cfg
        self.batch_size, self.device, self.rank, self.num_threads = batch_size, device, rank, num_threads
        self.epoch = 0
        self.skips = decoding.SkipCounter("skip" if cfg.on_error == "replace" else cfg.on_error, cfg.max_skip_fraction)
        self.clip_rows = bool(len(annotations) and annotations[0].get("clips"))  # the kind of row served
        self.files = cfg.clips if self.clip_rows else 1  # pipeline inputs per sample
        self.sampler = sampler if sampler is not None else build_sampler(
            len(annotations), train=cfg.train, batch_size=batch_size, rank=rank, world_size=world_size, seed=cfg.seed)
        self._pipe = None
        self._rebuild()

    def set_epoch(self, epoch: int) -> None:
        changed = epoch != self.epoch
        self.epoch = epoch
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)
        if changed and self.cfg.train:
            self._rebuild()

    def __len__(self) -> int:
        n = len(self.sampler)
        return n // self.batch_size if self.cfg.train else -(-n // self.batch_size)

    def _rebuild(self) -> None:
        """A failed DALI pipeline is no longer usable: build a fresh one."""
        self._pipe = _pipeline(self.cfg, self.batch_size, self.device, self.num_threads,
                               seed=self.cfg.seed * 1000 + self.rank + 7919 * self.epoch, files=self.files)

    def _plan(self, index: int, rng: np.random.Generator | None = None) -> _Plan | None:
        """What to decode for sample ``index`` (random draws from ``rng``, default ``loader.sample_rng``: the
        DataLoader path's frames and, for clip rows, its clip window), or None for a skipped video (counted)."""
        sample = fetch_sample(self.annotations, index, self.skips)
        if sample is None:
            return None
        rng = sample_rng(self.cfg.seed, self.epoch, index) if rng is None else rng
        try:
            clip_row = bool(sample.get("clips"))
            if clip_row != self.clip_rows:
                raise ValueError(f"{sample['source']}: a row {'with' if clip_row else 'without'} one file per clip "
                                 f"in a loader of rows {'without' if clip_row else 'with'} (its first sample's kind)")
            if clip_row:
                cp = plan_clips(sample, self.cfg, rng)
                segments, files, frames, frames_meta = cp.segments, cp.files, cp.frames, cp.frames
                extra = {"clip_start": cp.start, "clips": cp.files}
            else:
                segments = merge_segments(sample["segments"], self.cfg.sentences)
                frames_meta = plan_frames(sample["video"], segments, self.cfg, rng)
                files, frames, extra = [sample["video"]], [frames_meta], {}
            data = {}
            for path in dict.fromkeys(files):
                refusal = decoding.DaliDecoder.refuses(decoding.probe(path), self.device)  # codec, video streams
                if refusal:
                    raise decoding.DecodeError(path, refusal)
                data[path] = np.fromfile(path, dtype=np.uint8)
        except (decoding.DecodeError, OSError, ValueError) as e:
            self.skips.skip(sample["video"], e)
            return None
        return _Plan(index, sample, segments, files, frames, [data[f] for f in files], frames_meta, extra)

    def _run(self, plans: list[_Plan]) -> torch.Tensor:
        for k in range(self.files):
            self._pipe.feed_input(f"encoded{k}", [p.data[k] for p in plans])
            self._pipe.feed_input(f"frames{k}", [np.asarray(p.frames[k], dtype=np.int32) for p in plans])
        try:
            (video,) = self._pipe.run()
        except RuntimeError as e:
            self._rebuild()
            raise decoding.DecodeError(plans[0].name if len(plans) == 1 else f"one of {len(plans)} videos",
                                       f"DALI: {' '.join(str(e).split())[:300]}") from e
        out = torch.empty((len(plans), *video[0].shape()), dtype=torch.uint8, device=self.device)  # (B, T, H, W, C)
        if self.device == "cpu":
            for i in range(len(plans)):
                out[i] = torch.from_numpy(np.array(video[i]))
            return out
        from nvidia.dali.plugin.pytorch import feed_ndarray

        stream = torch.cuda.current_stream(out.device)
        for i in range(len(plans)):
            feed_ndarray(video[i], out[i], cuda_stream=stream)
        stream.synchronize()  # DALI reuses its output buffers on the next run
        return out

    def _decode_one(self, plan: _Plan) -> torch.Tensor | None:
        """Decode one sample alone; None (counted as a skip) when DALI fails on it."""
        try:
            video = self._run([plan])
        except decoding.DecodeError as e:
            self.skips.skip(plan.sample["video"], e)
            return None
        self.skips.ok()
        return video

    def _decode(self, plans: list[_Plan]) -> list[torch.Tensor | None]:
        """Decode a batch, one uint8 ``(1, T, H, W, C)`` video per plan; if DALI fails on the batch, retry video by
        video so the bad file is named (and maybe skipped: its entry is None)."""
        try:
            video = self._run(plans)
        except decoding.DecodeError:
            return [self._decode_one(p) for p in plans]
        for _ in plans:
            self.skips.ok()
        return list(video.split(1))

    def _replace(self, index: int) -> tuple[_Plan, torch.Tensor] | None:
        """The DataLoader path's replacement of bad sample ``index`` (``on_error="replace"``,
        :func:`~lfvila.data.loader.load_replacement`), planned and decoded alone; None when every attempt failed
        (each failure counted)."""

        def load(other: int, rng: np.random.Generator):
            plan = self._plan(other, rng)
            video = None if plan is None else self._decode_one(plan)
            return None if video is None else (plan, video)

        where = getattr(self.annotations, "annotation_path", "annotations")
        got = load_replacement(load, len(self.annotations), index, self.cfg, self.epoch, where)
        if got is None:
            return None
        plan, video = got[1]
        plan.extra["replaced"] = index
        return plan, video

    def __iter__(self):
        order = list(iter(self.sampler))
        for b in range(0, len(order), self.batch_size):
            chunk = order[b : b + self.batch_size]
            if self.cfg.train and len(chunk) < self.batch_size:
                break
            plans = [self._plan(i) for i in chunk]
            decoded = iter(self._decode([p for p in plans if p is not None]) if any(plans) else [])
            kept = []  # (plan, video) per slot of the chunk, in order
            for index, plan in zip(chunk, plans):
                video = None if plan is None else next(decoded)
                if video is not None:
                    kept.append((plan, video))
                elif self.cfg.on_error == "replace" and (replaced := self._replace(index)) is not None:
                    kept.append(replaced)
            if not kept:
                continue
            plans = [p for p, _ in kept]
            video = torch.cat([v for _, v in kept])  # uint8 (B, T, H, W, C)
            texts = [tokenize_paragraph(self.tokenizer, p.segments, self.cfg.sentences, self.cfg.max_len)
                     for p in plans]
            yield {
                "video": video,
                "text_ids": torch.stack([t["ids"] for t in texts]).to(self.device),
                "text_mask": torch.stack([t["mask"] for t in texts]).to(self.device),
                "sentence_real": torch.stack([t["real"] for t in texts]).to(self.device),
                "index": torch.tensor([p.index for p in plans], dtype=torch.int64, device=self.device),
                "meta": [{"video_id": p.sample["video_id"], "video": p.sample["video"], "frames": p.frames_meta,
                          "source": p.sample["source"], **p.extra} for p in plans],
            }
