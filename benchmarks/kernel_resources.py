"""Compile the window-attention kernels ahead of time for a GPU architecture and report their resources.

No GPU is needed: the launchers run on small CPU tensors with every kernel replaced by a recorder, so the recorded
launches carry exactly the constexprs (tiles, window, flags) and warps the real launch would use; each is then
compiled by Triton for the target (default sm_90, Hopper) and its cubin read with ``cuobjdump`` for registers,
spills and shared memory, and with ``nvdisasm`` for the matrix instructions used (HGMMA = Hopper wgmma, HMMA =
mma.sync). What this cannot tell: time. Use it to catch spills and compile failures before spending GPU time.

    python -m benchmarks.kernel_resources --out benchmarks/results/kernel-resources-sm90.md
"""

from __future__ import annotations

import argparse
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

from lfvila_kernels import _window_attention_triton as fused  # noqa: E402
from lfvila_kernels.reference import bias_table_rows  # noqa: E402

KERNELS = ("_htwa_fwd_kernel", "_htwa_bwd_delta_kernel", "_htwa_bwd_dkdv_kernel", "_htwa_bwd_dq_kernel")
# LF-VILA's layers (grid, heads, window, shift); head_dim 32. Layer 4 has layer 3's shapes.
LAYERS = {
    "layer0": ((32, 24, 40), 4, (2, 3, 5), (0, 1, 2)),
    "layer1": ((32, 12, 20), 8, (4, 3, 5), (0, 1, 2)),
    "layer2": ((32, 6, 10), 16, (8, 3, 5), (0, 1, 2)),
    "layer3": ((32, 6, 10), 16, (16, 3, 5), (0, 1, 2)),
    "layer5": ((32, 3, 5), 32, (32, 3, 5), (0, 0, 0)),
}
_TRITON_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.int64: "i64"}


class _Recorder:
    """Stands in for a ``@triton.jit`` kernel: ``kernel[grid](*args, **kwargs)`` records the launch."""

    def __init__(self, name, launches):
        self.name, self.launches = name, launches

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((self.name, grid, args, kwargs))


def record_launches(shape, window, shift, dtype, bias=True):
    """Run the forward and backward launchers on CPU tensors with recorders in place of the kernels."""
    launches, saved = [], {name: getattr(fused, name) for name in KERNELS}
    try:
        for name in KERNELS:
            setattr(fused, name, _Recorder(name, launches))
        q, k, v = (torch.randn(shape).to(dtype) for _ in range(3))
        table = torch.randn(bias_table_rows(window), shape[4]) if bias else None
        o, lse = fused._launch_fwd(q, k, v, table, window, shift, shape[-1] ** -0.5)
        fused._launch_bwd(torch.randn(shape).to(dtype), q, k, v, o, lse, table, window, shift, shape[-1] ** -0.5)
    finally:
        for name, fn in saved.items():
            setattr(fused, name, fn)
    return launches


def compile_launch(name, args, kwargs, arch: int):
    """AOT-compile one recorded launch for ``cuda:arch``; returns the compiled kernel."""
    fn = getattr(fused, name)
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
    parser.add_argument("--arch", type=int, default=90, help="compute capability as an int (90 = Hopper)")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    parser.add_argument("--layers", default=",".join(LAYERS), help=f"comma-separated subset of {','.join(LAYERS)}")
    parser.add_argument("--head-dim", type=int, default=32)
    parser.add_argument("--out", type=Path, help="write the markdown table here")
    args = parser.parse_args(argv)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    rows = [
        f"Window-attention kernels compiled for sm_{args.arch}, {args.dtype}, head_dim {args.head_dim}, with bias "
        f"(triton {triton.__version__}; compiled ahead of time, no GPU involved; resources, not timings).",
        "",
        "| layer | kernel | warps | tiles (M x N) | registers/thread | stack bytes | shared bytes | matrix op |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for layer in args.layers.split(","):
        grid, heads, window, shift = LAYERS[layer]
        shape = (1, *grid, heads, args.head_dim)
        for name, _grid, launch_args, kwargs in record_launches(shape, window, shift, dtype):
            tiles = f"{kwargs.get('BLOCK_M', kwargs.get('BLOCK_R', '-'))} x {kwargs.get('BLOCK_N', '-')}"
            compiled, warps = compile_launch(name, launch_args, dict(kwargs), args.arch)
            rep = cubin_report(compiled.asm["cubin"])
            rows.append(
                f"| {layer} | {name.removeprefix('_htwa_')} | {warps} | {tiles} | {rep['registers']} | "
                f"{rep['stack']} | {compiled.metadata.shared} | {rep['mma']} |"
            )
    table = "\n".join(rows)
    print(table)
    if args.out:
        args.out.write_text(table + "\n")


if __name__ == "__main__":
    main()
