"""The whole video encoder's forward on the CPU: ours (``attn_impl="torch"``) against the official LF-VILA code.

The official ``SwinTransformer3D`` is not vendored: pass the path of ``LF-VILA/src/models/video_encoder.py`` from a
checkout of microsoft/XPretrain (``git clone https://github.com/microsoft/XPretrain``). Its imports that play no part
in an eval forward are stood in for while it loads and removed afterwards: ``mmcv.runner.load_checkpoint`` and
``src.utils.dist.master_process`` (never called), and timm's ``DropPath`` / ``trunc_normal_`` (timm needs
torchvision, which is not installed here; ``DropPath`` is the identity in eval mode, ``trunc_normal_`` only
initialises). Our encoder loads the official model's state dict (``strict=True``), so both compute with the same
weights on the same clip; the output difference is reported beside the times.

    python -m benchmarks.bench_encoder_cpu --official ../XPretrain/LF-VILA/src/models/video_encoder.py \\
        --out benchmarks/results/encoder-cpu.md

Times: median of ``--reps`` forwards after one warm-up, ``torch.inference_mode``, fp32, ``--threads`` threads.
"""

from __future__ import annotations

import contextlib
import importlib.util
import statistics
import sys
import time
import types

import torch
import torch.nn as nn

from benchmarks import harness, suite

_STANDINS = ("mmcv", "mmcv.runner", "src", "src.utils", "src.utils.dist", "timm", "timm.models", "timm.models.layers")


@contextlib.contextmanager
def _standins():
    from lfvila.models.video_encoder import DropPath

    saved = {name: sys.modules.get(name) for name in _STANDINS}
    for name in _STANDINS:
        sys.modules[name] = types.ModuleType(name)
    sys.modules["mmcv.runner"].load_checkpoint = None
    sys.modules["src.utils.dist"].master_process = None
    sys.modules["timm.models.layers"].DropPath = DropPath
    sys.modules["timm.models.layers"].trunc_normal_ = nn.init.trunc_normal_
    try:
        yield
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


def load_official(path: str) -> nn.Module:
    """The official ``SwinTransformer3D`` with LF-VILA's configuration (``patch_norm`` and ``local_window=8`` as in
    every task config; the rest are the class defaults), in eval mode."""
    with _standins():
        spec = importlib.util.spec_from_file_location("official_video_encoder", path)
        if spec is None or spec.loader is None:
            raise ValueError(f"--official: cannot load {path}")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    model = module.SwinTransformer3D(patch_norm=True, local_window=8)
    model.eval()  # its train() override returns None, so no chaining
    return model


def _time(fn, reps: int) -> list[float]:
    with torch.inference_mode():
        fn()
        out = []
        for _ in range(reps):
            start = time.perf_counter()
            fn()
            out.append(time.perf_counter() - start)
    return out


GEMM_OPS = ("aten::addmm", "aten::mm", "aten::bmm", "aten::mkldnn_convolution")


def gemm_share(fn) -> dict:
    """One profiled forward of ``fn``: the self CPU time of its matrix products (``GEMM_OPS``: the Linear layers'
    addmm, mm, bmm, and the patch embedding's convolution), the total self time, and the products' FLOPs (torch's
    profiler counts them for addmm, mm and bmm). The products are the same in both encoders (the same Linear layers
    on the same tokens), so the official median over *our* GEMM time bounds the speed-up reachable by making
    everything else free."""
    with torch.inference_mode(), torch.profiler.profile(with_flops=True) as prof:
        fn()
    gemm_s = total_s = flops = 0.0
    for event in prof.key_averages():
        total_s += event.self_cpu_time_total / 1e6
        if event.key in GEMM_OPS:
            gemm_s += event.self_cpu_time_total / 1e6
            flops += event.flops or 0
    return dict(gemm_s=gemm_s, total_s=total_s, gflops=flops / 1e9)


def main(argv=None) -> int:
    p = suite.parser("benchmarks.bench_encoder_cpu", __doc__)
    p.add_argument("--official", required=True, help="path of XPretrain's LF-VILA/src/models/video_encoder.py")
    p.add_argument("--frames", type=int, default=32)
    p.add_argument("--size", type=int, nargs=2, default=(192, 320), metavar=("H", "W"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--out", help="markdown report")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from lfvila.models.registry import create_model

    official = load_official(args.official)
    ours = create_model("lfvila-base-video", attn_impl="torch", compat_official=True).eval()
    ours.load_state_dict(official.state_dict(), strict=True)
    clip = torch.randn(1, 3, args.frames, *args.size)
    with torch.inference_mode():
        diff = (ours(clip).grid - official(clip)[0]).abs().max().item()
    rows = {}
    for name, fn in (("official", lambda: official(clip)), ("ours", lambda: ours(clip))):
        times = _time(fn, args.reps)
        rows[name] = (statistics.median(times), min(times), max(times))
        harness.log(f"{name}: median {rows[name][0]:.3f} s over {args.reps}")
    shares = {}
    for name, fn in (("official", lambda: official(clip)), ("ours", lambda: ours(clip))):
        shares[name] = gemm_share(fn)
        harness.log(f"{name}: matrix products {shares[name]['gemm_s']:.3f} s of {shares[name]['total_s']:.3f} s")
    env = harness.environment("cpu")
    speedup = rows["official"][0] / rows["ours"][0]
    lines = [
        f"# Video encoder forward on the CPU: ours vs the official LF-VILA code ({args.frames} x {args.size[0]} x "
        f"{args.size[1]}, fp32, {args.threads} threads)",
        "",
        f"{env['device']}; torch {env['torch']}; git {env['commit']}. Median of {args.reps} forwards after one "
        "warm-up, `torch.inference_mode`. Same weights (ours loads the official state dict); max |output difference| "
        f"{diff:.2e}.",
        f"Generated by `python -m benchmarks.bench_encoder_cpu --official <XPretrain>/LF-VILA/src/models/"
        f"video_encoder.py --reps {args.reps}{' --out ' + args.out if args.out else ''}`.",
        "",
        "| encoder | median s | min s | max s | matrix products s (profiled forward) | rest s | GFLOP/s in products |",
        "|---|---|---|---|---|---|---|",
        *(f"| {n} | {m:.3f} | {lo:.3f} | {hi:.3f} | {shares[n]['gemm_s']:.3f} | "
          f"{shares[n]['total_s'] - shares[n]['gemm_s']:.3f} | {shares[n]['gflops'] / shares[n]['gemm_s']:.0f} |"
          for n, (m, lo, hi) in rows.items()),
        "",
        f"Speed-up (official median / ours): **{speedup:.2f}x**.",
        "",
        f"Matrix products (`{'`, `'.join(GEMM_OPS)}`, self CPU time in one `torch.profiler` forward of each; "
        f"{shares['ours']['gflops']:.0f} GFLOP counted in addmm / mm / bmm): the same Linear layers on the same "
        "tokens in both encoders. With everything else free, ours would take its matrix-product time, so the "
        f"speed-up reachable in fp32 on this machine without faster GEMMs is at most official median / ours' "
        f"matrix-product time = **{rows['official'][0] / shares['ours']['gemm_s']:.2f}x**.",
    ]
    report = "\n".join(lines)
    print(report)
    if args.out:
        with open(args.out, "w") as f:
            f.write(report + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
