"""Inflate a 2D Swin checkpoint (LF-VILA starts from Swin-B 22k-384) into the 3D video encoder.

The facts follow the official ``process_swin_weights`` (``LF-VILA/src/utils/load.py``), generalised from the configs:

* Blocks: the 2D blocks in ``(stage, block)`` order map one to one onto the 3D blocks in ``(layer, block)`` order
  (Swin-B ``2+2+18+2`` onto ``2+2+14+2+2+2``: Swin ``layers.2.blocks.14-15`` -> ``layers.3``, ``16-17`` -> ``layers.4``,
  ``layers.3.*`` -> ``layers.5``). The sums of depths and every pair's width must agree, and the heads too.
* Bias tables: the 2D table ``((2w-1)^2, heads)`` is bicubic-resized (``align_corners=False``) as a ``(heads, 2w-1,
  2w-1)`` image to ``(2wh-1, 2ww-1)``, flattened back to ``((2wh-1)(2ww-1), heads)`` and tiled ``2wt-1`` times along
  the rows (time is the outermost axis of the Video-Swin index). ``relative_position_index`` is rebuilt for the 3D
  window; 2D ``relative_position_index``, ``attn_mask`` and the classifier head are dropped.
* Patch embedding: the 2D kernel ``(C0, 3, 4, 4)`` is tiled to ``(C0, 3, pt, 8, 8)`` and divided by ``pt * 4``
  (on an 8x8 patch made of four equal 4x4 tiles the 3D conv then gives the 2D conv's output).
* PatchMerging: the 2D downsample taking width ``C`` goes to the 3D layer whose downsample takes width ``C``
  (Swin-B ``layers.{0,1,2}.downsample`` -> ``layers.{0,1,4}.downsample``); ``local_feat_proj`` gets the 2D downsample
  whose input width is the local branch's width (Swin ``layers.2.downsample``); ``norm`` and ``norm_local`` both get
  Swin's final ``norm``.

Two source layouts, detected from the keys (or forced with ``layout=``):

* ``"microsoft"`` (the original Swin repo, ``swin_base_patch4_window12_384_22k.pth``): stage ``i``'s downsample sits
  at its end as ``layers.{i}.downsample``; ``head.*``; persistent ``relative_position_index`` / ``attn_mask``.
* ``"timm"`` (``timm >= 0.9`` ``SwinTransformer``): the downsample sits at the start of the next stage,
  ``layers.{i+1}.downsample``; ``head.fc.*``. timm's ``PatchMerging`` concatenates the 2x2 neighbours in the same
  channel order as Microsoft's (and ours), and its ``checkpoint_filter_fn`` only renames keys, so no weight permutation
  is needed: both layouts inflate to identical tensors.

Dtypes: floating tensors come back float32 (float64 sources stay float64): the bicubic resize runs in that precision,
and ``load_state_dict`` casts into the encoder's own dtype anyway. Index buffers are int64. Copied tensors may share
storage with the source and with each other (``norm`` / ``norm_local``, ``layers.4.downsample`` / ``local_feat_proj``).
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch
import torch.nn.functional as F

from lfvila_kernels.reference import relative_position_index

from .video_encoder import VideoEncoder, VideoEncoderConfig
from .weights import read_state_dict

LAYOUTS = ("auto", "microsoft", "timm")
_BLOCK = re.compile(r"^layers\.(\d+)\.blocks\.(\d+)\.(.+)$")
_DOWN = re.compile(r"^layers\.(\d+)\.downsample\.(.+)$")


def inflate_swin2d(state_dict_2d: dict, cfg: VideoEncoderConfig, layout: str = "auto") -> dict[str, torch.Tensor]:
    """A complete ``VideoEncoder(cfg)`` state dict (our key names, no prefix, ``relative_position_index`` included)
    inflated from a 2D Swin state dict (optionally wrapped under ``"model"`` / ``"state_dict"``); loads with
    ``strict=True``. Raises ``ValueError`` naming missing 2D keys, depth / width / heads mismatches or shape
    mismatches (both shapes). Works on ``meta`` tensors (shape checks without memory)."""
    with torch.device("meta"):
        target = {k: v.shape for k, v in VideoEncoder(cfg).state_dict().items()}
    return _inflate(state_dict_2d, cfg, target, layout)[0]


def load_swin2d(encoder: VideoEncoder, src, layout: str = "auto") -> dict:
    """Inflate a 2D Swin checkpoint into ``encoder`` in place (``load_state_dict(strict=True)``).

    ``src``: a state dict, or a path to a ``.pth`` / ``.pt`` / ``.bin`` file (``torch.load(weights_only=True)``, the
    dict under ``"model"`` / ``"state_dict"`` if any) or a ``.safetensors`` file (``weights.read_state_dict``). Errors
    name the file.
    Returns ``{"layout": "microsoft" | "timm", "dropped": sorted 2D keys not used (head, buffers, ...)}``.
    """
    name = "state dict"
    if isinstance(src, (str, Path)):
        name = str(src)
        src = read_state_dict(src)  # weights_only / safetensors; unreadable files raise CheckpointError naming them
    target = {k: v.shape for k, v in encoder.state_dict().items()}
    try:
        out, report = _inflate(src, encoder.cfg, target, layout)
    except ValueError as e:
        raise ValueError(f"{name}: {e}") from None
    encoder.load_state_dict(out, strict=True)
    return report


def detect_layout(state_dict_2d: dict) -> str:
    """``"timm"`` when the downsamplers sit at the start of stages (none in stage 0) or the head is ``head.fc``,
    else ``"microsoft"``."""
    sd = _unwrap(state_dict_2d)
    down = {int(m.group(1)) for m in map(_DOWN.match, sd) if m}
    if 0 not in down and (down or any(k.startswith("head.fc.") for k in sd)):
        return "timm"
    return "microsoft"


def _unwrap(sd: dict) -> dict:
    for key in ("model", "state_dict"):
        if isinstance(sd.get(key), dict):
            sd = sd[key]
    return sd


def _out_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _inflate_patch(w: torch.Tensor, patch_size) -> torch.Tensor:
    """``(C0, Cin, kh, kw)`` -> ``(C0, Cin, pt, ph, pw)``: tiled ``rh x rw = (ph/kh) x (pw/kw)``, divided by
    ``pt * rh * rw``."""
    pt, ph, pw = patch_size
    kh, kw = w.shape[-2:]
    if ph % kh or pw % kw:
        raise ValueError(f"2D patch {kh}x{kw} does not tile the 3D patch {ph}x{pw}")
    rh, rw = ph // kh, pw // kw
    return w.to(_out_dtype(w)).unsqueeze(2).repeat(1, 1, pt, rh, rw) / (pt * rh * rw)


def _inflate_bias_table(table: torch.Tensor, window) -> torch.Tensor:
    """``((2w-1)^2, heads)`` -> ``((2wt-1)(2wh-1)(2ww-1), heads)``: bicubic resize in space, tiled over time."""
    wt, wh, ww = window
    rows, heads = table.shape
    s = math.isqrt(rows)
    if s * s != rows:
        raise ValueError(f"2D bias table has {rows} rows, not a square")
    table = table.to(_out_dtype(table))
    size = (2 * wh - 1, 2 * ww - 1)
    if size != (s, s):  # the official code resizes whenever the row counts differ (the same thing for real windows)
        image = table.t().reshape(1, heads, s, s)
        image = F.interpolate(image, size=size, mode="bicubic", align_corners=False)
        table = image.reshape(heads, size[0] * size[1]).t()
    return table.repeat(2 * wt - 1, 1)


def _inflate(sd: dict, cfg: VideoEncoderConfig, target: dict, layout: str) -> tuple[dict, dict]:
    """The inflation against ``target`` (our key -> expected shape). Returns ``(state_dict, report)``."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    sd = _unwrap(sd)
    layout = detect_layout(sd) if layout == "auto" else layout
    shift = 1 if layout == "timm" else 0  # timm's layers.{i+1}.downsample is Microsoft's layers.{i}.downsample

    def src_name(key: str) -> str:  # Microsoft-numbered key -> the key as the source spells it
        m = _DOWN.match(key)
        return f"layers.{int(m.group(1)) + shift}.downsample.{m.group(2)}" if m else key

    src = {}
    for k, v in sd.items():
        m = _DOWN.match(k)
        if m and shift and int(m.group(1)) == 0:
            raise ValueError(f"{k}: timm checkpoints have no downsample in stage 0 (layout={layout!r})")
        src[f"layers.{int(m.group(1)) - shift}.downsample.{m.group(2)}" if m else k] = v
    used, missing = set(), []

    def get(key: str):
        if key not in src:
            missing.append(src_name(key))
            return None
        used.add(key)
        return src[key]

    # Blocks: (stage, block) order onto (layer, block) order.
    blocks2d = sorted({(int(m.group(1)), int(m.group(2))) for m in map(_BLOCK.match, src) if m})
    depths2d = [sum(1 for s, _ in blocks2d if s == stage) for stage in sorted({s for s, _ in blocks2d})]
    blocks3d = [(i, j) for i, d in enumerate(cfg.depths) for j in range(d)]
    if len(blocks2d) != len(blocks3d):
        raise ValueError(f"depth mismatch: 2D depths {tuple(depths2d)} (sum {len(blocks2d)}) vs 3D depths "
                         f"{tuple(cfg.depths)} (sum {len(blocks3d)})")
    out, bad = {}, []
    for (s, j2), (i, j) in zip(blocks2d, blocks3d):
        pre2, pre3 = f"layers.{s}.blocks.{j2}.", f"layers.{i}.blocks.{j}."
        w2 = src.get(pre2 + "norm1.weight")
        if w2 is not None and w2.shape[0] != cfg.dim(i):
            bad.append(f"{pre3[:-1]} has width {cfg.dim(i)}, its source {pre2[:-1]} has width {w2.shape[0]}")
        table = src.get(pre2 + "attn.relative_position_bias_table")
        if table is not None and table.shape[1] != cfg.num_heads[i]:
            bad.append(f"{pre3[:-1]} has {cfg.num_heads[i]} heads, its source {pre2[:-1]} has {table.shape[1]}")
        for key in (k for k in target if k.startswith(pre3)):
            suffix = key[len(pre3):]
            if suffix == "attn.relative_position_index":
                out[key] = relative_position_index(cfg.window_size[i]).clone()
            elif (v := get(pre2 + suffix)) is not None:
                is_table = suffix == "attn.relative_position_bias_table"
                out[key] = _inflate_bias_table(v, cfg.window_size[i]) if is_table else v
    if bad:
        raise ValueError("width/heads mismatch (2D blocks map in order onto 3D blocks): " + "; ".join(bad))

    # PatchMerging: matched by input width (reduction weight (2C, 4C)).
    down2d = {}
    for k, v in src.items():
        m = _DOWN.match(k)
        if m and m.group(2) == "reduction.weight":
            stage, width = int(m.group(1)), v.shape[1] // 4
            stage_width = src.get(f"layers.{stage}.blocks.0.norm1.weight")
            if stage_width is not None and stage_width.shape[0] != width:
                raise ValueError(f"{src_name(k)} takes width {width} but stage {stage}'s blocks have width "
                                 f"{stage_width.shape[0]} (layout={layout!r}; wrong layout?)")
            down2d[width] = f"layers.{stage}.downsample."
    pairs = [(f"layers.{i}.downsample.", cfg.dim(i)) for i in cfg.downsample_stages if i < len(cfg.depths)]
    pairs.append(("local_feat_proj.", target["local_feat_proj.reduction.weight"][1] // 4))
    for pre3, width in pairs:
        if width not in down2d:
            raise ValueError(f"no 2D downsample takes width {width} (needed by {pre3}*); 2D downsamplers take "
                             f"widths {sorted(down2d)}")
        for key in (k for k in target if k.startswith(pre3)):
            if (v := get(down2d[width] + key[len(pre3):])) is not None:
                out[key] = v

    # Patch embedding and norms.
    for key in (k for k in target if k.startswith("patch_embed.")):
        if (v := get(key)) is not None:
            out[key] = _inflate_patch(v, cfg.patch_size) if key == "patch_embed.proj.weight" else v
    for key in (k for k in target if k.startswith(("norm.", "norm_local."))):
        if (v := get("norm." + key.split(".", 1)[1])) is not None:
            out[key] = v
    if missing:
        raise ValueError(f"missing 2D keys ({layout} layout): {sorted(set(missing))}")

    unmapped = sorted(set(target) - set(out))
    wrong = [f"{k}: inflated {tuple(out[k].shape)} vs encoder {tuple(target[k])}"
             for k in target if k in out and tuple(out[k].shape) != tuple(target[k])]
    if unmapped or wrong:
        raise ValueError(f"no source for {unmapped}" if unmapped else "shape mismatch: " + "; ".join(wrong))
    out = {k: v.to(_out_dtype(v)) if v.is_floating_point() else v for k, v in out.items()}
    dropped = sorted(src_name(k) for k in set(src) - used)
    return {k: out[k] for k in target}, {"layout": layout, "dropped": dropped}
