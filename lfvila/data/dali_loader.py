"""The DALI loading path: encoded file bytes and frame indices in, decoded + augmented + normalised batches out.

On a GPU the frames are decoded by NVDEC (DALI's ``mixed`` video decoder) and cropped, flipped, resized and
normalised on the GPU, so the CPU only reads files and plans frame indices. On the CPU, DALI's CPU backend runs the
same pipeline for the codecs it decodes (VP8 / VP9 / MJPEG), which is how it is tested without a GPU.

It yields what ``loader.build_loader`` + ``loader.to_model_input`` yield::

    video          float32 (B, C, T, H, W) on the device, ImageNet mean/std
    text_ids       int64 (B, M, L), text_mask int64 (B, M, L), sentence_real bool (B, M), index int64 (B,)
    meta           list of dicts (video_id, video path, frame indices, source row)

Augmentation matches the official one: train RandomResizedCrop to ``size`` (area 0.8-1, aspect 3/4-4/3, the same box
for every frame of a video) and a horizontal flip with p = 0.5 (DALI's own random generators, seeded per rank: the
draws differ from the DataLoader path's, the distribution is the same); eval resize 240x428, centre crop 216x385,
resize to ``size``. Rows with one file per clip (official pretraining rows) need the DataLoader path.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DistributedSampler

from . import decode as decoding
from .datasets import AnnotationDataset, shard
from .loader import IMAGENET_MEAN, IMAGENET_STD, LoaderConfig, plan_frames
from .sampling import merge_segments
from .text import tokenize_paragraph


def _pipeline(cfg: LoaderConfig, batch_size: int, device: str, num_threads: int, seed: int):
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types
    from nvidia.dali import Pipeline

    gpu = None if device == "cpu" else (torch.device(device).index or 0)
    pipe = Pipeline(batch_size=batch_size, num_threads=num_threads, device_id=gpu, seed=seed,
                    prefetch_queue_depth=1, exec_async=False, exec_pipelined=False)
    with pipe:
        encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
        frames = fn.external_source(name="frames", dtype=types.INT32, ndim=1)
        video = fn.decoders.video(encoded, frames=frames, device="cpu" if gpu is None else "mixed")  # (T, H, W, C)
        if cfg.train:
            video = fn.random_resized_crop(video, size=list(cfg.size), random_area=[0.8, 1.0],
                                           random_aspect_ratio=[3 / 4, 4 / 3])
            mirror = fn.random.coin_flip(probability=0.5 if cfg.flip else 0.0)
        else:
            video = fn.resize(video, size=[240, 428])
            video = fn.crop(video, crop=[216, 385])
            video = fn.resize(video, size=list(cfg.size))
            mirror = 0
        video = fn.crop_mirror_normalize(
            video, dtype=types.FLOAT, output_layout="CFHW", mirror=mirror,
            mean=[255 * m for m in IMAGENET_MEAN], std=[255 * s for s in IMAGENET_STD],
        )
        pipe.set_outputs(video)
    pipe.build()
    return pipe


class DaliLoader:
    """Iterate batches of ``annotations`` for rank ``rank`` of ``world_size`` through a DALI pipeline on ``device``.

    Sharding and order are the DataLoader path's: training shuffles with ``DistributedSampler`` (``set_epoch``),
    evaluation gives each rank a disjoint ordered part. Frame indices are planned with ``loader.plan_frames`` and
    ``(seed, epoch, index)`` as in the DataLoader path. A video that cannot be read is skipped and counted under
    ``cfg.on_error="skip"`` (the batch is smaller) or raises a ``DecodeError`` naming it.

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
        self.skips = decoding.SkipCounter(cfg.on_error, cfg.max_skip_fraction)
        if sampler is not None:
            self.sampler = sampler
        elif cfg.train:
            self.sampler = DistributedSampler(range(len(annotations)), num_replicas=world_size, rank=rank,
                                              shuffle=True, seed=cfg.seed, drop_last=True)
        else:
            self.sampler = shard(len(annotations), rank, world_size, mode="disjoint")
        self._pipe = None
        self._rebuild()

    def set_epoch(self, epoch: int) -> None:
        changed = epoch != self.epoch
        self.epoch = epoch
        if isinstance(self.sampler, DistributedSampler):
            self.sampler.set_epoch(epoch)
        if changed and self.cfg.train:
            self._rebuild()

    def __len__(self) -> int:
        n = len(self.sampler)
        return n // self.batch_size if self.cfg.train else -(-n // self.batch_size)

    def _rebuild(self) -> None:
        """A failed DALI pipeline is no longer usable: build a fresh one."""
        self._pipe = _pipeline(self.cfg, self.batch_size, self.device, self.num_threads,
                               seed=self.cfg.seed * 1000 + self.rank + 7919 * self.epoch)

    def _plan(self, index: int):
        """``(index, sample, merged segments, frame indices, file bytes)``, or None for a skipped video."""
        sample = self.annotations[index]
        if sample.get("clips"):
            raise ValueError(f"{sample['source']}: rows with one file per clip need the DataLoader path")
        segments = merge_segments(sample["segments"], self.cfg.sentences)
        rng = np.random.default_rng((self.cfg.seed, self.epoch, index))
        try:
            frames = plan_frames(sample["video"], segments, self.cfg, rng)
            refusal = decoding.DaliDecoder.supports(decoding.probe(sample["video"]).codec, self.device)
            if refusal:
                raise decoding.DecodeError(sample["video"], refusal)
            data = np.fromfile(sample["video"], dtype=np.uint8)
        except (decoding.DecodeError, OSError, ValueError) as e:
            self.skips.skip(sample["video"], e)
            return None
        return index, sample, segments, frames, data

    def _run(self, plans) -> torch.Tensor:
        self._pipe.feed_input("encoded", [p[4] for p in plans])
        self._pipe.feed_input("frames", [np.asarray(p[3], dtype=np.int32) for p in plans])
        try:
            (video,) = self._pipe.run()
        except RuntimeError as e:
            self._rebuild()
            raise decoding.DecodeError(plans[0][1]["video"] if len(plans) == 1 else f"one of {len(plans)} videos",
                                       f"DALI: {' '.join(str(e).split())[:300]}") from e
        out = torch.empty((len(plans), *video[0].shape()), dtype=torch.float32, device=self.device)  # (B, C, T, H, W)
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

    def _decode(self, plans) -> tuple[torch.Tensor | None, list]:
        """Decode a batch; if DALI fails on it, retry video by video so the bad file is named (and maybe skipped)."""
        try:
            video = self._run(plans)
        except decoding.DecodeError:
            video = None
        if video is not None:
            for _ in plans:
                self.skips.ok()
            return video, plans
        kept, videos = [], []
        for plan in plans:
            try:
                videos.append(self._run([plan]))
            except decoding.DecodeError as e:
                self.skips.skip(plan[1]["video"], e)
                continue
            self.skips.ok()
            kept.append(plan)
        return (torch.cat(videos) if videos else None), kept

    def __iter__(self):
        order = list(iter(self.sampler))
        for b in range(0, len(order), self.batch_size):
            chunk = order[b : b + self.batch_size]
            if self.cfg.train and len(chunk) < self.batch_size:
                break
            plans = [p for p in (self._plan(i) for i in chunk) if p is not None]
            video, plans = self._decode(plans) if plans else (None, [])
            if video is None:
                continue
            texts = [tokenize_paragraph(self.tokenizer, p[2], self.cfg.sentences, self.cfg.max_len) for p in plans]
            yield {
                "video": video,  # (B, C, T, H, W) float32, normalised
                "text_ids": torch.stack([t["ids"] for t in texts]).to(self.device),
                "text_mask": torch.stack([t["mask"] for t in texts]).to(self.device),
                "sentence_real": torch.stack([t["real"] for t in texts]).to(self.device),
                "index": torch.tensor([p[0] for p in plans], dtype=torch.int64, device=self.device),
                "meta": [{"video_id": p[1]["video_id"], "video": p[1]["video"], "frames": p[3],
                          "source": p[1]["source"]} for p in plans],
            }
