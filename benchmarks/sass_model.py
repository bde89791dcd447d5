"""The issue floor of a compiled kernel: its SASS loops, a per-kernel trip-count model, and sm_90 occupancy.

Model (``benchmarks.kernel_resources --issue-floor`` prints and writes it): an issue-only lower bound. Every warp
instruction takes one issue slot of one of the SM's 4 schedulers, so a launch needs at least

    warp-instructions executed / (132 SMs x 4 schedulers x 1.8e9 /s)

seconds, with warp-instructions = programs x warps x (straight-line instructions + sum over the SASS loops of their
body instructions x trip count). Trip counts come from the launch's constexprs and ints, through
:data:`KERNEL_MODELS`. What this cannot see: memory stalls and bandwidth, latency, tensor-core occupancy and
throughput (an HGMMA is one issue slot however long it runs), dependency stalls, L2 behaviour, wave quantisation.
It says how fast a kernel could be *if nothing but instruction issue limited it*; a kernel far above its issue floor
on a GPU is stalled, one near it is issue-bound and only fewer instructions help.

Loops: a backward branch in the SASS (a ``BRA`` to a label at or before it) closes a loop from its target to the
branch; loops nest by containment. The *main loop* is the innermost loop containing matrix instructions (HGMMA,
HMMA); a kernel without such a loop uses the whole kernel. ``loop_instr_per_elem`` = main-loop instructions x
threads / score elements one iteration computes: what each score element costs in issue slots across the CTA.

Counting: NOPs padding the end of the kernel and the unconditional ``BRA`` to itself that ends every kernel (a trap
after the last ``EXIT``, never reached) are not instructions; everything else counts once per execution. Branches
inside a loop (``if`` on a runtime value, predicated-off paths) are counted as taken: all of the body, every trip.
Software-pipelined loops (Triton's ``num_stages``): the prologue (the first iteration's loads, issued before the loop)
is straight-line code outside the backward branch and counts once per program; Triton predicates the prefetch of the
last iteration instead of peeling an epilogue, so the SASS loop runs the source trip count and its body counts that
many times. A loop whose trip count is fixed at compile time (``Static``) may be compiled away (one trip, or fully
unrolled by ptxas); the model then drops it, innermost first, and its trip count multiplies the elements of the loop
that holds its unrolled copies.

Hand check (the v1 forward kernel, commit 45d33a5, at lfvila-base layer 3: bf16, head_dim 32, window 16x3x5 = 240
tokens, a 128 x 64 score tile, 8 warps = 256 threads, so 32 score elements per thread per key block). ``nvdisasm``
shows one loop, ``.L_x_0`` to ``@!P2 BRA `(.L_x_0)``, of 1060 instructions; ``sort | uniq -c`` of its opcodes: 6
HGMMA (per warpgroup QK^T 64x64x16 x 2, PV 64x32x16 x 4); per thread and key block 34 MUFU (32 exp2 of the scores + 2
row rescales: 1 per element), 96 FSEL (3 per element: the allowed-pair select and exp2's range fix-up), 68 FADD +
48 FMUL + 34 FFMA + 36 FMNMX (scale, bias add, max, subtract, row sum: ~5.8 per element), 34 LDGSTS (the bias
gather, one cp.async per element, plus k and v), and 176 IMAD + 161 ISETP + 75 SEL + 73 LEA + 54 LOP3 + 31 SHF +
17 IADD3 + 13 VIADD = 600 integer instructions, ~19 per element: the per-element bias address and the region and
validity compares. 1060 x 256 / (128 x 64) = 33.1 instructions per score element, what ``loop_instr_per_elem``
reports there (FlashAttention-2's inner loop: ~6). The straight-line part (1397 instructions: query coordinates, the
q load, the output) counts once per program, the loop ``cdiv(240, 64)`` = 4 times: 4096 programs x 8 warps x (1397
+ 4 x 1060) / 9.504e11 warp-instructions per second = 194 µs.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field

# sm_90 (H100 / H200 SXM): what bounds issue and occupancy.
SMS, SCHEDULERS, CLOCK_HZ = 132, 4, 1.8e9
HBM_BYTES_PER_S = 4.8e12  # H200 HBM3e: the memory-bound estimate of the torch ops between kernels
REGS_PER_SM, REG_ALLOC_PER_WARP, SMEM_PER_SM, SMEM_RESERVED_PER_CTA = 65536, 256, 228 * 1024, 1024
WARPS_PER_SM, CTAS_PER_SM = 64, 32
MATRIX_OPS = ("HGMMA", "HMMA", "IMMA", "IGMMA", "QGMMA", "DMMA")

_INSTR = re.compile(r"^\s*/\*([0-9a-f]+)\*/\s+(.+?)\s*;?\s*$")
_LABEL = re.compile(r"^\s*(\.L_[\w.]+):")
_PRED = re.compile(r"^@!?U?P(?:T|\d+)\s+")
_TARGET = re.compile(r"`\((\.L_[\w.]+)\)")


class Static(int):
    """A trip count fixed at compile time (a ``range`` over constexprs): the compiler may unroll the loop away."""


# --------------------------------------------------------------------------------------------------- SASS
@dataclass
class Loop:
    """Instructions ``start..end`` (indices, inclusive) of the kernel: ``end`` is the backward branch."""

    start: int
    end: int
    depth: int = 0
    children: list[Loop] = field(default_factory=list)
    matrix: int = 0  # matrix instructions inside, nested loops included

    @property
    def size(self) -> int:
        return self.end - self.start + 1

    @property
    def own(self) -> int:
        """Instructions of this loop outside its nested loops."""
        return self.size - sum(c.size for c in self.children)

    def walk(self):
        yield self
        for child in self.children:
            yield from child.walk()


@dataclass
class Sass:
    """One kernel's SASS: instructions (without padding) and its loop forest."""

    instructions: list[str]
    loops: list[Loop]

    def all_loops(self) -> list[Loop]:
        return [loop for root in self.loops for loop in root.walk()]

    @property
    def depth(self) -> int:
        return max((loop.depth + 1 for loop in self.all_loops()), default=0)

    @property
    def straight(self) -> int:
        return len(self.instructions) - sum(root.size for root in self.loops)

    def main_loop(self) -> Loop | None:
        """The innermost loop holding matrix instructions (the deepest, then largest, if several), or None."""
        with_mma = [loop for loop in self.all_loops() if loop.matrix and not any(c.matrix for c in loop.children)]
        return max(with_mma, key=lambda loop: (loop.depth, loop.size), default=None)


