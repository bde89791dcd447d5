"""Frame sampling rules: official formulas, edge cases (short, one-frame, empty videos), clamping, determinism."""

import numpy as np
import pytest

from lfvila.data.sampling import (
    Segment,
    clip_indices,
    consecutive_clip_start,
    jittered_indices,
    segment_frame_range,
    uniform_indices,
)


def _valid(idx, n, length):
    assert len(idx) == length
    assert all(isinstance(i, int) for i in idx)
    assert all(0 <= i <= n - 1 for i in idx)
    assert idx == sorted(idx)


# --- uniform (eval) ----------------------------------------------------------------------------------------------


def test_uniform_official_formula():
    for n in (32, 33, 100, 271, 1000):
        assert uniform_indices(n, 32) == np.linspace(0, n - 1, 32).astype(int).tolist()
    idx = uniform_indices(100, 32)
    assert idx[0] == 0 and idx[-1] == 99
    assert idx[1] == 3  # 99 / 31 = 3.19 truncated, not rounded


def test_uniform_short_video_repeats_every_frame_in_order():
    idx = uniform_indices(5, 32)
    _valid(idx, 5, 32)
    assert sorted(set(idx)) == [0, 1, 2, 3, 4]
    assert uniform_indices(32, 32) == list(range(32))


def test_uniform_one_frame_and_count_one():
    assert uniform_indices(1, 32) == [0] * 32
    assert uniform_indices(10, 1) == [0]


@pytest.mark.parametrize("n", [0, -3, 2.5])
def test_bad_num_frames_raises(n):
    for fn in (uniform_indices, jittered_indices):
        with pytest.raises(ValueError, match="num_frames"):
            fn(n, 32)
    with pytest.raises(ValueError, match="num_frames"):
        clip_indices(n, 3.0, [])


def test_bad_count_and_rng():
    with pytest.raises(ValueError, match="count"):
        uniform_indices(10, 0)
    with pytest.raises(TypeError, match="Generator"):
        jittered_indices(10, 4, rng=np.random.RandomState(0))


# --- jittered (train) --------------------------------------------------------------------------------------------


def test_jittered_bounds_follow_official_rule():
    n, count = 100, 32
    interval = int(n / 31)
    starts, ends = set(), set()
    rng = np.random.default_rng(0)
    for _ in range(400):
        idx = jittered_indices(n, count, rng)
        _valid(idx, n, count)
        starts.add(idx[0])
        ends.add(idx[-1])
        assert idx == np.linspace(idx[0], idx[-1], count).astype(int).tolist()
    assert starts == set(range(0, interval + 1))
    assert ends == set(range(n - 1 - interval, n))


def test_jittered_short_and_one_frame():
    rng = np.random.default_rng(1)
    assert jittered_indices(5, 32, rng) == uniform_indices(5, 32)  # interval 0: no jitter possible
    assert jittered_indices(1, 32, rng) == [0] * 32
    single = {jittered_indices(7, 1, rng)[0] for _ in range(200)}
    assert single == set(range(7))


def test_jittered_deterministic_per_seed():
    a = [jittered_indices(500, 32, np.random.default_rng(7)) for _ in range(2)]
    assert a[0] == a[1]
    draws = {tuple(jittered_indices(500, 32, np.random.default_rng(s))) for s in range(20)}
    assert len(draws) > 1


def test_property_random_lengths():
    rng = np.random.default_rng(123)
    for _ in range(300):
        n = int(rng.integers(1, 3000))
        count = int(rng.integers(1, 65))
        _valid(uniform_indices(n, count), n, count)
        _valid(jittered_indices(n, count, rng), n, count)
        if n <= count:
            assert set(uniform_indices(n, count)) == set(range(n))
        if n < count - 1:
            assert set(jittered_indices(n, count, rng)) == set(range(n))


# --- clip-aligned sampling ---------------------------------------------------------------------------------------


def test_segment_frame_range_seconds_to_frames():
    # 3 fps, 90 frames (30 s): [2 s, 5 s] covers frames 6 .. 14 (frame 15 starts at exactly 5 s)
    assert segment_frame_range(90, 3.0, Segment("x", 2.0, 5.0)) == (6, 14)
    assert segment_frame_range(90, 3.0, Segment("x", 2.1, 2.1)) == (6, 6)  # zero length: one frame
    assert segment_frame_range(90, 3.0, Segment("x", 5.0, 2.0)) == (6, 14)  # reversed: swapped


def test_segment_frame_range_clamps_outside_spans():
    assert segment_frame_range(90, 3.0, Segment("x", 25.0, 40.0)) == (75, 89)
    assert segment_frame_range(90, 3.0, Segment("x", 50.0, 60.0)) == (89, 89)
    assert segment_frame_range(90, 3.0, Segment("x", -4.0, 1.0)) == (0, 2)
    assert segment_frame_range(90, 3.0, Segment("x", -9.0, -4.0)) == (0, 0)


