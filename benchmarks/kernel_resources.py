"""Compile the Triton kernels ahead of time for a GPU architecture and report their resources.

No GPU is needed: the launchers run on small CPU tensors with every kernel replaced by a recorder, so the recorded
launches carry exactly the constexprs (tiles, window, flags) and warps the real launch would use; each is then
compiled by Triton for the target (default sm_90, Hopper) and its cubin read with ``cuobjdump`` for registers,
spills and shared memory, and with ``nvdisasm`` for the matrix instructions used (HGMMA = Hopper wgmma, HMMA =
mma.sync). What this cannot tell: time. Use it to catch spills and compile failures before spending GPU time.

    python -m benchmarks.kernel_resources --out benchmarks/results/kernel-resources-sm90-bf16.md
    python -m benchmarks.kernel_resources --op contrastive --out benchmarks/results/contrastive-resources-sm90-bf16.md
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import subprocess
import tempfile
from pathlib import Path

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
if os.environ.get("TRITON_INTERPRET", "0") != "0":
    raise SystemExit("kernel_resources compiles real kernels: unset TRITON_INTERPRET")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

from lfvila_kernels import _contrastive_triton as fused_cl  # noqa: E402
from lfvila_kernels import _window_attention_triton as fused  # noqa: E402
from lfvila_kernels.reference import bias_table_rows  # noqa: E402

KERNELS = ("_htwa_fwd_kernel", "_htwa_bwd_delta_kernel", "_htwa_bwd_fused_kernel", "_htwa_bwd_dkdv_kernel",
           "_htwa_bwd_dq_kernel")
CL_KERNELS = ("_cl_fwd_kernel", "_cl_bwd_kernel")
# Contrastive problems (N, d): the kernels specialise on tiles, not on N.
CL_SHAPES = {"d256": (256, 256), "d512": (256, 512), "d1024": (256, 1024), "d2048": (256, 2048)}
# LF-VILA's layers (grid, heads, window, shift); head_dim 32. Layer 4 has layer 3's shapes.
LAYERS = {
    "layer0": ((32, 24, 40), 4, (2, 3, 5), (0, 1, 2)),
    "layer1": ((32, 12, 20), 8, (4, 3, 5), (0, 1, 2)),
    "layer2": ((32, 6, 10), 16, (8, 3, 5), (0, 1, 2)),
    "layer3": ((32, 6, 10), 16, (16, 3, 5), (0, 1, 2)),
    "layer5": ((32, 3, 5), 32, (32, 3, 5), (0, 0, 0)),
}
_TRITON_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.int32: "i32",
                  torch.int64: "i64"}


class _Recorder:
    """Stands in for a ``@triton.jit`` kernel: ``kernel[grid](*args, **kwargs)`` records the launch."""

    def __init__(self, name, launches):
        self.name, self.launches = name, launches

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((self.name, grid, args, kwargs))


@contextlib.contextmanager
def _recording(module, names):
    """Replace ``module``'s kernels ``names`` by recorders; yields the list the launches are appended to."""
    launches, saved = [], {name: getattr(module, name) for name in names}
    try:
        for name in names:
            setattr(module, name, _Recorder(name, launches))
        yield launches
    finally:
        for name, fn in saved.items():
            setattr(module, name, fn)


def record_launches(shape, window, shift, dtype, bias=True):
    """Run the window-attention launchers on CPU tensors with recorders in place of the kernels."""
    with _recording(fused, KERNELS) as launches:
        q, k, v = (torch.randn(shape).to(dtype) for _ in range(3))
        table = torch.randn(bias_table_rows(window), shape[4]) if bias else None
        o, lse = fused._launch_fwd(q, k, v, table, window, shift, shape[-1] ** -0.5)
        fused._launch_bwd(torch.randn(shape).to(dtype), q, k, v, o, lse, table, window, shift, shape[-1] ** -0.5)
    return launches


