"""Tests for stages/data.py: demo data, normalisation, distance targets, folder datasets.

Oracles: a brute-force O(N^2) distance transform and values worked by hand.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from stages.data import (
    CLASS_NAMES,
    DB_MAX,
    DB_MIN,
    NORM_MEAN,
    NORM_STD,
    RATIO_DB_MAX,
    RATIO_DB_MIN,
    DataError,
    LabelledFolder,
    PseudoLabelFolder,
    UnlabelledFolder,
    boundary_target,
    distance_transform,
    make_demo_data,
    sar_to_input,
    sdf_target,
    squared_distance_transform,
    write_confidence,
    write_image,
    write_mask,
)
from stages.units import Units
from upscale.errors import SamoeError

SMALL = dict(labelled=3, unlabelled=2, test=2, size=32)


def _png(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im)


def _digests(root: Path) -> dict[str, str]:
    """Digests of the data files (the ownership marker holds a random writer token by design)."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != ".samoe-owner.json"
    }


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("demo") / "data"
    make_demo_data(out, labelled=6, unlabelled=2, test=2, size=48, seed=0)
    return out


# --------------------------------------------------------------------------- demo data


def test_demo_data_layout_and_summary(tmp_path: Path) -> None:
    out = tmp_path / "d"
    summary = make_demo_data(out, **SMALL, seed=3)
    assert sorted(p.name for p in (out / "A" / "images").iterdir()) == ["a-0000.tif", "a-0001.tif", "a-0002.tif"]
    assert len(list((out / "A" / "masks").glob("*.png"))) == 3
    assert len(list((out / "A-test" / "images").glob("*.tif"))) == 2
    assert len(list((out / "A-test" / "masks").glob("*.png"))) == 2
    assert len(list((out / "B" / "images").glob("*.tif"))) == 2
    assert not (out / "B" / "masks").exists()
    assert summary["counts"] == {"A": 3, "A-test": 2, "B": 2}
    assert summary["size"] == 32
    assert sum(summary["class_fractions"]["A"].values()) == pytest.approx(1.0, abs=1e-5)
    # no temporary directory left beside the output
    assert [p.name for p in tmp_path.iterdir()] == ["d"]
    img = tifffile.imread(out / "A" / "images" / "a-0000.tif")
    assert img.shape == (2, 32, 32) and img.dtype == np.float32 and (img > 0).all()
    with tifffile.TiffFile(out / "A" / "images" / "a-0000.tif") as tf:
        names = {t.name for t in tf.pages[0].tags.values()}
    assert "DateTime" not in names and "Software" not in names
    with Image.open(out / "A" / "masks" / "a-0000.png") as mask:
        assert mask.mode == "L"


def test_demo_data_deterministic(tmp_path: Path) -> None:
    make_demo_data(tmp_path / "x", **SMALL, seed=1)
    make_demo_data(tmp_path / "y", **SMALL, seed=1)
    make_demo_data(tmp_path / "z", **SMALL, seed=2)
    dx, dy, dz = _digests(tmp_path / "x"), _digests(tmp_path / "y"), _digests(tmp_path / "z")
    assert dx == dy
    assert dx.keys() == dz.keys()
    differing = [k for k in dx if k.endswith((".tif", ".png")) and dx[k] != dz[k]]
    assert len(differing) == sum(k.endswith((".tif", ".png")) for k in dx)


def test_demo_data_refuses_existing_unless_force(tmp_path: Path) -> None:
    out = tmp_path / "d"
    make_demo_data(out, **SMALL, seed=0)
    before = _digests(out)
    with pytest.raises(DataError, match="already exists"):
        make_demo_data(out, **SMALL, seed=5)
    assert _digests(out) == before
    make_demo_data(out, **SMALL, seed=5, force=True)
    assert _digests(out) != before
    assert [p.name for p in tmp_path.iterdir()] == ["d"]


