"""Window resizing of the 3-D bias tables (``lfvila.models.window_resize``) and its load path
(``convert.load_checkpoint(resize_windows=True)``, ``from_pretrained``, the init steps): the identity, an independent
tricubic computation, the official ``change_window`` expression, and a 32-frame checkpoint run at 64 frames."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lfvila.config import InitStep
from lfvila.models import convert as cv
from lfvila.models import create_model
from lfvila.models.convert import CheckpointError
from lfvila.models.window_resize import resize_bias_table, source_window, window_from_index
from lfvila_kernels import relative_position_index


def _rows(window):
    return math.prod(2 * w - 1 for w in window)


def _table(window, heads=3, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(_rows(window), heads, generator=g, dtype=dtype)


def _keys(x: float, a: float = -0.75) -> float:
    """Keys' cubic convolution kernel (PyTorch's bicubic, A = -0.75)."""
    x = abs(x)
    if x <= 1:
        return (a + 2) * x**3 - (a + 3) * x**2 + 1
    if x < 2:
        return a * x**3 - 5 * a * x**2 + 8 * a * x - 4 * a
    return 0.0


def _cubic_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """``(n_out, n_in)``: 1-D bicubic resampling, ``align_corners=False``, border taps clamped, written out by hand."""
    m = torch.zeros(n_out, n_in, dtype=torch.float64)
    scale = n_in / n_out
    for o in range(n_out):
        src = (o + 0.5) * scale - 0.5
        f = math.floor(src)
        for k in (-1, 0, 1, 2):
            m[o, min(max(f + k, 0), n_in - 1)] += _keys(src - (f + k))
    return m


def test_same_window_is_the_identity():
    for window in [(1, 2, 3), (4, 2, 3), (2, 3, 5)]:
        table = _table(window, dtype=torch.float32)
        out = resize_bias_table(table, window, window)
        assert out.dtype == table.dtype and torch.equal(out, table)


@pytest.mark.parametrize("old, new", [((2, 2, 3), (4, 2, 3)),   # the official case: time only, longer
                                      ((4, 2, 3), (2, 2, 3)),   # time only, shorter
                                      ((2, 2, 3), (3, 3, 2))])  # every axis, one of them shrinking
def test_resize_is_tricubic_resampling_of_the_offset_grid(old, new):
    heads = 3
    table = _table(old, heads)
    got = resize_bias_table(table, old, new)
    dims_old, dims_new = [2 * w - 1 for w in old], [2 * w - 1 for w in new]
    mt, mh, mw = (_cubic_matrix(a, b) for a, b in zip(dims_old, dims_new))
    grid = table.t().reshape(heads, *dims_old)  # (heads, 2wt-1, 2wh-1, 2ww-1), row-major offsets
    want = torch.einsum("ta,hb,wc,nabc->thwn", mt, mh, mw, grid).reshape(-1, heads)
    assert got.shape == (_rows(new), heads)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_one_axis_by_hand():
    # window (2, 1, 1) -> (3, 1, 1): 3 temporal offsets -> 5. Output 2 sits at source coordinate (2.5 * 3/5) - 0.5 = 1:
    # exactly on the middle row. Output 0 sits at -0.2, taps -2..1 clamped to rows 0, 0, 0, 1.
    table = torch.tensor([[1.0], [2.0], [4.0]], dtype=torch.float64)
    got = resize_bias_table(table, (2, 1, 1), (3, 1, 1))[:, 0]
    assert got[2].item() == pytest.approx(2.0, abs=1e-12)
    t = 0.8  # -0.2 - floor(-0.2)
    w = [_keys(t + 1), _keys(t), _keys(1 - t), _keys(2 - t)]  # taps at rows -2, -1, 0, 1 -> 0, 0, 0, 1
    assert got[0].item() == pytest.approx((w[0] + w[1] + w[2]) * 1.0 + w[3] * 2.0, abs=1e-12)


def test_time_axis_matches_the_official_change_window_expression():
    """``utils/load.py``: permute, view (1, nH, -1, W1), float, bicubic to (2wt'-1, W1), view, permute, half."""
    old, new = (8, 3, 5), (16, 3, 5)
    table = _table(old, heads=4, dtype=torch.float16)
    w1 = (2 * new[1] - 1) * (2 * new[2] - 1)
    official = F.interpolate(table.permute(1, 0).view(1, 4, -1, w1).float(), size=(2 * new[0] - 1, w1),
                             mode="bicubic")
    official = official.view(4, _rows(new)).permute(1, 0).half()
    got = resize_bias_table(table, old, new)
    assert got.dtype == torch.float16
    torch.testing.assert_close(got, official, rtol=0, atol=0)


def test_window_of_an_index_and_the_official_fallback():
    for window in [(1, 2, 3), (1, 3, 2), (16, 2, 3), (2, 3, 5)]:
        assert window_from_index(relative_position_index(window), _rows(window)) == window
        assert source_window(_rows(window), (7, 9, 9), relative_position_index(window)) == window
    assert source_window(_rows((8, 3, 5)), (16, 3, 5)) == (8, 3, 5)  # no index: the model's spatial window
    with pytest.raises(ValueError, match="no temporal window"):
        source_window(_rows((8, 3, 5)), (16, 4, 4))
    with pytest.raises(ValueError, match="table must be"):
        resize_bias_table(_table((2, 2, 3)), (4, 2, 3), (2, 2, 3))


# ------------------------------------------------------------------------------ loading: 32 frames -> 64 frames

FRAMES, SIZE = 32, 32


def _windows_for(frames: int, cfg):
    """The tiny encoder's windows scaled with the frame count (the registered ones are for 32 frames here)."""
    factor = frames // FRAMES
    return tuple((w[0] * factor, w[1], w[2]) for w in cfg.window_size)


def _long(cfg, frames=2 * FRAMES):
    return dict(window_size=_windows_for(frames, cfg), local_window=cfg.local_window * frames // FRAMES)


@pytest.fixture(scope="module")
def short_dir(tmp_path_factory):
    torch.manual_seed(0)
    model = create_model("lfvila-tiny-video", attn_impl="torch", drop_path_rate=0.0)
    return cv.save_pretrained(model, tmp_path_factory.mktemp("ckpt") / "short"), model


def test_32_frame_checkpoint_runs_at_64_frames(short_dir):
    path, short = short_dir
    long = create_model("lfvila-tiny-video", attn_impl="torch", drop_path_rate=0.0, **_long(short.cfg)).eval()
    own_index = {k: v.clone() for k, v in long.state_dict().items() if k.endswith("relative_position_index")}
    report = cv.load_checkpoint(long, path, resize_windows=True)
    tables = sorted(k for k in short.state_dict() if k.endswith("relative_position_bias_table"))
    assert report.resized == tables and len(tables) == 12
    assert report.missing == [] and report.unexpected == [] and report.mismatched == []
    src, got = short.state_dict(), long.state_dict()
    for key, value in got.items():
        if key.endswith("relative_position_index"):
            assert torch.equal(value, own_index[key]), key  # the model's own index, not the checkpoint's
        elif key.endswith("relative_position_bias_table"):
            attn = long.get_submodule(key.rsplit(".", 1)[0])
            old = short.get_submodule(key.rsplit(".", 1)[0]).window_size
            assert attn.window_size == (2 * old[0], old[1], old[2])
            assert torch.equal(value, resize_bias_table(src[key], old, attn.window_size)), key
        else:
            assert torch.equal(value, src[key]), key
    video = torch.randn(1, 3, 2 * FRAMES, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = long(video)
    assert out.grid.shape[1] == 2 * FRAMES and torch.isfinite(out.grid).all() and torch.isfinite(out.local).all()


def test_without_the_switch_the_load_names_it(short_dir):
    path, short = short_dir
    with pytest.raises(CheckpointError, match="resize_windows=True") as err:
        cv.from_pretrained(path, **_long(short.cfg))
    assert "relative_position_index" in str(err.value)


def test_from_pretrained_and_init_steps_reach_the_switch(short_dir):
    path, short = short_dir
    model = cv.from_pretrained(path, resize_windows=True, **_long(short.cfg))
    assert model.cfg.window_size == _windows_for(2 * FRAMES, short.cfg)
    long = create_model("lfvila-tiny-video", **_long(short.cfg))
    cv.apply_init(long, [InitStep("pretrained", str(path), resize_windows=True)])
    for key, value in model.state_dict().items():
        assert torch.equal(value, long.state_dict()[key]), key
    with pytest.raises(ValueError, match="resize_windows applies to"):
        cv.apply_init(long, [InitStep("swin2d", str(path), resize_windows=True)])


def test_same_windows_with_the_switch_is_a_plain_load(short_dir):
    path, short = short_dir
    model = create_model("lfvila-tiny-video")
    report = cv.load_checkpoint(model, path, resize_windows=True)
    assert report.resized == []
    for key, value in short.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
