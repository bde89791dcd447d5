"""QA annotations derived from a synthetic dataset (:mod:`lfvila.data.synthetic`), in the official LF-VILA jsonl
formats, so the QA fine-tuning path runs offline end to end.

Every synthetic event is a caption such as "A red circle moves to the left." with its time span; a video's events
have distinct (colour, shape) pairs. From each video's captions this module writes three tasks:

- **How2QA-style multiple choice** (``lfvila_how2qa``): per event, ``text_q`` "what does the red circle do?",
  ``text_a`` the true motion ("moves to the left") and 3 other motions in a seeded order, ``answer_idx`` the true
  one's position, ``span`` the event's [start, end] seconds, ``text_s`` the video's *other* captions as time-stamped
  subtitles (the question's own caption would give the answer away; a quarter of the rows get none).
- **VIOLIN-style statements** (``lfvila_violin``): per event two rows, ``text_q`` "the red circle moves to the
  left." (``answer`` 1, true) and the same statement with the motion or the colour changed to one no event of the
  video has for that shape (``answer`` 0), ``text_s`` as above. Both come from one template, so the words alone
  do not tell true from false.
- **ActivityNet-QA-style classification** (``lfvila_actnet_qa``): per event "what does the red circle do?" ->
  the motion's class, and, where the (shape, motion) pair is unique in the video, "what colour is the circle that
  moves to the left?" -> the colour's class. Classes index :data:`ANSWERS` (motions, then colours), also written to
  ``actnet_qa_answers.json``.

``questions_per_video`` keeps that many events per video (a seeded choice; None: all). Everything is a function of
the source annotations and ``seed``: the same inputs give byte-identical files.

    python -m lfvila.data.synthetic_qa DATA_DIR [--seed 0] [--out DATA_DIR/qa] [--questions-per-video N]

writes ``OUT/{how2qa,violin,actnet_qa}_{train,val,test}.jsonl`` (from ``DATA_DIR/{train,val,test}.json``),
``OUT/actnet_qa_answers.json`` and ``OUT/meta.json``. Videos are named by ``clip_id`` / ``video_name``, the file stem
under the video root printed in the summary (``DATA_DIR/videos`` for a synthetic dataset): pass it as
``data.video_root``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
from pathlib import Path, PurePosixPath

from lfvila.data.synthetic import COLOURS, MOTIONS, SHAPES

SPLITS = ("train", "val", "test")
TASKS = ("how2qa", "violin", "actnet_qa")
MOTION_NAMES = tuple(MOTIONS)
ANSWERS: tuple[str, ...] = tuple(MOTIONS[m] for m in MOTION_NAMES) + tuple(COLOURS)
NUM_CHOICES = 4
_EMPTY_SUBTITLES_P = 0.25

_WORDS = re.compile(r"[a-z]+")


class SyntheticQAError(ValueError):
    """A source annotation that is not a synthetic caption file; the message names the file and the video."""


def parse_caption(sentence: str) -> tuple[str, str, str]:
    """``(colour, shape, motion)`` of a synthetic caption ("There is a red circle that moves to the left."); a
    ValueError when it does not name exactly one known colour, shape and motion."""
    text = " ".join(_WORDS.findall(sentence.lower()))
    words = set(text.split())
    colours = [c for c in COLOURS if c in words]
    shapes = [s for s in SHAPES if s in words]
    motions = [m for m, verb in MOTIONS.items() if re.search(rf"\b{verb}\b", text)]
    if len(colours) != 1 or len(shapes) != 1 or len(motions) != 1:
        raise ValueError(f"not a synthetic caption (colours {colours}, shapes {shapes}, motions {motions}): "
                         f"{sentence!r}")
    return colours[0], shapes[0], motions[0]


def _statement(colour: str, shape: str, motion: str) -> str:
    return f"the {colour} {shape} {MOTIONS[motion]}."


def _motion_question(colour: str, shape: str) -> str:
    return f"what does the {colour} {shape} do?"


def _rng(seed: int, *parts) -> random.Random:
    # str seeds are hashed with SHA-512 by random.Random: stable across runs and Python processes
    return random.Random("/".join(str(p) for p in (seed, *parts)))


def _load_split(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{path}: split annotation not found (make one with python -m lfvila.data.synthetic)"
                                ) from err
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise SyntheticQAError(f"{path}: not a JSON file ({err})") from err
    if not isinstance(data, dict):
        raise SyntheticQAError(f"{path}: expected an ActivityNet-Captions object {{video_id: {{...}}}}")
    return data


def video_events(path: Path, video_id: str, entry) -> list[dict]:
    """The video's events in file order: ``{colour, shape, motion, start, end, sentence}``."""
    try:
        stamps, sentences = entry["timestamps"], entry["sentences"]
        if len(stamps) != len(sentences) or not sentences:
            raise ValueError(f"{len(stamps)} timestamps for {len(sentences)} sentences")
        events = []
        for (start, end), sentence in zip(stamps, sentences):
            colour, shape, motion = parse_caption(sentence)
            events.append({"colour": colour, "shape": shape, "motion": motion, "start": float(start),
                           "end": float(end), "sentence": sentence})
    except (KeyError, TypeError, ValueError) as err:
        raise SyntheticQAError(f"{path}: video {video_id!r}: {err}") from err
    atoms = [(e["colour"], e["shape"]) for e in events]
    if len(set(atoms)) != len(atoms):
        raise SyntheticQAError(f"{path}: video {video_id!r}: two events share a colour and shape, so a question "
                               f"naming them would be ambiguous")
    return events


