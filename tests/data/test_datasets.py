"""Dataset adapters on small annotation files written here: one sample dict for all formats, edge cases of each
format, bad input raising (file and row named) or skipped (counted, capped), and sharding."""

import json
import logging
import pickle

import pytest

from lfvila.data.formats import REGISTRY, AnnotationDataset, build_dataset
from lfvila.data.official_formats import LFVILAPretrainFormat
from lfvila.data.row_parsing import AnnotationError, parse_literal
from lfvila.data.samplers import shard
from lfvila.data.sampling import Segment

KEYS = {"video_id", "video", "clips", "duration", "segments", "text", "question", "answers", "answer", "span",
        "label", "subtitles", "flags", "source"}


def jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def build(fmt, path, root, **kw):
    ds = build_dataset(fmt, path, root, **kw)
    for i in range(len(ds)):
        assert set(ds[i]) == KEYS
    return ds


# ------------------------------------------------------------------------------------------ one adapter each


def test_retrieval_text_as_list_or_string_and_video_fallbacks(tmp_path):
    rows = [{"clip_id": "v1", "text": [" A man runs. ", "", "He jumps."]}, {"clip_id": "v2", "text": "One sentence."},
            {"clip_id": "v3", "text": "x"}]
    ds = build("lfvila_retrieval", jsonl(tmp_path / "a.jsonl", rows), tmp_path / "vid")
    a, b = ds[0], ds[1]
    assert a["segments"] == [Segment("A man runs."), Segment("He jumps.")] and a["text"] == "A man runs. He jumps."
    assert b["segments"] == [Segment("One sentence.")]
    assert ds.dropped_segments["empty sentence"] == 1
    assert a["video"] == str(tmp_path / "vid" / "v1.mp4")  # default when nothing is on disk
    (tmp_path / "vid").mkdir()
    (tmp_path / "vid" / "v1.webm").touch()  # another known extension
    (tmp_path / "vid" / "v2.ts").touch()  # only the <stem>.* glob finds this one
    assert ds[0]["video"].endswith("v1.webm") and ds[1]["video"].endswith("v2.ts")
    assert a["source"].endswith("a.jsonl: line 1") and a["duration"] is None and a["flags"] == ()
    assert pickle.loads(pickle.dumps(ds))[1] == ds[1]  # DataLoader workers under spawn


def test_pretrain_json_and_python_literal_rows(tmp_path):
    clip = lambda n, t: {"clip_id": f"yt1.{n}.mp4", "text": t}
    lit = repr([{"clip_id": "yt2.0.mp4", "text": "it's fine"}, {"clip_id": "yt2.1.mp4", "text": ""}])
    ds = build("lfvila_pretrain", jsonl(tmp_path / "p.jsonl", [[clip(n, f"s{n}") for n in range(5)], lit]),
               tmp_path / "clips")
    a, b = ds[0], ds[1]
    assert a["video_id"] == "yt1" and a["video"] == str(tmp_path / "clips" / "yt1")
    assert a["clips"] == [str(tmp_path / "clips" / "yt1" / f"yt1.{n}.mp4") for n in range(5)]
    assert [s.text for s in a["segments"]] == [f"s{n}" for n in range(5)]
    assert b["segments"] == [Segment("it's fine"), Segment("")]  # an empty clip text keeps clip i <-> segment i
    assert b["text"] == "it's fine"
    assert parse_literal(b"[{'clip_id': 'a.0.mp4', 'text': 'x'}]") == [{"clip_id": "a.0.mp4", "text": "x"}]


def test_pretrain_code_in_a_row_is_refused_not_executed(tmp_path):
    marker = tmp_path / "pwned"
    evil = f"__import__('os').system('touch {marker}')"
    good = [[{"clip_id": f"yt{i}.0.mp4", "text": "hi"}] for i in range(30)]
    path = jsonl(tmp_path / "p.jsonl", [*good, evil, f"[{evil}]"])
    with pytest.raises(AnnotationError, match=r"p\.jsonl: line 31: .*code is refused"):
        LFVILAPretrainFormat(path, tmp_path)
    ds = LFVILAPretrainFormat(path, tmp_path, on_error="skip", max_skip_fraction=0.1)
    assert len(ds) == 30 and ds.skipped == 2 and ds.skip_reasons["malformed literal"] == 2
    assert not marker.exists()


