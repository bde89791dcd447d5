"""Write real encoded videos with PyAV (FFmpeg's libx264 / libvpx-vp9): for synthetic data, tests and ``prepare``.

Frames are ``uint8 (T, H, W, 3)`` RGB (or an iterable of ``(H, W, 3)`` frames); timestamps are exact (frame i at
``i / fps`` seconds, constant frame rate), the keyframe interval is ``gop`` frames.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from fractions import Fraction
from pathlib import Path

import numpy as np

CODECS = {"h264": ("libx264", "yuv420p", ".mp4"), "vp9": ("libvpx-vp9", "yuv420p", ".webm")}


def write_video(path, frames: Iterable[np.ndarray], fps: float = 3.0, codec: str = "h264", gop: int = 8,
                crf: int = 18) -> Path:
    """Encode ``frames`` (RGB uint8, even height and width) to ``path`` atomically (written to a temporary name in
    the same folder, then renamed). ``codec``: ``"h264"`` (mp4) or ``"vp9"`` (webm). Returns the path."""
    import av

    if codec not in CODECS:
        raise ValueError(f"codec must be one of {sorted(CODECS)}, got {codec!r}")
    if not fps > 0:
        raise ValueError(f"fps must be positive, got {fps!r}")
    encoder, pix_fmt, _ = CODECS[codec]
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}{path.suffix}")
    rate = Fraction(fps).limit_denominator(1001)
    count = 0
    try:
        with av.open(str(tmp), mode="w") as container:
            stream = container.add_stream(encoder, rate=rate)
            stream.pix_fmt = pix_fmt
            stream.gop_size = gop
            stream.time_base = 1 / rate
            if codec == "h264":
                stream.options = {"crf": str(crf), "preset": "veryfast", "bf": "0",
                                  "x264-params": f"keyint={gop}:min-keyint={gop}:scenecut=0"}
            else:
                stream.options = {"crf": str(crf + 12), "b": "0", "deadline": "realtime", "cpu-used": "8",
                                  "g": str(gop), "keyint_min": str(gop), "auto-alt-ref": "0", "lag-in-frames": "0"}
            for frame in frames:
                if count == 0:
                    stream.height, stream.width = frame.shape[0], frame.shape[1]
                    if stream.height % 2 or stream.width % 2:
                        raise ValueError(f"frame size {frame.shape[:2]} must be even for {pix_fmt}")
                vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
                vf.pts = count
                container.mux(stream.encode(vf))
                count += 1
            if count == 0:
                raise ValueError("no frames to write")
            container.mux(stream.encode(None))
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path