def _subtitles(events: list[dict], k: int) -> list[dict]:
    return [{"text": e["sentence"], "start": e["start"], "end": e["end"]} for j, e in enumerate(events) if j != k]


def how2qa_rows(clip_id: str, events: list[dict], picks: list[int], seed: int) -> list[dict]:
    """Multiple-choice rows (official How2QA jsonl fields) for the events ``picks``."""
    rows = []
    for k in picks:
        e = events[k]
        rng = _rng(seed, "how2qa", clip_id, k)
        wrong = rng.sample([m for m in MOTION_NAMES if m != e["motion"]], NUM_CHOICES - 1)
        choices = [e["motion"], *wrong]
        rng.shuffle(choices)
        subs = [] if rng.random() < _EMPTY_SUBTITLES_P else _subtitles(events, k)
        rows.append({"clip_id": clip_id, "span": [e["start"], e["end"]],
                     "text_q": _motion_question(e["colour"], e["shape"]),
                     "text_a": [MOTIONS[m] for m in choices], "text_s": subs,
                     "answer_idx": choices.index(e["motion"])})
    return rows


def violin_rows(clip_id: str, events: list[dict], picks: list[int], seed: int) -> list[dict]:
    """Statement rows (official VIOLIN jsonl fields): per event the true statement (1), then a false one (0)."""
    rows = []
    taken = {(e["colour"], e["shape"]) for e in events}
    for k in picks:
        e = events[k]
        rng = _rng(seed, "violin", clip_id, k)
        colours = [c for c in COLOURS if (c, e["shape"]) not in taken]
        if colours and rng.random() < 0.5:
            false = _statement(rng.choice(colours), e["shape"], e["motion"])
        else:
            false = _statement(e["colour"], e["shape"], rng.choice([m for m in MOTION_NAMES if m != e["motion"]]))
        subs = _subtitles(events, k)
        rows.append({"clip_id": clip_id, "text_q": _statement(e["colour"], e["shape"], e["motion"]), "text_s": subs,
                     "answer": 1})
        rows.append({"clip_id": clip_id, "text_q": false, "text_s": subs, "answer": 0})
    return rows


def actnet_qa_rows(video_name: str, events: list[dict], picks: list[int]) -> list[dict]:
    """Open-ended rows (official ActivityNet-QA jsonl fields), ``answer`` an index into :data:`ANSWERS`."""
    rows = []
    for k in picks:
        e = events[k]
        rows.append({"video_name": video_name, "question": _motion_question(e["colour"], e["shape"]),
                     "answer": ANSWERS.index(MOTIONS[e["motion"]])})
        if sum((o["shape"], o["motion"]) == (e["shape"], e["motion"]) for o in events) == 1:
            rows.append({"video_name": video_name,
                         "question": f"what colour is the {e['shape']} that {MOTIONS[e['motion']]}?",
                         "answer": ANSWERS.index(e["colour"])})
    return rows


