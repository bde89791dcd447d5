"""QA files derived from the synthetic dataset: they parse with the official-format adapters (videos found), every
answer is right with respect to the source captions, and the output is a deterministic function of the seed."""

from __future__ import annotations

import json
import os

import pytest

from lfvila.data.formats import build_dataset
from lfvila.data.synthetic import COLOURS, MOTIONS, make_dataset
from lfvila.data.synthetic_qa import ANSWERS, SyntheticQAError, main, make_qa, parse_caption

FORMATS = {"how2qa": "lfvila_how2qa", "violin": "lfvila_violin", "actnet_qa": "lfvila_actnet_qa"}


@pytest.fixture(scope="module")
def syn(tmp_path_factory):
    root = tmp_path_factory.mktemp("synqa")
    make_dataset(root, videos=8, seed=2, size=(48, 96), min_seconds=8, max_seconds=12)
    return root


@pytest.fixture(scope="module")
def qa(syn):
    return make_qa(syn, seed=0)


def _events(syn, split):
    """{video_id: [(colour, shape, motion, start, end, sentence), ...]} from the source captions."""
    data = json.loads((syn / f"{split}.json").read_text())
    return {vid: [(*parse_caption(s), a, b, s) for (a, b), s in zip(e["timestamps"], e["sentences"])]
            for vid, e in data.items()}


def _rows(qa, task, split):
    return [json.loads(line) for line in open(os.path.join(qa["out"], f"{task}_{split}.jsonl"))]


def test_parse_caption_reads_every_template():
    assert parse_caption("There is an orange star that moves to the left.") == ("orange", "star", "left")
    assert parse_caption("We see a pink hexagon that spins around.") == ("pink", "hexagon", "spin")
    assert parse_caption("The white cross grows bigger.") == ("white", "cross", "grow")
    with pytest.raises(ValueError, match="not a synthetic caption"):
        parse_caption("a man rides a bike")


@pytest.mark.parametrize("task", list(FORMATS))
@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_files_parse_with_the_adapters_and_find_the_videos(syn, qa, task, split):
    ann = build_dataset(FORMATS[task], os.path.join(qa["out"], f"{task}_{split}.jsonl"), qa["video_root"],
                        check_files=True)
    assert len(ann) == qa["rows"][f"{task}_{split}"] > 0 and ann.skipped == 0
    sources = json.loads((syn / f"{split}.json").read_text())
    for i in range(len(ann)):
        sample = ann[i]
        assert os.path.isfile(sample["video"])
        assert os.path.relpath(sample["video"], syn) == sources[sample["video_id"]]["video"]  # .mp4 and .webm alike


def test_how2qa_answers_are_the_event_motions(syn, qa):
    for split in ("train", "val", "test"):
        events = _events(syn, split)
        for row in _rows(qa, "how2qa", split):
            (event,) = [e for e in events[row["clip_id"]] if [e[3], e[4]] == row["span"]]
            colour, shape, motion, _, _, sentence = event
            assert row["text_q"] == f"what does the {colour} {shape} do?"
            assert len(row["text_a"]) == 4 == len(set(row["text_a"]))
            assert row["text_a"][row["answer_idx"]] == MOTIONS[motion]
            assert all(a in MOTIONS.values() for a in row["text_a"])
            subtitles = [s["text"] for s in row["text_s"]]
            assert sentence not in subtitles  # the question's own caption would give the answer away
            assert set(subtitles) <= {e[5] for e in events[row["clip_id"]]}


def test_violin_statements_are_true_or_false_as_labelled(syn, qa):
    labels = []
    for split in ("train", "val", "test"):
        events = _events(syn, split)
        for row in _rows(qa, "violin", split):
            facts = {(c, s, m) for c, s, m, *_ in events[row["clip_id"]]}
            said = parse_caption(row["text_q"])
            assert (said in facts) == (row["answer"] == 1), row
            labels.append(row["answer"])
    assert labels.count(0) == labels.count(1)


def test_actnet_qa_classes_answer_the_questions(syn, qa):
    answers = json.loads((syn / "qa" / "actnet_qa_answers.json").read_text())
    assert answers == list(ANSWERS) and len(answers) == len(MOTIONS) + len(COLOURS) == qa["num_answers"]
    kinds = set()
    for split in ("train", "val", "test"):
        events = _events(syn, split)
        for row in _rows(qa, "actnet_qa", split):
            vid_events = events[row["video_name"]]
            answer = ANSWERS[row["answer"]]
            if row["question"].startswith("what does the "):
                colour, shape = row["question"][len("what does the "):-len(" do?")].split()
                (motion,) = [m for c, s, m, *_ in vid_events if (c, s) == (colour, shape)]
                assert answer == MOTIONS[motion]
                kinds.add("motion")
            else:
                shape, verb = row["question"][len("what colour is the "):-1].split(" that ")
                (colour,) = [c for c, s, m, *_ in vid_events if (s, MOTIONS[m]) == (shape, verb)]
                assert answer == colour
                kinds.add("colour")
    assert kinds == {"motion", "colour"}


def test_same_seed_same_bytes_other_seed_other_answers(syn, tmp_path, qa):
    a = make_qa(syn, tmp_path / "a", seed=0)
    b = make_qa(syn, tmp_path / "b", seed=0)
    c = make_qa(syn, tmp_path / "c", seed=1)
    names = sorted(os.listdir(tmp_path / "a"))
    assert names == sorted(os.listdir(tmp_path / "b"))
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
        if name.endswith(".jsonl"):  # the default output folder holds the same files
            assert (tmp_path / "a" / name).read_bytes() == (syn / "qa" / name).read_bytes(), name
    assert a["rows"] == b["rows"] == c["rows"]
    assert (tmp_path / "a" / "how2qa_train.jsonl").read_bytes() != (tmp_path / "c" / "how2qa_train.jsonl").read_bytes()


def test_questions_per_video_caps_the_rows(syn, tmp_path):
    summary = make_qa(syn, tmp_path, seed=0, questions_per_video=1)
    for split in ("train", "val", "test"):
        videos = len(json.loads((syn / f"{split}.json").read_text()))
        assert summary["rows"][f"how2qa_{split}"] == videos
        assert summary["rows"][f"violin_{split}"] == 2 * videos
        assert videos <= summary["rows"][f"actnet_qa_{split}"] <= 2 * videos
    with pytest.raises(ValueError, match="questions_per_video"):
        make_qa(syn, tmp_path, questions_per_video=0)


def test_bad_sources_raise_naming_the_file_and_video(tmp_path, syn):
    for split in ("train", "val", "test"):
        (tmp_path / f"{split}.json").write_text((syn / f"{split}.json").read_text())
    data = json.loads((tmp_path / "val.json").read_text())
    vid = next(iter(data))
    data[vid]["sentences"][0] = "a man rides a bike"
    (tmp_path / "val.json").write_text(json.dumps(data))
    with pytest.raises(SyntheticQAError, match=rf"val\.json: video '{vid}': not a synthetic caption"):
        make_qa(tmp_path)
    (tmp_path / "test.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"test\.json"):
        make_qa(tmp_path)


def test_cli_writes_the_files(syn, tmp_path, capsys):
    summary = main([str(syn), "--out", str(tmp_path / "qa"), "--seed", "0"])
    assert json.loads(capsys.readouterr().out) == summary
    assert sorted(p.name for p in (tmp_path / "qa").glob("*.jsonl")) == sorted(
        f"{t}_{s}.jsonl" for t in FORMATS for s in ("train", "val", "test"))
