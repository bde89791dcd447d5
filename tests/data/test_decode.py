"""Decoders: frame-exact PyAV (H.264 with and without B-frames, VP9, VFR), DALI's CPU backend against PyAV, backend
selection (capability table, auto fallback), every kind of bad input, and the skip policy.

Fixtures are tiny real videos (96x128, 3 fps, gop 8) whose frames carry their index as a frame code.
"""

import importlib.util
import pickle
import time
from fractions import Fraction

import numpy as np
import pytest

from lfvila.data import decode as D
from lfvila.data.encode import write_video
from lfvila.data.framecode import draw_index, read_index

H, W, N, GOP = 96, 128, 48, 8


def coded_frames(n, h=H, w=W, seed=0):
    rng = np.random.default_rng(seed)
    for i in range(n):
        f = np.full((h, w, 3), 40 + (i * 9) % 160, np.uint8)
        f[32:] = rng.integers(60, 200, (h - 32, w, 3), dtype=np.uint8)  # texture below the code
        yield draw_index(f, i)


def write_pyav(path, encoder, pts, pix_fmt="yuv420p", options=None, rate=30, container_options=None):
    """Frames 0..len(pts)-1 (frame-coded) at timestamps ``pts`` in units of 1/rate s, written with PyAV directly."""
    import av

    with av.open(str(path), "w", options=container_options or {}) as c:
        s = c.add_stream(encoder, rate=rate)
        s.width, s.height, s.pix_fmt, s.time_base = W, H, pix_fmt, Fraction(1, rate)
        s.options = options or {}
        for f, p in zip(coded_frames(len(pts)), pts):
            vf = av.VideoFrame.from_ndarray(f, format="rgb24").reformat(format=pix_fmt)
            vf.pts, vf.time_base = int(p), Fraction(1, rate)
            c.mux(s.encode(vf))
        c.mux(s.encode(None))
    return path


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    d = tmp_path_factory.mktemp("videos")
    v = {
        "h264": write_video(d / "a.mp4", coded_frames(N), fps=3, codec="h264", gop=GOP),
        "vp9": write_video(d / "a.webm", coded_frames(N), fps=3, codec="vp9", gop=GOP),
        "h264-bframes": write_pyav(d / "b.mp4", "libx264", range(N), rate=3,
                                   options={"bf": "2", "x264-params": f"keyint={GOP}:min-keyint={GOP}:scenecut=0"}),
        "one": write_video(d / "one.mp4", coded_frames(1), fps=3, codec="h264", gop=GOP),
    }
    rng = np.random.default_rng(0)
    vfr_pts = np.concatenate([[0], np.cumsum(rng.integers(1, 6, 29))])  # steps of 1-5 ticks of 1/30 s
    v["vfr-pts"] = vfr_pts
    v["vfr"] = write_pyav(d / "vfr.mp4", "libx264", vfr_pts, options={"bf": "0"})
    v["vfr-vp9"] = write_pyav(d / "vfr.webm", "libvpx-vp9", vfr_pts, options={"deadline": "realtime"})
    return v


def codes(frames):
    return [read_index(np.asarray(f)) for f in frames]


def psnr(a, b):
    mse = np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


# ------------------------------------------------------------------------------------------------------ probe
@pytest.mark.parametrize("kind,codec", [("h264", "h264"), ("vp9", "vp9"), ("h264-bframes", "h264")])
def test_probe(videos, kind, codec):
    info = D.probe(videos[kind])
    assert (info.num_frames, info.width, info.height, info.codec) == (N, W, H, codec)
    assert info.fps == pytest.approx(3.0) and info.duration == pytest.approx(N / 3, abs=1e-3)
    assert not info.vfr and info.bit_depth == 8 and info.path == str(videos[kind])
    assert (info.stream, info.video_streams) == (0, 1)  # two-stream files: test_best_stream.py
    np.testing.assert_allclose(D.frame_times(videos[kind]), np.arange(N) / 3, atol=1e-3)