def record_contrastive_launches(n, d, dtype):
    """Run the contrastive launchers (square, symmetric) on CPU tensors with recorders in place of the kernels."""
    with _recording(fused_cl, CL_KERNELS) as launches:
        a, b = torch.randn(n, d).to(dtype), torch.randn(n, d).to(dtype)
        scale = torch.tensor(20.0)
        fused_cl._launch_fwd(a, b, scale, None)
        stats = torch.zeros(n)
        fused_cl._launch_bwd(stats, stats, a, b, scale, None, stats, stats)
    return launches


def compile_launch(name, args, kwargs, arch: int):
    """AOT-compile one recorded launch for ``cuda:arch``; returns the compiled kernel."""
    fn = getattr(fused_cl if name in CL_KERNELS else fused, name)
    options = {"num_warps": kwargs.pop("num_warps", 4), "num_stages": kwargs.pop("num_stages", 2)}
    signature, constexprs, attrs = {}, {}, {}
    divisible = [["tt.divisibility", 16]]  # what the JIT infers for 16-aligned pointers and multiples of 16
    for i, arg_name in enumerate(fn.arg_names):
        value = args[i] if i < len(args) else kwargs[arg_name]
        if arg_name in kwargs:
            signature[arg_name], constexprs[(i,)] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            signature[arg_name], attrs[(i,)] = "*" + _TRITON_DTYPES[value.dtype], divisible
        elif isinstance(value, float):
            signature[arg_name] = "fp32"
        else:
            signature[arg_name] = "i32"
            if value % 16 == 0:
                attrs[(i,)] = divisible
    src = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options), options["num_warps"]


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
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--op", default="window_attention", choices=["window_attention", "contrastive"])
    parser.add_argument("--arch", type=int, default=90, help="compute capability as an int (90 = Hopper)")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    parser.add_argument("--layers", default=None, help=f"window_attention: subset of {','.join(LAYERS)}; "
                        f"contrastive: subset of {','.join(CL_SHAPES)}")
    parser.add_argument("--head-dim", type=int, default=32, help="window_attention's head_dim")
    parser.add_argument("--out", type=Path, help="write the markdown table here")
    args = parser.parse_args(argv)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    if args.op == "window_attention":
        what = f"Window-attention kernels, {args.dtype}, head_dim {args.head_dim}, with bias"
        cases = {}
        for layer in (args.layers or ",".join(LAYERS)).split(","):
            grid, heads, window, shift = LAYERS[layer]
            cases[layer] = lambda g=grid, h=heads, w=window, s=shift: record_launches(
                (1, *g, h, args.head_dim), w, s, dtype)
    else:
        what = f"Contrastive-loss kernels, {args.dtype}, square symmetric loss"
        cases = {}
        for name in (args.layers or ",".join(CL_SHAPES)).split(","):
            n, d = CL_SHAPES[name]
            cases[name] = lambda n=n, d=d: record_contrastive_launches(n, d, dtype)
    rows = [
        f"{what}, compiled for sm_{args.arch} (triton {triton.__version__}; ahead of time, no GPU involved; "
        "resources, not timings).",
        "",
        "| case | kernel | warps | tiles (M x N) | registers/thread | stack bytes | shared bytes | matrix op |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for case, record in cases.items():
        for name, _grid, launch_args, kwargs in record():
            tiles = (f"{kwargs['P']} x {kwargs['QB']}" if "QB" in kwargs else  # the fused backward: keys x queries
                     f"{kwargs.get('BLOCK_M', kwargs.get('BLOCK_R', '-'))} x {kwargs.get('BLOCK_N', '-')}")
            compiled, warps = compile_launch(name, launch_args, dict(kwargs), args.arch)
            rep = cubin_report(compiled.asm["cubin"])
            kernel = name.removeprefix("_htwa_").removeprefix("_")
            rows.append(
                f"| {case} | {kernel} | {warps} | {tiles} | {rep['registers']} | "
                f"{rep['stack']} | {compiled.metadata.shared} | {rep['mma']} |"
            )
    table = "\n".join(rows)
    print(table)
    if args.out:
        args.out.write_text(table + "\n")


if __name__ == "__main__":
    main()
