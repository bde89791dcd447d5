"""A frame-index code drawn into video frames, so tests can check that decoded frame i is frame i.

The code is a 2 x 8 grid of ``cell x cell`` black/white squares in the top-left corner of the frame: cells 0-14
(row-major) hold the frame index in binary (least significant bit first, white = 1), cell 15 is an even-parity bit.
Black/white squares aligned to 8-pixel blocks survive lossy codecs (H.264, VP9 at normal quality); reading takes the
mean of each cell's interior, so compression noise at the edges does not matter. Indices up to 32767.
"""

from __future__ import annotations

import numpy as np

BITS = 15
ROWS, COLS = 2, 8
MAX_INDEX = 2**BITS - 1


def code_size(cell: int = 8) -> tuple[int, int]:
    """``(height, width)`` in pixels of the code region."""
    return ROWS * cell, COLS * cell


def draw_index(frame: np.ndarray, index: int, cell: int = 8) -> np.ndarray:
    """Draw ``index`` into ``frame`` (uint8 ``(H, W, C)``, modified in place and returned)."""
    if not 0 <= index <= MAX_INDEX:
        raise ValueError(f"index must be in [0, {MAX_INDEX}], got {index}")
    h, w = code_size(cell)
    if frame.shape[0] < h or frame.shape[1] < w:
        raise ValueError(f"frame {frame.shape[:2]} is too small for a {h}x{w} frame code")
    bits = [(index >> i) & 1 for i in range(BITS)]
    bits.append(sum(bits) % 2)  # even parity
    for k, bit in enumerate(bits):
        r, c = divmod(k, COLS)
        frame[r * cell : (r + 1) * cell, c * cell : (c + 1) * cell] = 255 if bit else 0
    return frame


def read_index(frame: np.ndarray, cell: int = 8) -> int:
    """The index drawn by :func:`draw_index` in ``frame`` (uint8 ``(H, W, C)``); ValueError if the parity fails."""
    margin = max(1, cell // 4)
    bits = []
    for k in range(ROWS * COLS):
        r, c = divmod(k, COLS)
        patch = frame[r * cell + margin : (r + 1) * cell - margin, c * cell + margin : (c + 1) * cell - margin]
        bits.append(int(patch.mean() > 127.5))
    if sum(bits[:BITS]) % 2 != bits[BITS]:
        raise ValueError("frame code parity check failed (frame altered, resized or not coded)")
    return sum(bit << i for i, bit in enumerate(bits[:BITS]))
