"""Benchmark video decoding for LF-VILA's frame sampling: clips/s and CPU cores used per decoder; rows to a CSV.

    python -m benchmarks.bench_decode --label cpu --size 144x256 --videos 4 \
        --out benchmarks/results/decode-cpu.csv --markdown benchmarks/results/decode-cpu.md
    python -m benchmarks.bench_decode --label h200 --size 360x640     # GPU machine: 16 procs -> 16 videos per input

Inputs, workloads, providers, rows, metrics, how CPU time is counted and the target: benchmarks/README.md, section
"Suites", "decode".
"""

from __future__ import annotations

import argparse
import functools
import math
import multiprocessing
import os
import resource
import tempfile
import time
from collections import namedtuple
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# The module level stays light (no torch, no harness, no suite): spawned pool workers import this module.
KERNEL = "decode"
WORKLOADS = ("uniform32", "clips4x8")
INPUTS = ("raw-h264", "raw-vp9", "prep-h264", "prep-vp9")
EXTS = {"h264": ".mp4", "vp9": ".webm"}
METRICS = (("clips_per_s", "clips/s"), ("cpu_cores", "cores"), ("max_abs_diff", "levels"), ("psnr", "dB"),
           ("frame_code", "fraction"))  # fmt: skip
GPU_PROVIDERS = ("dali-gpu", "pyav-nvdec")
TARGET_RATIO, TARGET_BASE, TARGET_INPUT = 3.0, "pyav-Nproc", "prep-h264"


# --------------------------------------------------------------------------------------------------- inputs
@dataclass(frozen=True)
class Source:
    """The raw videos (``videos`` of ``seconds`` s at ``fps``, ``size`` = (H, W), a keyframe every ``gop`` frames)
    and the preparation recipe (``prep_fps``, ``prep_gop``, ``prep_height``)."""

    videos: int = 4
    seconds: float = 180.0
    fps: float = 30.0
    size: tuple[int, int] = (180, 320)
    gop: int = 250
    seed: int = 0
    prep_fps: float = 3.0
    prep_gop: int = 8
    prep_height: int = 240

    def folder(self, root, prepared: bool, codec: str) -> Path:
        top = f"{self.seconds:g}s-{self.fps:g}fps-{self.size[0]}x{self.size[1]}-gop{self.gop}-seed{self.seed}"
        kind = f"prep-{self.prep_fps:g}fps-gop{self.prep_gop}-h{self.prep_height}" if prepared else "raw"
        return Path(root) / top / kind / codec


