"""Export our weights as the official LF-VILA checkpoint: a flat ``torch.save``d state dict with the official key
names, what the official code loads (``utils/load.py`` ``load_model_weights_with_mismatch``) and what DeepSpeed's
``save_fp16_model`` writes as ``pytorch_model.bin``.

    python -m lfvila.models.export_official SRC OUT.bin [--dtype fp32|fp16] [--overwrite]

``SRC``: a ``save_pretrained`` directory (``config.json`` + ``model.safetensors``; the weights are then checked
against the model its config describes), a training checkpoint directory (``run/checkpoints/step_XXXXXXXX``, its
``model.safetensors``), or a weights file (``.safetensors``, ``.bin``, ``.pt``). The keys are the inverse of the map
that reads official files (``convert.official_key``, ``convert.official_state_dict``): our names unchanged (a DDP
``module.`` or ``torch.compile`` ``_orig_mod.`` prefix stripped), the ``relative_position_index`` buffers kept, the
tied ``text_encoder.cls.predictions.decoder.bias`` written under both names as the official model's state dict has
it, and the official buffers we do not keep added: ``text_encoder.bert.embeddings.position_ids`` and
``sent_embedding.position_ids``, ``arange(P)[None]`` (int64).

``--dtype``: ``fp32`` (default: our weights exactly) or ``fp16`` (the official release files' dtype; the official
loader casts either into its model). Integer buffers stay int64. The file is written to a temporary name beside
``OUT``, fsynced, then renamed over it, so an interrupted export never leaves a half-written file under the final name.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn as nn

from .convert import official_key, official_state_dict, read_pretrained_config
from .weights import CheckpointError, canonical, compare_keys, fsync_dir, mismatch_message, read_state_dict, write_file

__all__ = ["DTYPES", "export_official", "main", "official_checkpoint"]

DTYPES = {"fp32": torch.float32, "fp16": torch.float16}


def _dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if dtype in DTYPES:
        return DTYPES[dtype]
    raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")


def _check_against_config(directory: Path, state: dict[str, torch.Tensor]) -> None:
    """The weights of a ``save_pretrained`` directory against the model its ``config.json`` describes (built on the
    meta device: names and shapes only)."""
    model_cls, cfg = read_pretrained_config(directory)
    with torch.device("meta"):
        target = {k: v for k, v in model_cls(cfg).state_dict().items() if official_key(k) is not None}
    missing, unexpected, mismatched = compare_keys(state, target)
    if missing or unexpected or mismatched:
        head = f"{directory}: weights do not fit its config.json ({model_cls.__name__})"
        raise CheckpointError(mismatch_message(head, (("missing", missing), ("unexpected", unexpected),
                                                      ("shape mismatch (weights vs config)", mismatched))))


def official_checkpoint(src, dtype="fp32") -> dict[str, torch.Tensor]:
    """The official flat state dict of ``src`` (a model, a state dict with our names, or a path as ``SRC`` in the
    module docstring): ``{official key: CPU tensor}``, floating tensors in ``dtype`` (``"fp32" | "fp16"`` or the
    torch dtype), tied tensors still shared."""
    dtype = _dtype(dtype)
    if isinstance(src, nn.Module):
        src = src.state_dict()
    raw = read_state_dict(src)
    state: dict[str, torch.Tensor] = {}
    for key, value in raw.items():
        name = official_key(canonical(key))
        if name is not None:  # None: an official-only buffer, rebuilt by official_state_dict
            state[name] = value
    if not isinstance(src, dict) and (Path(src) / "config.json").is_file():
        _check_against_config(Path(src), state)
    out, cast = {}, {}
    for key, value in official_state_dict(state).items():
        if id(value) not in cast:  # one cast per tensor object: tied names keep sharing it
            v = value.detach().cpu()
            cast[id(value)] = (v.to(dtype) if v.is_floating_point() else v).contiguous()
        out[key] = cast[id(value)]
    return out


def export_official(src, out, *, dtype="fp32", overwrite: bool = False) -> Path:
    """Write :func:`official_checkpoint` of ``src`` to ``out`` with ``torch.save``, atomically (temporary file beside
    it, fsynced, renamed). An existing ``out`` raises FileExistsError unless ``overwrite``. Returns the path."""
    target = Path(out)
    if target.is_dir():
        raise IsADirectoryError(f"{target}: the output must be a file name (e.g. pytorch_model.bin), not a directory")
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} exists (pass overwrite=True / --overwrite to replace it)")
    state = official_checkpoint(src, dtype)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.tmp-", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write_file(tmp, lambda p: torch.save(state, p))
        os.replace(tmp, target)
        fsync_dir(target.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return target


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lfvila.models.export_official",
                                     description="Export our weights as the official LF-VILA flat state dict (.bin).")
    parser.add_argument("src", help="save_pretrained directory, training checkpoint directory or weights file")
    parser.add_argument("out", help="output file, e.g. pytorch_model.bin")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32",
                        help="floating-point dtype of the file (default fp32; the official release files are fp16)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    args = parser.parse_args(argv)
    try:
        path = export_official(args.src, args.out, dtype=args.dtype, overwrite=args.overwrite)
    except (CheckpointError, FileExistsError, IsADirectoryError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {path} ({args.dtype}, {path.stat().st_size / 2**20:.1f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