def _video_names(entries: dict) -> tuple[str | None, dict[str, str]]:
    """The video folder (relative to the data dir) and each video's name under it: the file stem when every
    ``"video"`` path shares one folder (``videos/`` in a synthetic dataset), else the path without its extension.
    An empty split has no folder (None)."""
    if not entries:
        return None, {}
    rels = {vid: PurePosixPath(entry.get("video", vid) if isinstance(entry, dict) else vid)
            for vid, entry in entries.items()}
    parents = {str(r.parent) for r in rels.values()}
    if len(parents) == 1:
        return parents.pop(), {vid: r.stem if r.suffix else r.name for vid, r in rels.items()}
    return ".", {vid: str(r.with_suffix("")) for vid, r in rels.items()}


def dump_jsonl(path: Path, rows: list[dict]) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    os.replace(tmp, path)


def load_splits(data_dir: Path) -> tuple[dict, dict, str]:
    """The synthetic dataset's ``SPLITS`` in ``data_dir``: ``(splits {split: {video_id: entry}}, names {video_id: the
    row's video name}, the one folder every split keeps its videos in, "." for none)``."""
    splits = {name: _load_split(data_dir / f"{name}.json") for name in SPLITS}
    folders, names = set(), {}
    for entries in splits.values():
        folder, split_names = _video_names(entries)
        if folder is not None:
            folders.add(folder)
        names.update(split_names)
    if len(folders) > 1:
        raise SyntheticQAError(f"{data_dir}: the splits keep their videos in different folders {sorted(folders)}")
    folder = folders.pop() if folders else "."
    return splits, names, folder


def make_qa(data_dir, out=None, seed: int = 0, questions_per_video: int | None = None) -> dict:
    """Write the QA files of the synthetic dataset in ``data_dir`` to ``out`` (default ``data_dir/qa``); see the
    module docstring. Returns ``{"out", "video_root", "rows": {"how2qa_train": n, ...}, "num_answers"}``."""
    data_dir = Path(data_dir)
    out = Path(out) if out is not None else data_dir / "qa"
    if questions_per_video is not None and questions_per_video < 1:
        raise ValueError(f"questions_per_video must be >= 1 or None, got {questions_per_video}")
    splits, names, folder = load_splits(data_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows_written = {}
    for split, entries in splits.items():
        tables: dict[str, list[dict]] = {task: [] for task in TASKS}
        for video_id, entry in entries.items():
            events = video_events(data_dir / f"{split}.json", video_id, entry)
            picks = list(range(len(events)))
            if questions_per_video is not None and questions_per_video < len(picks):
                picks = sorted(_rng(seed, "picks", video_id).sample(picks, questions_per_video))
            name = names[video_id]
            tables["how2qa"] += how2qa_rows(name, events, picks, seed)
            tables["violin"] += violin_rows(name, events, picks, seed)
            tables["actnet_qa"] += actnet_qa_rows(name, events, picks)
        for task, rows in tables.items():
            dump_jsonl(out / f"{task}_{split}.jsonl", rows)
            rows_written[f"{task}_{split}"] = len(rows)
    (out / "actnet_qa_answers.json").write_text(json.dumps(list(ANSWERS), indent=1) + "\n", encoding="utf-8")
    meta = {"source": os.path.relpath(data_dir, out), "video_root": folder, "seed": seed,
            "questions_per_video": questions_per_video, "num_answers": len(ANSWERS), "num_choices": NUM_CHOICES}
    (out / "meta.json").write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
    return {"out": str(out), "video_root": str(data_dir / folder), "rows": rows_written, "num_answers": len(ANSWERS)}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m lfvila.data.synthetic_qa", description=__doc__.split("\n\n")[0])
    parser.add_argument("data_dir", help="a synthetic dataset (python -m lfvila.data.synthetic DATA_DIR)")
    parser.add_argument("--out", default=None, help="output folder (default DATA_DIR/qa)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--questions-per-video", type=int, default=None)
    args = parser.parse_args(argv)
    summary = make_qa(args.data_dir, args.out, seed=args.seed, questions_per_video=args.questions_per_video)
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
