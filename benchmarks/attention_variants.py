"""The window-attention providers that ``bench_attention`` compares, one builder per provider.

Every builder has the signature ``make(q, k, v, window, shift, table, scale) -> forward`` where ``forward()`` takes no
argument and returns the attention output ``(B, T, H, W, heads, head_dim)`` in the original token order, computed from
the given q, k, v ``(B, T, H, W, heads, head_dim)`` and bias table ``((2wt-1)(2wh-1)(2ww-1), heads)`` (or None). The
builder does the shape-dependent set-up that a model would do once (index tensors, constant masks, FlexAttention block
masks); ``forward()`` does the per-step work, so gradients reach q, k, v and the table through it.

All providers compute the same function as ``lfvila_kernels.window_attention_reference``: Video-Swin's cyclic shift
and shift-region mask; on grids not divisible by the window, roll first, then pad, with padded keys masked out.

Providers:
    window-attention-triton
                     lfvila_kernels.window_attention(impl="triton"): the fused kernel (no copies, no mask tensor)
    window-attention-torch
                     lfvila_kernels.window_attention(impl="torch"): the pure-torch reference
    videoswin-eager  benchmarks.videoswin_eager: Video-Swin's roll/pad/partition, explicit softmax, reverse
    sdpa-dense-bias  timm's fused-attention path: roll/pad/partition, a dense additive (B*nW, heads, N, N) float mask
                     (gathered bias + shift mask), F.scaled_dot_product_attention, reverse
    flex             torch.compile(flex_attention) on window-partitioned tokens (B, heads, nW*N, head_dim) with a
                     cached BlockMask (same window, same shift region, valid key) and a score_mod adding the bias
    xformers         xformers.ops.memory_efficient_attention on (B*nW, N, heads, hd) windows (every window the same
                     size, so the window batch is the block-diagonal layout) with the bias + shift mask as a dense
                     (B*nW, heads, N, N) tensor, its rows padded to a multiple of 8 as xformers requires (CUDA only)

Speed references (another function: no bias, no shift mask; their output is checked against their own function):
    sdpa-no-bias     F.scaled_dot_product_attention on windows partitioned once in set-up (no copies, no mask, no
                     bias in the timed call): the speed of light of plain attention at the shape
    flash-attn       flash_attn.flash_attn_func on the same pre-partitioned windows (when importable; CUDA, fp16/bf16)
    natten           natten.functional.na3d, neighbourhood attention (a sliding window of the window's size) on the
                     token grid, no bias (when importable)
    full-sdpa        F.scaled_dot_product_attention over all T*H*W tokens of a sample (no windows): the quadratic
                     reference of the long-form shape set
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from benchmarks import harness

Forward = Callable[[], torch.Tensor]
Builder = Callable[..., Forward]


# --------------------------------------------------------------------------------------------------- window layout
@dataclass(frozen=True)
class WindowLayout:
    """Where each token of a ``(T, H, W)`` grid lands once rolled by ``-shift``, padded and cut into windows.

    ``padded``: the grid rounded up to whole windows; ``n_windows``: windows per sample, numbered row-major over
    (t, h, w) blocks; ``tokens``: ``N = wt * wh * ww`` per window, row-major over (t, h, w) inside it.
    ``region``: long ``(n_windows, N)``: the shift region of each window slot (bit 2: the roll wrapped the token on the
    T axis, bit 1: on H, bit 0: on W), or -1 for a padding slot. Two slots of a window may attend iff their regions
    are equal and the key is not padding.
    """

    grid: tuple[int, int, int]
    window: tuple[int, int, int]
    shift: tuple[int, int, int]
    padded: tuple[int, int, int]
    n_windows: int
    tokens: int
    region: torch.Tensor

    @property
    def needs_mask(self) -> bool:
        return any(self.shift) or self.padded != self.grid


@functools.lru_cache(maxsize=32)
def window_layout(grid, window, shift, device: str = "cpu") -> WindowLayout:
    """The :class:`WindowLayout` of a grid, window and shift (``(T, H, W)``-ordered int triples), cached."""
    grid, window, shift = tuple(grid), tuple(window), tuple(shift)
    padded = tuple(-(-n // w) * w for n, w in zip(grid, window, strict=True))
    axes = []
    for n, p, s in zip(grid, padded, shift, strict=True):
        pos = torch.arange(p)  # position on the rolled, padded axis
        wrapped = (pos >= n - s) & (pos < n) if s else torch.zeros(p, dtype=torch.bool)
        axes.append(torch.where(pos < n, wrapped.long(), torch.full_like(pos, -8)))  # -8: padding on this axis
    rt, rh, rw = axes
    region = rt[:, None, None] * 4 + rh[None, :, None] * 2 + rw[None, None, :]  # (Tp, Hp, Wp), < 0 if any padding
    region = region.clamp(min=-1)
    (Tp, Hp, Wp), (wt, wh, ww) = padded, window
    region = region.reshape(Tp // wt, wt, Hp // wh, wh, Wp // ww, ww).permute(0, 2, 4, 1, 3, 5)
    region = region.reshape(-1, wt * wh * ww)  # (nW, N)
    return WindowLayout(grid, window, shift, padded, region.shape[0], region.shape[1], region.to(device))


def to_windows(x: torch.Tensor, layout: WindowLayout) -> torch.Tensor:
    """``(B, T, H, W, heads, hd)`` -> ``(B, nW, heads, N, hd)``: roll by ``-shift``, zero-pad, partition (copies)."""
    B, T, H, W, nh, hd = x.shape
    (Tp, Hp, Wp), (wt, wh, ww) = layout.padded, layout.window
    if any(layout.shift):
        x = torch.roll(x, shifts=tuple(-s for s in layout.shift), dims=(1, 2, 3))
    if layout.padded != layout.grid:
        x = F.pad(x, (0, 0, 0, 0, 0, Wp - W, 0, Hp - H, 0, Tp - T))
    x = x.reshape(B, Tp // wt, wt, Hp // wh, wh, Wp // ww, ww, nh, hd)
    x = x.permute(0, 1, 3, 5, 7, 2, 4, 6, 8)  # (B, nT, nH, nW, heads, wt, wh, ww, hd)
    return x.reshape(B, layout.n_windows, nh, layout.tokens, hd)


def from_windows(x: torch.Tensor, layout: WindowLayout) -> torch.Tensor:
    """Inverse of :func:`to_windows`: ``(B, nW, heads, N, hd)`` -> ``(B, T, H, W, heads, hd)``, padding dropped."""
    B, _, nh, _, hd = x.shape
    (T, H, W), (Tp, Hp, Wp), (wt, wh, ww) = layout.grid, layout.padded, layout.window
    x = x.reshape(B, Tp // wt, Hp // wh, Wp // ww, nh, wt, wh, ww, hd)
    x = x.permute(0, 1, 5, 2, 6, 3, 7, 4, 8).reshape(B, Tp, Hp, Wp, nh, hd)[:, :T, :H, :W]
    if any(layout.shift):
        x = torch.roll(x, shifts=layout.shift, dims=(1, 2, 3))
    return x


def allowed_pairs_mask(layout: WindowLayout) -> torch.Tensor:
    """Bool ``(nW, N, N)``: query slot i may attend to key slot j of the same window.

    A valid query sees the valid keys of its own shift region. A padding query (its output is discarded) sees every
    valid key, so that no softmax row is empty (an all ``-inf`` row would put NaN into SDPA's gradients).
    """
    r = layout.region
    valid_k = (r >= 0)[:, None, :]
    return valid_k & ((r[:, :, None] == r[:, None, :]) | (r < 0)[:, :, None])


def relative_position_index(window) -> torch.Tensor:
    """Long ``(N, N)``: the bias-table row of query slot i attending to key slot j (Video-Swin's index)."""
    wt, wh, ww = window
    t, h, w = torch.meshgrid(torch.arange(wt), torch.arange(wh), torch.arange(ww), indexing="ij")
    t, h, w = t.flatten(), h.flatten(), w.flatten()  # (N,) each
    dt = t[:, None] - t[None, :] + wt - 1
    dh = h[:, None] - h[None, :] + wh - 1
    dw = w[:, None] - w[None, :] + ww - 1
    return (dt * (2 * wh - 1) + dh) * (2 * ww - 1) + dw


# --------------------------------------------------------------------------------------------------- providers
def make_window_attention_triton(q, k, v, window, shift, table, scale) -> Forward:
    """The fused Triton kernel. Its module is imported at the first call, so a missing or broken kernel fails there."""
    import lfvila_kernels

    return lambda: lfvila_kernels.window_attention(q, k, v, window, shift, table, scale, impl="triton")


def make_window_attention_torch(q, k, v, window, shift, table, scale) -> Forward:
    """``lfvila_kernels``' pure-torch reference (roll, pad, partition, masked softmax, reverse)."""
    import lfvila_kernels

    return lambda: lfvila_kernels.window_attention(q, k, v, window, shift, table, scale, impl="torch")


def make_videoswin_eager(q, k, v, window, shift, table, scale) -> Forward:
    """Video-Swin's eager block, mask rebuilt every call as Video-Swin does."""
    from benchmarks.videoswin_eager import videoswin_window_attention

    return lambda: videoswin_window_attention(q, k, v, window, shift, table, scale)


def make_sdpa_dense_bias(q, k, v, window, shift, table, scale) -> Forward:
    """timm-style fused attention: one dense additive float mask per window and head, then SDPA.

    Per call: gather the bias ``(heads, N, N)`` from the table, add the constant shift/padding mask ``(nW, 1, N, N)``
    (0 or -inf), expand over the batch and materialise ``(B * nW, heads, N, N)`` in q's dtype as timm does, then
    ``F.scaled_dot_product_attention`` on ``(B * nW, heads, N, hd)`` windows. The table's gradient flows through the
    mask.
    """
    B, T, H, W, nh, hd = q.shape
    layout = window_layout((T, H, W), tuple(window), tuple(shift), str(q.device))
    N, nW = layout.tokens, layout.n_windows
    index = relative_position_index(window).reshape(-1).to(q.device)  # (N*N,)
    shift_mask = None
    if layout.needs_mask:
        allowed = allowed_pairs_mask(layout)  # (nW, N, N)
        shift_mask = torch.zeros(allowed.shape, dtype=q.dtype, device=q.device)
        shift_mask = shift_mask.masked_fill(~allowed, float("-inf")).unsqueeze(1)  # (nW, 1, N, N)

    def windows(x):  # (B, T, H, W, heads, hd) -> (B*nW, heads, N, hd)
        return to_windows(x, layout).reshape(B * nW, nh, N, hd)

    def forward():
        mask = None
        if table is not None:
            mask = table[index].reshape(N, N, nh).permute(2, 0, 1).to(q.dtype).unsqueeze(0)  # (1, heads, N, N)
        if shift_mask is not None:
            mask = shift_mask if mask is None else mask + shift_mask  # (nW, heads, N, N)
            mask = mask.unsqueeze(0).expand(B, nW, mask.shape[1], N, N).reshape(B * nW, -1, N, N)
        out = F.scaled_dot_product_attention(windows(q), windows(k), windows(v), attn_mask=mask, scale=scale)
        return from_windows(out.reshape(B, nW, nh, N, hd), layout)

    return forward


_flex_compiled = None


def _compiled_flex():
    """``torch.compile(flex_attention)``, built once. dynamic=False: one specialised kernel per shape; the recompile
    limit is raised so that the 6 layers x 2 modes of a run never fall back to the unfused eager flex_attention.
    fullgraph=True: a call that cannot be traced raises (and is recorded) instead of leaving dynamo to run pieces of
    flex_attention eagerly, which would silently time the slow unfused path from then on."""
    global _flex_compiled
    if _flex_compiled is None:
        import torch._dynamo
        from torch.nn.attention.flex_attention import flex_attention

        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        _flex_compiled = torch.compile(flex_attention, dynamic=False, fullgraph=True)
    return _flex_compiled


@functools.lru_cache(maxsize=32)
def _flex_block_mask(grid, window, shift, device: str):
    """BlockMask over ``nW * N`` window-ordered tokens (one per shape, shared by batch and heads) and its region
    tensor ``(nW * N,)``. Query and key may interact iff same window, same shift region, key not padding (padding
    queries see nothing: FlexAttention defines an empty row's output as 0)."""
    from torch.nn.attention.flex_attention import create_block_mask

    layout = window_layout(grid, window, shift, device)
    N = layout.tokens
    region = layout.region.reshape(-1)  # (nW*N,)

    def mask_mod(b, h, q_idx, kv_idx):
        rk = region[kv_idx]
        return (q_idx // N == kv_idx // N) & (region[q_idx] == rk) & (rk >= 0)

    L = region.numel()
    # Compiled, the mask is evaluated block by block; eager create_block_mask materialises L x L booleans and more
    # (17 GB at Video Swin-T's first stage, L = 50176, on the CPU; 0.5 GB compiled).
    return torch.compile(create_block_mask)(mask_mod, None, None, L, L, device=device)


def make_flex(q, k, v, window, shift, table, scale) -> Forward:
    """FlexAttention on window-partitioned tokens: ``(B, heads, nW * N, hd)``, block-sparse by window.

    The bias is a ``score_mod`` reading ``table[index(q_slot, k_slot), head]`` from the captured table (so the table
    gets its gradient), the index computed from the slots' (t, h, w) coordinates. Roll/pad/partition and the reverse
    are eager copies inside ``forward()``, as in the other unfused providers.
    """
    B, T, H, W, nh, hd = q.shape
    grid, window, shift = (T, H, W), tuple(window), tuple(shift)
    layout = window_layout(grid, window, shift, str(q.device))
    block_mask = _flex_block_mask(grid, window, shift, str(q.device))
    flex = _compiled_flex()
    N, nW = layout.tokens, layout.n_windows
    wt, wh, ww = window
    rows_t, rows_h = (2 * wh - 1) * (2 * ww - 1), 2 * ww - 1

    score_mod = None
    if table is not None:

        def score_mod(score, b, h, q_idx, kv_idx):
            qs, ks = q_idx % N, kv_idx % N  # slot inside the window, row-major over (t, h, w)
            dt = qs // (wh * ww) - ks // (wh * ww) + (wt - 1)
            dh = (qs // ww) % wh - (ks // ww) % wh + (wh - 1)
            dw = qs % ww - ks % ww + (ww - 1)
            return score + table[dt * rows_t + dh * rows_h + dw, h]

    def tokens(x):  # (B, T, H, W, heads, hd) -> (B, heads, nW*N, hd)
        return to_windows(x, layout).transpose(1, 2).reshape(B, nh, nW * N, hd)

    def forward():
        out = flex(tokens(q), tokens(k), tokens(v), score_mod=score_mod, block_mask=block_mask, scale=scale)
        return from_windows(out.reshape(B, nh, nW, N, hd).transpose(1, 2), layout)

    return forward


# --------------------------------------------------------------------------------------------------- speed references
class PrePartitioned:
    """A provider whose timed call works on tensors laid out in set-up (not on q, k, v themselves).

    ``forward()`` returns its own layout; ``leaves``: the tensors that receive gradients in its backward;
    ``to_tokens(out)`` maps an output to ``(B, T, H, W, heads, hd)`` and ``from_tokens(grad)`` a token-layout output
    gradient to its layout. The set-up copies are made once, outside the timed region, with the leaves requiring grad
    as q does.
    """

    def __init__(self, forward, leaves, to_tokens, from_tokens):
        self.forward, self.leaves, self.to_tokens, self.from_tokens = forward, leaves, to_tokens, from_tokens

    def __call__(self) -> torch.Tensor:
        return self.forward()


def _plain_windows(q, k, v, window, layout_shift=(0, 0, 0)):
    """q, k, v cut into un-shifted zero-padded windows ``(B*nW, N, heads, hd)`` (leaves), and the layout."""
    B, T, H, W, nh, hd = q.shape
    layout = window_layout((T, H, W), tuple(window), tuple(layout_shift), str(q.device))
    N, nW = layout.tokens, layout.n_windows

    def cut(x):  # (B, T, H, W, heads, hd) -> (B*nW, N, heads, hd), a fresh leaf
        w = to_windows(x.detach(), layout).transpose(2, 3).reshape(B * nW, N, nh, hd).contiguous()
        return w.requires_grad_(x.requires_grad)

    def to_tokens(out):  # (B*nW, N, heads, hd) -> (B, T, H, W, heads, hd)
        return from_windows(out.reshape(B, nW, N, nh, hd).transpose(2, 3), layout)

    def from_tokens(grad):
        return to_windows(grad, layout).transpose(2, 3).reshape(B * nW, N, nh, hd).contiguous()

    return (cut(q), cut(k), cut(v)), to_tokens, from_tokens


def make_sdpa_no_bias(q, k, v, window, shift, table, scale) -> PrePartitioned:
    """Plain SDPA on windows partitioned in set-up: no bias, no shift mask, no copies in the timed call."""
    (qw, kw, vw), to_tokens, from_tokens = _plain_windows(q, k, v, window)

    def forward():  # SDPA wants (batch, heads, N, hd): transposed views, no copies
        out = F.scaled_dot_product_attention(qw.transpose(1, 2), kw.transpose(1, 2), vw.transpose(1, 2), scale=scale)
        return out.transpose(1, 2)

    return PrePartitioned(forward, [qw, kw, vw], to_tokens, from_tokens)


def make_flash_attn(q, k, v, window, shift, table, scale) -> PrePartitioned:
    """flash-attn 2/3's ``flash_attn_func`` on windows partitioned in set-up (it has no bias and no arbitrary mask)."""
    from flash_attn import flash_attn_func  # optional: only where a user installed it

    (qw, kw, vw), to_tokens, from_tokens = _plain_windows(q, k, v, window)
    return PrePartitioned(
        lambda: flash_attn_func(qw, kw, vw, softmax_scale=scale), [qw, kw, vw], to_tokens, from_tokens
    )


def make_natten(q, k, v, window, shift, table, scale) -> Forward:
    """NATTEN's fused neighbourhood attention on the token grid, kernel = the window (no bias, no shift)."""
    import natten.functional as natten_functional  # optional: only where a user installed it

    kernel = tuple(int(w) for w in window)
    return lambda: natten_functional.na3d(q, k, v, kernel_size=kernel, scale=scale)


def make_full_sdpa(q, k, v, window, shift, table, scale) -> Forward:
    """Full self-attention over all ``T*H*W`` tokens of each sample (no windows, no bias): quadratic in T."""
    B, T, H, W, nh, hd = q.shape

    def seq(x):  # (B, T, H, W, heads, hd) -> (B, heads, L, hd), a view
        return x.reshape(B, T * H * W, nh, hd).transpose(1, 2)

    def forward():
        out = F.scaled_dot_product_attention(seq(q), seq(k), seq(v), scale=scale)  # (B, heads, L, hd)
        return out.transpose(1, 2).reshape(B, T, H, W, nh, hd)

    return forward


def make_xformers(q, k, v, window, shift, table, scale) -> Forward:
    """xformers' memory-efficient attention on windows with a dense bias tensor (bias gathered + shift mask).

    Same per-call work as ``sdpa-dense-bias`` (roll, pad, partition, a ``(B*nW, heads, N, N)`` additive mask,
    reverse), in xformers' ``(batch, N, heads, hd)`` layout; the mask is allocated with rows of ``ceil(N/8)*8``
    columns and sliced to N, the memory alignment xformers' kernels require of a tensor bias.
    """
    import xformers.ops as xops  # optional: GPU-only baseline

    B, T, H, W, nh, hd = q.shape
    layout = window_layout((T, H, W), tuple(window), tuple(shift), str(q.device))
    N, nW = layout.tokens, layout.n_windows
    padded_n = -(-N // 8) * 8
    index = relative_position_index(window).reshape(-1).to(q.device)  # (N*N,)
    shift_mask = torch.zeros(nW, 1, N, N, dtype=q.dtype, device=q.device)
    if layout.needs_mask:
        shift_mask = shift_mask.masked_fill(~allowed_pairs_mask(layout).unsqueeze(1), float("-inf"))

    def windows(x):  # (B, T, H, W, heads, hd) -> (B*nW, N, heads, hd)
        return to_windows(x, layout).transpose(2, 3).reshape(B * nW, N, nh, hd)

    def forward():
        bias = torch.empty(B, nW, nh, N, padded_n, dtype=q.dtype, device=q.device)[..., :N]
        mask = shift_mask
        if table is not None:
            mask = mask + table[index].reshape(N, N, nh).permute(2, 0, 1).to(q.dtype)  # (nW, heads, N, N)
        bias = bias.copy_(mask.expand(B, nW, nh, N, N)).reshape(B * nW, nh, N, N)  # graph-connected to the table
        out = xops.memory_efficient_attention(windows(q), windows(k), windows(v), attn_bias=bias, scale=scale)
        return from_windows(out.reshape(B, nW, N, nh, hd).transpose(2, 3), layout)

    return forward


def _importable(module: str, what: str):
    """A refusal that names the missing optional package (checked without importing it)."""
    import importlib.util

    def refusal(device: torch.device, dtype: torch.dtype) -> str | None:
        if importlib.util.find_spec(module) is None:
            return f"{what} is not installed (optional baseline: pip install {what})"
        return None

    return refusal


def _all(*refusals):
    def refusal(device, dtype):
        return next((r for r in (f(device, dtype) for f in refusals) if r), None)

    return refusal


def _cuda_only(name: str, dtypes: tuple[torch.dtype, ...] | None = None):
    def refusal(device: torch.device, dtype: torch.dtype) -> str | None:
        if device.type != "cuda":
            return f"{name} has no CPU implementation"
        if dtypes and dtype not in dtypes:
            return f"{name} supports {', '.join(str(d).replace('torch.', '') for d in dtypes)} only"
        return None

    return refusal


# --------------------------------------------------------------------------------------------------- registry
COMPUTES = ("window_attention", "windows-no-bias", "neighborhood", "full")


@dataclass(frozen=True)
class Variant:
    """A provider: its builder; optionally ``refusal(device, dtype) -> reason or None`` for known no-gos (the benchmark
    records a ``skipped`` row with the reason instead of running it); ``computes``: the function it computes, one of
    :data:`COMPUTES` (``window_attention``: the benchmarked problem itself; the others are speed references, checked
    against their own function); ``bias``: whether it adds the relative-position bias (and so has a bias gradient);
    ``compiles``: whether it compiles per shape and mode (torch.compile), so that ``bench_attention``'s compile budget
    applies to it."""

    make: Builder
    refusal: Callable[[torch.device, torch.dtype], str | None] | None = None
    computes: str = "window_attention"
    bias: bool = True
    compiles: bool = False

    def __post_init__(self):
        if self.computes not in COMPUTES:
            raise ValueError(f"computes must be one of {COMPUTES}, got {self.computes!r}")


_HALF = (torch.float16, torch.bfloat16)
VARIANTS: dict[str, Variant] = {
    "window-attention-triton": Variant(make_window_attention_triton, harness.triton_refusal),
    "window-attention-torch": Variant(make_window_attention_torch),
    "videoswin-eager": Variant(make_videoswin_eager),
    "sdpa-dense-bias": Variant(make_sdpa_dense_bias),
    "flex": Variant(make_flex, compiles=True),
    "xformers": Variant(make_xformers, _all(_importable("xformers", "xformers"), _cuda_only("xformers"))),
    "sdpa-no-bias": Variant(make_sdpa_no_bias, computes="windows-no-bias", bias=False),
    "flash-attn": Variant(
        make_flash_attn, _all(_importable("flash_attn", "flash-attn"), _cuda_only("flash-attn", _HALF)),
        computes="windows-no-bias", bias=False,
    ),
    "natten": Variant(make_natten, _importable("natten", "natten"), computes="neighborhood", bias=False),
    "full-sdpa": Variant(make_full_sdpa, computes="full", bias=False),
}  # fmt: skip
# Providers run by default on every shape set; the others (full attention) only where a shape set asks for them.
DEFAULT_PROVIDERS = tuple(name for name in VARIANTS if name != "full-sdpa")


# --------------------------------------------------------------------------------------------------- your own provider
def provider(computes: str, bias: bool = True, refusal=None, compiles: bool = False) -> Callable[[Builder], Variant]:
    """Decorator: a builder ``make(q, k, v, window, shift, table, scale) -> forward`` as a :class:`Variant`, declaring
    the function it computes (one of :data:`COMPUTES`), so ``--provider`` can load it::

        @provider(computes="window_attention")
        def make_provider(q, k, v, window, shift, table, scale):
            ...  # one-time set-up
            return lambda: my_attention(q, k, v, ...)  # (B, T, H, W, heads, head_dim)
    """
    return lambda make: Variant(make, refusal, computes, bias, compiles)


def load_provider(spec: str, taken=()) -> tuple[str, Variant]:
    """A provider from outside the repository: ``[NAME=]module.path:attr`` -> ``(NAME, Variant)``.

    ``attr`` is a :class:`Variant` (e.g. made by :func:`provider`), or a builder function that declares what it
    computes in attributes: ``make.computes`` (required, one of :data:`COMPUTES`), and optionally ``make.bias``,
    ``make.refusal``, ``make.compiles`` (the :class:`Variant` fields). ``NAME`` defaults to ``attr`` without a leading
    ``make_``, underscores as dashes. The module must be importable by that name: installed, or under the current
    directory (which ``python -m`` puts first on ``sys.path``). ``taken``: names already in use (a clash is refused)."""
    import importlib

    name, _, target = spec.rpartition("=") if "=" in spec else ("", "", spec)
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise SystemExit(f"--provider {spec!r}: expected [NAME=]module.path:attr, e.g. my_pkg.my_mod:make_provider")
    try:
        obj = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise SystemExit(f"--provider {spec!r}: cannot load {target}: {type(exc).__name__}: {exc}") from exc
    if not isinstance(obj, Variant):
        if not callable(obj) or not hasattr(obj, "computes"):
            raise SystemExit(f"--provider {spec!r}: {target} is neither a Variant nor a builder declaring "
                             f"`computes` (one of {COMPUTES}); see benchmarks/README.md, 'Your own provider'")
        try:
            obj = Variant(obj, getattr(obj, "refusal", None), obj.computes, getattr(obj, "bias", True),
                          getattr(obj, "compiles", False))  # fmt: skip
        except ValueError as exc:
            raise SystemExit(f"--provider {spec!r}: {exc}") from exc
    name = name or attr.removeprefix("make_").replace("_", "-")
    if name in taken or name in VARIANTS:
        raise SystemExit(f"--provider {spec!r}: the name {name!r} is taken; choose another with NAME=...")
    return name, obj
