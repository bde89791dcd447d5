"""Compile the Triton kernels ahead of time for a GPU architecture and report their resources and issue floor.

No GPU is needed: the launchers run on meta tensors (shapes, no data) with every ``@triton.jit`` function of the
kernel module replaced by a recorder and the work split sized for a 132-SM sm_90 GPU, so the recorded launches carry
exactly the grid, constexprs (tiles, window, flags) and warps the real launch would use; each is then compiled by
Triton for the target (default sm_90, Hopper), specialised as the JIT would (ints equal to 1, multiples of 16), and
its cubin read with ``cuobjdump`` for registers, spills and shared memory, and with ``nvdisasm`` for the SASS: the
matrix instructions used (HGMMA = Hopper wgmma, HMMA = mma.sync) and, with ``--issue-floor``, the loops.

    python -m benchmarks.kernel_resources --out benchmarks/results/kernel-resources-sm90-bf16.md
    python -m benchmarks.kernel_resources --op contrastive --out benchmarks/results/contrastive-resources-sm90-bf16.md
    python -m benchmarks.kernel_resources --issue-floor --op all --B 16 --T 32 \
        --json benchmarks/results/issue-floor-sm90-bf16-B16-T32.json \
        --out benchmarks/results/issue-floor-sm90-bf16-B16-T32.md

The committed ``*-before`` results are of the v1 kernels (commit 45d33a5), read from an export of that commit:
``git archive 45d33a5 kernels | tar -x -C DIR`` and ``PYTHONPATH=DIR/kernels`` in front of the command.

``--issue-floor`` (the report: ``benchmarks/issue_floor.py``; the model: ``benchmarks/sass_model.py``) gives per
(op, layer, pass, launch) the instructions of the main loop per score element, the issue-only lower bound on the
launch's time and the useful TFLOP/s it allows, and per pass a ``total`` row, with the torch ops the launchers run
between kernels estimated as memory-bound (bytes / 4.8 TB/s). Resources report: what this cannot tell is time.
Issue floor: a lower bound, not a prediction.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile
import types
from pathlib import Path

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
if os.environ.get("TRITON_INTERPRET", "0") != "0":
    raise SystemExit("kernel_resources compiles real kernels: unset TRITON_INTERPRET")

import torch  # noqa: E402
import triton  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_leaves  # noqa: E402
from triton.backends.compiler import BaseBackend, GPUTarget  # noqa: E402
from triton.runtime.jit import JITFunction, native_specialize_impl  # noqa: E402

import lfvila_kernels  # noqa: E402
from benchmarks import sass_model as sm  # noqa: E402
from lfvila_kernels.reference import bias_table_rows  # noqa: E402

# The launchers' modules, whose globals the recorders patch (the kernels' source is in ``_*_kernels``). The package's
# own folder decides: with the kernels of a commit before the split on PYTHONPATH, lfvila's editable-install finder
# would still resolve the new module names, from this checkout.
if Path(lfvila_kernels.__file__).with_name("_window_attention_launch.py").exists():
    from lfvila_kernels import _contrastive_kernels as kernels_cl  # noqa: E402
    from lfvila_kernels import _contrastive_launch as fused_cl  # noqa: E402
    from lfvila_kernels import _window_attention_kernels as kernels_wa  # noqa: E402
    from lfvila_kernels import _window_attention_launch as fused  # noqa: E402

    kernels_wa_split = (importlib.import_module("lfvila_kernels._window_attention_split_kernels")
                        if Path(lfvila_kernels.__file__).with_name("_window_attention_split_kernels.py").exists()
                        else kernels_wa)  # the split backward's own module, from v3 on
else:  # before the split: kernels and launchers in one module per op
    from lfvila_kernels import _contrastive_triton as fused_cl  # noqa: E402
    from lfvila_kernels import _window_attention_triton as fused  # noqa: E402

    kernels_cl, kernels_wa, kernels_wa_split = fused_cl, fused, fused

# Contrastive problems (N, d) of the resources report: the kernels specialise on tiles, not on N.
CL_SHAPES = {"d256": (256, 256), "d512": (256, 512), "d1024": (256, 1024), "d2048": (256, 2048)}
CL_N, CL_DIMS = 32768, (256, 512, 1024, 2048)  # the issue floor's contrastive problems
# LF-VILA's layers (grid, heads, window, shift) for the resources report; head_dim 32. Layer 4 has layer 3's shapes.
LAYERS = {
    "layer0": ((32, 24, 40), 4, (2, 3, 5), (0, 1, 2)),
    "layer1": ((32, 12, 20), 8, (4, 3, 5), (0, 1, 2)),
    "layer2": ((32, 6, 10), 16, (8, 3, 5), (0, 1, 2)),
    "layer3": ((32, 6, 10), 16, (16, 3, 5), (0, 1, 2)),
    "layer5": ((32, 3, 5), 32, (32, 3, 5), (0, 0, 0)),
}
DEPTHS = {"L0": 2, "L1": 2, "L2": 14, "L3": 2, "L4": 2, "L5": 2}  # lfvila-base's blocks; odd blocks are shifted
# Launcher helpers that size the work by the device (their ``device`` argument is made to look like a CUDA device);
# ``_sm_count`` is answered directly. Add a helper here when a launcher sizes its grid in a new one.
_SIZING_HELPERS = ("_num_splits", "_num_programs", "_device_programs")
_FREE_OPS = ("empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided")  # allocate, launch nothing


# --------------------------------------------------------------------------------------------------- recording
@dataclasses.dataclass
class Recorded:
    name: str
    fn: JITFunction
    grid: tuple
    args: tuple
    kwargs: dict


class _Recorder:
    """Stands in for a ``@triton.jit`` kernel: ``kernel[grid](*args, **kwargs)`` records the launch."""

    def __init__(self, name, fn, launches):
        self.name, self.fn, self.launches = name, fn, launches

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            g = grid(kwargs) if callable(grid) else grid
            self.launches.append(Recorded(self.name, self.fn, tuple(g), args, kwargs))

        return launch


@contextlib.contextmanager
def _recording(module):
    """Replace every ``@triton.jit`` function of ``module`` by a recorder; yields the list launches are appended to
    (jit helpers are replaced too: only kernels are called from Python)."""
    launches = []
    saved = {name: fn for name, fn in vars(module).items() if isinstance(fn, JITFunction)}
    try:
        for name, fn in saved.items():
            setattr(module, name, _Recorder(name, fn, launches))
        yield launches
    finally:
        for name, fn in saved.items():
            setattr(module, name, fn)


@contextlib.contextmanager
def _sized_for_gpu(module, sms: int = sm.SMS):
    """Make ``module``'s launchers size their work (dq splits, item groups, forward programs) for a CUDA GPU with
    ``sms`` SMs: ``_sm_count`` answers ``sms``, the helpers in ``_SIZING_HELPERS`` get a CUDA device instead of the
    meta one, and ``torch.cuda.get_device_properties`` / ``current_device`` answer for that GPU."""
    props = types.SimpleNamespace(multi_processor_count=sms, name=f"sm_90 model ({sms} SMs)")
    patches = {(torch.cuda, "get_device_properties"): lambda *a, **k: props,
               (torch.cuda, "current_device"): lambda: 0}
    if hasattr(module, "_sm_count"):
        patches[(module, "_sm_count")] = lambda *a, **k: sms
    for name in _SIZING_HELPERS:
        if callable(fn := getattr(module, name, None)) and "device" in inspect.signature(fn).parameters:
            def on_gpu(*args, _fn=fn, **kwargs):
                bound = inspect.signature(_fn).bind(*args, **kwargs)
                bound.arguments["device"] = torch.device("cuda", 0)
                return _fn(*bound.args, **bound.kwargs)

            patches[(module, name)] = on_gpu
    saved = {key: getattr(*key) for key in patches}
    try:
        for (owner, name), value in patches.items():
            setattr(owner, name, value)
        yield
    finally:
        for (owner, name), value in saved.items():
            setattr(owner, name, value)


def _nbytes(t: torch.Tensor) -> int:
    """Bytes a kernel touches in ``t``: its elements, at most its storage (an expanded view is read once)."""
    try:
        return min(t.numel() * t.element_size(), t.untyped_storage().nbytes())
    except (RuntimeError, NotImplementedError):
        return t.numel() * t.element_size()


class _TorchOps(TorchDispatchMode):
    """Records the torch ops run on device tensors (meta here) between kernels: each non-view, non-allocating aten
    op is a kernel launch touching every distinct tensor argument and result once. Ops on CPU tensors only (host
    work, e.g. geometry cached per device) are not counted."""

    def __init__(self):
        super().__init__()
        self.ops: list[tuple[str, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if getattr(func, "is_view", False) or func.overloadpacket.__name__ in _FREE_OPS:
            return out
        tensors = {id(t): t for t in tree_leaves((args, kwargs, out)) if isinstance(t, torch.Tensor)}
        if tensors and any(t.device.type != "cpu" for t in tensors.values()):
            self.ops.append((str(func), sum(_nbytes(t) for t in tensors.values())))
        return out


def _record_passes(module, steps) -> dict:
    """Run ``steps`` (pass -> callable; each gets the previous step's result) twice under recorders sized for the
    GPU: once to fill per-call caches as in steady state, once recorded. Returns pass -> (launches, torch ops)."""
    out = {}
    with _recording(module) as launches, _sized_for_gpu(module):
        prev = None
        for step in steps.values():  # warm-up
            prev = step(prev)
        prev = None
        for name, step in steps.items():
            launches.clear()
            with _TorchOps() as ops:
                prev = step(prev)
            out[name] = (list(launches), ops.ops)
    return out


def record_window_attention(shape, window, shift, dtype, bias=True) -> dict:
    """The window-attention launchers (forward, backward with the bias gradient) on meta tensors."""
    scale = shape[-1] ** -0.5
    q, k, v, do = (torch.randn(shape, device="meta", dtype=dtype) for _ in range(4))
    table = torch.randn(bias_table_rows(window), shape[4], device="meta") if bias else None
    return _record_passes(fused, {
        "fwd": lambda _: fused._launch_fwd(q, k, v, table, window, shift, scale),
        "bwd": lambda o_lse: fused._launch_bwd(do, q, k, v, *o_lse, table, window, shift, scale),
    })


def record_contrastive(n, d, dtype) -> dict:
    """The contrastive launchers (square, symmetric loss, learnable scale) on meta tensors."""
    a, b = (torch.randn(n, d, device="meta", dtype=dtype) for _ in range(2))
    scale = torch.full((), 20.0, device="meta")
    g = torch.ones(n, device="meta")
    return _record_passes(fused_cl, {
        "fwd": lambda _: fused_cl._launch_fwd(a, b, scale, None),
        "bwd": lambda res: fused_cl._launch_bwd(g, g, a, b, scale, None, res[2], res[3]),
    })


def record_launches(shape, window, shift, dtype, bias=True):
    """Every launch of a window-attention forward + backward (the resources report)."""
    return [x for launches, _ in record_window_attention(shape, window, shift, dtype, bias).values() for x in launches]


def record_contrastive_launches(n, d, dtype):
    return [x for launches, _ in record_contrastive(n, d, dtype).values() for x in launches]


# --------------------------------------------------------------------------------------------------- compiling
_COMPILED: dict = {}


def _values(launch: Recorded) -> dict:
    """Argument name -> value of a recorded launch (defaults filled in)."""
    params = launch.fn.params
    return {p.name: launch.args[i] if i < len(launch.args) else launch.kwargs.get(p.name, p.default)
            for i, p in enumerate(params)}


def compile_launch(launch: Recorded, arch: int):
    """AOT-compile one recorded launch for ``cuda:arch``, specialised as the JIT would; returns ``(compiled kernel,
    warps, cuobjdump/nvdisasm report)``, cached per specialisation."""
    fn, values = launch.fn, _values(launch)
    options = {k: launch.kwargs[k] for k in ("num_warps", "num_stages", "num_ctas") if k in launch.kwargs}
    signature, constexprs, attrs = {}, {}, {}
    for i, p in enumerate(fn.params):
        value = values[p.name]
        if p.is_constexpr:
            signature[p.name], constexprs[(i,)] = "constexpr", value
            continue
        ty, key = native_specialize_impl(BaseBackend, value, p.is_const, not p.do_not_specialize,
                                         not p.do_not_specialize_on_alignment)
        signature[p.name] = ty
        if ty == "constexpr":  # an int equal to 1
            constexprs[(i,)] = value
        elif key == "D":  # 16-aligned pointer or multiple of 16
            attrs[(i,)] = [["tt.divisibility", 16]]
    cache_key = repr((fn.__module__, launch.name, signature, constexprs, attrs, options, arch))
    if cache_key not in _COMPILED:
        src = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
        _COMPILED[cache_key] = (compiled, compiled.metadata.num_warps, cubin_report(compiled.asm["cubin"]))
    return _COMPILED[cache_key]


def _tool(name: str) -> str:
    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    return str(bundled) if bundled.exists() else name


def cubin_report(cubin: bytes) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", f.name], capture_output=True, text=True)
        sass = subprocess.run([_tool("nvdisasm"), f.name], capture_output=True, text=True).stdout
    text = usage.stdout
    field = lambda key: int(m.group(1)) if (m := re.search(rf"{key}[:=]\s*(\d+)", text)) else None  # noqa: E731
    return {
        "registers": field("REG"),
        "stack": field("STACK"),
        "local": field("LOCAL"),
        "mma": "HGMMA" if "HGMMA" in sass else ("HMMA" if "HMMA" in sass else "FFMA only"),
        "sass": sass,
    }


def _tiles(kwargs: dict) -> str:
    if "QB" in kwargs:  # the fused backward: keys x queries
        return f"{kwargs['P']} x {kwargs['QB']}"
    return f"{kwargs.get('BLOCK_M', kwargs.get('BLOCK_R', '-'))} x {kwargs.get('BLOCK_N', '-')}"


def resources_report(op: str, dtype_name: str, dtype, arch: int, head_dim: int, layers: str | None,
                     batch: int = 16) -> str:
    if op == "window_attention":
        what = f"Window-attention kernels, {dtype_name}, head_dim {head_dim}, with bias"
        cases = {}
        for layer in (layers or ",".join(LAYERS)).split(","):
            grid, heads, window, shift = LAYERS[layer]
            cases[layer] = lambda g=grid, h=heads, w=window, s=shift: record_launches((batch, *g, h, head_dim), w,
                                                                                     s, dtype)
    else:
        what = f"Contrastive-loss kernels, {dtype_name}, square symmetric loss"
        cases = {name: lambda n=n, d=d: record_contrastive_launches(n, d, dtype)
                 for name in (layers or ",".join(CL_SHAPES)).split(",") for n, d in [CL_SHAPES[name]]}
    rows = [
        f"{what}, compiled for sm_{arch} (triton {triton.__version__}; ahead of time, no GPU involved; "
        "resources, not timings).",
        "",
        "| case | kernel | warps | tiles (M x N) | registers/thread | stack bytes | shared bytes | matrix op |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for case, record in cases.items():
        for launch in record():
            compiled, warps, rep = compile_launch(launch, arch)
            kernel = launch.name.removeprefix("_window_attention_").removeprefix("_")
            rows.append(f"| {case} | {kernel} | {warps} | {_tiles(launch.kwargs)} | {rep['registers']} | "
                        f"{rep['stack']} | {compiled.metadata.shared} | {rep['mma']} |")
    return "\n".join(rows)


# --------------------------------------------------------------------------------------------------- CLI
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--op", default="window_attention", choices=["window_attention", "contrastive", "all"])
    parser.add_argument("--arch", type=int, default=90, help="compute capability as an int (90 = Hopper)")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    parser.add_argument("--layers", default=None, help=f"window_attention: subset of {','.join(LAYERS)} (issue "
                        f"floor: L0..L5); contrastive: subset of {','.join(CL_SHAPES)}")
    parser.add_argument("--head-dim", type=int, default=32, help="window_attention's head_dim")
    parser.add_argument("--out", type=Path, help="write the markdown report here")
    parser.add_argument("--issue-floor", action="store_true", help="the issue-floor model instead of resources")
    parser.add_argument("--json", type=Path, help="--issue-floor: write the rows here (a JSON list)")
    parser.add_argument("--B", type=int, default=16, help="window attention's batch (meta tensors: costs nothing)")
    parser.add_argument("--T", type=int, default=32, help="--issue-floor: window attention's frames")
    parser.add_argument("--passes", default="fwd,bwd", help="--issue-floor: fwd, bwd or both")
    args = parser.parse_args(argv)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    ops = ["window_attention", "contrastive"] if args.op == "all" else [args.op]
    if not args.issue_floor:
        text = "\n\n".join(resources_report(op, args.dtype, dtype, args.arch, args.head_dim, args.layers, args.B)
                           for op in ops)
    else:
        from benchmarks.issue_floor import issue_floor, issue_floor_markdown

        names = set(args.layers.split(",")) if args.layers else None
        passes = tuple(args.passes.split(","))
        rows, plain = issue_floor(ops, args.B, args.T, dtype, args.arch, args.head_dim, names, passes,
                                  unshifted=args.out is not None and set(passes) == {"fwd", "bwd"})
        if args.json:
            args.json.write_text(json.dumps(rows, indent=1) + "\n")
        pairs = (("window_attention", (kernels_wa, kernels_wa_split, fused)), ("contrastive", (kernels_cl, fused_cl)))
        modules = [m for op, pair in pairs if op in ops for m in dict.fromkeys(pair)]
        command = "python -m benchmarks.kernel_resources " + " ".join(argv if argv is not None else sys.argv[1:])
        if os.environ.get("PYTHONPATH"):  # e.g. the kernels of another commit: `git archive C kernels | tar -x -C D`
            command = f"PYTHONPATH={os.environ['PYTHONPATH']} {command}"
        text = issue_floor_markdown(rows, plain, args.B, args.T, args.dtype, args.arch, modules, command)
    print(text)
    if args.out:
        args.out.write_text(text + ("\n" if not text.endswith("\n") else ""))


if __name__ == "__main__":
    main()
