"""Video decoding behind one interface: ``probe(path) -> VideoInfo``, ``decode(path, indices) -> (T, H, W, 3)``.

Backends (by name through :func:`get_decoder`): ``pyav`` (CPU, any codec FFmpeg knows, threaded); ``dali``
(``fn.decoders.video``: NVDEC on a GPU, only VP8/VP9/MJPEG on its CPU backend; DALI's own resize and normalisation);
``pyav-nvdec`` (FFmpeg's CUDA hwaccel, frames copied to the host); ``auto`` (GPU: ``dali``, ``pyav-nvdec``, then
``pyav`` with a warning for what NVDEC cannot decode, e.g. AV1 and 10-bit H.264 on Hopper; CPU: ``pyav``).
Output: uint8 ``(T, H, W, 3)`` RGB in the requested order (any order, repeats allowed): numpy, or a CUDA torch tensor
from ``dali`` on a GPU (float32 when it normalises).

Stream rule (every backend, and ``lfvila.data.prepare``): the video stream FFmpeg's best-stream rule picks
(:func:`video_stream`; decord, the official code's decoder, picks the same), not necessarily the first. DALI cannot be
told which stream to decode, so ``dali`` refuses files with more than one video stream (``auto`` takes the next
backend).

Frame index rule (every backend): frame ``i`` is the packet with the ``i``-th smallest timestamp among those the
demuxer reads from that stream (edit-list "discard" packets excluded): the ``i``-th frame in presentation order. The
table is built once per file by demuxing without decoding (cached per process), so variable-frame-rate files index
exactly and ``num_frames`` is known where the container omits it (WebM). Times: :func:`frame_times`.

Bad input raises :class:`DecodeError` naming the file: missing, empty, unreadable or truncated file, no video stream,
fewer readable packets than the container declares (:func:`truncation`), index out of range, a frame the decoder
rejected. A decoder error taints the later frames up to the next keyframe (their references are gone): asking for one
raises rather than returning concealed garbage. Damage a codec cannot detect (flipped bits in a slice that still
parses) decodes as the codec makes it; packets the demuxer resyncs over (a lost WebM cluster) are not part of the
stream. A deadline (``timeout`` s, checked per packet and given to FFmpeg's I/O) bounds every decode.
:class:`SkipCounter`: logged, counted skips under ``on_error="skip"``.
"""

from __future__ import annotations

import functools
import logging
import os
import time
import warnings

import av
import numpy as np
from av.video.reformatter import Interpolation

from .video_index import (  # noqa: F401  (re-exported: the decoding interface is this module)
    DEFAULT_TIMEOUT_S,
    DecodeError,
    SkipCounter,
    StreamIndex,
    TooManySkipsError,
    VideoInfo,
    ffmpeg_message,
    frame_times,
    is_flush_packet,
    probe,
    stream_index,
    truncation,
    video_stream,
)

log = logging.getLogger(__name__)

BACKENDS: dict[str, type[Decoder]] = {}  # name -> backend class (filled below the classes)


# YUV -> RGB with bilinear chroma upsampling at full resolution and accurate rounding: the conversion DALI's CPU
# backend makes, so the two agree bit for bit (FFmpeg's default conversion is ~1 level off and blurs chroma less well).
RGB_FLAGS = Interpolation.BILINEAR | Interpolation.FULL_CHR_H_INT | Interpolation.ACCURATE_RND


def _as_indices(path, indices, num_frames: int) -> np.ndarray:
    idx = np.asarray(indices)
    if idx.size and not np.issubdtype(idx.dtype, np.integer):
        raise TypeError(f"frame indices must be integers, got {idx.dtype}")
    idx = idx.astype(np.int64).reshape(-1)
    if (bad := idx[(idx < 0) | (idx >= num_frames)]).size:
        raise DecodeError(path, f"frame indices {sorted(set(bad.tolist()))[:8]} out of range: {num_frames} frames")
    return idx


