"""Two providers written the way a user outside the repository writes one (``benchmarks/README.md``, "Your own
provider"), loaded by ``--provider tests.benchmarks.own_provider:ATTR`` in ``test_own_provider.py``."""

import torch
import torch.nn.functional as F

from benchmarks.attention_variants import (
    allowed_pairs_mask,
    from_windows,
    provider,
    relative_position_index,
    to_windows,
    window_layout,
)


@provider(computes="window_attention")
def make_masked_sdpa(q, k, v, window, shift, table, scale):
    """Shifted-window attention with the bias: partition, one SDPA call with bias + mask, reverse (recomputed per
    call, as a naive user would write it)."""
    B, T, H, W, nh, hd = q.shape
    layout = window_layout((T, H, W), tuple(window), tuple(shift), str(q.device))
    N = layout.tokens
    index = relative_position_index(window).reshape(-1).to(q.device)
    allowed = allowed_pairs_mask(layout)[None, :, None]  # (1, nW, 1, N, N)

    def forward():
        bias = table[index].reshape(N, N, nh).permute(2, 0, 1)  # (heads, N, N)
        mask = torch.where(allowed, bias[None, None], float("-inf")).to(q.dtype)  # (1, nW, heads, N, N)
        qw, kw, vw = (to_windows(x, layout) for x in (q, k, v))  # (B, nW, heads, N, hd)
        return from_windows(F.scaled_dot_product_attention(qw, kw, vw, attn_mask=mask, scale=scale), layout)

    return forward


def make_no_bias(q, k, v, window, shift, table, scale):
    """Declares the benchmarked function but forgets the bias: its max_abs_err row must show it."""
    wt, wh, ww = window
    zeros = torch.zeros((2 * wt - 1) * (2 * wh - 1) * (2 * ww - 1), q.shape[-2], dtype=q.dtype, device=q.device)
    return make_masked_sdpa.make(q, k, v, window, shift, zeros, scale)  # table is None: bias = False below


make_no_bias.computes = "window_attention"  # the attribute form of the declaration
make_no_bias.bias = False

undeclared = make_masked_sdpa.make  # a builder that says nothing about what it computes: refused