def test_pretrain_mixed_videos_and_min_clips(tmp_path):
    path = jsonl(tmp_path / "p.jsonl", [[{"clip_id": "a.0.mp4", "text": "x"}, {"clip_id": "b.1.mp4", "text": "y"}]])
    with pytest.raises(AnnotationError, match="line 1: .*not from video 'a'"):
        LFVILAPretrainFormat(path, tmp_path)
    path = jsonl(tmp_path / "q.jsonl", [[{"clip_id": "a.0.mp4", "text": "x"}]])
    with pytest.raises(AnnotationError, match="min_clips 4"):
        LFVILAPretrainFormat(path, tmp_path, min_clips=4)


def test_how2qa_jsonl(tmp_path):
    subs = [{"text": "hello", "start": 0.5, "end": 2.0}, {"text": "bad", "start": 3.0, "end": 3.0}]
    row = {"clip_id": "c1", "span": [4, 9], "text_q": "what?", "text_a": ["a", "b", "c", "d"], "text_s": subs,
           "answer_idx": 2}
    ds = build("lfvila_how2qa", jsonl(tmp_path / "h.jsonl", [row, {**row, "span": [7, 7]}]), tmp_path)
    a, b = ds[0], ds[1]
    assert (a["question"], a["answers"], a["answer"], a["span"]) == ("what?", ["a", "b", "c", "d"], 2, (4.0, 9.0))
    assert a["subtitles"] == a["segments"] == [Segment("hello", 0.5, 2.0)]
    assert ds.dropped_segments["start >= end"] == 2
    assert b["span"] == (7.0, 8.0) and b["flags"] == ("zero_length_span",)
    for bad, msg in [({"answer_idx": 4}, "out of range"), ({"text_a": ["a", "b"]}, "expected 4"),
                     ({"span": [5, 2]}, "start <= end")]:
        with pytest.raises(AnnotationError, match=f"line 1: .*{msg}"):
            build("lfvila_how2qa", jsonl(tmp_path / "bad.jsonl", [{**row, **bad}]), tmp_path)


def test_violin_and_actnet_qa(tmp_path):
    v = build("lfvila_violin", jsonl(tmp_path / "v.jsonl", [{"clip_id": "c", "text_q": "He sits.", "answer": 1,
                                                              "text_s": [{"text": "hi", "start": 0, "end": 1}]}]),
              tmp_path)
    assert v[0]["label"] == 1 and v[0]["question"] == "He sits." and v[0]["subtitles"] == [Segment("hi", 0, 1)]
    with pytest.raises(AnnotationError, match="0 or 1"):
        build("lfvila_violin", jsonl(tmp_path / "w.jsonl", [{"clip_id": "c", "text_q": "x", "answer": 2}]), tmp_path)
    q = build("lfvila_actnet_qa", jsonl(tmp_path / "q.jsonl", [{"video_name": "v_x", "question": "who?",
                                                                 "answer": 17}]), tmp_path, num_classes=1654)
    assert (q[0]["video_id"], q[0]["label"], q[0]["segments"], q[0]["text"]) == ("v_x", 17, [], "")
    with pytest.raises(AnnotationError, match="outside"):
        build("lfvila_actnet_qa", jsonl(tmp_path / "r.jsonl", [{"video_name": "v", "question": "q", "answer": 3}]),
              tmp_path, num_classes=3)


def test_activitynet_captions_clamp_drop_strip(tmp_path):
    ann = {"v_abc": {"duration": 10.0, "timestamps": [[-1, 3], [2, 12.5], [6, 6], [11, 13]],
                     "sentences": [" A man walks. ", "He sits.", "zero", "after the end"]},
           "v_def": {"duration": 5, "timestamps": [[0, 5]], "sentences": ["ok"]}}
    (tmp_path / "a.json").write_text(json.dumps(ann), encoding="utf-8")
    ds = build("activitynet_captions", tmp_path / "a.json", tmp_path)
    s = ds[0]
    assert s["segments"] == [Segment("A man walks.", 0.0, 3.0), Segment("He sits.", 2.0, 10.0)]
    assert s["duration"] == 10.0 and s["source"].endswith("key 'v_abc'")
    assert ds.dropped_segments["start >= end"] == 2 and ds.clamped_segments["clamped"] == 3
    (tmp_path / "abc.mp4").touch()  # files often lack ActivityNet's v_ prefix
    assert ds[0]["video"] == str(tmp_path / "abc.mp4")


