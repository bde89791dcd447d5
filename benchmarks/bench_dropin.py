"""Drop-in benchmark: the training step of existing models with and without our kernels; append rows to a CSV.

    python -m benchmarks.bench_dropin --label h200-main          # CUDA: full sizes, bf16 autocast
    python -m benchmarks.bench_dropin --label cpu-reduced        # CPU: reduced sizes, fp32
    python -m benchmarks.bench_dropin --reduced --label gpu-smoke --out /tmp/dropin.csv   # reduced sizes on CUDA

Workloads (timm Swin, transformers Swin and its Donut copy, MONAI SwinUNETR, CLIP's loss), their providers and
sizes, rows, metrics and the torchvision-free timm import: benchmarks/README.md, section "Suites", "dropin".
"""

from __future__ import annotations

import contextlib
import functools
import importlib.abc
import importlib.machinery
import importlib.util
import math
import sys
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks import harness, suite
from benchmarks.plot import cell_text

MODE = {"swin-timm": "train-step", "swin-hf": "train-step", "swin-donut": "train-step", "swin-monai": "train-step",
        "clip-loss": "fwd+bwd"}  # fmt: skip
PROVIDERS = {"swin-timm": ("unpatched", "patched"), "swin-hf": ("unpatched", "patched"),
             "swin-donut": ("unpatched", "patched"), "swin-monai": ("unpatched", "patched"),
             "clip-loss": ("open_clip", "ours")}  # fmt: skip
METRICS = (("time", "ms"), ("memory", "MB"), ("max_abs_err", "abs"))
HF_SWIN_B_384 = {"image_size": 384, "embed_dim": 128, "depths": [2, 2, 18, 2], "num_heads": [4, 8, 16, 32],
                 "window_size": 12}  # fmt: skip
DONUT_BASE = {"embed_dim": 128, "depths": [2, 2, 14, 2], "num_heads": [4, 8, 16, 32],
              "window_size": 10}  # fmt: skip
# MONAI SwinUNETR: input side (every side divisible by 32) and constructor keywords
MONAI_BTCV = {"image": 96, "feature_size": 48, "window_size": 7}  # the BTCV recipe: 96^3 crops, feature size 48
MONAI_CPU = {"image": 64, "feature_size": 24, "window_size": 7}  # MONAI's default feature size


@dataclass
class Sizes:
    """Problem sizes of one run. ``dtype``: autocast dtype for the Swin steps (fp32: none) and the features' dtype
    for the loss. ``hf_config``: keyword arguments of ``transformers.SwinConfig`` (``{}``: Swin-T); ``donut_config``
    of ``transformers.DonutSwinConfig`` (``{}``: its defaults, Swin-T's); ``monai``: ``image`` (the side of the
    cubic input) and ``SwinUNETR`` keywords, with ``batch`` volumes of one channel and two output classes."""

    timm_model: str
    image: int
    batch: int
    hf_config: dict = field(default_factory=dict)
    loss_n: int = 4096
    loss_dim: int = 256
    dtype: torch.dtype = torch.float32
    num_classes: int = 1000
    donut_config: dict = field(default_factory=dict)
    monai: dict = field(default_factory=lambda: dict(MONAI_CPU))
    monai_batch: int = 1


FULL = Sizes("swin_base_patch4_window12_384", 384, 32, HF_SWIN_B_384, 32768, 512, torch.bfloat16,
             donut_config=DONUT_BASE, monai=MONAI_BTCV, monai_batch=2)  # fmt: skip
REDUCED = Sizes("swin_tiny_patch4_window7_224", 224, 2, {}, 4096, 256, torch.float32)


@dataclass
class Prepared:
    """A workload ready to time: ``providers[name] = (context factory, step)``; ``step()`` runs one step inside the
    provider's context. ``error()`` -> ``(max_abs_err, note)`` of the candidate against the baseline."""

    shape: str
    providers: dict[str, tuple[Callable[[], contextlib.AbstractContextManager], Callable[[], object]]]
    error: Callable[[], tuple[float, str]]