def test_segment_frame_range_untimed_and_padding_partition():
    n, clips = 10, 4
    ranges = [segment_frame_range(n, 3.0, Segment(""), i, clips) for i in range(clips)]
    assert ranges == [(0, 1), (2, 4), (5, 6), (7, 9)]
    assert [segment_frame_range(n, 3.0, Segment("t"), i, clips) for i in range(clips)] == ranges
    assert [segment_frame_range(2, 3.0, Segment(""), i, clips) for i in range(clips)] == [(0, 0), (0, 0), (1, 1),
                                                                                          (1, 1)]
    with pytest.raises(ValueError, match="clip"):
        segment_frame_range(n, 3.0, Segment(""), 4, clips)
    with pytest.raises(ValueError, match="fps"):
        segment_frame_range(n, 0.0, Segment("t", 0.0, 1.0))


def test_clip_indices_eval_official_rule_inside_spans():
    segs = [Segment("a", 0.0, 10.0), Segment("b", 10.0, 20.0), Segment("c", 20.0, 25.0), Segment("d", 25.0, 30.0)]
    idx = clip_indices(90, 3.0, segs, clips=4, frames_per_clip=8)
    _valid(idx, 90, 32)
    assert idx[:8] == np.linspace(0, 30, 9)[:8].astype(int).tolist()
    assert idx[8:16] == (30 + np.linspace(0, 30, 9)[:8].astype(int)).tolist()
    for k, (lo, hi) in enumerate([(0, 29), (30, 59), (60, 74), (75, 89)]):
        assert all(lo <= i <= hi for i in idx[8 * k : 8 * (k + 1)])


def test_clip_indices_train_stays_inside_spans_and_is_deterministic():
    segs = [Segment("a", 1.0, 7.0), Segment("b", 9.5, 12.0), Segment("c", 40.0, 41.0)]
    for seed in range(50):
        idx = clip_indices(120, 3.0, segs, clips=4, frames_per_clip=8, train=True, rng=np.random.default_rng(seed))
        for k in range(4):
            _valid(idx[8 * k : 8 * (k + 1)], 120, 8)
        assert all(3 <= i <= 20 for i in idx[:8])
        assert all(28 <= i <= 35 for i in idx[8:16])
        assert idx[16:24] == [119] * 8  # span after the end -> last frame
        assert all(90 <= i <= 119 for i in idx[24:])  # padding -> last quarter of the video
    a = clip_indices(120, 3.0, segs, train=True, rng=np.random.default_rng(3))
    b = clip_indices(120, 3.0, segs, train=True, rng=np.random.default_rng(3))
    assert a == b


def test_clip_indices_short_video_one_frame_and_untimed():
    idx = clip_indices(5, 3.0, [Segment("a"), Segment("b")], clips=4, frames_per_clip=8)
    _valid(idx, 5, 32)
    assert set(idx) == set(range(5))
    assert clip_indices(1, 3.0, [Segment("a", 0.0, 9.0)], train=True, rng=np.random.default_rng(0)) == [0] * 32
    with pytest.raises(ValueError, match="merge"):
        clip_indices(100, 3.0, [Segment("a")] * 5, clips=4)


def test_clip_indices_property_random():
    rng = np.random.default_rng(5)
    for _ in range(200):
        n = int(rng.integers(1, 2000))
        fps = float(rng.choice([1.0, 3.0, 29.97]))
        dur = n / fps
        cuts = np.sort(rng.uniform(-0.1 * dur, 1.2 * dur, size=5))
        segs = [Segment("s", float(cuts[i]), float(cuts[i + 1])) for i in range(int(rng.integers(0, 5)))]
        for train in (False, True):
            idx = clip_indices(n, fps, segs, clips=4, frames_per_clip=8, train=train, rng=rng)
            for k in range(4):
                _valid(idx[8 * k : 8 * (k + 1)], n, 8)
            if len(segs) in (0, 4):  # ordered clip ranges -> the whole list is sorted
                _valid(idx, n, 32)
            for k, seg in enumerate(segs):
                lo, hi = segment_frame_range(n, fps, seg, k, 4)
                assert all(lo <= i <= hi for i in idx[8 * k : 8 * (k + 1)])


# --- consecutive clip start (LMDB rule) ---------------------------------------------------------------------------


def test_consecutive_clip_start_includes_last_start_by_default():
    rng = np.random.default_rng(0)
    assert {consecutive_clip_start(10, 4, rng) for _ in range(500)} == set(range(7))
    assert {consecutive_clip_start(10, 4, rng, compat_official=True) for _ in range(500)} == set(range(6))
    assert {consecutive_clip_start(5, 4, rng, compat_official=True) for _ in range(50)} == {0}
    assert {consecutive_clip_start(5, 4, rng) for _ in range(50)} == {0, 1}


def test_consecutive_clip_start_edges_and_determinism():
    assert consecutive_clip_start(4, 4) == 0
    assert consecutive_clip_start(2, 4) == 0
    assert consecutive_clip_start(10, 4, train=False) == 0
    with pytest.raises(ValueError, match="num_clips_available"):
        consecutive_clip_start(0, 4)
    a = [consecutive_clip_start(100, 4, np.random.default_rng(9)) for _ in range(3)]
    assert len(set(a)) == 1