# ------------------------------------------------------------------------------------------ devices / NVDEC table
def _device(device) -> str:
    """``"cpu"`` or ``"cuda:N"`` from a str / torch.device / None. None is the CPU: GPU decoding is opt-in, because
    touching CUDA in a forked DataLoader worker fails once the parent process has initialised it."""
    device = "cpu" if device is None else str(device)
    if device != "cpu" and device != "cuda" and not device.startswith("cuda:"):
        raise ValueError(f"device must be 'cpu' or 'cuda[:N]', got {device!r}")
    return "cuda:0" if device == "cuda" else device


def _cuda_index(device: str) -> int | None:
    return int(device.split(":")[1]) if device.startswith("cuda:") else None


def _cuda_capability(index: int) -> tuple[int, int] | None:
    """Compute capability of CUDA device ``index``; None without a usable GPU (torch is imported only here)."""
    import torch

    ok = torch.cuda.is_available() and index < torch.cuda.device_count()
    return tuple(torch.cuda.get_device_capability(index)) if ok else None


# NVDEC: the deepest bit depth it decodes per codec (4:2:0). H.264 is 8-bit only on every NVDEC generation.
NVDEC_MAX_BIT_DEPTH = {"h264": 8, "hevc": 12, "vp9": 12, "vp8": 8, "av1": 10, "mpeg4": 8, "mpeg2video": 8,
                       "mjpeg": 8}
_NVDEC_AV1 = {(8, 6), (8, 7), (8, 9)}  # Ampere GA10x, Orin, Ada; Blackwell (10.x, 12.x) too. Not Hopper (9.0).


def nvdec_refusal(codec: str, bit_depth: int = 8, capability: tuple[int, int] = (9, 0)) -> str | None:
    """Why NVDEC on a GPU of compute ``capability`` cannot decode ``codec`` at ``bit_depth``; None if it can.
    Architectures not known to decode AV1 (A100, Hopper) are refused it, so such files fall back to the CPU."""
    gpu = f"NVDEC on sm_{capability[0]}{capability[1]}"
    av1_ok = tuple(capability) in _NVDEC_AV1 or capability[0] >= 10
    if codec not in NVDEC_MAX_BIT_DEPTH or codec == "av1" and not av1_ok:
        return f"{gpu} cannot decode {codec}"
    if bit_depth > NVDEC_MAX_BIT_DEPTH[codec]:
        return f"{gpu} cannot decode {bit_depth}-bit {codec} (at most {NVDEC_MAX_BIT_DEPTH[codec]}-bit)"
    return None


def _gpu_refusal(backend: str, device: str) -> str | None:
    if _cuda_index(device) is None:
        return f"{backend} decodes on a GPU; device is {device}"
    return None if _cuda_capability(_cuda_index(device)) else f"no CUDA GPU {device} (torch.cuda has none)"


# ---------------------------------------------------------------------------------------------------- backends
class Decoder:
    """A backend. ``decode(path, indices)`` -> uint8 ``(T, H, W, 3)``; ``supports(codec, device, bit_depth)`` -> None,
    or why it cannot decode that codec there; ``refuses(info, device)`` -> the same for a probed file (codec, bit depth
    and anything else about it); ``available(device)`` -> the same for the backend as a whole."""

    name = "base"

    def __init__(self, device="cpu", timeout: float = DEFAULT_TIMEOUT_S):
        self.device, self.timeout = _device(device), float(timeout)

    @classmethod
    def available(cls, device) -> str | None:
        return None

    @classmethod
    def supports(cls, codec: str, device="cpu", bit_depth: int = 8) -> str | None:
        return cls.available(device)

    @classmethod
    def refuses(cls, info: VideoInfo, device="cpu") -> str | None:
        return cls.supports(info.codec, device, info.bit_depth)

    def probe(self, path) -> VideoInfo:
        return probe(path)

    def decode(self, path, indices):  # uint8 (T, H, W, 3)
        raise NotImplementedError

    def decode_many(self, items) -> list:
        """``[decode(path, indices) for path, indices in items]``; batched where the backend can."""
        return [self.decode(path, indices) for path, indices in items]

    def _check(self, path, info: VideoInfo) -> None:
        if (reason := self.refuses(info, self.device)) is not None:
            raise DecodeError(path, f"{self.name} cannot decode it: {reason}")