# --------------------------------------------------------------------------------------------------- workloads
def _autocast(device: torch.device, dtype: torch.dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def _swin_prepare(model, logits_of, sizes: Sizes, device, impl: str, name: str, images=None, labels=None) -> Prepared:
    """Shared by the Swin workloads: ``logits_of(model, images) -> (B, classes, ...)``, cross-entropy against
    ``labels (B, ...)``. Default inputs: ``images (B, 3, H, W)`` and ``labels (B,)`` of ``sizes``."""
    from lfvila_kernels.patch import apply_window_attention

    gen = torch.Generator().manual_seed(0)
    if images is None:
        images = torch.randn(sizes.batch, 3, sizes.image, sizes.image, generator=gen)  # (B, 3, H, W)
        labels = torch.randint(0, sizes.num_classes, (sizes.batch,), generator=gen)
    images, labels = images.to(device), labels.to(device)
    model = model.to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        optimizer.zero_grad(set_to_none=True)
        with _autocast(device, sizes.dtype):
            loss = F.cross_entropy(logits_of(model, images).float(), labels)
        loss.backward()
        optimizer.step()
        return loss.detach()

    @contextlib.contextmanager
    def patched():
        with apply_window_attention(model, impl=impl):
            yield

    def error():
        model.eval()
        try:
            with torch.no_grad(), _autocast(device, sizes.dtype):
                ref = logits_of(model, images).float()
                with apply_window_attention(model, impl=impl):
                    out = logits_of(model, images).float()
        finally:
            model.train()
        note = f"eval-mode logits on the same weights; max |logit| {ref.abs().max():.3g}"
        return (out - ref).abs().max().item(), note

    model.train()
    shape = (f"model={name} image={'x'.join(map(str, images.shape[2:]))} batch={images.shape[0]} "
             f"classes={sizes.num_classes if labels.dim() == 1 else 2}")  # fmt: skip
    return Prepared(shape, {"unpatched": (contextlib.nullcontext, step), "patched": (patched, step)}, error)


class _InertMeta(type):
    def __getattr__(cls, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _InertMeta(name, (_Inert,), {})


class _Inert(metaclass=_InertMeta):
    def __init__(self, *args, **kwargs):
        raise RuntimeError(f"{type(self).__name__}: torchvision is not usable here (inert stand-in for timm)")


class _InertModule(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _InertMeta(name, (_Inert,), {})


class _InertTorchvision(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Answers every ``torchvision`` import with an :class:`_InertModule` (a package, so submodules import too)."""

    def find_spec(self, name, path, target=None):
        if name.split(".")[0] == "torchvision":
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        return _InertModule(spec.name)

    def exec_module(self, module):
        module.__path__ = []


def import_timm():
    """timm as it is; where importing it fails (its torchvision import: missing, or built for another torch), timm
    imported again with the inert torchvision stand-in, which is removed from ``sys.modules`` right after. Raises
    ImportError naming both failures when that does not work either."""
    try:
        import timm

        return timm
    except Exception as exc:  # ImportError, or RuntimeError from a torchvision built for another torch
        first = harness.describe_exception(exc)
    for name in [m for m in sys.modules if m.split(".")[0] in ("timm", "torchvision")]:
        del sys.modules[name]
    finder = _InertTorchvision()
    sys.meta_path.insert(0, finder)
    try:
        import timm

        return timm
    except Exception as exc:
        raise ImportError(f"timm cannot be imported ({first}; with an inert torchvision: "
                          f"{harness.describe_exception(exc)})") from None  # fmt: skip
    finally:
        sys.meta_path.remove(finder)
        for name in [m for m in sys.modules if m.split(".")[0] == "torchvision"]:
            del sys.modules[name]


def prepare_swin_timm(sizes: Sizes, device, impl: str = "auto") -> Prepared:
    timm = import_timm()
    torch.manual_seed(0)
    model = timm.create_model(sizes.timm_model, pretrained=False, num_classes=sizes.num_classes,
                              img_size=sizes.image)  # fmt: skip
    return _swin_prepare(model, lambda m, x: m(x), sizes, device, impl, sizes.timm_model)


def prepare_swin_hf(sizes: Sizes, device, impl: str = "auto") -> Prepared:
    from transformers import SwinConfig, SwinForImageClassification

    torch.manual_seed(0)
    config = SwinConfig(**{"image_size": sizes.image, **sizes.hf_config}, num_labels=sizes.num_classes)
    model = SwinForImageClassification(config)
    name = (f"transformers-swin(embed={config.embed_dim} depths={'-'.join(map(str, config.depths))} "
            f"window={config.window_size})")
    return _swin_prepare(model, lambda m, x: m(pixel_values=x).logits, sizes, device, impl, name)


def prepare_swin_donut(sizes: Sizes, device, impl: str = "auto") -> Prepared:
    from transformers import DonutSwinConfig, DonutSwinForImageClassification

    torch.manual_seed(0)
    config = DonutSwinConfig(**{"image_size": sizes.image, **sizes.donut_config}, num_labels=sizes.num_classes)
    model = DonutSwinForImageClassification(config)
    name = (f"transformers-donut-swin(embed={config.embed_dim} depths={'-'.join(map(str, config.depths))} "
            f"window={config.window_size})")
    return _swin_prepare(model, lambda m, x: m(pixel_values=x).logits, sizes, device, impl, name)


def prepare_swin_monai(sizes: Sizes, device, impl: str = "auto") -> Prepared:
    """MONAI ``SwinUNETR`` (segmentation of 3-D volumes, or 2-D images with ``spatial_dims=2``; one input channel,
    two classes): voxel-wise cross-entropy."""
    from monai.networks.nets import SwinUNETR

    options = dict(sizes.monai)
    side = options.pop("image")
    torch.manual_seed(0)
    model = SwinUNETR(in_channels=1, out_channels=2, **options)
    gen = torch.Generator().manual_seed(0)
    grid = (side,) * options.get("spatial_dims", 3)
    volumes = torch.randn(sizes.monai_batch, 1, *grid, generator=gen)  # (B, 1, D, H, W)
    labels = torch.randint(0, 2, (sizes.monai_batch, *grid), generator=gen)  # (B, D, H, W)
    name = f"monai-swin-unetr(feature={model.swinViT.embed_dim} window={options.get('window_size', 7)})"
    return _swin_prepare(model, lambda m, x: m(x), sizes, device, impl, name, volumes, labels)


def open_clip_loss_class():
    """open_clip's ``ClipLoss``: from the package, or, where the package import fails (it imports torchvision at the
    top), from its ``loss.py`` alone, which needs only torch. Raises ImportError when open_clip_torch is missing."""
    try:
        from open_clip.loss import ClipLoss

        return ClipLoss
    except Exception as exc:
        spec = importlib.util.find_spec("open_clip")
        if spec is None or not spec.submodule_search_locations:
            raise ImportError(f"open_clip_torch is not installed ({harness.describe_exception(exc)})") from exc
        path = Path(next(iter(spec.submodule_search_locations))) / "loss.py"
        module_spec = importlib.util.spec_from_file_location("_open_clip_loss_file", path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
        return module.ClipLoss


def prepare_clip_loss(sizes: Sizes, device, impl: str = "auto") -> Prepared:
    from lfvila_kernels.clip_loss import ClipLoss

    losses = {"open_clip": open_clip_loss_class()(), "ours": ClipLoss(impl=impl)}
    gen = torch.Generator().manual_seed(0)
    n, d = sizes.loss_n, sizes.loss_dim
    image = F.normalize(torch.randn(n, d, generator=gen), dim=-1)
    text = F.normalize(image + torch.randn(n, d, generator=gen) / d**0.5, dim=-1)
    image, text = (t.to(device=device, dtype=sizes.dtype).requires_grad_(True) for t in (image, text))
    log_scale = torch.tensor(math.log(1 / 0.07), device=device, requires_grad=True)  # CLIP's initial scale

    def make_step(loss_fn):
        def step():
            for t in (image, text, log_scale):
                t.grad = None
            loss = loss_fn(image, text, log_scale.exp())
            loss.backward()
            return loss.detach()

        return step

    def error():
        results = []
        for name in ("open_clip", "ours"):
            loss = make_step(losses[name])()
            results.append([loss.float()] + [t.grad.float() for t in (image, text, log_scale)])
        diffs = [(a - b).abs().max().item() for a, b in zip(*results)]
        return max(diffs), f"|loss difference| {diffs[0]:.3g}; gradients {max(diffs[1:]):.3g}"

    steps = {name: (contextlib.nullcontext, make_step(fn)) for name, fn in losses.items()}
    return Prepared(f"N={n} d={d} logit_scale=learnable", steps, error)


WORKLOADS: dict[str, Callable[..., Prepared]] = {
    "swin-timm": prepare_swin_timm,
    "swin-hf": prepare_swin_hf,
    "swin-donut": prepare_swin_donut,
    "swin-monai": prepare_swin_monai,
    "clip-loss": prepare_clip_loss,
}


# --------------------------------------------------------------------------------------------------- running
def _measure_provider(context, step, device, timing) -> tuple[dict, float | None]:
    with context():
        step()  # first call outside the timing: lazy initialisation, optimizer state
        times = harness.measure(step, device=device, **timing)
        memory = harness.peak_memory(step, device)
    return times, memory


def _rows(kernel, provider, x_value, shape, dtype_name, cells) -> list[dict]:
    """``cells``: metric -> (status, values, note), for the metrics this provider has."""
    return suite.cell_rows([(m, u) for m, u in METRICS if m in cells], cells, kernel=kernel, provider=provider,
                           mode=MODE.get(kernel, "train-step"), x_name="batch", x_value=x_value, shape=shape,
                           dtype=dtype_name)  # fmt: skip


def run(workloads: dict[str, Callable[..., Prepared]], sizes: Sizes, device, writer: harness.ResultWriter,
        timing: dict | None = None, impl: str = "auto", providers: dict[str, Sequence[str]] | None = None,
        log=print) -> list[dict]:  # fmt: skip
    """Benchmark every workload's providers; append the rows to ``writer`` as they exist; return all rows.

    ``providers[kernel]``: the provider names of a workload (default :data:`PROVIDERS`; the last one is the
    candidate that gets the ``max_abs_err`` row). A workload that cannot be prepared gives failed rows for all.
    """
    device = torch.device(device)
    dtype_name = suite.dtype_name(sizes.dtype)
    timing = dict(timing or {})
    written: list[dict] = []
    for kernel, prepare in workloads.items():
        names = tuple((providers or PROVIDERS).get(kernel, ("baseline", "candidate")))
        batch = str({"clip-loss": sizes.loss_n, "swin-monai": sizes.monai_batch}.get(kernel, sizes.batch))
        prepared, note = harness.guarded(functools.partial(prepare, sizes, device, impl), device)
        if note is not None:
            log(f"{kernel:10s} failed to prepare: {note}")
            for name in names:
                cells = {m: ("failed", None, note) for m, _ in METRICS if m != "max_abs_err" or name == names[-1]}
                written.extend(writer.write(_rows(kernel, name, batch, "", dtype_name, cells)))
            continue
        for name in names:
            context, step = prepared.providers[name]
            result, note = harness.guarded(functools.partial(_measure_provider, context, step, device, timing), device)
            if note is not None:
                cells = {"time": ("failed", None, note), "memory": ("failed", None, note)}
                log(f"{kernel:10s} {name:10s} failed: {note}")
            else:
                times, memory = result
                mem = ("ok", suite.once(memory), "") if memory is not None else ("skipped", None, "CUDA only")
                cells = {"time": ("ok", times, ""), "memory": mem}
                log(f"{kernel:10s} {name:10s} {times['p50']:10.1f} ms" + (f" {memory:9.0f} MB" if memory else ""))
            if name == names[-1]:
                err, err_note = harness.guarded(prepared.error, device)
                cells["max_abs_err"] = ("failed", None, err_note) if err_note else ("ok", suite.once(err[0]), err[1])
            written.extend(writer.write(_rows(kernel, name, batch, prepared.shape, dtype_name, cells)))
        prepared = None
        harness.free_memory(device)
    return written


# --------------------------------------------------------------------------------------------------- summary
def markdown_summary(rows: Sequence[dict]) -> str:
    """One table per workload: provider, median step time (speedup vs the baseline), peak memory (fraction of the
    baseline), max abs error; a failed or skipped cell shows its status."""
    parts = []
    for kernel in dict.fromkeys(r["kernel"] for r in rows):
        sel = [r for r in rows if r["kernel"] == kernel]
        cell = {(r["provider"], r["metric"]): r for r in sel}
        names = list(dict.fromkeys(r["provider"] for r in sel))
        shape = next((r["shape"] for r in sel if r["shape"]), "")
        lines = [f"**{kernel}** ({sel[0]['mode']}, {sel[0]['dtype']}{', ' + shape if shape else ''})", "",
                 "| provider | time (ms) | peak memory (MB) | max abs err |", "|---|---|---|---|"]  # fmt: skip
        for name in names:
            metrics = (("time", "baseline/value"), ("memory", "value/baseline"), ("max_abs_err", None))
            out = [cell_text(cell.get((name, m)), cell.get((names[0], m)) if name != names[0] else None, rel, digits=4)
                   for m, rel in metrics]  # fmt: skip
            lines.append(f"| {name} | " + " | ".join(out) + " |")
        notes = sorted({r["note"] for r in sel if r["status"] == "failed" and r["note"]})
        lines += [f"\nfailed: {n}" for n in notes]
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def comparison_report(rows: Sequence[dict]) -> list[str]:
    """One line per workload: the candidate against the baseline (median step time, peak memory, max abs error), or
    why it was not measured. The issue sets no number for the drop-ins: these are figures, not verdicts."""
    lines = []
    for kernel in dict.fromkeys(r["kernel"] for r in rows):
        cell = {(r["provider"], r["metric"]): r for r in rows if r["kernel"] == kernel}
        base, cand = PROVIDERS.get(kernel, tuple(dict.fromkeys(p for p, _ in cell)))[:2]
        parts = []
        for metric, unit, relation in (("time", "ms", "faster"), ("memory", "MB", "of the memory")):
            a, b = cell.get((cand, metric)), cell.get((base, metric))
            if a and b and a["status"] == b["status"] == "ok" and float(a["p50"]) > 0 and float(b["p50"]) > 0:
                x, y = float(a["p50"]), float(b["p50"])
                ratio = y / x if metric == "time" else x / y
                parts.append(f"{metric} {x:.4g} vs {y:.4g} {unit} ({ratio:.3g}x {relation})")
            else:
                bad = next((r for r in (a, b) if r is not None and r["status"] != "ok"), None)
                parts.append(f"{metric} not measured" + (f" ({bad['provider']} {bad['status']}: {bad['note'][:120]})"
                                                          if bad else ""))  # fmt: skip
        err = cell.get((cand, "max_abs_err"))
        if err and err["status"] == "ok":
            parts.append(f"max abs err {float(err['p50']):.3g}")
        lines.append(f"- {kernel}: {cand} vs {base}: " + "; ".join(parts))
    return lines


# --------------------------------------------------------------------------------------------------- CLI
def _parse(argv):
    p = suite.parser("benchmarks.bench_dropin", __doc__)
    suite.add_output(p, "benchmarks/results/dropin-<device>.csv")
    p.add_argument("--reduced", action="store_true", help="the reduced (CPU) sizes on any device")
    p.add_argument("--workloads", default=",".join(WORKLOADS), help=f"comma-separated subset of {','.join(WORKLOADS)}")
    suite.add_device(p)
    p.add_argument("--impl", default="auto", choices=("auto", "triton", "torch"), help="our kernels' implementation")
    p.add_argument("--batch", type=int, default=None, help="override the Swin batch")
    p.add_argument("--loss-batch", type=int, default=None, help="override the loss batch N")
    suite.add_timing(p, reps=5, warmup=1, rep_ms=2000.0, warmup_ms=500.0, calls="steps")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> list[dict]:
    """Run the benchmark from command-line arguments; print progress and the summary; return the rows written."""
    args = _parse(argv)
    device = suite.resolve_device(args.device)
    names = suite.pick(args.workloads, WORKLOADS, "workloads")
    base = REDUCED if args.reduced or device.type == "cpu" else FULL
    sizes = Sizes(**{**base.__dict__, **({"batch": args.batch} if args.batch else {}),
                     **({"loss_n": args.loss_batch} if args.loss_batch else {})})  # fmt: skip
    session = suite.start(args, device, f"benchmarks/results/dropin-{device.type}.csv")
    print(f"# {sizes} workloads {names} -> {session.out}", flush=True)
    rows = run({n: WORKLOADS[n] for n in names}, sizes, device, session.writer, suite.timing(args), impl=args.impl,
               log=harness.log)  # fmt: skip
    return session.finish(rows, markdown_summary(rows))


if __name__ == "__main__":
    main()
