"""Frame sampling and paragraph segmentation rules of LF-VILA, each a small pure function.

Frame indices are explicit lists (ints into the decoded stream, ``0 <= i < num_frames``) so that decoders never choose
frames themselves and train / eval sampling and clip-to-sentence alignment live here.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Segment:
    """One sentence of a paragraph with its time span in seconds (``None`` when the format has no timestamps).
    A padding segment has ``text == ""``."""

    text: str
    start: float | None = None
    end: float | None = None

    @property
    def is_padding(self) -> bool:
        return self.text == ""


def merge_segments(segments: list[Segment], m: int) -> list[Segment]:
    """The official paragraph -> ``m`` sentences rule: while there are more than ``m`` segments, merge the adjacent
    pair with the smallest combined number of characters (the first such pair on ties), joining texts with a space
    and spans by union; then pad with empty segments to exactly ``m``.
    """
    if m < 1:
        raise ValueError(f"m must be >= 1, got {m}")
    segs = list(segments)
    while len(segs) > m:
        k = min(range(len(segs) - 1), key=lambda i: len(segs[i].text) + len(segs[i + 1].text))
        a, b = segs[k], segs[k + 1]
        starts = [s for s in (a.start, b.start) if s is not None]
        ends = [e for e in (a.end, b.end) if e is not None]
        merged = Segment(f"{a.text} {b.text}".strip(), min(starts) if starts else None, max(ends) if ends else None)
        segs[k : k + 2] = [merged]
    return segs + [Segment("")] * (m - len(segs))