class PyAVDecoder(Decoder):
    """FFmpeg through PyAV. For each wanted frame (sorted, deduplicated) it seeks to the keyframe before it unless
    decoding forward from the current position reaches that keyframe first, decodes forward and keeps the frames whose
    timestamps map to wanted indices: each needed frame is decoded and converted once. ``threads``: FFmpeg decoder and
    conversion threads (0 = automatic; frame and slice threading)."""

    name = "pyav"

    def __init__(self, device="cpu", timeout: float = DEFAULT_TIMEOUT_S, threads: int = 0):
        super().__init__(device, timeout)
        self.threads = threads

    @classmethod
    def supports(cls, codec, device="cpu", bit_depth=8):
        try:
            av.Codec(codec, "r")
        except Exception:  # noqa: BLE001 - PyAV raises different types for unknown codecs across versions
            return f"this FFmpeg has no {codec} decoder"
        return None

    def _open(self, path):
        return av.open(path, timeout=self.timeout)

    def _configure(self, stream) -> None:
        stream.codec_context.thread_type, stream.codec_context.thread_count = "AUTO", self.threads

    def decode(self, path, indices) -> np.ndarray:
        """uint8 ``(T, H, W, 3)`` RGB frames ``indices`` of ``path`` (numpy, host memory)."""
        index = stream_index(path := os.fspath(path))
        self._check(path, info := index.info)
        idx = _as_indices(path, indices, info.num_frames)
        wanted, got, bad, errors = set(idx.tolist()), {}, set(), []
        deadline = time.monotonic() + self.timeout
        try:
            with self._open(path) as container:
                stream = container.streams[info.stream]  # the one video_stream() picked when indexing
                self._configure(stream)
                frames, pos = None, -1
                for target in sorted(wanted):
                    if target in got or target in bad:
                        continue
                    key = index.key_before(target)
                    if frames is None or key > pos + 1:  # a keyframe lies ahead: seeking skips decoding up to it
                        frames, pos = self._frames_from(path, container, stream, index, key, deadline, errors), -1
                    for i, frame, tainted in frames:
                        pos = max(pos, i)
                        if i in wanted and i not in got and i not in bad:
                            if tainted:
                                bad.add(i)
                            else:
                                got[i] = frame.to_ndarray(format="rgb24", width=info.width, height=info.height,
                                                          interpolation=RGB_FLAGS, threads=self.threads)
                        if pos >= target:
                            break
                    if target not in got:
                        bad.add(target)
        except av.error.ExitError as e:  # FFmpeg's I/O interrupt: av.open's timeout ran out
            raise DecodeError(path, f"decoding timed out after {self.timeout:.0f} s") from e
        except av.FFmpegError as e:
            raise DecodeError(path, f"decoding failed ({ffmpeg_message(e)})") from e
        if bad:
            why = f"decoder errors: {'; '.join(errors[:3])}" if errors else "not produced by the decoder"
            raise DecodeError(path, f"frames {sorted(bad)[:8]} could not be decoded ({why})")
        if not got:
            return np.zeros((0, info.height, info.width, 3), np.uint8)
        return np.stack([got[i] for i in idx.tolist()])  # (T, H, W, 3); a mid-stream size change is scaled back

    def _frames_from(self, path, container, stream, index: StreamIndex, key: int, deadline: float, errors: list):
        """Seek to keyframe ``key``; yield ``(frame index, av.VideoFrame, tainted)`` in presentation order. Retries
        from the stream start (where nothing can overshoot) if the demuxer's seek lands after ``key``."""
        for start in (key, 0) if key > 0 else (0,):
            container.seek(int(index.pts[start]), stream=stream, backward=True, any_frame=False)
            packets, first, tainted, overshot = container.demux(stream), True, False, False
            while not overshot:
                if time.monotonic() > deadline:
                    raise DecodeError(path, f"decoding timed out after {self.timeout:.0f} s")
                packet = None
                try:
                    packet = next(packets)
                    decoded = packet.decode()
                except StopIteration:
                    return
                except av.FFmpegError as e:
                    # this packet's frame is lost and later frames of its GOP lack their references
                    errors.append(f"{ffmpeg_message(e)} near frame {index.lookup(getattr(packet, 'pts', None))}")
                    tainted = True
                    continue
                for frame in decoded:
                    if (i := index.lookup(frame.pts)) is None:
                        continue
                    if first and 0 < start < i:
                        overshot = True  # the seek landed after the keyframe: retry from the stream start
                        break
                    first = False
                    tainted = (tainted and not frame.key_frame) or frame.is_corrupt
                    yield i, frame, tainted