def opcode(instruction: str) -> str:
    """``@!P0 HGMMA.64x64x16.F32.BF16 R24, ...`` -> ``HGMMA``."""
    return _PRED.sub("", instruction).split(None, 1)[0].split(".", 1)[0]


def parse_sass(text: str, kernel: str | None = None) -> Sass:
    """The ``.text.<kernel>`` section of ``nvdisasm`` output (the first kernel when ``kernel`` is None)."""
    raw, labels, pending, inside = [], {}, [], False
    for line in text.splitlines():
        stripped = line.strip()
        if not inside:
            inside = stripped.startswith(".text.") and stripped.endswith(":") and (
                kernel is None or stripped == f".text.{kernel}:")
            continue
        if stripped.startswith((".section", "//----")):
            break
        if m := _LABEL.match(line):
            pending.append(m.group(1))
        elif m := _INSTR.match(line):
            labels.update((name, len(raw)) for name in pending)
            pending = []
            raw.append(m.group(2).strip())
    if not inside:
        raise ValueError(f"no .text section for kernel {kernel!r} in the SASS")

    def target(i):
        t = _TARGET.search(raw[i]) if opcode(raw[i]) == "BRA" else None
        return labels.get(t.group(1)) if t else None

    # padding: unconditional branches to themselves (the trap after the last EXIT), then the trailing NOPs
    keep = [not (target(i) == i and not _PRED.match(raw[i])) for i in range(len(raw))]
    while keep and (not keep[-1] or opcode(raw[len(keep) - 1]) == "NOP"):
        keep.pop()
    index = {}
    for i, kept in enumerate(keep):
        if kept:
            index[i] = len(index)
    spans: dict[int, int] = {}
    for i in index:
        if (t := target(i)) is not None and t <= i and t in index:
            spans[index[t]] = max(spans.get(index[t], index[i]), index[i])  # several back edges to one head: one loop
    instructions = [raw[i] for i in index]
    return Sass(instructions, _nest([Loop(s, e) for s, e in spans.items()], instructions))