def test_demo_data_class_coverage_and_backscatter(demo: Path) -> None:
    counts = np.zeros(len(CLASS_NAMES), dtype=np.int64)
    vv_db: dict[int, list[float]] = {c: [] for c in range(len(CLASS_NAMES))}
    ratio_db: dict[int, list[float]] = {c: [] for c in range(len(CLASS_NAMES))}
    for mask_path in sorted((demo / "A" / "masks").glob("*.png")):
        mask = _png(mask_path)
        img = tifffile.imread(demo / "A" / "images" / f"{mask_path.stem}.tif").astype(np.float64)
        counts += np.bincount(mask.ravel(), minlength=len(CLASS_NAMES))
        assert mask.max() < len(CLASS_NAMES)
        for c in range(len(CLASS_NAMES)):
            if (mask == c).any():
                vv_db[c].append(10 * np.log10(img[0][mask == c].mean()))
                ratio_db[c].append(10 * np.log10(img[0][mask == c].mean() / img[1][mask == c].mean()))
    assert (counts > 0).all(), counts
    mean_vv = {c: float(np.mean(v)) for c, v in vv_db.items()}
    # water darkest, then bare soil, vegetation, urban brightest
    assert mean_vv[0] < mean_vv[3] < mean_vv[2] < mean_vv[1]
    assert mean_vv[0] == pytest.approx(-20, abs=2.5)
    for c in range(len(CLASS_NAMES)):
        assert 5.0 <= float(np.mean(ratio_db[c])) <= 9.0


def test_hard_scene_single_region_is_unchanged() -> None:
    """Every growth measurement in the README used single-region hard scenes: the regions option must not move them."""
    from stages.hard_scenes import hard_scene

    golden = ["666406e0e1b069f1", "f153a1fdc267218d", "20ce124c07d71758"]
    for i, want in enumerate(golden):
        for kwargs in ({}, {"regions": 1}, {"region": 0}):
            img, mask = hard_scene(np.random.default_rng([5, 1, i]), 64, **kwargs)
            assert hashlib.sha256(img.tobytes() + mask.tobytes()).hexdigest()[:16] == want


@pytest.mark.parametrize("region", [0, 1, 2, 3])
def test_hard_scene_region_gives_classes_the_permuted_signatures(region: int) -> None:
    """VV / (VH - noise floor) of a class's mean intensities is its signature's ratio: texture, rows, points and
    the calibration offset are shared by both channels, speckle has mean 1, and the floor adds its power."""
    from stages.hard_scenes import _RADIOMETRY, hard_scene, region_noise_floor_db, region_signatures

    wears = region_signatures(region)
    floor = 10 ** (region_noise_floor_db(region) / 10) if region else 0.0
    assert sorted(wears) == list(range(10))
    checked = set()
    for i in range(24):
        img, mask = hard_scene(np.random.default_rng([7, region, i]), 128, regions=4, region=region)
        for c in range(10):
            sel = mask == c
            db, ratio = _RADIOMETRY[int(wears[c])][:2]
            if sel.sum() < 1500 or db < -12:
                continue
            measured = 10 * np.log10(img[0][sel].astype(np.float64).mean() / (img[1][sel].astype(np.float64).mean() - floor))
            assert measured == pytest.approx(ratio, abs=0.6), (region, c, measured, ratio)
            checked.add(c)
    assert len(checked) >= 3  # the test saw several classes
    if region:
        assert (wears != np.arange(10)).sum() >= 6  # a region really re-maps most classes