class PyAVNvdecDecoder(PyAVDecoder):
    """PyAV with FFmpeg's CUDA hwaccel: NVDEC decodes, frames are copied back to the host (numpy) for conversion."""

    name = "pyav-nvdec"

    @classmethod
    def available(cls, device) -> str | None:
        from av.codec.hwaccel import hwdevices_available

        reason = _gpu_refusal(cls.name, _device(device))
        return reason or (None if "cuda" in hwdevices_available() else "PyAV's FFmpeg has no CUDA hwaccel")

    @classmethod
    def supports(cls, codec, device="cpu", bit_depth=8):
        reason = cls.available(device)
        return reason or nvdec_refusal(codec, bit_depth, _cuda_capability(_cuda_index(_device(device))))

    def _open(self, path):
        from av.codec.hwaccel import HWAccel

        hw = HWAccel("cuda", device=str(_cuda_index(self.device)), allow_software_fallback=False)
        return av.open(path, timeout=self.timeout, hwaccel=hw)

    def _configure(self, stream) -> None:
        pass  # NVDEC decodes asynchronously; FFmpeg's frame threads do not apply


class DaliDecoder(Decoder):
    """DALI's ``fn.decoders.video`` on encoded bytes with an explicit frame list (DALI numbers frames in presentation
    order too). ``cuda:N``: the ``mixed`` backend (NVDEC), output a CUDA torch tensor; ``cpu``: DALI's CPU backend
    (VP8/VP9/MJPEG only), output numpy. ``size``: resize frames to ``(H, W)`` on the device; ``mean``/``std`` (per
    channel, 0-255 scale): float32 ``(x - mean) / std``. :meth:`decode_many` runs ``batch_size`` videos at once.
    ``timeout`` bounds the PyAV indexing that vets each file first; DALI's own decoding cannot be interrupted.

    Stream: DALI's video decoder (and ``fn.readers.video``) has no argument choosing the stream. Its source calls
    ``av_find_best_stream`` on a container it has not probed, so frames seen while probing play no part and ties go
    to the first stream: on a file with two video streams it can decode another stream than :func:`video_stream`
    (DALI 2.4, CPU backend: two VP9 streams, neither flagged default, 3 and 10 frames; FFmpeg's rule after probing,
    which PyAV and decord apply, takes the second, DALI the first). So :meth:`refuses` files with more than one video
    stream: ``auto`` decodes them with the next backend (``pyav-nvdec``, ``pyav``), the DALI loader skips or raises."""

    name = "dali"
    CPU_CODECS = ("vp8", "vp9", "mjpeg")

    def __init__(self, device="cpu", timeout: float = DEFAULT_TIMEOUT_S, batch_size: int = 8, num_threads: int = 0,
                 size: tuple[int, int] | None = None, mean=None, std=None):
        super().__init__(device, timeout)
        if (mean is None) != (std is None):
            raise ValueError("give both mean and std, or neither")
        self.batch_size, self.size, self.mean, self.std = batch_size, size, mean, std
        self.num_threads, self._pipe = num_threads or min(4, os.cpu_count() or 1), None

    @classmethod
    def available(cls, device) -> str | None:
        try:
            import nvidia.dali  # noqa: F401
        except ImportError as e:
            return f"nvidia.dali is not installed ({e}); pip install nvidia-dali-cuda130"
        return None if _device(device) == "cpu" else _gpu_refusal(cls.name, _device(device))

    @classmethod
    def supports(cls, codec, device="cpu", bit_depth=8):
        if (reason := cls.available(device)) is not None:
            return reason
        if _device(device) == "cpu":
            return None if codec in cls.CPU_CODECS else (
                f"DALI's CPU backend decodes only {'/'.join(cls.CPU_CODECS)}, not {codec} (H.264/HEVC/AV1 need NVDEC)")
        return nvdec_refusal(codec, bit_depth, _cuda_capability(_cuda_index(_device(device))))

    @classmethod
    def refuses(cls, info: VideoInfo, device="cpu") -> str | None:
        if (reason := super().refuses(info, device)) is not None:
            return reason
        if info.video_streams > 1:
            return (f"{info.video_streams} video streams: DALI cannot be told to decode stream {info.stream} (FFmpeg's "
                    "best stream) and may decode another")
        return None

    def _build(self):
        import nvidia.dali.fn as fn
        import nvidia.dali.types as types
        from nvidia.dali import Pipeline

        gpu = _cuda_index(self.device)
        pipe = Pipeline(batch_size=self.batch_size, num_threads=self.num_threads, device_id=gpu,
                        prefetch_queue_depth=1, exec_async=False, exec_pipelined=False)
        with pipe:
            encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
            frames = fn.external_source(name="frames", dtype=types.INT32, ndim=1)
            video = fn.decoders.video(encoded, frames=frames, device="cpu" if gpu is None else "mixed")  # (F,H,W,C)
            if self.size is not None:
                video = fn.resize(video, size=list(self.size))
            if self.mean is not None:
                video = fn.crop_mirror_normalize(video, dtype=types.FLOAT, output_layout="FHWC",
                                                 mean=list(self.mean), std=list(self.std))
            pipe.set_outputs(video)
        pipe.build()
        return pipe

    def decode(self, path, indices):
        """uint8 ``(T, H, W, 3)`` (float32 when normalising; ``H, W = size`` when resizing)."""
        return self.decode_many([(path, indices)])[0]

    def decode_many(self, items) -> list:
        """Decode ``[(path, indices), ...]``; a failing batch is retried video by video so the error names the file.
        Each file is first indexed by PyAV (bounded time), which rejects unreadable containers before DALI sees them."""
        prepared = []
        for path, indices in items:
            info = probe(path := os.fspath(path))
            self._check(path, info)
            prepared.append((path, _as_indices(path, indices, info.num_frames)))
        out = []
        for b in range(0, len(prepared), self.batch_size):
            chunk = prepared[b : b + self.batch_size]
            try:
                out.extend(self._run(chunk))
            except DecodeError:  # retry video by video: the error then names the bad file
                out.extend(self._run([item])[0] for item in chunk)
        return out

    def _run(self, chunk) -> list:
        if self._pipe is None:
            self._pipe = self._build()
        try:
            self._pipe.feed_input("encoded", [np.fromfile(path, dtype=np.uint8) for path, _ in chunk])
            self._pipe.feed_input("frames", [idx.astype(np.int32) for _, idx in chunk])
            (video,) = self._pipe.run()
        except RuntimeError as e:
            self._pipe = None  # a failed DALI pipeline is no longer valid: rebuild it on the next call
            msg = str(e).split("encountered:", 1)[-1].split("Current pipeline object", 1)[0]
            raise DecodeError(chunk[0][0] if len(chunk) == 1 else f"one of {len(chunk)} videos",
                              f"DALI: {' '.join(msg.split())[:300]}") from e
        if _cuda_index(self.device) is None:
            return [np.array(video[i]) for i in range(len(chunk))]  # a copy: DALI reuses its buffers next run
        import torch
        from nvidia.dali.plugin.pytorch import feed_ndarray

        dtype, out = torch.float32 if self.mean is not None else torch.uint8, []
        for i in range(len(chunk)):  # copy into torch-owned memory, ordered on torch's current stream
            out.append(torch.empty(video[i].shape(), dtype=dtype, device=self.device))
            feed_ndarray(video[i], out[-1], cuda_stream=torch.cuda.current_stream(out[-1].device))
        torch.cuda.current_stream(out[0].device).synchronize()  # DALI reuses its output buffers on the next run
        return out


