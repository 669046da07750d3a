"""Tests for stages/predict.py and `samoe predict`: sliding windows, blending, GeoTIFF in and out.

Oracles: window grids and blend weights worked by hand; the model's own forward on
a whole image (a scene that fits one window) and on each window, blended in plain
numpy here; the georeferencing rasterio wrote into the input scenes.
"""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from affine import Affine
from PIL import Image
from typer.testing import CliRunner

import cli
from stages.data import sar_to_input
from stages.predict import (Scene, Tiling, model_forward, ramp, seg_probabilities, sliding_windows, window_starts)
from stages.units import Units
from upscale import load_model

pytestmark = pytest.mark.usefixtures("one_thread")
TRANSFORM = Affine(10.0, 0.0, 500000.0, 0.0, -10.0, 4600000.0)


def samoe(*args):
    return CliRunner().invoke(cli.app, [str(a) for a in args])


def one_error_line(res, *words: str) -> str:
    assert res.exit_code == 2, (res.exit_code, res.stdout[-500:], res.stderr)
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    for w in words:
        assert w in lines[0], res.stderr
    return lines[0]


def geotiff(path: Path, values: np.ndarray, nodata: float | None = None, crs: str = "EPSG:32633") -> Path:
    """A GeoTIFF written by rasterio: (bands, H, W) values, a UTM CRS, a 10 m transform, optional nodata."""
    with rasterio.open(path, "w", driver="GTiff", height=values.shape[1], width=values.shape[2], count=values.shape[0],
                       dtype=values.dtype.name, crs=crs, transform=TRANSFORM, nodata=nodata) as d:
        d.write(values)
    return path