def test_activitynet_optional_video_key_as_the_synthetic_data_writes(tmp_path):
    ann = {"s0": {"duration": 4, "timestamps": [[0, 2]], "sentences": ["x"], "video": "videos/s0.webm"}}
    (tmp_path / "a.json").write_text(json.dumps(ann), encoding="utf-8")
    (tmp_path / "videos").mkdir()
    (tmp_path / "videos" / "s0.webm").touch()
    assert build("activitynet_captions", tmp_path / "a.json", tmp_path)[0]["video"] == str(tmp_path / "videos/s0.webm")
    assert build("activitynet_captions", tmp_path / "a.json", tmp_path / "videos")[0]["video"] == str(
        tmp_path / "videos/s0.webm")


def test_activitynet_row_with_no_valid_span_is_bad(tmp_path):
    ann = {"v1": {"duration": 4, "timestamps": [[5, 8]], "sentences": ["x"]}}
    (tmp_path / "a.json").write_text(json.dumps(ann), encoding="utf-8")
    with pytest.raises(AnnotationError, match=r"a\.json: key 'v1': empty paragraph"):
        build("activitynet_captions", tmp_path / "a.json", tmp_path)


def test_didemo_chunks_to_seconds_grouped_and_ordered(tmp_path):
    ann = [{"video": "x@N00_1.mov", "description": "later", "times": [[2, 3], [2, 3], [0, 0], [1, 3]]},
           {"video": "y.mp4", "description": "only", "times": [[5, 5]]},
           {"video": "x@N00_1.mov", "description": " first ", "times": [[0, 0], [0, 1], [0, 0], [0, 1]]},
           {"video": "x@N00_1.mov", "description": "reversed", "times": [3, 1]},
           {"video": "z.mp4", "descriptions": ["b", "a"], "times": [[1, 1], [[0, 0], [0, 0]]]}]
    (tmp_path / "d.json").write_text(json.dumps(ann), encoding="utf-8")
    ds = build("didemo", tmp_path / "d.json", tmp_path)
    x, y, z = ds[0], ds[1], ds[2]
    assert x["segments"] == [Segment("first", 0.0, 5.0), Segment("later", 10.0, 20.0)]  # ties -> first span
    assert x["video"] == str(tmp_path / "x@N00_1.mov") and x["text"] == "first later"
    assert y["segments"] == [Segment("only", 25.0, 30.0)]
    assert z["segments"] == [Segment("a", 0.0, 5.0), Segment("b", 5.0, 10.0)]
    assert ds.dropped_segments["start >= end"] == 1


def test_how2qa_csv_quoted_commas_zero_spans_and_shuffle(tmp_path):
    csv_text = ('vid1,[3.0:9.0],"no, never",wrong two,"three, 3","What, exactly, is cut?","the onion, sliced"\n'
                'vid2,[5:5],w1,w2,w3,why?,right\n')
    (tmp_path / "h.csv").write_text(csv_text, encoding="utf-8")
    ds = build("how2qa_csv", tmp_path / "h.csv", tmp_path)
    a, b = ds[0], ds[1]
    assert a["question"] == "What, exactly, is cut?" and a["span"] == (3.0, 9.0)
    assert sorted(a["answers"]) == sorted(["the onion, sliced", "no, never", "wrong two", "three, 3"])
    assert a["answers"][a["answer"]] == "the onion, sliced" and b["answers"][b["answer"]] == "right"
    assert b["span"] == (5.0, 6.0) and b["flags"] == ("zero_length_span",)
    assert build("how2qa_csv", tmp_path / "h.csv", tmp_path)[0]["answers"] == a["answers"]  # deterministic
    assert build("how2qa_csv", tmp_path / "h.csv", tmp_path, zero_span="keep")[1]["span"] == (5.0, 5.0)
    unshuffled = build("how2qa_csv", tmp_path / "h.csv", tmp_path, shuffle_answers=False)[0]
    assert unshuffled["answer"] == 0 and unshuffled["answers"][0] == "the onion, sliced"
    with pytest.raises(AnnotationError, match=r"h\.csv: line 2: zero-length span"):
        build("how2qa_csv", tmp_path / "h.csv", tmp_path, zero_span="error")
    with pytest.raises(ValueError, match="zero_span"):
        build("how2qa_csv", tmp_path / "h.csv", tmp_path, zero_span="stretch")


