"""Video classification annotations derived from a synthetic dataset (:mod:`lfvila.data.synthetic`), in the official
LF-VILA video classification jsonl (``lfvila_video_cls``: ``video_id``, ``recipe_type``), so the COIN / LVU path
(``train.task: video_classification``) runs offline end to end on small real video files.

The class of a video is the colour of its longest event (the earliest of equally long ones), an index into
:data:`CLASSES` (the synthetic colours, 9 classes): a whole-video label, as COIN's task or LVU's scene, that the
mean-pooled global feature can see (the longest event's shape covers the most pixels over time). Everything is a
function of the source annotations: the same inputs give byte-identical files.

    python -m lfvila.data.synthetic_cls DATA_DIR [--out DATA_DIR/cls]

writes ``OUT/{train,val,test}.jsonl`` (from ``DATA_DIR/{train,val,test}.json``), ``OUT/classes.json`` and
``OUT/meta.json``. Videos are named by ``video_id``, the file stem under the video root printed in the summary
(``DATA_DIR/videos`` for a synthetic dataset): pass it as ``data.video_root``.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from lfvila.data.synthetic import COLOURS
from lfvila.data.synthetic_qa import dump_jsonl, load_splits, video_events

CLASSES: tuple[str, ...] = tuple(COLOURS)


def video_class(events: list[dict]) -> int:
    """The class of a video from its events (``{colour, start, end, ...}`` in file order): the colour of the longest
    event, the earliest on ties, as an index into :data:`CLASSES`."""
    if not events:
        raise ValueError("a video without events has no class")
    longest = max(range(len(events)), key=lambda k: (events[k]["end"] - events[k]["start"], -k))
    return CLASSES.index(events[longest]["colour"])


def make_cls(data_dir, out=None) -> dict:
    """Write the classification files of the synthetic dataset in ``data_dir`` to ``out`` (default
    ``data_dir/cls``); see the module docstring. Returns ``{"out", "video_root", "rows": {split: n},
    "num_classes"}``."""
    data_dir = Path(data_dir)
    out = Path(out) if out is not None else data_dir / "cls"
    splits, names, folder = load_splits(data_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows_written = {}
    for split, entries in splits.items():
        source = data_dir / f"{split}.json"
        rows = [{"video_id": names[vid], "recipe_type": video_class(video_events(source, vid, entry))}
                for vid, entry in entries.items()]
        dump_jsonl(out / f"{split}.jsonl", rows)
        rows_written[split] = len(rows)
    (out / "classes.json").write_text(json.dumps(list(CLASSES), indent=1) + "\n", encoding="utf-8")
    meta = {"source": os.path.relpath(data_dir, out), "video_root": folder, "num_classes": len(CLASSES),
            "label": "colour of the longest event"}
    (out / "meta.json").write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
    return {"out": str(out), "video_root": str(data_dir / folder), "rows": rows_written, "num_classes": len(CLASSES)}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m lfvila.data.synthetic_cls", description=__doc__.split("\n\n")[0])
    parser.add_argument("data_dir", help="a synthetic dataset (python -m lfvila.data.synthetic DATA_DIR)")
    parser.add_argument("--out", default=None, help="output folder (default DATA_DIR/cls)")
    args = parser.parse_args(argv)
    summary = make_cls(args.data_dir, args.out)
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
