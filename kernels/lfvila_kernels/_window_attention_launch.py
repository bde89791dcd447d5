"""HTWA window attention on the GPU: geometry-dependent tiles and work split, the launchers, the ``torch.library`` op.

The ``@triton.jit`` kernels, and the design they implement, are in ``_window_attention_kernels.py``; the geometry
(window tokens, mask classes) in ``_window_geometry.py``. Everything here runs in torch, once per call.
"""

from __future__ import annotations

import contextlib
import math

import torch
import triton

from ._window_attention_kernels import (
    _window_attention_bias_grad_kernel,
    _window_attention_bwd_delta_kernel,
    _window_attention_bwd_fused_kernel,
    _window_attention_fwd_kernel,
    _window_attention_tile_kernel,
)
from ._window_attention_split_kernels import (
    _window_attention_bwd_db_kernel,
    _window_attention_bwd_dkdv_kernel,
    _window_attention_bwd_dq_kernel,
)
from ._window_geometry import geometry as _geometry
from ._window_geometry import pow2 as _pow2
from .dispatch import interpreting
from .reference import bias_table_rows, relative_position_bias, relative_position_index

LOG2E = 1.4426950408889634
_MAX_GRID_YZ = 65535
_FOLD_MAX_SPLITS = 16  # _bias_grad: more partials than this (the fused backward's groups) are summed first
_FUSED_MAX = 128  # the fused backward holds a window's keys in one tile: P <= 128 keeps it in registers


# ----------------------------------------------------------------------------------------------------------------------
# Geometry, tiles and configs (torch, once per call; the geometry is cached per (grid, window, shift, device))
# ----------------------------------------------------------------------------------------------------------------------

_config_override: dict | None = None


@contextlib.contextmanager
def override_config(**cfg):
    """Force tiles and work split in a scope, for tests (the multi-block, multi-group and split paths at small
    shapes) and tuning runs. Keys: ``fwd_m``, ``fwd_n`` (forward tiles), ``group`` (items per program),
    ``fwd_warps``, ``fused_warps`` (warps of the forward and the fused backward; default: ``_chained_warps``),
    ``bwd`` (``"fused"`` or ``"split"``), ``fused_qb`` (the fused backward's query sub-block), ``dkdv_m``,
    ``dkdv_n``, ``dq_m``, ``dq_n``, ``db_m``, ``db_n`` (the split backward's tiles: ``_m`` queries, ``_n`` keys),
    ``split`` (the split backward's bias-gradient kernel: items per group ``ceil(items / split)``), ``i64`` (int64
    offsets, which only tensors of 2**31 elements need)."""
    global _config_override
    previous, _config_override = _config_override, dict(cfg)
    try:
        yield
    finally:
        _config_override = previous