def test_how2qa_csv_with_header_and_multiline_quotes(tmp_path):
    csv_text = ('video_id,start,end,question,answer,wrong1,wrong2,wrong3\n'
                'v9,1,4,"a question\nover two lines",yes,no,maybe,never\n'
                'v10,2,3,q,yes,no,,never\n')
    (tmp_path / "h.csv").write_text(csv_text, encoding="utf-8")
    with pytest.raises(AnnotationError, match=r"line 4: missing wrong"):
        build("how2qa_csv", tmp_path / "h.csv", tmp_path)
    ds = build("how2qa_csv", tmp_path / "h.csv", tmp_path, on_error="skip", max_skip_fraction=0.5)
    assert len(ds) == 1 and ds[0]["span"] == (1.0, 4.0) and ds[0]["question"] == "a question\nover two lines"
    (tmp_path / "u.csv").write_text('id,time,x,y,z,q,ok\nv,[1:2],w,w,w,"q, q",right\n', encoding="utf-8")
    u = build("how2qa_csv", tmp_path / "u.csv", tmp_path)  # unknown header names over the release's layout
    assert len(u) == 1 and u[0]["question"] == "q, q" and u[0]["answers"][u[0]["answer"]] == "right"
    (tmp_path / "g.csv").write_text("video_id,question,a1,a2\nv,q,x,y\n", encoding="utf-8")
    with pytest.raises(AnnotationError, match="line 1: header"):
        build("how2qa_csv", tmp_path / "g.csv", tmp_path)


def test_generic_jsonl(tmp_path):
    rows = [{"video": "sub/a.mkv", "duration": 8, "sentences": [{"text": "one", "start": 0, "end": 3},
                                                                   {"text": "two", "start": 3, "end": 9}]},
            {"video": "b", "video_id": "B", "sentences": ["untimed"]}]
    ds = build("generic_jsonl", jsonl(tmp_path / "g.jsonl", rows), tmp_path)
    assert ds[0]["video"] == str(tmp_path / "sub" / "a.mkv") and ds[0]["video_id"] == "a"
    assert ds[0]["segments"] == [Segment("one", 0.0, 3.0), Segment("two", 3.0, 8.0)]
    assert ds[1]["video_id"] == "B" and ds[1]["duration"] is None and ds[1]["segments"] == [Segment("untimed")]


# ------------------------------------------------------------------------------------------ bad input


GOOD = {"video": "a", "sentences": [{"text": "fine", "start": 0, "end": 1}]}
BAD_LINES = {
    "malformed json": (b'{"video": "a", "sentences": [', "malformed JSON"),
    "missing field": (json.dumps({"video": "a"}).encode(), "missing field 'sentences'"),
    "empty paragraph": (json.dumps({"video": "a", "sentences": [" ", ""]}).encode(), "empty paragraph"),
    "start >= end": (json.dumps({"video": "a", "sentences": [{"text": "x", "start": 2, "end": 1}]}).encode(),
                     "empty paragraph"),
    "non-utf8": (b'{"video": "a", "sentences": ["caf\xe9"]}', "non-UTF-8"),
    "bad value": (json.dumps({"video": "a", "sentences": [{"text": "x", "start": "soon", "end": 1}]}).encode(),
                  "must be a number"),
    "unsafe path": (json.dumps({**GOOD, "video": "../../etc/passwd"}).encode(), "leaves the video root"),
}


