"""prepare: re-encoding a folder to 3 fps with short keyframe intervals, in parallel, resumable, with a report."""

import json
import re
import subprocess
import sys

import av
import numpy as np
import pytest

from lfvila.data import decode as D
from lfvila.data.decode import decode, probe
from lfvila.data.encode import write_video
from lfvila.data.framecode import draw_index, read_index
from lfvila.data.prepare import find_videos, main, prepare_one, scaled_size

H, W, CELL = 96, 128, 16  # the code's 16-pixel cells become 8-pixel cells at max height 48


def coded(n):
    for i in range(n):
        yield draw_index(np.full((H, W, 3), 30 + (i * 11) % 190, np.uint8), i, cell=CELL)


@pytest.fixture()
def src(tmp_path):
    root = tmp_path / "src"
    (root / "sub").mkdir(parents=True)
    write_video(root / "a.mp4", coded(48), fps=6, codec="h264", gop=12)  # 8 s
    write_video(root / "sub" / "b.webm", coded(60), fps=10, codec="vp9", gop=30)  # 6 s
    (root / "bad.mp4").write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    (root / "notes.txt").write_text("not a video")
    return root


def keyframes(path):
    with av.open(str(path)) as c:
        return [i for i, p in enumerate(q for q in c.demux(c.streams.video[0]) if q.size) if p.is_keyframe]


def report(path):
    return {r["path"]: r for r in map(json.loads, path.read_text().splitlines())}


def test_scaled_size():
    assert scaled_size(720, 1280, 240) == (240, 426)
    assert scaled_size(96, 128, 240) == (96, 128)  # never upscaled
    assert scaled_size(101, 181, None) == (100, 180)  # even


def test_prepare_folder(src, tmp_path):
    dst = tmp_path / "dst"
    assert find_videos(src) == [src.joinpath("a.mp4").relative_to(src), src.joinpath("bad.mp4").relative_to(src),
                                src.joinpath("sub/b.webm").relative_to(src)]
    rc = main([str(src), str(dst), "--fps", "3", "--gop", "8", "--max-height", "48", "--workers", "2"])
    assert rc == 1  # bad.mp4 failed
    rows = report(dst / "prepare_report.jsonl")
    assert rows["bad.mp4"]["status"] == "failed" and "cannot open" in rows["bad.mp4"]["reason"]
    # source frame shown at k / 3 s: a (6 fps) -> 2k, b (10 fps) -> floor(10 k / 3)
    for rel, out, n_in, expect in [("a.mp4", "a.mp4", 48, [2 * k for k in range(24)]),
                                   ("sub/b.webm", "sub/b.mp4", 60, [10 * k // 3 for k in range(18)])]:
        row = rows[rel]
        assert (row["status"], row["output"], row["in_frames"], row["out_frames"]) == ("ok", out, n_in, len(expect))
        info = probe(dst / out)
        assert (info.num_frames, info.fps, info.height, info.width, info.codec) == (len(expect), 3.0, 48, 64, "h264")
        assert keyframes(dst / out) == list(range(0, len(expect), 8))
        frames = decode(dst / out, list(range(len(expect))), backend="pyav", device="cpu")
        assert [read_index(f, cell=CELL // 2) for f in frames] == expect
    assert not (dst / "bad.mp4").exists() and not list(dst.rglob(".*tmp*"))

    # rerun (through the real CLI): done outputs are skipped, the bad file fails again
    mtime = (dst / "a.mp4").stat().st_mtime_ns
    res = subprocess.run([sys.executable, "-m", "lfvila.data.prepare", str(src), str(dst), "--max-height", "48",
                          "--workers", "1"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 1 and "0 ok, 2 skipped, 1 failed" in res.stdout and "bad.mp4" in res.stdout
    rows = report(dst / "prepare_report.jsonl")
    assert [rows[k]["status"] for k in ("a.mp4", "sub/b.webm", "bad.mp4")] == ["skipped", "skipped", "failed"]
    assert (dst / "a.mp4").stat().st_mtime_ns == mtime


def test_prepare_reports_bad_inputs(tmp_path):
    root = tmp_path / "src"
    root.mkdir()
    with av.open(str(root / "speech.mp4"), "w") as c:  # audio only
        s = c.add_stream("aac", rate=16000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        frame.sample_rate, frame.pts = 16000, 0
        c.mux(s.encode(frame))
        c.mux(s.encode(None))
    (root / "empty.webm").touch()
    write_video(root / "one.mp4", coded(1), fps=3)
    good = write_video(root / "good.mp4", coded(12), fps=3, gop=4).read_bytes()
    (root / "cut.mp4").write_bytes(good[: len(good) // 2])  # truncated: no moov
    report_path = tmp_path / "r.jsonl"
    assert main([str(root), str(tmp_path / "dst"), "--workers", "1", "--report", str(report_path)]) == 1
    rows = report(report_path)
    assert "no video stream" in rows["speech.mp4"]["reason"]
    assert {rows[k]["status"] for k in ("speech.mp4", "empty.webm", "cut.mp4")} == {"failed"}
    assert rows["one.mp4"]["status"] == "ok" and rows["one.mp4"]["out_frames"] == 1
    assert rows["good.mp4"]["status"] == "ok" and rows["good.mp4"]["out_frames"] == 12
    assert all(r["reason"] for r in rows.values() if r["status"] == "failed")


def test_prepare_fails_a_file_cut_after_its_header(tmp_path, capsys):
    """An MP4 with its index first, cut in half, demuxes cleanly but ends early: the decoders refuse it as truncated
    and prepare reports it failed by the same rule, leaving no output (its annotations would point past its end)."""
    root = tmp_path / "src"
    root.mkdir()
    with av.open(str(tmp_path / "full.mp4"), "w", options={"movflags": "faststart"}) as c:
        s = c.add_stream("libx264", rate=3)
        s.width, s.height, s.pix_fmt, s.options = W, H, "yuv420p", {"preset": "ultrafast", "g": "4"}
        for i, f in enumerate(coded(24)):
            frame = av.VideoFrame.from_ndarray(f, format="rgb24")
            frame.pts = i
            c.mux(s.encode(frame))
        c.mux(s.encode(None))
    data = (tmp_path / "full.mp4").read_bytes()
    assert data.find(b"moov") < data.find(b"mdat")  # the header (with all 24 frames' sample table) survives the cut
    (root / "cut.mp4").write_bytes(data[: len(data) // 2])
    with pytest.raises(D.DecodeError, match=r"cut.mp4: container declares 24 frames but \d+ can be read: truncated"):
        probe(root / "cut.mp4")
    dst = tmp_path / "dst"
    assert main([str(root), str(dst), "--workers", "1"]) == 1
    out = capsys.readouterr().out
    assert "1 videos: 0 ok, 0 skipped, 1 failed" in out and "failed cut.mp4: container declares 24 frames" in out
    row = report(dst / "prepare_report.jsonl")["cut.mp4"]
    assert row["status"] == "failed" and re.search(r"container declares 24 frames but \d+ can be read: truncated",
                                                   row["reason"])
    assert not (dst / "cut.mp4").exists() and not list(dst.rglob(".*tmp*"))
    assert prepare_one(tmp_path / "full.mp4", dst / "full.mp4")["status"] == "ok"  # the whole file is fine