BACKENDS.update({cls.name: cls for cls in (PyAVDecoder, PyAVNvdecDecoder, DaliDecoder)})

# ------------------------------------------------------------------------------------------------ auto / module API
AUTO_ORDER = {"cuda": ("dali", "pyav-nvdec", "pyav"), "cpu": ("pyav",)}
_KWARGS = {"pyav": {"threads"}, "pyav-nvdec": {"threads"}, "dali": {"batch_size", "num_threads", "size", "mean", "std"}}


class AutoDecoder(Decoder):
    """Per file, the first backend of ``AUTO_ORDER[device kind]`` that does not refuse it (:meth:`Decoder.refuses`:
    codec and bit depth; ``dali``: one video stream only). On a GPU, a file NVDEC cannot decode (AV1, 10-bit H.264 on
    Hopper) goes to ``pyav`` on the CPU with a warning; one with several video streams goes to ``pyav-nvdec``.
    ``backend_kwargs`` go to each backend that takes them."""

    name = "auto"

    def __init__(self, device=None, timeout: float = DEFAULT_TIMEOUT_S, **backend_kwargs):
        super().__init__(device, timeout)
        self.kind, self.backend_kwargs, self._backends = "cpu" if self.device == "cpu" else "cuda", backend_kwargs, {}

    def choose(self, info: VideoInfo) -> str:
        """The backend for a probed video; :class:`DecodeError` listing every refusal when none fits."""
        refused = {}
        for name in AUTO_ORDER[self.kind]:
            if (reason := BACKENDS[name].refuses(info, self.device)) is None:
                if self.kind == "cuda" and name == "pyav":
                    warnings.warn(f"no GPU decoder for {info.bit_depth}-bit {info.codec} ("
                                  f"{'; '.join(f'{k}: {v}' for k, v in refused.items())}); decoding on the CPU "
                                  "with pyav", RuntimeWarning, stacklevel=3)
                return name
            refused[name] = reason
        raise DecodeError(info.path, "no backend can decode it: " + "; ".join(f"{k}: {v}" for k, v in refused.items()))

    def backend(self, name: str) -> Decoder:
        if name not in self._backends:
            self._backends[name] = get_decoder(name, self.device, timeout=self.timeout, **self.backend_kwargs)
        return self._backends[name]

    def decode(self, path, indices):
        return self.backend(self.choose(probe(path))).decode(path, indices)