def write_with_bad(path, n_good, bad_lines):
    lines = [json.dumps(GOOD).encode()] * n_good + list(bad_lines)
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


@pytest.mark.parametrize("case", sorted(BAD_LINES))
def test_bad_row_raises_naming_file_and_row(tmp_path, case):
    line, msg = BAD_LINES[case]
    path = write_with_bad(tmp_path / "ann.jsonl", 3, [line])
    with pytest.raises(AnnotationError, match=rf"ann\.jsonl: line 4: .*{msg}") as info:
        build_dataset("generic_jsonl", path, tmp_path)
    assert info.value.row == "line 4"


@pytest.mark.parametrize("case", sorted(BAD_LINES))
def test_bad_row_is_skipped_and_counted(tmp_path, case, caplog):
    line, _ = BAD_LINES[case]
    path = write_with_bad(tmp_path / "ann.jsonl", 20, [line])
    with caplog.at_level(logging.WARNING, logger="lfvila.data.row_parsing"):
        ds = build_dataset("generic_jsonl", path, tmp_path, on_error="skip")  # 1 / 21 < 5 %
    assert len(ds) == 20 and ds.skipped == 1 and sum(ds.skip_reasons.values()) == 1
    assert "ann.jsonl: line 21" in caplog.text


def test_skipping_more_than_max_skip_fraction_raises(tmp_path):
    path = write_with_bad(tmp_path / "ann.jsonl", 20, [b"{", b"[1, 2"])  # 2 / 22 > 5 %
    with pytest.raises(AnnotationError, match=r"skipped 2 of 22 rows .*max_skip_fraction"):
        build_dataset("generic_jsonl", path, tmp_path, on_error="skip")
    assert len(build_dataset("generic_jsonl", path, tmp_path, on_error="skip", max_skip_fraction=0.1)) == 20
    with pytest.raises(ValueError, match="on_error"):
        build_dataset("generic_jsonl", path, tmp_path, on_error="ignore")


def test_empty_or_missing_annotation_file(tmp_path):
    (tmp_path / "e.jsonl").write_text("\n\n", encoding="utf-8")
    with pytest.raises(AnnotationError, match="no annotation rows"):
        build_dataset("generic_jsonl", tmp_path / "e.jsonl", tmp_path)
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        build_dataset("generic_jsonl", tmp_path / "missing.jsonl", tmp_path)


def test_whole_file_json_non_utf8_and_malformed(tmp_path):
    ann = {f"v{i}": {"duration": 5, "timestamps": [[0, 1]], "sentences": [f"s{i}"]} for i in range(25)}
    data = json.dumps(ann, indent=1).encode().replace(b'"s7"', b'"s\xff7"')
    (tmp_path / "a.json").write_bytes(data)
    line = data[: data.index(b"\xff")].count(b"\n") + 1
    with pytest.raises(AnnotationError, match=rf"a\.json: line {line}: non-UTF-8"):
        build_dataset("activitynet_captions", tmp_path / "a.json", tmp_path)
    ds = build_dataset("activitynet_captions", tmp_path / "a.json", tmp_path, on_error="skip")
    assert len(ds) == 24 and ds.skip_reasons == {"non-utf8": 1} and "v7" not in {s["video_id"] for s in ds}
    (tmp_path / "b.json").write_text('{"v1": {"duration": 5,\n "timestamps": [[0, 1]],, }}', encoding="utf-8")
    with pytest.raises(AnnotationError, match=r"b\.json: line 2: malformed JSON"):  # cannot be skipped row-wise
        build_dataset("activitynet_captions", tmp_path / "b.json", tmp_path, on_error="skip")
    (tmp_path / "c.json").write_text("[]", encoding="utf-8")
    with pytest.raises(AnnotationError, match="expected a JSON object"):
        build_dataset("activitynet_captions", tmp_path / "c.json", tmp_path)


