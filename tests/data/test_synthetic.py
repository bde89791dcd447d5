"""Synthetic dataset: real encoded videos whose frames carry their index, valid ActivityNet annotations that agree
with the pixels, a loadable vocabulary, determinism per seed (whatever the worker count), resume."""

import json
from collections import Counter

import numpy as np
import pytest

from lfvila.data import synthetic
from lfvila.data.framecode import read_index
from lfvila.data.sampling import Segment, segment_frame_range

av = pytest.importorskip("av")

KW = dict(videos=4, size=(96, 160), fps=3.0, min_seconds=10.0, max_seconds=12.0)
SPLITS = ("train", "val", "test")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Three datasets: seed 0 in one process, seed 0 with two worker processes, seed 1."""
    root = tmp_path_factory.mktemp("synthetic")
    out = {}
    for name, seed, workers in (("a", 0, 1), ("b", 0, 2), ("c", 1, 1)):
        summary = synthetic.make_dataset(root / name, seed=seed, workers=workers, **KW)
        out[name] = (root / name, summary)
    return out


def _load(folder, name):
    return json.loads((folder / name).read_text(encoding="utf-8"))


def _decode(path):
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])  # (T, H, W, 3)


def test_files_and_summary(runs):
    folder, summary = runs["a"]
    assert summary["videos"] == summary["written"] == 4 and summary["skipped"] == 0
    assert summary["splits"] == {"train": 2, "val": 1, "test": 1}
    assert summary["codecs"] == {"h264": 3, "vp9": 1}
    paths = _load(folder, "videos.json")
    assert len(paths) == 4
    assert sorted(p.rsplit(".", 1)[1] for p in paths.values()) == ["mp4", "mp4", "mp4", "webm"]
    for rel in paths.values():
        assert (folder / rel).stat().st_size > 0
    for name in ("train.json", "val.json", "test.json", "vocab.txt", "meta.json"):
        assert (folder / name).exists()
    assert not [p for p in folder.rglob(".*tmp*")]  # no temporary files left behind


def test_annotations_valid_activitynet(runs):
    folder, _ = runs["a"]
    paths = _load(folder, "videos.json")
    seen = []
    for split in SPLITS:
        for vid, entry in _load(folder, f"{split}.json").items():
            seen.append(vid)
            assert entry["video"] == paths[vid]
            duration, stamps, sentences = entry["duration"], entry["timestamps"], entry["sentences"]
            assert duration > 0 and 3 <= len(stamps) == len(sentences) <= 6
            for (start, end), text in zip(stamps, sentences):
                assert 0 <= start < end <= duration
                assert isinstance(text, str) and text.strip()
            assert [s for s, _ in stamps] == sorted(s for s, _ in stamps)
    assert sorted(seen) == sorted(paths)  # every video in exactly one split


@pytest.mark.parametrize("ext", ["mp4", "webm"])
def test_decoded_frames_carry_their_index(runs, ext):
    folder, _ = runs["a"]
    entries = {k: v for split in SPLITS for k, v in _load(folder, f"{split}.json").items()}
    vid, entry = next((k, v) for k, v in entries.items() if v["video"].endswith(ext))
    frames = _decode(folder / entry["video"])
    assert frames.shape[1:] == (96, 160, 3) and frames.dtype == np.uint8
    assert len(frames) == round(entry["duration"] * 3.0)
    assert [read_index(f) for f in frames] == list(range(len(frames)))


def test_pixels_agree_with_timestamps():
    script = synthetic.plan_dataset(1, seed=3, min_seconds=10, max_seconds=12)[0]
    frames = list(synthetic.render_frames(script, (96, 160)))
    assert len(frames) == script.num_frames
    colours = {e.colour for e in script.events}
    ranges = [segment_frame_range(script.num_frames, script.fps, Segment("e", e.start, e.end)) for e in script.events]
    for i, frame in enumerate(frames):
        assert read_index(frame) == i
        active = [e for e, (first, last) in zip(script.events, ranges) if first <= i <= last]
        for colour in colours:
            present = bool((frame[20:] == synthetic.COLOURS[colour]).all(axis=-1).any())
            assert present == any(e.colour == colour for e in active), (i, colour)
        # shapes keep clear of the code: beside and below it, the top rows are plain background (constant per row)
        assert (frame[:20, 64:] == frame[:20, 64:65]).all() and (frame[16:20] == frame[16:20, :1]).all()


def test_same_seed_same_bytes_and_frames_any_workers(runs):
    a, _ = runs["a"]
    b, summary_b = runs["b"]
    assert summary_b["written"] == 4
    for name in ("train.json", "val.json", "test.json", "videos.json", "vocab.txt", "meta.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    for rel in _load(a, "videos.json").values():
        assert np.array_equal(_decode(a / rel), _decode(b / rel)), rel


def test_different_seeds_differ(runs):
    a, _ = runs["a"]
    c, _ = runs["c"]
    assert (a / "train.json").read_bytes() != (c / "train.json").read_bytes()
    first = _load(a, "videos.json")["syn_00000"]
    assert not np.array_equal(_decode(a / first)[:20], _decode(c / first)[:20])


def test_vocab_loads_and_covers_the_text(runs):
    tokenizers = pytest.importorskip("tokenizers")
    folder, summary = runs["a"]
    lines = (folder / "vocab.txt").read_text(encoding="utf-8").splitlines()
    assert lines[0] == "[PAD]" and lines[100:104] == ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]  # bert-base-uncased ids
    assert len(lines) == len(set(lines)) == summary["vocab_size"]
    assert all(t == t.lower() for t in lines[104:])
    tok = tokenizers.BertWordPieceTokenizer(str(folder / "vocab.txt"), lowercase=True)
    assert [tok.token_to_id(t) for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")] == [0, 100, 101, 102, 103]
    sentences = [s for split in SPLITS for e in _load(folder, f"{split}.json").values() for s in e["sentences"]]
    for text in sentences:
        enc = tok.encode(text)
        assert "[UNK]" not in enc.tokens
        assert enc.tokens[0] == "[CLS]" and enc.tokens[-1] == "[SEP]"
        assert not any(t.startswith("##") for t in enc.tokens)  # every word of the corpus is one token
    assert "[UNK]" not in tok.encode("A Magenta blob zooms!").tokens  # unseen words fall back to characters


def test_resume_skips_and_refuses_other_settings(runs, tmp_path):
    folder, _ = runs["a"]
    before = {n: (folder / n).read_bytes() for n in ("train.json", "vocab.txt")}
    summary = synthetic.main([str(folder), "--videos", "4", "--seed", "0", "--size", "96x160", "--fps", "3",
                              "--min-seconds", "10", "--max-seconds", "12", "--workers", "1"])
    assert summary["skipped"] == 4 and summary["written"] == 0
    assert before == {n: (folder / n).read_bytes() for n in before}
    with pytest.raises(ValueError, match="other settings"):
        synthetic.make_dataset(folder, seed=5, **KW)


def test_families_share_events_in_other_orders():
    scripts = synthetic.plan_dataset(40, seed=0, min_seconds=10, max_seconds=12)
    assert Counter(s.split for s in scripts) == {"train": 32, "val": 4, "test": 4}
    bags = {}
    for s in scripts:
        key = frozenset((e.shape, e.colour, e.motion) for e in s.events)
        bags.setdefault(key, []).append(s)
    families = [group for group in bags.values() if len(group) > 1]
    assert families
    for group in families:
        assert len({g.split for g in group}) == 1  # a family never straddles a split
        orders = {tuple((e.shape, e.colour, e.motion) for e in g.events) for g in group}
        assert len(orders) == len(group)  # same events, a different order in every sibling


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="size"):
        synthetic.make_dataset(tmp_path / "x", videos=1, size=(95, 160))
    with pytest.raises(ValueError, match="min_seconds"):
        synthetic.make_dataset(tmp_path / "x", videos=1, min_seconds=2, max_seconds=3)
    with pytest.raises(ValueError, match="videos"):
        synthetic.make_dataset(tmp_path / "x", videos=0)
    with pytest.raises(ValueError, match="radius"):
        synthetic.make_dataset(tmp_path / "x", videos=1, radius=(0.3, 0.5))  # a grown shape would leave the frame
    with pytest.raises(ValueError, match="radius"):
        synthetic.make_dataset(tmp_path / "x", videos=1, radius=(0.3, 0.2))


@pytest.mark.parametrize("radius", [(0.12, 0.14), (0.34, 0.36)])
def test_radius_sets_the_shape_size_and_every_pose_stays_in_the_play_area(radius):
    """The drawn radii are in range, and at the largest allowed radii (grow / shrink peak at 1.35x) every shape of
    every motion stays inside the play area (below the index code, inside the frame) at start, middle and end."""
    scripts = synthetic.plan_dataset(12, seed=1, min_seconds=10, max_seconds=12, radius=radius)
    events = [e for s in scripts for e in s.events]
    assert all(radius[0] <= e.radius <= radius[1] for e in events)
    size = (96, 160)
    top = synthetic.code_size()[0] + 4
    for e in events:
        for p in (0.0, 0.5, 1.0):
            cx, cy, r, _ = synthetic._pose(e, p, top, *size)
            assert top - 1 <= cy - r and cy + r <= size[0] + 1 and -1 <= cx - r and cx + r <= size[1] + 1, (e, p)