def get_decoder(name: str = "auto", device=None, **kwargs) -> Decoder:
    """A decoder by name (``auto``, ``pyav``, ``dali``, ``pyav-nvdec``) for ``device`` (``cpu`` = None, ``cuda[:N]``).
    ValueError saying why when the backend cannot run there (DALI missing, no GPU, ...)."""
    if name == "auto":
        return AutoDecoder(device, **kwargs)
    if name not in BACKENDS:
        raise ValueError(f"unknown decoder {name!r}; choose from {['auto', *sorted(BACKENDS)]}")
    if (reason := BACKENDS[name].available(device := _device(device))) is not None:
        raise ValueError(f"decoder {name!r} cannot run on {device}: {reason}")
    return BACKENDS[name](device, **{k: v for k, v in kwargs.items() if k in _KWARGS.get(name, set()) | {"timeout"}})


_cached_decoder = functools.lru_cache(maxsize=16)(get_decoder)


def decode(path, indices, backend: str = "auto", device=None):
    """Frames ``indices`` (any order, repeats allowed) of ``path``: uint8 ``(T, H, W, 3)`` RGB, numpy or (``dali`` on
    a GPU) a CUDA torch tensor. One decoder per (backend, device) is kept per process."""
    return _cached_decoder(backend, None if device is None else str(device)).decode(path, indices)