# --------------------------------------------------------------------------------------------- exact decoding
@pytest.mark.parametrize("kind", ["h264", "vp9", "h264-bframes"])
def test_pyav_is_frame_exact(videos, kind):
    rng = np.random.default_rng(1)
    idx = [*rng.integers(0, N, 12).tolist(), 47, 0, 5, 5, 46, 3]  # unsorted, repeated, both ends
    out = D.get_decoder("pyav", "cpu").decode(videos[kind], idx)
    assert out.shape == (len(idx), H, W, 3) and out.dtype == np.uint8
    assert codes(out) == idx
    full = D.decode(videos[kind], list(range(N)), backend="pyav", device="cpu")  # one sequential pass
    assert codes(full) == list(range(N))
    np.testing.assert_array_equal(out, full[idx])  # seeking gives the very same pixels


def test_pyav_seeks_only_across_keyframes(videos, monkeypatch):
    seeks = []
    original = D.PyAVDecoder._frames_from

    def spy(self, path, container, stream, index, key, *args):
        seeks.append(key)
        return original(self, path, container, stream, index, key, *args)

    monkeypatch.setattr(D.PyAVDecoder, "_frames_from", spy)
    dec = D.PyAVDecoder("cpu")
    assert codes(dec.decode(videos["h264"], [41, 2, 5, 9, 44])) == [41, 2, 5, 9, 44]
    assert seeks == [0, 8, 40]  # keyframes ahead of the decode position are sought; 44 follows 41 forward
    seeks.clear()
    assert codes(dec.decode(videos["h264"], [9, 7, 8, 20])) == [9, 7, 8, 20]
    assert seeks == [0, 16]  # 7 -> 8 -> 9 decode forward through keyframe 8


def test_seek_overshoot_falls_back_to_stream_start(videos):
    pts = D.stream_index(videos["h264"]).pts

    class LateSeeks:  # a demuxer whose first seek lands one GOP after the asked keyframe
        def __init__(self, container):
            self.container, self.streams, self.demux, self.seeks = container, container.streams, container.demux, []

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.container.close()

        def seek(self, offset, **kwargs):
            self.seeks.append(offset)
            self.container.seek(int(pts[24]) if len(self.seeks) == 1 else offset, **kwargs)

    opened = []

    class Decoder(D.PyAVDecoder):
        def _open(self, path):
            opened.append(LateSeeks(super()._open(path)))
            return opened[-1]

    assert codes(Decoder("cpu").decode(videos["h264"], [17, 18])) == [17, 18]
    assert opened[0].seeks == [pts[16], pts[0]]


def test_empty_request(videos):
    assert D.decode(videos["h264"], [], backend="pyav", device="cpu").shape == (0, H, W, 3)


def test_vfr_indexes_by_presentation_order(videos):
    info = D.probe(videos["vfr"])
    assert info.vfr and info.num_frames == 30
    np.testing.assert_allclose(D.frame_times(videos["vfr"]), videos["vfr-pts"] / 30, atol=1e-4)
    idx = [29, 0, 13, 13, 7, 28, 1]
    assert codes(D.decode(videos["vfr"], idx, backend="pyav", device="cpu")) == idx
    assert codes(D.decode(videos["vfr-vp9"], idx, backend="pyav", device="cpu")) == idx


def test_one_frame_video(videos):
    info = D.probe(videos["one"])
    assert info.num_frames == 1 and info.duration > 0
    assert codes(D.decode(videos["one"], [0, 0], backend="pyav", device="cpu")) == [0, 0]
    with pytest.raises(D.DecodeError, match="out of range"):
        D.decode(videos["one"], [1], backend="pyav", device="cpu")


# ---------------------------------------------------------------------------------------------------- DALI
needs_dali = pytest.mark.skipif(importlib.util.find_spec("nvidia") is None
                                or importlib.util.find_spec("nvidia.dali") is None, reason="nvidia.dali not installed")