def sigma0(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    return rng.gamma(4, 0.025, size=shape).astype(np.float32)


# --------------------------------------------------------------------------- tiling and blending by hand


@pytest.mark.parametrize("length, window, stride, starts", [
    (128, 128, 96, [0]),  # fits: one window
    (100, 128, 96, [0]),  # smaller: one padded window
    (300, 128, 96, [0, 96, 172]),  # the last window moved back to end at the edge
    (256, 128, 128, [0, 128]),  # no overlap, exact fit
    (257, 128, 128, [0, 128, 129]),
    (6, 4, 2, [0, 2]),
])
def test_window_starts_by_hand(length, window, stride, starts):
    assert window_starts(length, window, stride) == starts
    ends = [s + window for s in starts]
    assert starts[0] == 0 and max(ends) == max(length, window)  # every pixel covered, none past the edge unless padded


def test_ramp_by_hand():
    np.testing.assert_allclose(ramp(4, 2), [0.25, 0.75, 0.75, 0.25])
    np.testing.assert_allclose(ramp(8, 4), [0.125, 0.375, 0.625, 0.875, 0.875, 0.625, 0.375, 0.125])
    np.testing.assert_array_equal(ramp(4, 4), [1, 1, 1, 1])  # no overlap: uniform


def _constant_scene(h: int, w: int) -> Scene:
    return Scene("s", h, w, lambda y0, y1: (np.zeros((3, y1 - y0, w), np.float32), np.ones((y1 - y0, w), bool)))


def test_overlap_blend_matches_a_hand_computation():
    """1 x 6 scene, windows of 4 at stride 2 (starts 0 and 2), ramp 1/4, 3/4, 3/4, 1/4 along x; window k outputs
    the constant a_k. By hand: pixels 0-1 only window 0 -> a0; pixel 2: (3/4 a0 + 1/4 a1) / 1; pixel 3:
    (1/4 a0 + 3/4 a1) / 1; pixels 4-5 only window 1 -> a1. (One row: the y axis has one window, weight 1.)"""
    a = [2.0, 10.0]

    def forward(x, windows):
        return torch.stack([torch.full((1, 4, 4), a[w.x // 2]) for w in windows])

    bands = list(sliding_windows([_constant_scene(1, 6)], Tiling(4, 2), 1, 1, forward))
    values = np.concatenate([b.values for b in bands], axis=1)[0, 0]
    np.testing.assert_allclose(values, [2, 2, 0.75 * 2 + 0.25 * 10, 0.25 * 2 + 0.75 * 10, 10, 10], rtol=1e-6)
    assert [(b.y0, b.y1, b.last) for b in bands] == [(0, 1, True)]


def test_blend_of_a_two_by_two_grid_by_hand():
    """6 x 6 scene, 4 x 4 windows at stride 2: weights are outer products of the ramps; pixel (2, 3) gets
    sum_k wy_k * wx_k * a_k / sum_k wy_k * wx_k with wy = (3/4, 1/4) and wx = (1/4, 3/4) for windows (0,0),(0,2),(2,0),(2,2)."""
    a = {(0, 0): 1.0, (0, 2): 2.0, (2, 0): 4.0, (2, 2): 8.0}

    def forward(x, windows):
        return torch.stack([torch.full((1, 4, 4), a[(w.y, w.x)]) for w in windows])

    bands = list(sliding_windows([_constant_scene(6, 6)], Tiling(4, 2), 3, 1, forward))  # batches span rows of windows
    values = np.concatenate([b.values for b in bands], axis=1)[0]
    assert [(b.y0, b.y1) for b in bands] == [(0, 2), (2, 6)]  # rows above the next row of windows leave first
    wy, wx = (0.75, 0.25), (0.25, 0.75)
    weights = {(0, 0): wy[0] * wx[0], (0, 2): wy[0] * wx[1], (2, 0): wy[1] * wx[0], (2, 2): wy[1] * wx[1]}
    expect = sum(weights[k] * a[k] for k in a) / sum(weights.values())
    assert values[2, 3] == pytest.approx(expect, rel=1e-6)
    assert values[0, 0] == 1.0 and values[5, 5] == 8.0 and values[0, 5] == 2.0 and values[5, 0] == 4.0


def test_windows_without_data_are_not_run():
    """1 x 6 scene with data only in pixels 4-5: window 0 (pixels 0-3) has none and is skipped; pixels 2-3 then
    come from window 1 alone, pixels 0-1 from no window (0, and not valid)."""
    valid = np.array([[False, False, False, False, True, True]])
    scene = Scene("s", 1, 6, lambda y0, y1: (np.zeros((3, 1, 6), np.float32), valid))
    seen, skipped = [], []

    def forward(x, windows):
        seen.extend(w.x for w in windows)
        return torch.full((len(windows), 1, 4, 4), 10.0)

    (band,) = sliding_windows([scene], Tiling(4, 2), 8, 1, forward, on_skipped=skipped.append)
    assert seen == [2] and skipped == [1]
    np.testing.assert_array_equal(band.values[0, 0], [0, 0, 10, 10, 10, 10])
    np.testing.assert_array_equal(band.valid, valid)


# --------------------------------------------------------------------------- against the model's own forward


@pytest.fixture(scope="module")
def model(src):
    return load_model(src).eval()


def _scene_of(image: np.ndarray) -> Scene:
    inp = sar_to_input(image, Units("linear"))
    h, w = inp.shape[1:]
    return Scene("s", h, w, lambda y0, y1: (inp[:, y0:y1], np.ones((y1 - y0, w), bool)))


def _run(model, image: np.ndarray, tiling: Tiling, batch: int = 4) -> np.ndarray:
    forward = model_forward(model, torch.device("cpu"), "fp32", seg_probabilities)
    bands = list(sliding_windows([_scene_of(image)], tiling, batch, 4, forward))
    return np.concatenate([b.values for b in bands], axis=1)


def test_one_window_scene_equals_the_whole_image_forward(model):
    image = sigma0(np.random.default_rng(1), (2, 128, 128))
    with torch.no_grad():
        want = model(torch.from_numpy(sar_to_input(image))[None])["seg"].softmax(1)[0].numpy()
    np.testing.assert_array_equal(_run(model, image, Tiling.of(128)), want)


def test_smaller_scene_equals_the_forward_of_it_padded(model):
    image = sigma0(np.random.default_rng(2), (2, 100, 90))
    padded = np.zeros((3, 128, 128), np.float32)
    padded[:, :100, :90] = sar_to_input(image)
    with torch.no_grad():
        want = model(torch.from_numpy(padded)[None])["seg"].softmax(1)[0, :, :100, :90].numpy()
    np.testing.assert_array_equal(_run(model, image, Tiling.of(128)), want)


def test_large_scene_blends_each_windows_forward(model):
    """A 200 x 300 scene at stride 96: the engine's output equals each window's forward blended here in plain numpy."""
    image = sigma0(np.random.default_rng(3), (2, 200, 300))
    tiling = Tiling.of(128, stride=96)
    inp = sar_to_input(image)
    acc, wsum = np.zeros((4, 200, 300)), np.zeros((200, 300))
    wy, wx = ramp(128, 96), ramp(128, 96)
    for y in window_starts(200, 128, 96):
        for x in window_starts(300, 128, 96):
            with torch.no_grad():
                p = model(torch.from_numpy(inp[:, y:y + 128, x:x + 128].copy())[None])["seg"].softmax(1)[0].numpy()
            acc[:, y:y + 128, x:x + 128] += p * np.outer(wy, wx)
            wsum[y:y + 128, x:x + 128] += np.outer(wy, wx)
    got = _run(model, image, tiling, batch=5)
    np.testing.assert_allclose(got, acc / wsum, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got.sum(0), 1.0, rtol=1e-5)


def test_streaming_memory_is_bounded_by_a_band_not_the_scene():
    """A 8192 x 2048 scene through the engine with a trivial forward: the peak traced allocation stays far below
    what the scene's blended probabilities alone would take (4 x 8192 x 2048 float32 = 256 MiB)."""
    h, w = 8192, 2048

    def read(y0, y1):
        return np.zeros((3, y1 - y0, w), np.float32), np.ones((y1 - y0, w), bool)

    def forward(x, windows):
        return torch.full((x.shape[0], 4, 128, 128), 0.25)

    tracemalloc.start()
    rows = 0
    for band in sliding_windows([Scene("wide", h, w, read)], Tiling.of(128), 16, 4, forward):
        rows += band.y1 - band.y0
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert rows == h
    assert peak < 32 * 2**20, peak / 2**20


# --------------------------------------------------------------------------- samoe predict on GeoTIFFs


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> Path:
    """Real GeoTIFFs written by rasterio: 2-band float32 linear with nodata; 1-band uint16 DN; and a PNG."""
    d = tmp_path_factory.mktemp("scenes")
    rng = np.random.default_rng(0)
    two = sigma0(rng, (2, 150, 200))
    two[:, :10, :20] = -9999.0
    geotiff(d / "s2.tif", two, nodata=-9999.0)
    dn = (np.sqrt(sigma0(rng, (1, 130, 140)).astype(np.float64)) * 474.0).round().astype(np.uint16)
    (d / "dn").mkdir()
    geotiff(d / "dn" / "s1.tif", dn, nodata=0, crs="EPSG:4326")
    (d / "dn" / "data.json").write_text(json.dumps({"input_scale": "dn", "dn_calibration": 474.0, "polarisations": ["HH"]}))
    (d / "png").mkdir()
    Image.fromarray(np.full((90, 100), 120, np.uint8)).save(d / "png" / "quick.png")
    return d


def test_predict_geotiffs_keep_crs_transform_and_nodata(src, scenes, tmp_path):
    out = tmp_path / "pred"
    res = samoe("predict", src, "--images", scenes / "s2.tif", "--images", scenes / "dn", "--out", out, "--json")
    assert res.exit_code == 0, res.stderr
    summary = json.loads(res.stdout)
    assert summary["predicted"] == 2 and set(summary["scenes"]) == {"s2", "s1"}
    for stem, source in (("s2", scenes / "s2.tif"), ("s1", scenes / "dn" / "s1.tif")):
        with rasterio.open(source) as s, rasterio.open(out / "masks" / f"{stem}.tif") as m, \
                rasterio.open(out / "confidence" / f"{stem}.tif") as c:
            assert m.crs == s.crs and c.crs == s.crs
            assert m.transform == s.transform == c.transform
            assert (m.height, m.width) == (c.height, c.width) == (s.height, s.width)  # pixel for pixel
            assert m.nodata == 255 and c.nodata == 0
            mask, conf, valid = m.read(1), c.read(1), s.read_masks(1) > 0
            assert (mask[~valid] == 255).all() and (mask[valid] < 4).all()
            assert (conf[~valid] == 0).all() and (conf[valid] >= 0.25 - 1e-6).all() and (conf <= 1).all()
            assert m.colormap(1)[0][:3] == (31, 119, 180)  # class 0 in the default palette (no classes recorded)
        assert (out / "previews" / f"{stem}.png").is_file()
    assert summary["scenes"]["s2"]["nodata_pixels"] == 200
    assert json.loads((out / "classes.json").read_text())["ignore_index"] == 255


def test_predict_mask_equals_the_engine_output(src, model, scenes, tmp_path):
    """The written mask is the argmax of the blended probabilities, and confidence their max (float32)."""
    out = tmp_path / "pred"
    assert samoe("predict", src, "--images", scenes / "s2.tif", "--out", out, "--stride", 64).exit_code == 0
    with rasterio.open(scenes / "s2.tif") as s:
        image, valid = s.read(), s.read_masks(1) > 0
    probs = _run_masked(model, np.where(valid, image, np.nan), valid)
    with rasterio.open(out / "masks" / "s2.tif") as m, rasterio.open(out / "confidence" / "s2.tif") as c:
        np.testing.assert_array_equal(m.read(1), np.where(valid, probs.argmax(0), 255))
        np.testing.assert_allclose(c.read(1), np.where(valid, probs.max(0), 0), rtol=1e-6)


def _run_masked(model, image, valid):
    inp = sar_to_input(image, Units("linear"))
    inp[:, ~valid] = 0
    h, w = inp.shape[1:]
    scene = Scene("s", h, w, lambda y0, y1: (inp[:, y0:y1], valid[y0:y1]))
    forward = model_forward(model, torch.device("cpu"), "fp32", seg_probabilities)
    return np.concatenate([b.values for b in sliding_windows([scene], Tiling.of(128, stride=64), 4, 4, forward)], axis=1)


def test_predict_plain_png_gives_png_mask_and_resumes(src, scenes, tmp_path):
    out = tmp_path / "pred"
    args = ("predict", src, "--images", scenes / "png", "--out", out, "--input-scale", "display")
    res = samoe(*args)
    assert res.exit_code == 0, res.stderr
    with Image.open(out / "masks" / "quick.png") as im:
        assert im.size == (100, 90)
    before = (out / "masks" / "quick.png").read_bytes()
    res = samoe(*args, "--json")
    assert res.exit_code == 0 and json.loads(res.stdout)["skipped"] == 1
    assert (out / "masks" / "quick.png").read_bytes() == before
    one_error_line(samoe(*args, "--stride", 100), "another checkpoint or tiling", "--force")
    assert samoe(*args, "--stride", 100, "--force").exit_code == 0


def test_predict_refuses_wrong_units_and_band_counts_before_writing(src, scenes, tmp_path):
    out = tmp_path / "pred"
    one_error_line(samoe("predict", src, "--images", scenes / "png", "--out", out), "quick.png", "--input-scale")
    one_error_line(samoe("predict", src, "--images", scenes / "s2.tif", "--out", out, "--input-scale", "db"),
                   "s2.tif", "--input-scale")
    one_error_line(samoe("predict", src, "--images", scenes / "s2.tif", "--out", out, "--polarisations", "HH"),
                   "s2.tif has 2 band(s)", "HH")
    one_error_line(samoe("predict", src, "--images", scenes / "dn", "--out", out, "--input-scale", "linear"),
                   "contradicts", "data.json")
    assert not out.exists()


def test_predict_refuses_a_folder_it_did_not_write(src, scenes, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    one_error_line(samoe("predict", src, "--images", scenes / "s2.tif", "--out", mine), "not written by samoe predict")
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]