def test_hard_scene_regions_draw_and_noise_floor(monkeypatch: pytest.MonkeyPatch) -> None:
    import stages.hard_scenes as hs

    assert hs.region_noise_floor_db(0) is None and hs.region_noise_floor_db(3) == -25.0
    # every class at -80 dB and no point targets: what is left of a scene is its sensor's noise floor (mean 1 speckle)
    monkeypatch.setattr(hs, "_RADIOMETRY", {c: (-80.0, 0.0, 4, 0.0, 0.0) for c in range(10)})
    monkeypatch.setattr(hs, "_POINT_DENSITY", {2: 0.0, 3: 0.0})
    for region, want in ((0, 0.0), (1, 10 ** -2.9), (3, 10 ** -2.5)):
        img, _ = hs.hard_scene(np.random.default_rng([1, 2, 3]), 128, regions=4, region=region)
        assert img.astype(np.float64).mean() == pytest.approx(want, rel=0.02, abs=1e-6)
    monkeypatch.undo()
    # regions > 1 draws the region from the scene's generator: masks differ from the single-region scene's
    one, _ = hs.hard_scene(np.random.default_rng([9, 9, 9]), 64)
    many, _ = hs.hard_scene(np.random.default_rng([9, 9, 9]), 64, regions=4)
    assert one.shape == many.shape and not np.array_equal(one, many)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"preset": "easy", "regions": 2}, "--regions and --region need --preset hard"),
    ({"preset": "hard", "regions": 2, "region": 2}, "--region 2 is not one of the 2 regions"),
    ({"preset": "hard", "regions": 0}, "--regions must be >= 1"),
])
def test_demo_data_region_errors(tmp_path: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(DataError, match=message):
        make_demo_data(tmp_path / "d", **SMALL, **kwargs)
    assert not (tmp_path / "d").exists()


def test_demo_data_regions_summary(tmp_path: Path) -> None:
    summary = make_demo_data(tmp_path / "d", **SMALL, preset="hard", regions=4, region=1)
    assert summary["regions"] == 4 and summary["region"] == 1
    assert "regions" not in make_demo_data(tmp_path / "e", **SMALL, preset="hard")


# --------------------------------------------------------------------------- normalisation


def _expected_u(x: np.ndarray) -> np.ndarray:
    db = 10 * np.log10(np.maximum(x.astype(np.float64), 1e-6))
    return (np.clip(db, DB_MIN, DB_MAX) - DB_MIN) / (DB_MAX - DB_MIN)


def test_sar_to_input_one_channel_layouts() -> None:
    rng = np.random.default_rng(0)
    x = rng.gamma(4, 0.25 * 0.05, size=(5, 7)).astype(np.float32)
    want = np.repeat(((_expected_u(x) - NORM_MEAN) / NORM_STD)[None], 3, axis=0)
    for arr in (x, x[None], x[..., None]):
        out = sar_to_input(arr)
        assert out.shape == (3, 5, 7) and out.dtype == np.float32
        np.testing.assert_allclose(out, want, rtol=1e-6, atol=1e-6)


def test_sar_to_input_two_channels_both_layouts() -> None:
    # VV = -10 dB, VH = -18 dB everywhere: ratio 8 dB
    vv = np.full((4, 6), 0.1, dtype=np.float32)
    vh = np.full((4, 6), 10 ** -1.8, dtype=np.float32)
    chw = np.stack([vv, vh])
    a, b = sar_to_input(chw), sar_to_input(chw.transpose(1, 2, 0))
    np.testing.assert_array_equal(a, b)
    assert a.shape == (3, 4, 6)
    u_vv = (-10 - DB_MIN) / (DB_MAX - DB_MIN)
    u_vh = (-18 - DB_MIN) / (DB_MAX - DB_MIN)
    u_ratio = (8 - RATIO_DB_MIN) / (RATIO_DB_MAX - RATIO_DB_MIN)
    np.testing.assert_allclose(a[:, 0, 0], (np.array([u_vv, u_vh, u_ratio]) - NORM_MEAN) / NORM_STD, atol=1e-5)


def test_sar_to_input_clipping_nonfinite_and_integers() -> None:
    x = np.array([[0.0, -1.0, np.nan, np.inf, 1e-3, 1e3]], dtype=np.float32)
    out = sar_to_input(x)
    assert np.isfinite(out).all()
    lo, hi = (0 - NORM_MEAN) / NORM_STD, (1 - NORM_MEAN) / NORM_STD
    np.testing.assert_allclose(out[0, 0], [lo, lo, lo, hi, lo, hi], atol=1e-6)  # 1e-3 = -30 dB
    u8 = np.array([[0, 51, 255]], dtype=np.uint8)
    np.testing.assert_allclose(sar_to_input(u8)[1, 0], (np.array([0, 0.2, 1.0]) - NORM_MEAN) / NORM_STD, atol=1e-6)
    u16 = np.array([[0, 65535]], dtype=np.uint16)
    np.testing.assert_allclose(sar_to_input(u16)[2, 0], [lo, hi], atol=1e-6)


@pytest.mark.parametrize("shape", [(3, 4, 5), (4, 5, 3), (4, 5, 0), (2, 2, 4, 5), (5,)])
def test_sar_to_input_rejects_bad_channel_counts(shape: tuple[int, ...]) -> None:
    with pytest.raises(DataError):
        sar_to_input(np.ones(shape, dtype=np.float32))


# --------------------------------------------------------------------------- distance transform


def _brute_force_sq_edt(features: np.ndarray) -> np.ndarray:
    h, w = features.shape
    ys, xs = np.nonzero(features)
    if ys.size == 0:
        return np.full((h, w), np.inf)
    out = np.empty((h, w))
    for y in range(h):
        for x in range(w):
            out[y, x] = np.min((ys - y) ** 2 + (xs - x) ** 2)
    return out


def test_edt_matches_brute_force_exactly() -> None:
    rng = np.random.default_rng(0)
    for trial in range(40):
        h, w = int(rng.integers(1, 14)), int(rng.integers(1, 14))
        density = [0.02, 0.1, 0.5, 0.95][trial % 4]
        f = rng.random((h, w)) < density
        np.testing.assert_array_equal(squared_distance_transform(f), _brute_force_sq_edt(f))


def test_edt_batched_and_edge_cases() -> None:
    rng = np.random.default_rng(1)
    batch = rng.random((3, 2, 9, 11)) < 0.08
    batch[0, 0] = False  # an image with no features
    batch[1, 1] = True  # an image that is all features
    got = squared_distance_transform(batch)
    assert got.shape == batch.shape
    for i in range(3):
        for j in range(2):
            np.testing.assert_array_equal(got[i, j], _brute_force_sq_edt(batch[i, j]))
    assert np.isinf(got[0, 0]).all() and (got[1, 1] == 0).all()
    single = np.zeros((7, 7), dtype=bool)
    single[0, 0] = True
    np.testing.assert_allclose(distance_transform(single)[6, 6], 6 * math.sqrt(2))
    # a worst case for the envelope: features at both ends of long rows
    ends = np.zeros((2, 200), dtype=bool)
    ends[:, 0] = ends[:, -1] = True
    np.testing.assert_array_equal(squared_distance_transform(ends), _brute_force_sq_edt(ends))


# --------------------------------------------------------------------------- targets


def test_boundary_hand_example() -> None:
    mask = np.zeros((4, 6), dtype=np.uint8)
    mask[:, 3:] = 1
    want_r1 = np.zeros((4, 6), dtype=np.uint8)
    want_r1[:, 1:5] = 1
    np.testing.assert_array_equal(boundary_target(mask, radius=1), want_r1)
    want_r0 = np.zeros((4, 6), dtype=np.uint8)
    want_r0[:, 2:4] = 1
    np.testing.assert_array_equal(boundary_target(mask, radius=0), want_r0)
    assert boundary_target(mask).dtype == np.uint8
    np.testing.assert_array_equal(boundary_target(mask, radius=2), np.ones((4, 6), dtype=np.uint8))


def test_boundary_disk_shape_single_class_and_ignore() -> None:
    # one pixel of class 1 in a 9x9 field of class 0: the edges are it and its
    # 4 neighbours; the target is 1 within Euclidean distance 2 of an edge.
    mask = np.zeros((9, 9), dtype=np.uint8)
    mask[4, 4] = 1
    got = boundary_target(mask, radius=2)
    edges = [(4, 4), (3, 4), (5, 4), (4, 3), (4, 5)]
    want = np.array(
        [[int(min((y - a) ** 2 + (x - b) ** 2 for a, b in edges) <= 4) for x in range(9)] for y in range(9)],
        dtype=np.uint8,
    )
    np.testing.assert_array_equal(got, want)
    assert got[4, 8] == 0 and got[4, 7] == 1 and got[1, 1] == 0
    assert not boundary_target(np.full((5, 5), 2, dtype=np.uint8)).any()
    ignore = np.zeros((5, 5), dtype=np.uint8)
    ignore[:, 2:] = 255
    assert not boundary_target(ignore).any()


@pytest.mark.parametrize("radius", [0, 1, 3, 8, 9, 12])
def test_boundary_matches_brute_force_disk(radius: int) -> None:
    rng = np.random.default_rng(radius)
    mask = np.where(rng.random((15, 18)) < 0.03, 1, 0).astype(np.uint8)
    mask[rng.random((15, 18)) < 0.02] = 255
    valid = mask != 255
    edge = np.zeros(mask.shape, dtype=bool)
    for y in range(15):
        for x in range(18):
            for ny, nx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                if 0 <= ny < 15 and 0 <= nx < 18 and valid[y, x] and valid[ny, nx] and mask[y, x] != mask[ny, nx]:
                    edge[y, x] = True
    want = (_brute_force_sq_edt(edge) <= radius * radius).astype(np.uint8)
    np.testing.assert_array_equal(boundary_target(mask, radius=radius), want)


def test_sdf_hand_example_1d() -> None:
    mask = np.array([[1, 1, 1, 0, 0]], dtype=np.uint8)
    got = sdf_target(mask, 2)
    np.testing.assert_allclose(got[1, 0], [1, 0.5, 0, -0.5, -1], atol=1e-6)
    np.testing.assert_allclose(got[0, 0], [-1, -2 / 3, -1 / 3, 0, 1], atol=1e-6)


def test_sdf_hand_example_2d() -> None:
    mask = np.zeros((3, 3), dtype=np.uint8)
    mask[1, 1] = 1
    got = sdf_target(mask, 3)
    assert got.shape == (3, 3, 3) and got.dtype == np.float32
    r = 1 / math.sqrt(2)
    np.testing.assert_allclose(got[1], [[-1, -r, -1], [-r, 0, -r], [-1, -r, -1]], atol=1e-6)
    # class 0: the ring; the centre is at distance 1 from it, the ring has d_out - 1 = 0 or sqrt2 - 1
    np.testing.assert_allclose(got[0][1, 1], -1)
    assert got[0][0, 1] == 0 and got[0][0, 0] == pytest.approx(1.0)
    np.testing.assert_array_equal(got[2], -np.ones((3, 3)))  # absent class


def test_sdf_all_foreground_all_background_and_signs() -> None:
    full = np.full((6, 5), 1, dtype=np.uint8)
    got = sdf_target(full, 3)
    assert got.shape == (3, 6, 5)
    np.testing.assert_array_equal(got[1], np.ones((6, 5)))
    np.testing.assert_array_equal(got[0], -np.ones((6, 5)))
    np.testing.assert_array_equal(got[2], -np.ones((6, 5)))
    ignored = np.full((4, 4), 255, dtype=np.uint8)
    np.testing.assert_array_equal(sdf_target(ignored, 2), -np.ones((2, 4, 4)))
    rng = np.random.default_rng(0)
    mask = rng.integers(0, 4, size=(17, 13)).astype(np.uint8)
    got = sdf_target(mask, 4)
    assert got.shape == (4, 17, 13) and np.isfinite(got).all()
    assert got.min() >= -1 and got.max() <= 1
    for c in range(4):
        np.testing.assert_array_equal(got[c] >= 0, mask == c)
        assert got[c].min() == -1
        # +1 at the deepest pixel; a class made only of boundary pixels stays 0
        deep = (distance_transform(mask != c)[mask == c] > 1).any()
        assert got[c].max() == (1 if deep else 0)


# --------------------------------------------------------------------------- folders


def test_labelled_folder_items(demo: Path) -> None:
    ds = LabelledFolder(demo / "A", num_classes=4)
    assert len(ds) == 6
    item = ds[0]
    assert item["name"] == "a-0000"
    assert item["image"].shape == (3, 48, 48) and item["image"].dtype == torch.float32
    assert item["mask"].shape == (48, 48) and item["mask"].dtype == torch.int64
    assert item["sdf"].shape == (4, 48, 48) and item["sdf"].dtype == torch.float32
    assert item["boundary"].shape == (1, 48, 48) and item["boundary"].dtype == torch.float32
    mask = item["mask"].numpy()
    np.testing.assert_array_equal(mask, _png(demo / "A" / "masks" / "a-0000.png"))
    np.testing.assert_array_equal(item["sdf"].numpy(), sdf_target(mask, 4))
    img = tifffile.imread(demo / "A" / "images" / "a-0000.tif")
    np.testing.assert_array_equal(item["image"].numpy(), sar_to_input(img))
    batch = torch.utils.data.default_collate([ds[0], ds[1]])
    assert batch["image"].shape == (2, 3, 48, 48) and batch["name"] == ["a-0000", "a-0001"]


def test_folders_resize(demo: Path) -> None:
    ds = LabelledFolder(demo / "A", num_classes=4, size=24)
    item = ds[1]
    assert item["image"].shape == (3, 24, 24) and item["mask"].shape == (24, 24)
    assert item["sdf"].shape == (4, 24, 24) and item["boundary"].shape == (1, 24, 24)
    full = _png(demo / "A" / "masks" / "a-0001.png")
    # nearest-exact at scale 1/2 samples source pixel 2i + 1 (pixel centres)
    np.testing.assert_array_equal(item["mask"].numpy(), full[1::2, 1::2])
    np.testing.assert_array_equal(item["sdf"].numpy(), sdf_target(full[1::2, 1::2], 4))
    un = UnlabelledFolder(demo / "B", size=(16, 20))
    assert len(un) == 2 and un[0]["image"].shape == (3, 16, 20) and un[0]["name"] == "b-0000"


def _folder(tmp_path: Path, n: int = 2, hw: tuple[int, int] = (8, 10), masks: bool = True) -> Path:
    root = tmp_path / "f"
    (root / "images").mkdir(parents=True)
    if masks:
        (root / "masks").mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        write_image(root / "images" / f"s{i}.tif", rng.gamma(4, 0.025, size=(2, *hw)).astype(np.float32))
        if masks:
            write_mask(root / "masks" / f"s{i}.png", rng.integers(0, 3, size=hw))
    return root


def test_png_images_and_hwc_tiff_and_16bit_masks(tmp_path: Path) -> None:
    root = _folder(tmp_path, n=0)
    Image.fromarray(np.arange(80, dtype=np.uint8).reshape(8, 10)).save(root / "images" / "p8.png")
    Image.fromarray((np.arange(80, dtype=np.uint16) * 800).reshape(8, 10)).save(root / "images" / "p16.png")
    for stem in ("p8", "p16"):
        Image.fromarray(np.full((8, 10), 2, dtype=np.uint16)).save(root / "masks" / f"{stem}.png")
    with pytest.raises(DataError, match="p16.png does not hold linear backscatter power: its median value is 3.16e"):
        LabelledFolder(root, num_classes=3)  # display-scaled integers are not power: declared, not guessed
    ds = LabelledFolder(root, num_classes=3, units=Units("display"))
    assert ds.names == ["p16", "p8"]
    items = [ds[i] for i in range(2)]
    for it in items:
        assert it["image"].shape == (3, 8, 10) and (it["mask"] == 2).all()
    assert items[0]["image"].max() == pytest.approx((63200 / 65535 - NORM_MEAN) / NORM_STD, abs=1e-5)
    hwc = _folder(tmp_path / "hwc", n=0)  # tifffile's HxWxC page stack: read with tifffile, not GDAL
    tifffile.imwrite(hwc / "images" / "hwc.tif", np.full((8, 10, 2), 0.1, np.float32), photometric="minisblack")
    Image.fromarray(np.full((8, 10), 2, dtype=np.uint16)).save(hwc / "masks" / "hwc.png")
    item = LabelledFolder(hwc, num_classes=3)[0]
    np.testing.assert_allclose(item["image"], torch.from_numpy(sar_to_input(np.full((2, 8, 10), 0.1, np.float32))))


def test_pseudo_label_folder(tmp_path: Path) -> None:
    root = _folder(tmp_path)
    (root / "confidence").mkdir()
    for i in range(2):
        write_confidence(root / "confidence" / f"s{i}.tif", np.linspace(0, 1, 80, dtype=np.float32).reshape(8, 10))
    ds = PseudoLabelFolder(root, num_classes=3)
    item = ds[0]
    assert set(item) == {"image", "mask", "sdf", "boundary", "name", "confidence"}
    assert item["confidence"].shape == (8, 10) and item["confidence"].dtype == torch.float32
    assert item["confidence"][-1, -1] == 1.0
    assert PseudoLabelFolder(root, num_classes=3, size=4)[1]["confidence"].shape == (4, 4)
    write_confidence(root / "confidence" / "s1.tif", np.zeros((8, 9), np.float32))
    with pytest.raises(DataError, match="s1.tif"):
        PseudoLabelFolder(root, num_classes=3)
    (root / "confidence" / "s1.tif").unlink()
    with pytest.raises(DataError, match="no confidence map"):
        PseudoLabelFolder(root, num_classes=3)
    tifffile.imwrite(root / "confidence" / "s1.tif", np.full((8, 10), 1.5, np.float32))
    with pytest.raises(DataError, match=r"outside \[0, 1\]"):
        PseudoLabelFolder(root, num_classes=3)


def _missing_images(root: Path) -> None:
    for p in (root / "images").iterdir():
        p.unlink()
    (root / "images").rmdir()


def _empty_images(root: Path) -> None:
    for p in (root / "images").iterdir():
        p.unlink()


def _image_without_mask(root: Path) -> None:
    (root / "masks" / "s1.png").unlink()


def _mask_wrong_size(root: Path) -> None:
    write_mask(root / "masks" / "s1.png", np.zeros((8, 9), dtype=np.uint8))


def _corrupt_image(root: Path) -> None:
    (root / "images" / "s1.tif").write_bytes(b"this is not a tiff file at all")


def _corrupt_mask(root: Path) -> None:
    data = (root / "masks" / "s1.png").read_bytes()
    (root / "masks" / "s1.png").write_bytes(data[: len(data) // 2])


def _class_id_too_large(root: Path) -> None:
    mask = np.zeros((8, 10), dtype=np.uint8)
    mask[3, 3] = 7
    mask[0, 0] = 255  # ignore is fine
    write_mask(root / "masks" / "s1.png", mask)


def _three_channel_image(root: Path) -> None:
    write_image(root / "images" / "s1.tif", np.ones((3, 8, 10), dtype=np.float32))


def _rgb_png_image(root: Path) -> None:
    (root / "images" / "s1.tif").unlink()
    Image.fromarray(np.zeros((8, 10, 3), dtype=np.uint8)).save(root / "images" / "s1.png")


def _rgb_mask(root: Path) -> None:
    Image.fromarray(np.zeros((8, 10, 3), dtype=np.uint8)).save(root / "masks" / "s1.png")


def _orphan_mask(root: Path) -> None:
    write_mask(root / "masks" / "extra.png", np.zeros((8, 10), dtype=np.uint8))


def _duplicate_stem(root: Path) -> None:
    Image.fromarray(np.zeros((8, 10), dtype=np.uint8)).save(root / "images" / "s1.png")


def _no_masks_dir(root: Path) -> None:
    for p in (root / "masks").iterdir():
        p.unlink()
    (root / "masks").rmdir()


@pytest.mark.parametrize(
    "break_it, message",
    [
        (_missing_images, "no images/ folder"),
        (_empty_images, "holds no"),
        (_image_without_mask, "'s1'.*has no mask"),
        (_mask_wrong_size, "s1.png is 8x9 but its image is 8x10"),
        (_corrupt_image, "cannot read image .*s1.tif"),
        (_corrupt_mask, "cannot read mask .*s1.png"),
        (_class_id_too_large, r"s1.png has class id\(s\) \[7\]"),
        (_three_channel_image, "s1.tif has shape .*3 channels"),
        (_rgb_png_image, "s1.png has shape .*3 channels"),
        (_rgb_mask, "s1.png is a RGB image"),
        (_orphan_mask, "extra.png has no image"),
        (_duplicate_stem, "share the name 's1'"),
        (_no_masks_dir, "no masks/ folder"),
    ],
)
def test_labelled_folder_errors(tmp_path: Path, break_it, message: str) -> None:
    root = _folder(tmp_path)
    LabelledFolder(root, num_classes=3)  # the intact folder is fine
    break_it(root)
    with pytest.raises(DataError, match=message) as info:
        LabelledFolder(root, num_classes=3)
    assert isinstance(info.value, ValueError) and isinstance(info.value, SamoeError)
    assert "\n" not in str(info.value) and ": " in str(info.value)


def test_missing_root_and_unlabelled_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        UnlabelledFolder(tmp_path / "nope")
    root = _folder(tmp_path, masks=False)
    assert len(UnlabelledFolder(root)) == 2
    _corrupt_image(root)
    with pytest.raises(DataError, match="s1.tif"):
        UnlabelledFolder(root)


def test_truncated_pixel_data_fails_on_read(tmp_path: Path) -> None:
    root = _folder(tmp_path)
    path = root / "images" / "s1.tif"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 200])  # header intact, strips cut short
    try:
        ds = LabelledFolder(root, num_classes=3)
    except DataError:
        return  # caught at construction: also fine
    with pytest.raises(DataError, match="s1.tif"):
        ds[1]


def test_cached_targets_equal_recomputed_ones_and_respect_the_budget(demo: Path) -> None:
    """Targets served from the cache are identical to a fresh computation, every epoch; the byte budget holds."""
    fresh = LabelledFolder(demo / "A", 4, cache_bytes=0)
    cached = LabelledFolder(demo / "A", 4)
    for i in range(len(cached)):
        cached[i]
    kept = [sum(v.numel() * v.element_size() for v in cached._cache[n].values()) for n in cached.names]
    full = sum(v.numel() * v.element_size() for k, v in fresh[0].items() if k in ("mask", "sdf", "boundary"))
    assert max(kept) < full  # masks and boundaries in 8 bits, SDFs of present classes only
    partial = LabelledFolder(demo / "A", 4, cache_bytes=kept[0] + kept[1])
    for _ in range(2):
        for i in range(len(fresh)):
            ref = fresh[i]
            for ds in (cached, partial):
                got = ds[i]
                assert got.keys() == ref.keys() and got["name"] == ref["name"]
                for k in ("image", "mask", "sdf", "boundary"):
                    assert got[k].dtype == ref[k].dtype and torch.equal(got[k], ref[k]), k
    assert len(cached._cache) == len(fresh) and len(partial._cache) == 2 and fresh._cache == {}
    item = cached[0]
    item["sdf"].fill_(7.0)  # a caller that modifies its item does not change what the next one gets
    assert torch.equal(cached[0]["sdf"], fresh[0]["sdf"])
