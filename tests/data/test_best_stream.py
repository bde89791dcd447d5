"""Files with two video streams: probe, the frame index, every PyAV decode and ``prepare`` read the stream FFmpeg's
best-stream rule picks (``av_find_best_stream``, decord's choice), in whichever order the streams come; DALI, which
cannot be told the stream, refuses such files and ``auto`` takes another backend.

Each stream is painted one colour (plus zero-mean noise), so the decoded pixels tell which stream was read.
"""

import importlib.util
from dataclasses import replace
from fractions import Fraction

import av
import numpy as np
import pytest

from lfvila.data import decode as D
from lfvila.data.prepare import prepare_one

RED, BLUE = (230, 30, 30), (30, 30, 230)
DEFAULT = av.stream.Disposition.default


def write_streams(path, specs, encoder="libx264"):
    """One video stream per ``(height, width, frames, colour, disposition)`` at 3 fps, muxed interleaved. The colour
    carries noise (zero mean) so that a stream's bit rate grows with its frame size."""
    rng = np.random.default_rng(0)
    options = {"deadline": "realtime", "cpu-used": "8"} if encoder == "libvpx-vp9" else {"preset": "ultrafast"}
    with av.open(str(path), "w") as c:
        streams = []
        for h, w, _, _, disposition in specs:
            s = c.add_stream(encoder, rate=3)
            s.width, s.height, s.pix_fmt, s.time_base, s.options = w, h, "yuv420p", Fraction(1, 3), options
            s.disposition = disposition
            streams.append(s)
        for i in range(max(spec[2] for spec in specs)):
            for s, (h, w, n, colour, _) in zip(streams, specs):
                if i < n:
                    noisy = np.asarray(colour, np.int16) + rng.integers(-20, 21, (h, w, 3), dtype=np.int16)
                    frame = av.VideoFrame.from_ndarray(noisy.astype(np.uint8), format="rgb24")
                    frame.pts = i
                    c.mux(s.encode(frame))
        for s in streams:
            c.mux(s.encode(None))
    return path


# name -> (file name, encoder, stream specs, index FFmpeg's rule picks)
CASES = {
    # both flagged default (the MP4 muxer flags the first track unless told): the higher bit rate, the larger, wins
    "mp4-small-first": ("a.mp4", "libx264", [(36, 64, 6, RED, DEFAULT), (72, 128, 8, BLUE, DEFAULT)], 1),
    "mp4-large-first": ("b.mp4", "libx264", [(72, 128, 8, BLUE, DEFAULT), (36, 64, 6, RED, DEFAULT)], 0),
    # the stream flagged default wins, even the smaller one: the rule is FFmpeg's, not "the largest"
    "mkv-default-second": ("c.mkv", "libx264", [(72, 128, 8, BLUE, 0), (36, 64, 6, RED, DEFAULT)], 1),
    # neither flagged: more frames seen while probing (up to 5) wins over the lower index
    "webm-short-first": ("d.webm", "libvpx-vp9", [(36, 64, 3, RED, 0), (72, 128, 8, BLUE, 0)], 1),
}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("streams")
    return {name: write_streams(d / fname, specs, encoder) for name, (fname, encoder, specs, _) in CASES.items()}


def best_spec(name):
    specs, best = CASES[name][2], CASES[name][3]
    return best, specs[best]


def assert_colour(frames, colour):
    mean = np.asarray(frames, np.float64).reshape(-1, 3).mean(0)
    np.testing.assert_allclose(mean, colour, atol=6)  # YUV 4:2:0 round trip of a flat colour


@pytest.mark.parametrize("name", list(CASES))
def test_ffmpeg_picks_the_expected_stream(files, name):
    with av.open(str(files[name])) as c:  # the fixtures do what their comments say; the helper is FFmpeg's choice
        assert len(c.streams.video) == 2
        assert c.streams.best("video").index == D.video_stream(c, files[name]).index == CASES[name][3]


@pytest.mark.parametrize("name", list(CASES))
def test_probe_index_and_decode_follow_the_best_stream(files, name):
    best, (h, w, n, colour, _) = best_spec(name)
    info = D.probe(files[name])
    assert (info.width, info.height, info.num_frames, info.stream, info.video_streams) == (w, h, n, best, 2)
    assert info.fps == pytest.approx(3.0) and info.duration == pytest.approx(n / 3, abs=1e-3)
    np.testing.assert_allclose(D.frame_times(files[name]), np.arange(n) / 3, atol=1e-3)
    idx = [n - 1, 0, 2, 2]
    out = D.get_decoder("pyav", "cpu").decode(files[name], idx)
    assert out.shape == (len(idx), h, w, 3) and out.dtype == np.uint8
    assert_colour(out, colour)
    with pytest.raises(D.DecodeError, match="out of range"):  # the other stream's frame count does not apply
        D.decode(files[name], [n], backend="pyav", device="cpu")