@needs_dali
@pytest.mark.parametrize("kind", ["vp9", "vfr-vp9"])
def test_dali_cpu_matches_pyav_on_vp9(videos, kind):
    n = D.probe(videos[kind]).num_frames
    idx = [n - 1, 0, 3, 3, n // 2, 1, n - 2]
    ref = D.get_decoder("pyav", "cpu").decode(videos[kind], idx)
    out = D.get_decoder("dali", "cpu").decode(videos[kind], idx)
    assert isinstance(out, np.ndarray) and out.shape == ref.shape and out.dtype == np.uint8
    assert codes(out) == idx
    assert min(psnr(a, b) for a, b in zip(out, ref)) >= 35.0


@needs_dali
def test_dali_cpu_batch_resize_normalize(videos):
    dec = D.get_decoder("dali", "cpu", batch_size=2)
    outs = dec.decode_many([(videos["vp9"], [4, 1]), (videos["vp9"], [0]), (videos["vfr-vp9"], [2, 2, 2])])
    assert [codes(o) for o in outs] == [[4, 1], [0], [2, 2, 2]]
    small = D.DaliDecoder("cpu", size=(48, 64)).decode(videos["vp9"], [0, 9])
    assert small.shape == (2, 48, 64, 3) and small.dtype == np.uint8
    norm = D.DaliDecoder("cpu", mean=(100.0,) * 3, std=(50.0,) * 3).decode(videos["vp9"], [9])
    plain = dec.decode(videos["vp9"], [9])
    assert norm.dtype == np.float32
    np.testing.assert_allclose(norm, (plain.astype(np.float32) - 100) / 50, atol=1e-5)


@needs_dali
def test_dali_cpu_refuses_h264_and_auto_uses_pyav(videos):
    reason = D.DaliDecoder.supports("h264", "cpu")
    assert reason and "h264" in reason and "NVDEC" in reason
    assert D.DaliDecoder.supports("vp9", "cpu") is None
    with pytest.raises(D.DecodeError, match="a.mp4.*dali cannot decode"):
        D.get_decoder("dali", "cpu").decode(videos["h264"], [0])
    auto = D.get_decoder("auto", "cpu")
    assert auto.choose(D.probe(videos["h264"])) == "pyav"
    assert codes(auto.decode(videos["h264"], [3, 1])) == [3, 1]


@needs_dali
def test_dali_bad_input_names_file(videos, tmp_path):
    junk = tmp_path / "junk.webm"
    junk.write_bytes(b"\x1a\x45\xdf\xa3" + bytes(3000))
    with pytest.raises(D.DecodeError, match="junk.webm"):
        D.get_decoder("dali", "cpu").decode(junk, [0])
    assert codes(D.get_decoder("dali", "cpu").decode(videos["vp9"], [2])) == [2]  # still works afterwards


# ------------------------------------------------------------------------------ backend selection and NVDEC
def test_nvdec_capability_table():
    hopper = (9, 0)
    assert D.nvdec_refusal("h264", 8, hopper) is None
    assert D.nvdec_refusal("hevc", 10, hopper) is None and D.nvdec_refusal("vp9", 10, hopper) is None
    assert "10-bit h264" in D.nvdec_refusal("h264", 10, hopper)
    assert "av1" in D.nvdec_refusal("av1", 8, hopper)
    assert D.nvdec_refusal("av1", 8, (8, 9)) is None  # Ada decodes AV1
    assert "theora" in D.nvdec_refusal("theora", 8, hopper)


def test_gpu_backends_refused_without_gpu(monkeypatch):
    monkeypatch.setattr(D, "_cuda_capability", lambda index: None)
    for name in ("pyav-nvdec", "dali"):
        reason = D.BACKENDS[name].supports("h264", "cuda:0")
        assert reason and "GPU" in reason
        with pytest.raises(ValueError, match=f"{name}.*cannot run on cuda:0"):
            D.get_decoder(name, "cuda")
    assert "GPU" in D.PyAVNvdecDecoder.supports("h264", "cpu")
    with pytest.raises(ValueError, match="unknown decoder 'ffmpeg'.*pyav"):
        D.get_decoder("ffmpeg")
    with pytest.raises(ValueError, match="device"):
        D.get_decoder("pyav", "tpu")
    assert D.get_decoder("auto", None).device == "cpu"


@pytest.fixture(scope="module")
def hard_for_nvdec(tmp_path_factory):
    d = tmp_path_factory.mktemp("nvdec")
    return {"av1": write_pyav(d / "av1.webm", "libsvtav1", range(4), rate=3, options={"preset": "12"}),
            "h264-10bit": write_pyav(d / "h10.mp4", "libx264", range(4), rate=3, pix_fmt="yuv420p10le")}


def test_auto_on_hopper_falls_back_to_cpu_with_warning(videos, hard_for_nvdec, monkeypatch):
    monkeypatch.setattr(D, "_cuda_capability", lambda index: (9, 0))  # pretend an H200 is present
    auto = D.get_decoder("auto", "cuda")
    expected_gpu = "dali" if D.DaliDecoder.available("cpu") is None else "pyav-nvdec"
    assert auto.choose(D.probe(videos["h264"])) == expected_gpu
    for kind, bits in [("av1", 8), ("h264-10bit", 10)]:
        info = D.probe(hard_for_nvdec[kind])
        assert info.bit_depth == bits and info.codec == kind.split("-")[0]
        with pytest.warns(RuntimeWarning, match="decoding on the CPU with pyav"):
            assert auto.choose(info) == "pyav"
        with pytest.warns(RuntimeWarning):
            out = auto.decode(hard_for_nvdec[kind], [3, 0])
        assert isinstance(out, np.ndarray) and codes(out) == [3, 0]


# ------------------------------------------------------------------------------------------------ bad input
def test_missing_file(tmp_path):
    with pytest.raises(D.DecodeError, match="nope.mp4: file not found"):
        D.probe(tmp_path / "nope.mp4")


def test_zero_byte_file(tmp_path):
    (tmp_path / "empty.mp4").touch()
    with pytest.raises(D.DecodeError, match="empty.mp4: empty file"):
        D.decode(tmp_path / "empty.mp4", [0], backend="pyav", device="cpu")


def test_not_a_video(tmp_path):
    (tmp_path / "text.mp4").write_text("hello, not a video\n" * 100)
    with pytest.raises(D.DecodeError, match="text.mp4: cannot open"):
        D.probe(tmp_path / "text.mp4")


def test_truncated_mp4_without_moov(videos, tmp_path):
    data = videos["h264"].read_bytes()
    assert data.rfind(b"moov") > len(data) // 2  # write_video puts the index at the end
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(D.DecodeError, match="cut.mp4: cannot open"):
        D.probe(cut)


def test_truncated_faststart_mp4(tmp_path):
    full = write_pyav(tmp_path / "fast.mp4", "libx264", range(N), rate=3, container_options={"movflags": "faststart"})
    data = full.read_bytes()
    assert data.find(b"moov") < data.find(b"mdat")  # index first: the cut keeps it
    cut = tmp_path / "fastcut.mp4"
    cut.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(D.DecodeError, match="fastcut.mp4: .*(truncated|corrupt)"):
        D.decode(cut, [0], backend="pyav", device="cpu")


def test_audio_only_file(tmp_path):
    import av

    path = tmp_path / "speech.mp4"
    with av.open(str(path), "w") as c:
        s = c.add_stream("aac", rate=16000)
        for k in range(10):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 16000, k * 1024
            c.mux(s.encode(frame))
        c.mux(s.encode(None))
    with pytest.raises(D.DecodeError, match="speech.mp4: no video stream \\(streams: audio\\)"):
        D.decode(path, [0], backend="pyav", device="cpu")


def test_index_out_of_range_and_bad_type(videos):
    for idx in ([N], [-1], [0, N + 5]):
        with pytest.raises(D.DecodeError, match=f"a.mp4: frame indices .* out of range.*{N} frames"):
            D.decode(videos["h264"], idx, backend="pyav", device="cpu")
    with pytest.raises(TypeError):
        D.decode(videos["h264"], [0.5], backend="pyav", device="cpu")


def corrupt_copy(src, dst, nbytes, seed=1):
    data = bytearray(src.read_bytes())
    mid = len(data) // 2
    data[mid : mid + nbytes] = np.random.default_rng(seed).integers(0, 256, nbytes, dtype=np.uint8).tobytes()
    dst.write_bytes(bytes(data))
    return dst


def test_corrupt_h264_mid_stream(videos, tmp_path):
    """Defined behaviour: frames whose packets the decoder rejects, and the rest of their GOP, raise DecodeError
    naming the file; intact GOPs decode exactly."""
    bad = corrupt_copy(videos["h264"], tmp_path / "broken.mp4", 20000)
    dec = D.get_decoder("pyav", "cpu")
    t = time.monotonic()
    with pytest.raises(D.DecodeError, match="broken.mp4: frames .* could not be decoded"):
        dec.decode(bad, list(range(N)))
    assert time.monotonic() - t < 10
    good = [*range(0, 24), *range(32, N)]
    assert codes(dec.decode(bad, good)) == good


def test_corrupt_vp9_mid_stream_never_returns_garbage(videos, tmp_path):
    bad = corrupt_copy(videos["vp9"], tmp_path / "broken.webm", 2000)
    t = time.monotonic()
    try:
        n = D.probe(bad).num_frames
        out = D.get_decoder("pyav", "cpu").decode(bad, list(range(n)))
    except D.DecodeError as e:
        assert "broken.webm" in str(e)
    else:  # the demuxer resynced over the damaged cluster: what is returned are real, readable frames
        got = codes(out)
        assert got == sorted(got) and len(set(got)) == len(got)
    assert time.monotonic() - t < 10


def test_timeout_bounds_decoding(videos):
    with pytest.raises(D.DecodeError, match="a.mp4: decoding timed out"):
        D.PyAVDecoder("cpu", timeout=0).decode(videos["h264"], [0])


def test_decode_error_pickles_and_names_file():
    e = pickle.loads(pickle.dumps(D.DecodeError("/data/x.mp4", "corrupt")))
    assert isinstance(e, RuntimeError) and str(e) == "/data/x.mp4: corrupt" and e.path == "/data/x.mp4"


# -------------------------------------------------------------------------------------------------- skip policy
def test_skip_counter_raise_mode():
    sc = D.SkipCounter("raise")
    with pytest.raises(D.DecodeError, match="x.mp4: corrupt"):
        sc.skip("x.mp4", D.DecodeError("x.mp4", "corrupt"))
    with pytest.raises(D.DecodeError, match="y.mp4: OSError: disk"):
        sc.skip("y.mp4", OSError("disk"))
    with pytest.raises(ValueError):
        D.SkipCounter("ignore")


def test_skip_counter_counts_logs_and_caps(videos, tmp_path, caplog):
    sc = D.SkipCounter("skip", max_skip_fraction=0.25, min_seen=4)
    missing = tmp_path / "gone.mp4"
    with caplog.at_level("WARNING"):
        assert sc.call(missing, D.probe, missing) is None
    assert "gone.mp4: file not found" in caplog.text
    assert sc.call(videos["h264"], D.probe, videos["h264"]).num_frames == N
    sc.ok()
    assert (sc.seen, sc.skipped) == (3, 1)
    with pytest.raises(D.TooManySkipsError):  # 2 of 4 seen > 25 %
        sc.skip("b.mp4", D.DecodeError("b.mp4", "corrupt"))
    lax = D.SkipCounter("skip", max_skip_fraction=0.5, min_seen=100)
    lax.skip("c.mp4", D.DecodeError("c.mp4", "bad"))
    with pytest.raises(D.TooManySkipsError, match="c.mp4"):
        lax.check()  # end of run: enforced whatever the count

