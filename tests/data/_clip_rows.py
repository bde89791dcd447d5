"""Tiny official-pretraining rows (``lfvila_pretrain``: one file per clip, one sentence per clip) whose clips can be
told apart after decoding: clip k of row r has the text ``clip{k}``, a frame code ``r * 512 + k * 32 + f`` on frame f
(top 16 rows, exact through PyAV) and a constant grey level :func:`grey` (the rest of the frame, which survives
DALI's resize and crop)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from lfvila.data.encode import write_video
from lfvila.data.framecode import draw_index, read_index
from lfvila.data.synthetic import build_vocab

FRAME = (48, 64)  # (H, W): 16 rows of frame code, 32 rows of grey
FRAMES_PER_FILE = 6


def grey(clip: int) -> int:
    return 24 + 24 * clip


def write_rows(root, lengths: list[int], codec: str = "h264") -> Path:
    """Rows of ``lengths[r]`` clips each under ``root`` (videos in ``root/videos/<vid>/``, rows in ``root/rows.jsonl``,
    a vocabulary holding every ``clip{k}`` in ``root/vocab.txt``); returns the rows file."""
    root = Path(root)
    ext = ".mp4" if codec == "h264" else ".webm"
    rows = []
    for r, n in enumerate(lengths):
        vid = f"yt{r}"
        (root / "videos" / vid).mkdir(parents=True, exist_ok=True)
        row = []
        for k in range(n):
            frames = np.full((FRAMES_PER_FILE, *FRAME, 3), grey(k), dtype=np.uint8)
            for f in range(FRAMES_PER_FILE):
                draw_index(frames[f], r * 512 + k * 32 + f)
            write_video(root / "videos" / vid / f"{vid}.{k}{ext}", frames, fps=3.0, codec=codec, gop=2)
            row.append({"clip_id": f"{vid}.{k}{ext}", "text": f"clip{k}"})
        rows.append(row)
    path = root / "rows.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    build_vocab([f"clip{k}" for k in range(max(lengths))], root / "vocab.txt")
    return path


def clip_file(root, row: int, clip: int, codec: str = "h264") -> Path:
    return Path(root) / "videos" / f"yt{row}" / f"yt{row}.{clip}{'.mp4' if codec == 'h264' else '.webm'}"


def decode_code(frame: np.ndarray) -> tuple[int, int, int]:
    """``(row, clip, frame)`` of a decoded uint8 ``(H, W, C)`` frame at :data:`FRAME` size."""
    code = read_index(frame)
    return code // 512, code % 512 // 32, code % 32


def clip_of_grey(level: float) -> int:
    """The clip whose grey level is nearest to ``level``."""
    return int(round((level - 24) / 24))


def sentence_words(tok, ids) -> list[str]:
    """The words of each sentence of ``ids`` (M, L): the tokens between [CLS] and [SEP], joined ("" for padding)."""
    inv = {v: k for k, v in tok.vocab.items()}
    out = []
    for row in ids.tolist():
        words = [inv[i] for i in row if i not in (tok.cls_id, tok.sep_id, tok.pad_id)]
        out.append(" ".join(words))
    return out