def _nest(loops: list[Loop], instructions: list[str]) -> list[Loop]:
    roots, stack = [], []
    for loop in sorted(loops, key=lambda lp: (lp.start, -lp.end)):
        while stack and stack[-1].end < loop.start:
            stack.pop()
        if stack and loop.end > stack[-1].end:
            raise ValueError(f"SASS loops overlap without nesting: {stack[-1].start}..{stack[-1].end} and "
                             f"{loop.start}..{loop.end}")
        loop.depth = len(stack)
        (stack[-1].children if stack else roots).append(loop)
        stack.append(loop)
    for loop in (lp for root in roots for lp in root.walk()):
        loop.matrix = sum(opcode(ins) in MATRIX_OPS for ins in instructions[loop.start:loop.end + 1])
    return roots


# --------------------------------------------------------------------------------------------------- occupancy
def ctas_per_sm(registers: int, shared_bytes: int, warps: int) -> int:
    """Resident CTAs per sm_90 SM, from registers (allocated per warp in units of 256), shared memory (1 KB reserved
    per CTA) and warps."""
    regs_per_warp = math.ceil(registers * 32 / REG_ALLOC_PER_WARP) * REG_ALLOC_PER_WARP
    by_regs = REGS_PER_SM // max(1, regs_per_warp * warps)
    by_smem = SMEM_PER_SM // (shared_bytes + SMEM_RESERVED_PER_CTA)
    return min(by_regs, by_smem, WARPS_PER_SM // warps, CTAS_PER_SM)


# --------------------------------------------------------------------------------------------------- trip counts
class Launch(dict):
    """A recorded launch as the models read it: argument name -> value (ints, floats, constexprs; tensors as
    tensors, so ``launch["WIN"].shape`` works), plus ``.name``, ``.grid``, ``.warps``."""

    def __init__(self, name: str, grid: tuple[int, ...], warps: int, values: dict):
        super().__init__(values)
        self.name, self.grid, self.warps = name, tuple(grid), warps

    @property
    def programs(self) -> int:
        return math.prod(self.grid)


def _cdiv(a, b) -> int:
    return -(-a // b)


def _window(launch: Launch) -> int:
    """Token positions a window-attention kernel loops over: ``N`` (v1 kernels) or the padded ``P`` (v2)."""
    return launch["N"] if "N" in launch else launch["P"]


def _group_trips(launch: Launch) -> list:
    """v2 kernels that take a group of (window, batch) items (``GRP`` rows ``(j0, nj, b0, nb, class)``, see
    ``_groups``): the mean trip counts of the window loop and of the batch loop inside it, from the shapes alone
    (``GRP`` may be a meta tensor). Groups are whole windows with every batch (then ``groups <= windows``) or one
    window and a batch range; either way the trips summed over programs are exact, which is all the floor needs.
    Earlier v2 kernels (``GSTART``): one item loop."""
    windows = launch["WIN"].shape[0]
    if "GSTART" in launch:
        return [launch["B"] * windows / (launch["GSTART"].shape[0] - 1)]
    groups, batch = launch["GRP"].shape[0], launch["Q"].shape[0]
    if groups <= windows:
        return [windows / groups, batch]
    return [1, windows * batch / groups]


def _window_attention_fwd(launch: Launch) -> dict:
    items = _group_trips(launch) if ("GSTART" in launch or "GRP" in launch) else []  # v1: one item per program
    return {"elements": launch["BLOCK_M"] * launch["BLOCK_N"], "useful": 1.0,
            "trips": [*items, Static(_cdiv(_window(launch), launch["BLOCK_N"]))]}


def _window_attention_dq(launch: Launch) -> dict:
    """The dq kernel's key-block loop; before it lost the bias gradient (``n_split`` in the launch), it walked the
    items of a split outside that loop."""
    keys = Static(_cdiv(_window(launch), launch["BLOCK_N"]))
    if "n_split" not in launch:
        return {"elements": launch["BLOCK_M"] * launch["BLOCK_N"], "useful": 0.2, "trips": [keys]}
    items = launch["n_items"] if "n_items" in launch else launch["n_win"] * launch["B"]
    return {"elements": launch["BLOCK_M"] * launch["BLOCK_N"], "useful": 0.2,
            "trips": [items / launch["n_split"], keys]}


def _cl_fwd(launch: Launch) -> dict:
    """Contrastive forward. v1 (no ``CB_PER_SPLIT``): a program's row blocks x column blocks x feature chunks; the
    main loop is the GEMM's K loop, one trip a BLOCK_M x BLOCK_N partial product, so its per-element count excludes
    the softmax (which the floor includes). v2: program (g, split) takes row blocks g, g + G, ...; per row block the
    positives' K loop (``POS_K`` chunks; only split 0 runs it: a mean over the splits) and the split's full column
    blocks (with the row tile resident, ``HOIST``, one trip is a whole logit tile; otherwise a K loop inside, and the
    last, partial column block has a K loop of its own beside the column loop)."""
    bm, bn, m, d = launch["BLOCK_M"], launch["BLOCK_N"], launch["M"], launch["D"]
    rows = launch["n_row_blocks"] / launch["G"]
    if "CB_PER_SPLIT" not in launch:
        return {"elements": bm * bn, "useful": 1.0, "trips": [rows, _cdiv(m, bn), _cdiv(d, launch["BLOCK_K"])]}
    splits, per = launch.grid[1], launch["CB_PER_SPLIT"]
    n_cb, n_full = _cdiv(m, bn), m // bn
    full = sum(max(0, min(sp * per + per, n_cb, n_full) - sp * per) for sp in range(splits)) / splits
    pos = _cdiv(d, launch["POS_K"]) / splits
    if launch["HOIST"]:
        return {"elements": bm * bn, "useful": 1.0, "trips": [rows, [pos, full]]}
    # the split holding the partial block runs its K loop once per row block (compiled in either way: a runtime if)
    partial = (n_cb > n_full) / splits
    return {"elements": bm * bn, "useful": 1.0, "trips": [rows, [pos, full, partial], _cdiv(d, launch["BLOCK_K"])]}


def _cl_bwd(launch: Launch) -> dict:
    """Contrastive backward, one launch per side (da, db); useful: its dlogits @ b, half of the backward. v1: column
    blocks x feature chunks. v2: the full column blocks (``M // BLOCK_N``; one trip a logit tile when ``HOIST``, else
    a K loop inside), and the partial block's K loop beside it (compiled in either way, run where M % BLOCK_N)."""
    bm, bn, m, d = launch["BLOCK_M"], launch["BLOCK_N"], launch["M"], launch["D"]
    k = _cdiv(d, launch["BLOCK_K"])
    if "HOIST" not in launch:
        return {"elements": bm * bn, "useful": 0.5, "trips": [_cdiv(m, bn), k]}
    n_full, partial = m // bn, m % bn != 0
    if launch["HOIST"]:
        return {"elements": bm * bn, "useful": 0.5, "trips": [n_full]}
    return {"elements": bm * bn, "useful": 0.5, "trips": [[n_full, int(partial)], k]}


# Kernel name -> (launch -> {"elements": score elements one iteration of the innermost loop computes (None: an
# elementwise kernel), "trips": trip count per SASS loop depth, outermost first (``Static`` when fixed at compile
# time; a mean over programs is fine; a list where sibling loops share a depth: one per loop, in address order),
# "useful": the share of the pass's useful FLOPs the launch computes (each of the flash convention's GEMMs counted
# in the first kernel that computes it; absent: none)}). A new kernel needs an entry here; a kernel without one
# stops the run with its name, and so does a model whose loop levels do not match the kernel's SASS.
KERNEL_MODELS: dict[str, Callable[[Launch], dict]] = {
    # window attention: one program per (window or group of items, head, query block); looping over key blocks
    "_window_attention_fwd_kernel": _window_attention_fwd,
    "_window_attention_bwd_delta_kernel": lambda launch: {"elements": None, "trips": []},
    # the bias + mask tile of (class, head, row block): elementwise
    "_window_attention_tile_kernel": lambda launch: {"elements": None, "trips": []},
    # one table row per program: splits x its pairs in BLOCK_F chunks. Every row has a pair, so a row takes at least
    # one chunk and on average at least (N^2 / rows) / BLOCK_F (a lower bound: the per-row rounding up is not known
    # from the shapes)
    "_window_attention_bias_grad_kernel": lambda launch: {
        "elements": None, "trips": [
            Static(1) if launch["n_split"] == 1 else launch["n_split"],  # an int equal to 1 is specialised
            max(1.0, launch["PAIRS"].shape[0] / (launch["RPTR"].shape[0] - 1) / launch["BLOCK_F"])]},
    # S, dP, dV, dK (4 of the 5 backward GEMMs) over the query blocks of a key block
    "_window_attention_bwd_dkdv_kernel": lambda launch: {
        "elements": launch["BLOCK_M"] * launch["BLOCK_N"], "useful": 0.8,
        "trips": [Static(_cdiv(_window(launch), launch["BLOCK_M"]))]},
    # key blocks (v2 at first: the items of a split x key blocks, with the bias gradient); recomputes S and dP, adds dQ
    "_window_attention_bwd_dq_kernel": _window_attention_dq,
    # long windows' bias-gradient partial: a group's items x one (query block, key block) tile; recomputes S and dP
    "_window_attention_bwd_db_kernel": lambda launch: {
        "elements": launch["BLOCK_M"] * launch["BLOCK_N"], "useful": 0.0, "trips": _group_trips(launch)},
    # v2, windows of <= 128 padded tokens: all five GEMMs of an item's P x P scores per trip of the item loop
    "_window_attention_bwd_fused_kernel": lambda launch: {
        "elements": launch["P"] * launch["P"], "useful": 1.0, "trips": _group_trips(launch)},
    # contrastive loss: see _cl_fwd / _cl_bwd
    "_cl_fwd_kernel": lambda launch: _cl_fwd(launch),
    "_cl_bwd_kernel": lambda launch: _cl_bwd(launch),
}


def kernel_model(launch: Launch) -> dict:
    if launch.name not in KERNEL_MODELS:
        raise KeyError(f"kernel {launch.name!r} has no trip-count model: add an entry for it to "
                       f"benchmarks.sass_model.KERNEL_MODELS (see the entries there)")
    return KERNEL_MODELS[launch.name](launch)


def issue_counts(sass: Sass, model: dict, kernel: str, threads: int) -> dict:
    """Per-program instruction counts from the SASS and a model's trip counts.

    Returns ``straight``, ``loops`` (``[depth, own instructions, trips]`` per SASS loop), ``per_program`` (the
    instructions one warp executes), ``main_body`` (instructions of the main loop, or of the kernel without one) and
    ``loop_instr_per_elem`` (None for elementwise kernels)."""
    levels, elements = list(model["trips"]), model.get("elements")
    while len(levels) > sass.depth:  # compile-time loops the compiler removed: innermost first
        static = [i for i, t in enumerate(levels) if isinstance(t, Static)]
        if not static:
            break
        elements = None if elements is None else elements * levels[static[-1]]
        del levels[static[-1]]
    if len(levels) != sass.depth:
        raise ValueError(f"kernel {kernel!r}: its SASS has {sass.depth} nested loop level(s) "
                         f"({[(lp.depth, lp.size) for lp in sass.all_loops()]}: depth, instructions), its model in "
                         f"KERNEL_MODELS gives trip counts for {len(model['trips'])}: {model['trips']}")
    at_depth: dict[int, list[Loop]] = {}
    for lp in sass.all_loops():  # pre-order: address order within a depth
        at_depth.setdefault(lp.depth, []).append(lp)
    for d, t in enumerate(levels):
        if isinstance(t, (list, tuple)) and len(t) != len(at_depth[d]):
            raise ValueError(f"kernel {kernel!r}: {len(at_depth[d])} SASS loop(s) at depth {d}, its model in "
                             f"KERNEL_MODELS gives {len(t)} trip counts there: {t}")

    def trips(lp):
        t = levels[lp.depth]
        return t[at_depth[lp.depth].index(lp)] if isinstance(t, (list, tuple)) else t

    loops, per_program = [], sass.straight

    def visit(lp, outer):  # outer: executions of the enclosing loop's body per program
        nonlocal per_program
        reps = outer * trips(lp)
        loops.append([lp.depth, lp.own, trips(lp)])
        per_program += lp.own * reps
        for child in lp.children:
            visit(child, reps)

    for root in sass.loops:
        visit(root, 1)
    main = sass.main_loop()
    body = main.size if main is not None else len(sass.instructions)
    return {"straight": sass.straight, "loops": loops, "per_program": per_program, "main_body": body,
            "loop_instr_per_elem": body * threads / elements if elements else None}


def issue_floor_us(warp_instructions: float) -> float:
    return warp_instructions / (SMS * SCHEDULERS * CLOCK_HZ) * 1e6


# --------------------------------------------------------------------------------------------------- TTGIR
_MMA_LAYOUT = re.compile(r"^#(\w+) = #ttg\.nvidia_mma<\{.*?warpsPerCTA = \[(\d+), (\d+)\]")
_DOT_RESULT = re.compile(r"(?:tt\.dot|ttng\.warp_group_dot) .*-> tensor<(\d+)x(\d+)x\w+, #(\w+)>")


def replicated_dots(ttgir: str) -> list[str]:
    """Matrix products whose warps repeat each other's work: a dot with an ``M``-row result in an mma layout of
    ``warpsPerCTA = [wm, wn]`` gives each of the ``wm`` warp rows 16 rows (one wgmma / mma.sync row block), so
    ``16 * wm > M`` means some warps compute rows another warp computes too (Triton's chained-dot rule puts every
    warp along M: 8 warps on a 64-row tile is [8, 1], the second warpgroup redoing the first's product). Returns a
    description of each such dot (empty: no replicated work)."""
    layouts = {m.group(1): (int(m.group(2)), int(m.group(3)))
               for line in ttgir.splitlines() if (m := _MMA_LAYOUT.match(line))}
    out = []
    for line in ttgir.splitlines():
        if (m := _DOT_RESULT.search(line)) and m.group(3) in layouts:
            rows, (wm, wn) = int(m.group(1)), layouts[m.group(3)]
            if 16 * wm > rows:
                out.append(f"{rows}x{m.group(2)} result with warpsPerCTA [{wm}, {wn}]: {line.strip()[:120]}")
    return out