def test_csv_non_utf8_row(tmp_path):
    rows = [f"v{i},[1:2],w,w,w,q,a".encode() for i in range(30)] + [b"vx,[1:2],w,w,w,q\xe9,a"]
    (tmp_path / "h.csv").write_bytes(b"\n".join(rows))
    with pytest.raises(AnnotationError, match=r"h\.csv: line 31: non-UTF-8"):
        build_dataset("how2qa_csv", tmp_path / "h.csv", tmp_path)
    ds = build_dataset("how2qa_csv", tmp_path / "h.csv", tmp_path, on_error="skip")
    assert len(ds) == 30 and ds.skip_reasons == {"non-utf8": 1}


def test_didemo_bad_entry_is_named(tmp_path):
    ann = [{"video": "a.mp4", "description": "x", "times": [[0, 0]]}, {"video": "a.mp4", "times": [[0, 1]]}]
    (tmp_path / "d.json").write_text(json.dumps(ann), encoding="utf-8")
    with pytest.raises(AnnotationError, match=r"d\.json: entry 1: missing field 'description'"):
        build_dataset("didemo", tmp_path / "d.json", tmp_path)


def test_check_files(tmp_path):
    rows = [{"clip_id": f"v{i}", "text": "t"} for i in range(25)]
    path = jsonl(tmp_path / "r.jsonl", rows)
    for i in range(24):
        (tmp_path / f"v{i}.mp4").touch()
    assert len(build_dataset("lfvila_retrieval", path, tmp_path)) == 25  # not checked by default
    with pytest.raises(AnnotationError, match=r"r\.jsonl: line 25: video file not found: .*v24\.mp4"):
        build_dataset("lfvila_retrieval", path, tmp_path, check_files=True)
    ds = build_dataset("lfvila_retrieval", path, tmp_path, check_files=True, on_error="skip")
    assert len(ds) == 24 and ds.skip_reasons == {"missing video": 1}
    pre = jsonl(tmp_path / "p.jsonl", [[{"clip_id": "yt.0.mp4", "text": "a"}, {"clip_id": "yt.1.mp4", "text": "b"}]])
    (tmp_path / "yt").mkdir()
    (tmp_path / "yt" / "yt.0.mp4").touch()
    with pytest.raises(AnnotationError, match=r"yt\.1\.mp4"):
        build_dataset("lfvila_pretrain", pre, tmp_path, check_files=True)


# ------------------------------------------------------------------------------------------ registry, sharding


def test_registry_and_unknown_format(tmp_path):
    assert {"lfvila_retrieval", "lfvila_pretrain", "lfvila_how2qa", "lfvila_violin", "lfvila_actnet_qa",
            "activitynet_captions", "didemo", "how2qa_csv", "generic_jsonl"} <= set(REGISTRY)
    assert all(issubclass(c, AnnotationDataset) and c.format_name == n for n, c in REGISTRY.items())
    with pytest.raises(ValueError, match="unknown dataset format 'msrvtt'.*didemo"):
        build_dataset("msrvtt", tmp_path / "x", tmp_path)


@pytest.mark.parametrize("n", [0, 1, 7, 8])
def test_two_rank_shards_cover_the_dataset_once(n):
    parts = [shard(n, r, 2) for r in range(2)]
    assert sorted(parts[0] + parts[1]) == list(range(n)) and not set(parts[0]) & set(parts[1])
    assert abs(len(parts[0]) - len(parts[1])) <= 1


def test_shard_modes_and_dataset_input(tmp_path):
    ds = build_dataset("lfvila_retrieval", jsonl(tmp_path / "r.jsonl", [{"clip_id": f"v{i}", "text": "t"}
                                                                         for i in range(7)]), tmp_path)
    assert [shard(ds, r, 3) for r in range(3)] == [[0, 3, 6], [1, 4], [2, 5]]
    assert [shard(ds, r, 3, mode="pad") for r in range(3)] == [[0, 3, 6], [1, 4, 0], [2, 5, 1]]
    assert [shard(ds, r, 3, mode="drop") for r in range(3)] == [[0, 3], [1, 4], [2, 5]]
    assert shard([10, 11, 12], 1, 2) == [11]
    for rank, world in [(2, 2), (-1, 2), (0, 0)]:
        with pytest.raises(ValueError, match="rank"):
            shard(ds, rank, world)
    with pytest.raises(ValueError, match="mode"):
        shard(ds, 0, 2, mode="repeat")