def _chained_warps(rows: int) -> int:
    """Warps for a tile whose scores feed a second GEMM: Triton then puts every warp on the rows (16 each on both
    mma.sync and wgmma), so more than rows / 16 warps would repeat each other's work."""
    return max(1, min(8, rows // 16))


def _blocks(P: int, head_dim: int, dtype: torch.dtype = torch.bfloat16) -> dict:
    """Default tiles for a window of ``P`` padded tokens; ``override_config`` sets others.

    LF-VILA's windows hold 30, 60, 120, 240, 480 tokens: P = 32, 64, 128, 256, 512. Half precision (tensor cores):
    up to 128 the forward takes the whole window as one tile (its bias + mask tile then stays in registers; one warp
    per 32 rows up to P = 64, ``fwd_warps``: fewer instructions per score element than a warp per 16 rows, 12.3
    against 13.6 at P = 32 and 9.0 against 10.7 at P = 64) and the backward is the fused kernel; beyond, 128 x 128
    forward tiles and the split backward (dk/dv 64 keys x 64 queries, dq 128 x 128, bias-gradient 64 x 64), 2
    pipeline stages.

    fp32 (IEEE products on FFMA: both operands of every dot live in registers) has its own table, chosen with the
    compiled-code yardstick (``benchmarks.kernel_resources --issue-floor --dtype fp32``; sm_90): the half tiles make
    ptxas fall back to 32 registers and spill 8-11 KB a thread from P = 128 on. One pipeline stage, 64 x 32 forward
    tiles (64 x 16 at head_dim 64: the forward keeps a window's q and o offsets in registers across its batch
    items) and 32 x 32 split-backward tiles (at head_dim 64: dk/dv 32 keys x 16 queries, dq 32 x 16, bias gradient
    16 x 16) spill at most 16 bytes; the fused backward is kept for P <= 32 only (at P = 64 it spills 1.6 KB)
    (benchmarks/NOTES-window-attention.md)."""
    if dtype == torch.float32:
        cfg = dict(fwd_m=min(P, 64 if head_dim <= 64 else 32), fwd_n=min(P, 32 if head_dim <= 32 else 16),
                   bwd="fused" if P <= 32 else "split", fused_qb=P if P <= 32 else 32,
                   dkdv_m=min(P, 32 if head_dim <= 32 else 16), dkdv_n=min(P, 32), dq_m=min(P, 32),
                   dq_n=P if P <= 32 else (32 if head_dim <= 32 else 16),
                   db_m=min(P, 32 if head_dim <= 32 else 16), db_n=min(P, 32 if head_dim <= 32 else 16), stages=1)
    elif P <= _FUSED_MAX:
        cfg = dict(fwd_m=P, fwd_n=P, fwd_warps=max(1, P // 32) if P <= 64 else _chained_warps(P), bwd="fused",
                   fused_qb=min(P, 64), dkdv_m=min(P, 64), dkdv_n=min(P, 64), dq_m=min(P, 64), dq_n=P,
                   db_m=min(P, 64), db_n=min(P, 64), stages=2)
    else:
        wide = head_dim <= 64
        cfg = dict(fwd_m=128 if wide else 64, fwd_n=128 if wide else 64, bwd="split", fused_qb=64, dkdv_m=64,
                   dkdv_n=64, dq_m=128 if wide else 64, dq_n=128 if wide else 64, db_m=64, db_n=64, stages=2)
    if _config_override:
        cfg.update({k: v for k, v in _config_override.items() if k not in ("split", "group", "i64")})
    if cfg["bwd"] == "fused" and (P > _FUSED_MAX or P not in (cfg["fused_qb"] * n for n in (1, 2, 4))):
        raise ValueError(f"the fused backward needs P <= {_FUSED_MAX} and P = 1, 2 or 4 query sub-blocks; got "
                         f"P={P}, fused_qb={cfg['fused_qb']}")
    return cfg


def _sm_count(device: torch.device) -> int | None:
    """Streaming multiprocessors of a CUDA device (None elsewhere): the work split depends on it alone."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else None


def _tiles(geo: dict, table: torch.Tensor | None, window, dtype: torch.dtype, scale: float):
    """``(classes, heads, P, P)`` in ``dtype``: ``bias / scale`` (the bias in units of raw scores ``q . k``) where
    allowed, ``-inf`` elsewhere; ``None`` when there is neither a bias nor a mask. A function of the table, so its
    gradient flows through the kernels' dtable output, not through this tensor (built from ``table.detach()``)."""
    allowed, N, P = geo["allowed"], geo["N"], geo["P"]
    if table is None and bool(allowed.all()):
        return None
    heads = 1 if table is None else table.shape[1]
    bias = torch.zeros((heads, P, P), dtype=torch.float32, device=allowed.device)
    if table is not None:
        bias[:, :N, :N] = relative_position_bias(table.detach().float(), window) * (1.0 / scale)
    tile = torch.where(allowed[:, None], bias[None], float("-inf"))
    return tile.to(dtype).contiguous()


def _rel_tables(geo: dict, window) -> dict:
    """Per geometry, cached in ``geo``: the relative-position index ``(N, N)`` int32 and its pairs grouped by table
    row (``pairs``: flat ``i * P + j`` sorted by row, stable; ``rptr``: rows + 1 offsets), on the geometry's device."""
    if "rel_index" not in geo:
        N, P = geo["N"], geo["P"]
        index = relative_position_index(window).reshape(-1)  # CPU, (N * N,)
        order = torch.sort(index, stable=True).indices
        counts = torch.bincount(index, minlength=bias_table_rows(window))
        device = geo["tok"].device
        geo["rel_index"] = index.to(torch.int32).to(device)
        geo["pairs"] = ((order // N) * P + order % N).to(torch.int32).to(device)
        geo["rptr"] = torch.cat([counts.new_zeros(1), counts.cumsum(0)]).to(torch.int32).to(device)
    return geo


def _tile(geo: dict, table: torch.Tensor | None, window, dtype: torch.dtype, scale: float, transpose: bool = False):
    """:func:`_tiles` computed by ``_window_attention_tile_kernel`` (one read of the table, one write of the tile; equal
    bit for bit), or its ``(classes, heads, key, query)`` transpose for the fused backward; None without bias or
    mask."""
    allowed, P = geo["allowed"], geo["P"]
    if table is None:  # a mask alone: none without a shift or padding (one device sync per geometry, not per call)
        if "all_allowed" not in geo:
            geo["all_allowed"] = bool(allowed.all())
        if geo["all_allowed"]:
            return None
    heads = 1 if table is None else table.shape[1]
    out = torch.empty((allowed.shape[0], heads, P, P), dtype=dtype, device=allowed.device)
    rel = _rel_tables(geo, window)
    block_r = max(1, min(P, 4096 // P))
    t = table.detach() if table is not None else out
    _window_attention_tile_kernel[(allowed.shape[0], heads, P // block_r)](
        t, rel["rel_index"], allowed.view(torch.uint8), out,
        t.stride(0) if table is not None else 0, t.stride(1) if table is not None else 0, geo["N"], 1.0 / scale,
        P=P, BLOCK_R=block_r, HAS_TABLE=table is not None, TRANSPOSE=transpose, num_warps=4,
    )
    return out


def _bias_grad(partials: torch.Tensor, geo: dict, window) -> torch.Tensor:
    """The table gradient ``(rows, heads)`` fp32 from the dense partials ``(groups, heads, P, P)``: one pass of
    ``_window_attention_bias_grad_kernel`` (fixed order; no atomics)."""
    rel = _rel_tables(geo, window)
    if partials.shape[0] > _FOLD_MAX_SPLITS:  # many small partials (the fused backward's groups): one contiguous
        partials = partials.sum(0, keepdim=True)  # fixed-order sum first, not a gather per group and pair
    splits, nh = partials.shape[:2]
    rows = rel["rptr"].numel() - 1
    out = torch.empty((rows, nh), dtype=torch.float32, device=partials.device)
    block_h = min(32, triton.next_power_of_2(nh))
    block_f = min(64, triton.next_power_of_2(-(-rel["pairs"].numel() // rows)))  # about a row's mean pair count
    _window_attention_bias_grad_kernel[(rows, triton.cdiv(nh, block_h))](
        partials, rel["pairs"], rel["rptr"], out, splits, partials.stride(0), partials.stride(1), nh,
        BLOCK_F=block_f, BLOCK_H=block_h, num_warps=max(1, min(4, block_f * block_h // 256)),
    )
    return out


def _groups(geo: dict, B: int, programs: int, device: torch.device, size: int | None = None
            ) -> tuple[torch.Tensor, int]:
    """Split the (window, batch) items into groups of one class: whole windows (``order[j0:j0 + nj]``, every batch)
    when a group holds at least ``B`` items, else one window and a batch range ``b0:b0 + nb``. A program walks its
    group's windows and, inside, the batches, so a window's token offsets are computed once for its batch items.

    Group size ``size`` items, or (None) enough groups that the launch (``programs`` programs per group: the heads,
    times the tiles of a window where a program takes one) has about 4 programs per SM, a function of shapes and the
    device only, so the bias-gradient summation order is the same on every run. Returns ``grp (groups, 5)`` int32 on
    ``device``, rows ``(j0, nj, b0, nb, class)``, and the groups' largest item count."""
    n_items = geo["n_win"] * B
    sms = _sm_count(device)
    if size is not None:
        size = max(1, int(size))
    elif _config_override and "group" in _config_override:
        size = max(1, int(_config_override["group"]))
    elif sms is None:
        size = 2  # the interpreter: several items per program and several programs, at test sizes
    else:
        size = max(1, math.ceil(n_items * programs / (4 * sms)))
    rows = []
    bounds = geo["class_start"]
    for c in range(len(bounds) - 1):
        if size >= B:
            per = size // B
            rows += [(j, min(per, bounds[c + 1] - j), 0, B, c) for j in range(bounds[c], bounds[c + 1], per)]
        else:
            rows += [(j, 1, b, min(size, B - b), c) for j in range(bounds[c], bounds[c + 1]) for b in range(0, B, size)]
    grp = torch.tensor(rows, dtype=torch.int32, device=device).reshape(-1, 5)
    return grp, max(nj * nb for _, nj, _, nb, _ in rows)


def _token_strided(x: torch.Tensor) -> torch.Tensor:
    """``x`` itself when its t and h strides are multiples of its w stride by the grid (a token is one stride
    apart from the next in row-major (t, h, w) order: true of contiguous tensors and of views of one fused qkv
    projection); else a contiguous copy."""
    _, T, H, W = x.shape[:4]
    s = x.stride()
    return x if s[2] == W * s[3] and s[1] == H * W * s[3] else x.contiguous()


def _strides(x: torch.Tensor) -> tuple[int, int, int]:
    return x.stride(0), x.stride(3), x.stride(4)  # batch, token, head


def _needs_i64(*tensors: torch.Tensor) -> bool:
    """Whether an element offset into one of ``tensors`` may exceed int32 (the kernels then compute in int64)."""
    if _config_override and "i64" in _config_override:
        return bool(_config_override["i64"])
    return any(sum((n - 1) * st for n, st in zip(x.shape, x.stride())) >= 2**31 - 1 or x.numel() >= 2**31 - 1
               for x in tensors)


def _dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # fp32 inputs get fp32 products, not tf32


def _launch_fwd(q, k, v, table, window, shift, scale):
    B, T, H, W, nh, hd = q.shape
    if B * nh > _MAX_GRID_YZ:
        raise ValueError(f"batch * heads = {B * nh} exceeds the kernel's grid limit {_MAX_GRID_YZ}")
    q, k, v = (_token_strided(x) for x in (q, k, v))
    geo = _geometry((T, H, W), window, shift, q.device)
    P = geo["P"]
    cfg = _blocks(P, hd, q.dtype)
    tile = _tile(geo, table, window, q.dtype, scale)
    grp, _ = _groups(geo, B, nh, q.device)
    o = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((B, T, H, W, nh), dtype=torch.float32, device=q.device)
    tile_arg = q if tile is None else tile
    s_tc, s_th = (0, 0) if tile is None else (tile.stride(0), tile.stride(1) if tile.shape[1] > 1 else 0)
    grid = (grp.shape[0], nh, P // cfg["fwd_m"])
    _window_attention_fwd_kernel[grid](
        q, k, v, tile_arg, geo["tok"], geo["order"], grp, o, lse,
        *_strides(q), *_strides(k), *_strides(v), *_strides(o), s_tc, s_th,
        nh, T * H * W, scale * LOG2E,
        HD=hd, BLOCK_D=_pow2(hd), P=P, BLOCK_M=cfg["fwd_m"], BLOCK_N=cfg["fwd_n"], HAS_TILE=tile is not None,
        DOT_PREC=_dot_precision(q.dtype), I64=_needs_i64(q, k, v, o, lse), FAST=not interpreting(),
        num_warps=cfg.get("fwd_warps") or _chained_warps(cfg["fwd_m"]), num_stages=cfg["stages"],
    )
    return o, lse


def _launch_bwd(do, q, k, v, o, lse, table, window, shift, scale, bias_grad=True):
    """dq, dk, dv and the table gradient (an empty tensor without a table, or with ``bias_grad=False``)."""
    B, T, H, W, nh, hd = q.shape
    q, k, v = (_token_strided(x) for x in (q, k, v))
    geo = _geometry((T, H, W), window, shift, q.device)
    P = geo["P"]
    cfg = _blocks(P, hd, q.dtype)
    do, o = do.contiguous(), o.contiguous()
    BLOCK_D = _pow2(hd)
    fused = cfg["bwd"] == "fused"
    delta = None
    if not fused or cfg["fused_qb"] < P:  # else the fused kernel computes delta itself
        n_rows = o.numel() // hd
        delta = torch.empty(lse.shape, dtype=torch.float32, device=q.device)
        _window_attention_bwd_delta_kernel[(triton.cdiv(n_rows, 64),)](
            o, do, delta, n_rows, HD=hd, BLOCK_R=64, BLOCK_D=BLOCK_D
        )

    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dv = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    bias_grad = bias_grad and table is not None
    tile = _tile(geo, table, window, q.dtype, scale, transpose=fused)  # fused: (class, head, key, query)
    common = dict(HD=hd, BLOCK_D=BLOCK_D, P=P, HAS_TILE=tile is not None, DOT_PREC=_dot_precision(q.dtype),
                  I64=_needs_i64(q, k, v, o, do, lse), num_stages=cfg["stages"])
    in_strides = (*_strides(q), *_strides(k), *_strides(v), *_strides(do))
    n_tok = T * H * W

    if fused:
        tile_arg = q if tile is None else tile
        s_tile = (0, 0) if tile is None else (tile.stride(0), tile.stride(1) if tile.shape[1] > 1 else 0)
        grp, _ = _groups(geo, B, nh, q.device)
        n_groups = grp.shape[0]
        partials = (torch.empty((n_groups, nh, P, P), dtype=torch.float32, device=q.device) if bias_grad else q)
        _window_attention_bwd_fused_kernel[(n_groups, nh)](  # o shares do's strides (both contiguous)
            q, k, v, o, do, lse, lse if delta is None else delta, tile_arg, geo["tok"], geo["order"], grp,
            dq, dk, dv, partials,
            *in_strides, *s_tile, nh, n_tok, scale * LOG2E, scale,
            QB=cfg["fused_qb"], BIAS_GRAD=bias_grad, num_warps=cfg.get("fused_warps") or _chained_warps(P), **common,
        )
    else:  # long windows: dk/dv per key block (keys as rows: the transposed tile), dq per query block, the
        # bias-gradient partial per (group of items, tile)
        tile_arg = q if tile is None else tile
        s_tile = (0, 0) if tile is None else (tile.stride(0), tile.stride(1) if tile.shape[1] > 1 else 0)
        tile_t = None if tile is None else _tile(geo, table, window, q.dtype, scale, transpose=True)
        n_kblk = P // cfg["dkdv_n"]
        _window_attention_bwd_dkdv_kernel[(geo["n_win"] * n_kblk, B * nh)](
            q, k, v, q if tile_t is None else tile_t, geo["tok"], geo["cls"], do, lse, delta, dk, dv, *in_strides,
            *s_tile, nh, n_tok, n_kblk, scale * LOG2E, scale,
            BLOCK_M=cfg["dkdv_m"], BLOCK_N=cfg["dkdv_n"], num_warps=_chained_warps(cfg["dkdv_n"]), **common,
        )
        n_qblk = P // cfg["dq_m"]
        _window_attention_bwd_dq_kernel[(geo["n_win"] * n_qblk, B * nh)](
            q, k, v, tile_arg, geo["tok"], geo["cls"], do, lse, delta, dq, *in_strides, *s_tile,
            nh, n_tok, n_qblk, scale * LOG2E, scale,
            BLOCK_M=cfg["dq_m"], BLOCK_N=cfg["dq_n"], num_warps=_chained_warps(cfg["dq_m"]), **common,
        )
        if bias_grad:
            tiles = (P // cfg["db_m"]) * (P // cfg["db_n"])
            split = _config_override.get("split") if _config_override else None
            size = None if split is None else -(-(B * geo["n_win"]) // max(1, int(split)))
            grp, _ = _groups(geo, B, nh * tiles, q.device, size)
            partials = torch.empty((grp.shape[0], nh, P, P), dtype=torch.float32, device=q.device)
            _window_attention_bwd_db_kernel[(grp.shape[0], tiles, nh)](  # not chained: 32 elements a thread
                q, k, v, tile, geo["tok"], geo["order"], grp, do, lse, delta, partials, *in_strides, *s_tile,
                nh, n_tok, P // cfg["db_n"], scale * LOG2E,
                HD=hd, BLOCK_D=BLOCK_D, P=P, BLOCK_M=cfg["db_m"], BLOCK_N=cfg["db_n"], DOT_PREC=common["DOT_PREC"],
                I64=common["I64"], num_stages=cfg["stages"],
                num_warps=max(1, min(8, cfg["db_m"] * cfg["db_n"] // 1024)),
            )
    if not bias_grad:
        dtable = q.new_empty(0)
    else:
        dtable = _bias_grad(partials, geo, window).to(table.dtype)  # over groups and pairs, fixed order
    return dq, dk, dv, dtable


# ----------------------------------------------------------------------------------------------------------------------
# torch.library op: opaque to torch.compile, with a fake implementation and an autograd formula
# ----------------------------------------------------------------------------------------------------------------------


@torch.library.custom_op("lfvila_kernels::window_attention_fwd", mutates_args=())
def _window_attention_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, table: torch.Tensor | None,
    window: list[int], shift: list[int], scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _launch_fwd(q, k, v, table, tuple(window), tuple(shift), scale)


@_window_attention_fwd.register_fake
def _(q, k, v, table, window, shift, scale):
    return q.new_empty(q.shape), q.new_empty(q.shape[:5], dtype=torch.float32)


@torch.library.custom_op("lfvila_kernels::window_attention_bwd", mutates_args=())
def _window_attention_bwd(
    do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor,
    table: torch.Tensor | None, window: list[int], shift: list[int], scale: float, bias_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _launch_bwd(do, q, k, v, o, lse, table, tuple(window), tuple(shift), scale, bias_grad)


@_window_attention_bwd.register_fake
def _(do, q, k, v, o, lse, table, window, shift, scale, bias_grad):
    dtable = table.new_empty(table.shape) if table is not None and bias_grad else q.new_empty(0)
    return q.new_empty(q.shape), q.new_empty(q.shape), q.new_empty(q.shape), dtable


def _setup_context(ctx, inputs, output):
    q, k, v, table, window, shift, scale = inputs
    o, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, table, o, lse)
    ctx.window, ctx.shift, ctx.scale = window, shift, scale


def _backward(ctx, do, _dlse):
    q, k, v, table, o, lse = ctx.saved_tensors
    bias_grad = table is not None and ctx.needs_input_grad[3]
    dq, dk, dv, dtable = _window_attention_bwd(
        do, q, k, v, o, lse, table, ctx.window, ctx.shift, ctx.scale, bias_grad
    )
    return dq, dk, dv, (dtable if bias_grad else None), None, None, None


torch.library.register_autograd("lfvila_kernels::window_attention_fwd", _backward, setup_context=_setup_context)


def window_attention_op(q, k, v, table, window: list[int], shift: list[int], scale: float) -> torch.Tensor:
    """The fused op on validated arguments (see ``window_attention``). Returns o ``(B, T, H, W, heads, head_dim)``."""
    if q.device.type == "cpu" and not interpreting():
        raise RuntimeError("the Triton window attention needs CUDA tensors (or TRITON_INTERPRET=1 on the CPU)")
    return _window_attention_fwd(q, k, v, table, window, shift, scale)[0]