@pytest.mark.parametrize("name", list(CASES))
def test_prepare_reencodes_the_best_stream(files, name, tmp_path):
    _, (h, w, n, colour, _) = best_spec(name)
    row = prepare_one(files[name], tmp_path / "out.mp4", fps=3, gop=4, max_height=None)
    assert (row["status"], row["in_frames"], row["out_frames"]) == ("ok", n, n), row
    info = D.probe(tmp_path / "out.mp4")
    assert (info.width, info.height, info.num_frames, info.video_streams) == (w, h, n, 1)
    assert_colour(D.decode(tmp_path / "out.mp4", list(range(n)), backend="pyav", device="cpu"), colour)


def test_one_stream_file_reports_stream_zero(tmp_path):
    path = write_streams(tmp_path / "one.mp4", [(36, 64, 4, RED, 0)])
    info = D.probe(path)
    assert (info.stream, info.video_streams, info.num_frames, info.width) == (0, 1, 4, 64)
    assert_colour(D.decode(path, [3, 0], backend="pyav", device="cpu"), RED)


def test_no_video_stream_names_the_file(tmp_path):
    path = tmp_path / "speech.mka"
    with av.open(str(path), "w") as c:
        s = c.add_stream("aac", rate=16000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        frame.sample_rate, frame.pts = 16000, 0
        c.mux(s.encode(frame))
        c.mux(s.encode(None))
    with av.open(str(path)) as c, pytest.raises(D.DecodeError, match="speech.mka: no video stream"):
        D.video_stream(c, path)


# ---------------------------------------------------------------------------------------------------- DALI
def test_dali_refuses_several_video_streams_and_auto_goes_elsewhere(files, monkeypatch):
    one = D.probe(files["mp4-small-first"])
    reason = D.DaliDecoder.refuses(replace(one, codec="vp9"), "cpu")
    if D.DaliDecoder.available("cpu") is None:
        assert "2 video streams" in reason and f"stream {one.stream}" in reason
    single = replace(one, codec="vp9", video_streams=1, stream=0)
    assert D.DaliDecoder.refuses(single, "cpu") == D.DaliDecoder.supports("vp9", "cpu")  # codec rules unchanged
    monkeypatch.setattr(D, "_cuda_capability", lambda index: (9, 0))  # pretend an H200 is present
    auto = D.get_decoder("auto", "cuda")
    gpu = "dali" if D.DaliDecoder.available("cpu") is None else "pyav-nvdec"
    assert auto.choose(replace(one, video_streams=1, stream=0)) == gpu
    if D.PyAVNvdecDecoder.available("cuda:0") is None:
        assert auto.choose(one) == "pyav-nvdec"
    else:  # no CUDA hwaccel in this PyAV: the CPU, with the usual warning that names DALI's refusal
        with pytest.warns(RuntimeWarning, match="2 video streams"):
            assert auto.choose(one) == "pyav"


needs_dali = pytest.mark.skipif(importlib.util.find_spec("nvidia") is None
                                or importlib.util.find_spec("nvidia.dali") is None, reason="nvidia.dali not installed")


@needs_dali
def test_dali_decoder_names_the_file(files):
    path = files["webm-short-first"]
    with pytest.raises(D.DecodeError, match="d.webm: dali cannot decode it: 2 video streams"):
        D.get_decoder("dali", "cpu").decode(path, [0])
    assert_colour(D.get_decoder("auto", "cpu").decode(path, [0, 7]), BLUE)


@needs_dali
def test_dali_reads_another_stream_than_ffmpegs_rule(files):
    """Why DALI is refused: handed the file's bytes, it decodes the first stream where FFmpeg's rule after probing
    (PyAV, decord) takes the second. If this fails, DALI now agrees and the refusal may be narrowed."""
    out = D.DaliDecoder("cpu")._run([(files["webm-short-first"], np.array([0, 1]))])[0]
    assert out.shape == (2, 36, 64, 3)
    assert_colour(out, RED)