def source_frames(k: int, src: Source):
    """Yield raw video ``k``'s frames, uint8 ``(H, W, 3)``: a synthetic script (shapes moving over a gradient, frame
    index drawn top-left) plus a 2x2-pixel noise texture (+-14 levels) panning 1 px per frame and +-2 levels of fresh
    noise per frame; the frame-code corner is left untouched so that it stays readable."""
    from lfvila.data.framecode import MAX_INDEX, code_size
    from lfvila.data.synthetic import plan_dataset, render_frames

    (h, w), n, pan = src.size, round(src.seconds * src.fps), 64
    if n > MAX_INDEX + 1:
        raise ValueError(f"{n} frames per video exceed the frame code's {MAX_INDEX + 1}; lower --seconds or --fps")
    seed = int(np.random.SeedSequence([src.seed, k]).generate_state(1)[0])
    script = plan_dataset(1, seed, fps=src.fps, min_seconds=src.seconds, max_seconds=src.seconds, vp9_every=0)[0]
    rng = np.random.default_rng([src.seed, k, 1])
    texture = rng.integers(-14, 15, ((h + 1) // 2 + pan, (w + 1) // 2 + pan, 1), dtype=np.int16).repeat(2, 0)
    texture = texture.repeat(2, 1)
    ch, cw = code_size()
    for i, frame in enumerate(render_frames(script, (h, w))):
        dy, dx = (i // 3) % pan, i % pan
        out = frame + texture[dy : dy + h, dx : dx + w] + rng.integers(-2, 3, (h, w, 1), dtype=np.int16)
        out = np.clip(out, 0, 255).astype(np.uint8)
        out[:ch, :cw] = frame[:ch, :cw]
        yield out


def _write_raw(k: int, codec: str, src: Source, path: str) -> str:
    from lfvila.data.encode import write_video

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return str(write_video(path, source_frames(k, src), fps=src.fps, codec=codec, gop=src.gop))


def make_inputs(src: Source, names: Sequence[str], root, workers: int = 1, log=print) -> dict[str, list[Path]]:
    """The video files of each input in ``names`` (``INPUTS``), ``src.videos`` each, generating what is missing:
    raw videos in ``workers`` spawn processes, prepared ones through ``lfvila.data.prepare.run``."""
    codecs = sorted({n.split("-", 1)[1] for n in names})
    raw = {c: [src.folder(root, False, c) / f"v{k:03d}{EXTS[c]}" for k in range(src.videos)] for c in codecs}
    jobs = [(k, c, src, str(p)) for c in codecs for k, p in enumerate(raw[c]) if not p.exists()]
    if jobs:
        log(f"# generating {len(jobs)} raw videos ({src.seconds:g} s, {src.fps:g} fps, {src.size[0]}x{src.size[1]})")
        spawn = multiprocessing.get_context("spawn")  # no fork: the parent may hold FFmpeg / torch threads
        with ProcessPoolExecutor(max(1, min(workers, len(jobs))), mp_context=spawn) as ex:
            list(ex.map(_write_raw, *zip(*jobs)))
    out = {f"raw-{c}": raw[c] for c in codecs}
    for c in (c for c in codecs if f"prep-{c}" in names):
        from lfvila.data.prepare import run as prepare

        prep = [src.folder(root, True, c) / p.name for p in raw[c]]
        if not all(p.exists() for p in prep):
            log(f"# preparing {len(prep)} {c} videos ({src.prep_fps:g} fps, GOP {src.prep_gop}, <= {src.prep_height})")
        rows = prepare(src.folder(root, False, c), src.folder(root, True, c), fps=src.prep_fps, gop=src.prep_gop,
                       max_height=src.prep_height, codec=c, workers=max(1, min(workers, src.videos)))  # fmt: skip
        failed = [f"{r['path']}: {r['reason']}" for r in rows if r["status"] == "failed"]
        if failed:
            raise RuntimeError(f"prepare failed for {len(failed)} videos: {'; '.join(failed[:3])}")
        out[f"prep-{c}"] = prep
    return {n: out[n] for n in names}


def workload_indices(workload: str, num_frames: int, fps: float, clip_seconds: float = 4.0) -> list[int]:
    """Frame indices of one video for ``workload`` (``WORKLOADS``), through lfvila.data.sampling."""
    from lfvila.data.sampling import Segment, clip_indices, uniform_indices

    if workload == "uniform32":
        return uniform_indices(num_frames, 32)
    if workload != "clips4x8":
        raise ValueError(f"unknown workload {workload!r}; choose from {WORKLOADS}")
    duration, half = num_frames / fps, clip_seconds / 2
    centres = [(c + 0.5) * duration / 4 for c in range(4)]
    segments = [Segment(f"clip {c}", max(0.0, t - half), t + half) for c, t in enumerate(centres)] if half else []
    return clip_indices(num_frames, fps, segments, clips=4, frames_per_clip=8)


# --------------------------------------------------------------------------------------------------- providers
def cpu_seconds(children: bool = True) -> float:
    """User + system CPU seconds of this process (all threads) and, if ``children``, of its exited, waited-for
    child processes (getrusage RUSAGE_SELF + RUSAGE_CHILDREN)."""
    who = (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN) if children else (resource.RUSAGE_SELF,)
    return sum(u.ru_utime + u.ru_stime for u in map(resource.getrusage, who))


# A session is an opened provider: ``run([(path, indices), ...]) -> (frames per video, CPU seconds reported by worker
# processes that outlive the call)``; ``close()`` releases its workers.
class InProcess:
    """``decode_all(items) -> frames per video`` in this process (no workers); ``sync()`` (if given) after it."""

    def __init__(self, decode_all: Callable[[list], list], sync: Callable[[], None] | None = None):
        self.decode_all, self.sync = decode_all, sync

    def run(self, items):
        out = self.decode_all(list(items))
        if self.sync:
            self.sync()
        return out, 0.0

    close = staticmethod(lambda: None)


_WORKER: dict = {}


def _worker_init(threads: int) -> None:
    from lfvila.data.decode import get_decoder

    _WORKER["decoder"] = get_decoder("pyav", "cpu", threads=threads)


def _worker_decode(item) -> tuple[np.ndarray, float]:
    start = cpu_seconds(children=False)
    frames = _WORKER["decoder"].decode(*item)
    return frames, cpu_seconds(children=False) - start


class PoolSession:
    """A spawn ``multiprocessing.Pool`` of ``procs`` processes, one PyAV decoder (``threads`` FFmpeg threads) each;
    one video per task. Each task reports its process's CPU time (getrusage RUSAGE_SELF delta, all its threads)."""

    def __init__(self, procs: int, threads: int = 1, init=_worker_init, task=_worker_decode):
        self.task = task
        self.pool = multiprocessing.get_context("spawn").Pool(procs, initializer=init, initargs=(threads,))

    def run(self, items):
        results = self.pool.map(self.task, list(items), chunksize=1)
        return [frames for frames, _ in results], float(sum(cpu for _, cpu in results))

    def close(self) -> None:
        self.pool.close()
        self.pool.join()


# procs: pyav-Nproc processes and DALI CPU threads; pyav_threads: FFmpeg threads per pyav-Nproc process; batch: DALI
# videos per pipeline run; gpu: the device of the GPU providers.
Options = namedtuple("Options", "procs pyav_threads batch gpu", defaults=(os.cpu_count() or 1, 1, 8, "cuda:0"))
# open(options) -> session; refusal(codec, bit_depth, options) -> why it cannot run here (a skipped row), or None
Provider = namedtuple("Provider", "open refusal")


def import_refusal(module: str, install: str) -> str | None:
    from benchmarks import harness  # lazily: it imports torch

    return harness.import_refusal(module, install)


def _backend_refusal(backend: str, on_gpu: bool):
    def refusal(codec, bit_depth, opts):
        missing = import_refusal("lfvila.data.decode", "pip install av")
        if missing:
            return missing
        from lfvila.data.decode import BACKENDS

        return BACKENDS[backend].supports(codec, opts.gpu if on_gpu else "cpu", bit_depth)

    return refusal


def _each(fn: Callable) -> Callable[[list], list]:
    return lambda items: [fn(path, idx) for path, idx in items]


def _open_decoder(backend: str, on_gpu: bool):
    """Sessions over lfvila.data.decode: ``pyav`` through decode(), DALI batched, pyav-nvdec video by video."""

    def open_(opts):
        from lfvila.data import decode as D

        device = opts.gpu if on_gpu else "cpu"
        if backend == "pyav":
            return InProcess(_each(functools.partial(D.decode, backend="pyav", device="cpu")))
        if backend == "dali":
            decoder = D.get_decoder("dali", device, batch_size=opts.batch, num_threads=opts.procs)
            if on_gpu:
                import torch  # the frames stay on the GPU: wait for them

                return InProcess(decoder.decode_many, torch.cuda.synchronize)
            return InProcess(decoder.decode_many)
        return InProcess(_each(D.get_decoder(backend, device).decode))

    return open_


def _open_decord(opts):
    import decord

    return InProcess(_each(lambda path, idx: decord.VideoReader(os.fspath(path), ctx=decord.cpu(0))
                           .get_batch(list(idx)).asnumpy()))  # fmt: skip


def _open_torchcodec(opts):
    from torchcodec.decoders import VideoDecoder

    return InProcess(_each(lambda path, idx: VideoDecoder(os.fspath(path), seek_mode="exact", device="cpu",
                                                          dimension_order="NHWC").get_frames_at(list(idx)).data.numpy()))


PROVIDERS: dict[str, Provider] = {
    "pyav-1proc": Provider(_open_decoder("pyav", False), _backend_refusal("pyav", False)),
    "pyav-Nproc": Provider(lambda o: PoolSession(o.procs, o.pyav_threads), _backend_refusal("pyav", False)),
    "decord": Provider(_open_decord, lambda c, b, o: import_refusal("decord", "pip install decord")),
    "torchcodec": Provider(_open_torchcodec, lambda c, b, o: import_refusal(
        "torchcodec.decoders", "pip install torchcodec (needs FFmpeg's shared libraries and a matching torch)")),
    "dali-cpu": Provider(_open_decoder("dali", False), _backend_refusal("dali", False)),
    "dali-gpu": Provider(_open_decoder("dali", True), _backend_refusal("dali", True)),
    "pyav-nvdec": Provider(_open_decoder("pyav-nvdec", True), _backend_refusal("pyav-nvdec", True)),
}  # fmt: skip


# --------------------------------------------------------------------------------------------------- measuring
def timed_pass(session, items) -> tuple[list, float, float]:
    """One pass of ``session`` over ``items``: ``(frames, wall seconds, CPU seconds)``, the CPU time being this
    process's and its exited children's getrusage deltas plus what the session's live workers reported."""
    cpu0, t0 = cpu_seconds(), time.perf_counter()
    frames, worker_cpu = session.run(items)
    wall = time.perf_counter() - t0
    return frames, wall, cpu_seconds() - cpu0 + worker_cpu


def check_frames(frames: Sequence, refs: Sequence[np.ndarray], codes: Sequence[Sequence[int]] | None,
                 code_note: str = "") -> dict[str, tuple]:  # fmt: skip
    """Correctness cells (metric -> (status, values, note)) of one pass's ``frames`` against pyav's ``refs`` and the
    expected frame ``codes`` per video (None: ``frame_code`` is skipped with ``code_note``)."""
    from benchmarks.suite import once
    from lfvila.data.framecode import read_index

    worst, psnr, hits, total = 0, math.inf, 0, 0
    for k, (out, ref) in enumerate(zip(frames, refs, strict=True)):
        out = out.cpu().numpy() if hasattr(out, "cpu") else np.asarray(out)  # a CUDA tensor from dali-gpu
        if out.shape != ref.shape or out.dtype != np.uint8:
            raise ValueError(f"video {k}: got {out.dtype} {tuple(out.shape)}, pyav gives uint8 {tuple(ref.shape)}")
        diff = np.abs(out.astype(np.int16) - ref.astype(np.int16))
        worst = max(worst, int(diff.max(initial=0)))
        mse = float(np.mean(diff.astype(np.float64) ** 2)) if diff.size else 0.0
        psnr = min(psnr, math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse))
        for frame, want in zip(out, codes[k] if codes else (), strict=True):
            try:
                hits += read_index(frame) == want
            except ValueError:  # parity failure: the code is unreadable
                pass
            total += 1
    exact = "bit-exact" if worst == 0 else f"{worst} levels at most"
    return {"max_abs_diff": ("ok", once(float(worst)), f"vs lfvila.data.decode pyav: {exact}"),
            "psnr": ("ok", once(psnr), "lowest per-video PSNR vs pyav (inf: identical)"),
            "frame_code": ("skipped", None, code_note) if codes is None else
            ("ok", once(hits / max(total, 1)), f"{hits} of {total} frames show the expected index")}  # fmt: skip


def _measure_one(session, case, link_dir: Path, repeats: int):
    """Cells of one (provider, workload, input): an untimed, checked pass, then ``repeats`` timed passes."""
    from benchmarks.suite import quantiles

    items = lambda rep: list(zip(fresh_links(link_dir / str(rep), case.paths), case.indices))
    frames, _, _ = timed_pass(session, items(0))  # starts workers and pipelines
    cells = check_frames(frames, case.refs, case.codes, case.code_note)
    del frames
    rates, cores = [], []
    for rep in range(1, repeats + 1):
        frames, wall, cpu = timed_pass(session, items(rep))
        del frames
        rates.append(len(case.paths) / wall)
        cores.append(cpu / wall)
    for metric, values, note in (("clips_per_s", rates, f"{len(case.paths)} videos per pass, {repeats} timed passes"),
                                 ("cpu_cores", cores, "(getrusage self + children + pool workers' own) / wall")):
        cells[metric] = ("ok", quantiles(values), note)
    return cells


def _rows(provider, input_name, workload, shape, cells=None, status="ok", note=""):
    from benchmarks.suite import cell_rows

    return cell_rows(METRICS, cells, status, note, kernel=KERNEL, provider=provider, mode=workload, x_name="input",
                     x_value=input_name, shape=shape, dtype="uint8")


def fresh_links(folder: Path, paths: Sequence) -> list[str]:
    """Symbolic links in the new ``folder`` to ``paths`` (new paths, so that caches keyed on the path miss)."""
    folder.mkdir(parents=True)
    links = [folder / f"{k:04d}-{Path(path).name}" for k, path in enumerate(paths)]
    for link, path in zip(links, paths):
        os.symlink(Path(path).resolve(), link)
    return [str(link) for link in links]


# One (input, workload): the videos, their frame indices, pyav's frames, the expected frame codes (or why not).
_Case = namedtuple("_Case", "input_name workload paths indices refs codes code_note shape codec bit_depth")


def _cases(input_name: str, paths, workloads, src: Source, opts: Options, clip_seconds: float):
    """The ``_Case`` of each workload. A prepared video's source is found by :func:`make_inputs`' folder layout."""
    from lfvila.data.decode import decode, frame_times, probe

    infos = [probe(p) for p in paths]
    info, prepared = infos[0], input_name.startswith("prep")
    code_note = ""
    if prepared and info.height != src.size[0]:
        code_note = f"prepare scaled the frames ({src.size[0]} -> {info.height} rows): frame codes unreadable"

    def codes_of(path, idx):  # prepared: frame i shows the latest source frame at i / prep_fps s (prepare's rule,
        if not prepared:  # 0.1 ms tolerance) by the source's own timestamps (WebM rounds them to milliseconds)
            return list(idx)
        times = frame_times(Path(path).parents[2] / "raw" / Path(path).parent.name / Path(path).name)
        return (np.searchsorted(times, np.asarray(idx) / src.prep_fps + 1e-4, side="right") - 1).tolist()

    for workload in workloads:
        indices = [workload_indices(workload, v.num_frames, v.fps, clip_seconds) for v in infos]
        refs = [decode(p, idx, backend="pyav", device="cpu") for p, idx in zip(paths, indices)]
        codes = None if code_note else [codes_of(p, idx) for p, idx in zip(paths, indices)]
        shape = (f"videos={len(paths)} frames={len(indices[0])} {info.codec} {info.width}x{info.height} "
                 f"{info.fps:g}fps {info.duration:.0f}s frames/video={info.num_frames} procs={opts.procs}")
        yield _Case(input_name, workload, list(paths), indices, refs, codes, code_note, shape, info.codec,
                    info.bit_depth)  # fmt: skip


def _run_case(case: _Case, name: str, provider: Provider, sessions: dict, opts: Options, link_root: Path,
              repeats: int, log) -> list[dict]:  # fmt: skip
    from benchmarks import harness

    head, row_key = f"{case.input_name:10s} {case.workload:10s} {name:11s}", (name, *case[:2], case.shape)
    refusal, note = harness.guarded(functools.partial(provider.refusal, case.codec, case.bit_depth, opts), "cpu")
    refusal = refusal or (f"refusal check failed: {note}" if note else None)
    if refusal:
        log(f"{head} skipped: {refusal}")
        return _rows(*row_key, status="skipped", note=refusal)
    if name not in sessions:
        session, note = harness.guarded(functools.partial(provider.open, opts), "cpu")
        sessions[name] = session if note is None else f"could not open: {note}"
    if isinstance(sessions[name], str):
        cells, note = None, sessions[name]
    else:
        link_dir = Path(tempfile.mkdtemp(prefix=f"{case.input_name}-{case.workload}-{name}-", dir=link_root))
        cells, note = harness.guarded(functools.partial(_measure_one, sessions[name], case, link_dir, repeats), "cpu")
    if note is not None:
        log(f"{head} failed: {note}")
        return _rows(*row_key, status="failed", note=note)
    log(f"{head} {cells['clips_per_s'][1]['p50']:9.2f} clips/s {cells['cpu_cores'][1]['p50']:5.2f} cores, "
        f"psnr {cells['psnr'][1]['p50']:.1f} dB")  # fmt: skip
    return _rows(*row_key, cells)


def run(inputs: dict[str, list[Path]], providers: dict[str, Provider], workloads: Sequence[str], opts: Options,
        writer, src: Source, repeats: int = 3, clip_seconds: float = 4.0, log=print) -> list[dict]:  # fmt: skip
    """Benchmark every (input, workload, provider); append its rows to ``writer`` as soon as they exist; return them.

    ``inputs``: input name -> video paths (from :func:`make_inputs`, made from ``src``). Sessions are opened at a
    provider's first use and closed at the end; a provider that failed to open fails everywhere with that reason."""
    written: list[dict] = []
    sessions: dict = {}  # provider -> session, or the note of its failure to open
    with tempfile.TemporaryDirectory(prefix="bench-decode-links-") as link_root:
        try:
            for input_name, paths in inputs.items():
                for case in _cases(input_name, paths, workloads, src, opts, clip_seconds):
                    for name, provider in providers.items():
                        written += writer.write(_run_case(case, name, provider, sessions, opts, Path(link_root),
                                                          repeats, log))  # fmt: skip
        finally:
            for session in sessions.values():
                if not isinstance(session, str):
                    session.close()
    return written


# --------------------------------------------------------------------------------------------------- summary
def _cell(rows, provider, workload, input_name, metric):
    from benchmarks.suite import find

    return find(rows, provider=provider, mode=workload, x_value=input_name, metric=metric)


def markdown_summary(rows: Sequence[dict]) -> str:
    """Per workload, a provider x input table of clips/s (CPU cores used); a correctness table; why rows were
    skipped or failed; the issue's GPU target (reported, not asserted)."""
    inputs = [i for i in INPUTS if any(r["x_value"] == i for r in rows)]
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    head = ["| provider | " + " | ".join(inputs) + " |", "|---|" + "---|" * len(inputs)]

    def rate(p, workload, i):  # "clips/s (cores)", or the row's status
        r, cores = _cell(rows, p, workload, i, "clips_per_s"), _cell(rows, p, workload, i, "cpu_cores")
        return "" if r is None else f"{float(r['p50']):.3g} ({float(cores['p50']):.2g})" if r["status"] == "ok" else \
            r["status"]  # fmt: skip

    def check(p, i):  # over all workloads: "exact" or the lowest PSNR, and the lowest share of right frame codes
        sel = [r for r in rows if r["provider"] == p and r["x_value"] == i and r["status"] == "ok"]
        diff, psnr, code = ([float(r["p50"]) for r in sel if r["metric"] == m] for m, _ in METRICS[2:])
        text = "" if not psnr else "exact" if max(diff) == 0 else f"{min(psnr):.1f} dB"
        return text + (f", codes {min(code):.0%}" if code else "")

    out = []
    for workload in dict.fromkeys(r["mode"] for r in rows):
        lines = [f"**{workload}**: clips/s, median of the timed passes (CPU cores used)", "", *head]
        out.append("\n".join(lines + [f"| {p} | " + " | ".join(rate(p, workload, i) for i in inputs) + " |"
                                      for p in providers]))  # fmt: skip
    lines = ["**correctness** vs pyav over all workloads: bit-exact, or the lowest PSNR; share of frames with the "
             "expected frame code", "", *head]  # fmt: skip
    out.append("\n".join(lines + [f"| {p} | " + " | ".join(check(p, i) for i in inputs) + " |" for p in providers]))
    reasons: dict[tuple[str, str, str], dict] = {}  # (provider, status, note) -> inputs (ordered set)
    for r in (r for r in rows if r["status"] != "ok" and r["metric"] == "clips_per_s"):
        reasons.setdefault((r["provider"], r["status"], r["note"]), {})[r["x_value"]] = None
    if reasons:
        out.append("\n".join(f"- {p} {s} on {', '.join(i)}: {n}" for (p, s, n), i in reasons.items()))
    out.append("\n".join(targets_report(rows)))
    return "\n\n".join(out)


def target_heads() -> list[str]:
    """The first words of each target line of :func:`targets_report` (after ``"- "``): one per workload."""
    return list(WORKLOADS)


def targets_report(rows: Sequence[dict]) -> list[str]:
    """The issue's target: the best GPU provider's clips/s >= 3x pyav-Nproc's on prepared H.264, per workload."""
    lines = [f"Target (issue): a GPU path >= {TARGET_RATIO:g}x the clips/s of {TARGET_BASE} on {TARGET_INPUT}."]
    for workload in dict.fromkeys(r["mode"] for r in rows):
        base = _cell(rows, TARGET_BASE, workload, TARGET_INPUT, "clips_per_s")
        gpus = [r for p in GPU_PROVIDERS if (r := _cell(rows, p, workload, TARGET_INPUT, "clips_per_s"))]
        gpus = [r for r in gpus if r["status"] == "ok"]
        if not base or base["status"] != "ok" or not gpus:
            lines.append(f"- {workload}: not measured here (needs ok rows of {TARGET_BASE} and of one of "
                         f"{', '.join(GPU_PROVIDERS)} on {TARGET_INPUT})")  # fmt: skip
            continue
        best = max(gpus, key=lambda r: float(r["p50"]))
        ratio = float(best["p50"]) / float(base["p50"])
        verdict = "met" if ratio >= TARGET_RATIO else "not met: the CPU path is competitive here"
        lines.append(f"- {workload}: {best['provider']} {float(best['p50']):.3g} clips/s vs {TARGET_BASE} "
                     f"{float(base['p50']):.3g} clips/s = {ratio:.2f}x ({verdict})")  # fmt: skip
    return lines


# --------------------------------------------------------------------------------------------------- CLI
def _size(text: str) -> tuple[int, int]:
    h, w = (int(v) for v in text.lower().split("x")) if text.lower().count("x") == 1 else (0, 0)
    if h % 2 or w % 2 or h < 48 or w < 96:
        raise argparse.ArgumentTypeError(f"size must be HEIGHTxWIDTH, even, at least 48x96; got {text!r}")
    return h, w


def _parse(argv):
    from benchmarks import suite

    p = suite.parser("benchmarks.bench_decode", __doc__)
    suite.add_output(p, "benchmarks/results/decode-<cpu|cuda>.csv")
    arg = p.add_argument
    arg("--providers", default=None, help=f"comma-separated subset of {','.join(PROVIDERS)}")
    arg("--inputs", default=None, help=f"comma-separated subset of {','.join(INPUTS)}")
    arg("--workloads", default=None, help=f"comma-separated subset of {','.join(WORKLOADS)}")
    arg("--videos", type=int, default=None, help="videos per input and pass (default: max(4, --procs))")
    arg("--seconds", type=float, default=180.0, help="length of each raw video")
    arg("--fps", type=float, default=30.0, help="frame rate of the raw videos")
    arg("--size", type=_size, default=(180, 320), help="HEIGHTxWIDTH of the raw videos (180x320)")
    arg("--gop", type=int, default=250, help="keyframe interval of the raw videos, frames")
    arg("--seed", type=int, default=0)
    arg("--clip-seconds", type=float, default=4.0, help="clips4x8: span of each clip's segment (0: the quarters)")
    arg("--repeats", type=int, default=3, help="timed passes per measurement (after one untimed)")
    arg("--procs", type=int, default=os.cpu_count() or 1, help="pyav-Nproc processes, DALI CPU threads, generators")
    arg("--pyav-threads", type=int, default=1, help="FFmpeg threads per pyav-Nproc process (0: automatic)")
    arg("--dali-batch", type=int, default=8, help="videos per DALI pipeline run")
    arg("--gpu", default="cuda:0", help="device of dali-gpu and pyav-nvdec")
    arg("--scratch", default="benchmarks/results/_scratch/decode-inputs", help="where generated inputs are cached")
    args = p.parse_args(argv)
    if args.repeats < 1 or args.procs < 1 or (args.videos is not None and args.videos < 1):
        p.error("--repeats, --procs and --videos must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> list[dict]:
    """Run the benchmark from command-line arguments; print progress and the summary; return the rows written."""
    args = _parse(argv)
    try:
        import av  # noqa: F401
    except ImportError as exc:
        raise SystemExit(f"PyAV is needed for the inputs and the reference frames ({exc}); pip install av") from exc
    from benchmarks import harness, suite

    names = suite.pick(args.providers, PROVIDERS, "providers")
    inputs = suite.pick(args.inputs, INPUTS, "inputs")
    workloads = suite.pick(args.workloads, WORKLOADS, "workloads")
    device = suite.resolve_device("auto")  # names the CSV and the machine; the providers choose their own devices
    src = Source(videos=args.videos or max(4, args.procs), seconds=args.seconds, fps=args.fps, size=args.size,
                 gop=args.gop, seed=args.seed)  # fmt: skip
    opts = Options(procs=args.procs, pyav_threads=args.pyav_threads, batch=args.dali_batch, gpu=args.gpu)
    session = suite.start(args, device, f"benchmarks/results/decode-{device.type}.csv")
    print(f"# procs {args.procs}", flush=True)
    log = harness.log
    files = make_inputs(src, inputs, args.scratch, args.procs, log=log)
    print(f"# inputs ready in {time.perf_counter() - session.started:.0f} s: {src.videos} videos each of {inputs}; "
          f"providers {names}, workloads {workloads} -> {session.out}", flush=True)  # fmt: skip
    session.started = time.perf_counter()  # the summary's time: the benchmark, not the inputs
    rows = run(files, {n: PROVIDERS[n] for n in names}, workloads, opts, session.writer, src, args.repeats,
               args.clip_seconds, log=log)  # fmt: skip
    return session.finish(rows, markdown_summary(rows))

if __name__ == "__main__":
    main()
