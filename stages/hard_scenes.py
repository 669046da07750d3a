"""A capacity-bound synthetic SAR benchmark: `samoe demo-data --preset hard`.

The default demo scenes have 4 classes that differ by 6-20 dB of backscatter:
a 0.54M-parameter model saturates on them, so no experiment on them can show a
gain from added capacity. These scenes are built so that telling the classes
apart needs several learned statistics at once, the way real SAR land cover
does:

- 10 classes in parcels of a warped Voronoi partition (fields), with a river
  or lake and urban blocks for context;
- pairs of classes with the same VV backscatter told apart only by the
  polarimetric ratio VV/VH (forest / wetland), by heavy-tailed K-distributed
  texture (bare soil / wind-roughened water), by an oriented row pattern at a
  random angle (cropland / grassland), by point-scatterer density (dense urban /
  suburban), or by the number of looks (sand / calm water);
- multiplicative speckle (Gamma, L looks) on top of K-texture (Gamma, order nu);
- a per-scene calibration offset of up to +-1.5 dB, so absolute levels alone do
  not identify a class and the context of the scene matters.

Per pixel, 4-look speckle spreads a level by about +-2 dB; separating 2-4 dB
ratio differences, texture orders and stripe orientations takes averaging over
neighbourhoods and non-linear combinations of statistics: capacity.
The first growth experiment (docs/growth-experiments.md, 2026-11-25) showed that a
larger model trained from scratch beats the tiny one on this set with a paired
bootstrap interval that excludes zero.

Regions (`--regions D`). On one region the tiny model ends up classifying the
inside of parcels almost perfectly (98-99% accuracy farther than 8 px from a
class border), and what is left is where borders fall within a 16-px token:
delineation, which added experts cannot buy. A user grows a model to hold
*more knowledge*: more sensors, regions and seasons, where the same signature
means different land cover. With D regions, each scene comes from one region
r: region 0 is the scene above; region r > 0 gives each class the signature of
another (a fixed permutation per region: the radiometry, row pattern and point
targets move together) and is imaged by a sensor with its own noise floor
(NESZ) in both channels, the cue that tells the regions apart. A model must
keep one mapping per region: knowledge, which is what experts add.
"""

from __future__ import annotations

import numpy as np

from .classes import ClassList
from .synth import river_band
from .synth import smooth_noise as _smooth

HARD_CLASS_NAMES: tuple[str, ...] = (
    "calm_water", "rough_water", "dense_urban", "suburban", "forest",
    "wetland", "cropland", "grassland", "bare_soil", "sand",
)
HARD_CLASSES = ClassList.of(HARD_CLASS_NAMES, ("#1f4e9c", "#5b8fd1", "#b2182b", "#ef8a62", "#1b7837",
                                               "#66c2a5", "#e6c84f", "#a6d96a", "#bf9b6a", "#f2e3b5"))
"""The hard preset's classes.json: names and colours."""


# class -> (VV sigma0 dB, VV - VH dB, looks, K-texture order nu (0 = none), row pattern amplitude dB)
_RADIOMETRY: dict[int, tuple[float, float, int, float, float]] = {
    0: (-21.0, 7.0, 4, 0.0, 0.0),   # calm water: specular
    1: (-16.0, 9.0, 4, 3.0, 0.0),   # rough water: wind texture (heavy tail), like bare soil otherwise
    2: (-3.0, 6.0, 4, 1.5, 0.0),    # dense urban: double bounce, many point targets
    3: (-6.0, 6.0, 4, 4.0, 0.0),    # suburban: fewer point targets
    4: (-8.5, 5.5, 4, 0.0, 0.0),    # forest: volume scattering (strong cross-pol)
    5: (-8.5, 9.5, 4, 0.0, 0.0),    # wetland: flooded vegetation, weak cross-pol
    6: (-11.5, 7.0, 4, 0.0, 2.5),   # cropland: rows
    7: (-11.5, 7.0, 4, 0.0, 0.0),   # grassland: same level and ratio, no rows
    8: (-16.0, 9.0, 4, 0.0, 0.0),   # bare soil
    9: (-20.0, 7.5, 1, 0.0, 0.0),   # sand: single-look-like, near water's level
}
_POINT_DENSITY = {2: 0.03, 3: 0.006}  # bright point scatterers per pixel (urban classes)


def region_signatures(region: int) -> np.ndarray:
    """Which class's signature each class wears in `region`: identity in region 0, a fixed permutation after."""
    if region == 0:
        return np.arange(len(HARD_CLASS_NAMES))
    return np.random.default_rng([0x5A8, region]).permutation(len(HARD_CLASS_NAMES))


def region_noise_floor_db(region: int) -> float | None:
    """The sensor noise floor (NESZ, dB) of `region`'s scenes; region 0's sensor has none worth modelling."""
    return None if region == 0 else -31.0 + 2.0 * region


def hard_scene(rng: np.random.Generator, size: int, regions: int = 1,
               region: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One scene: (float32 (2, H, W) VV/VH linear sigma0, uint8 (H, W) class ids 0..9).

    `regions` > 1 draws the scene's region from 0..regions-1 (`region` fixes it);
    with the defaults the scene is exactly the single-region one.
    """
    if region is None and regions > 1:
        region = int(rng.integers(regions))
    region = region or 0
    wears = region_signatures(region)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    # Parcels: Voronoi cells of random sites, borders warped by smooth noise.
    sites = int(rng.integers(6, 11))
    sy, sx = rng.uniform(0, size, sites), rng.uniform(0, size, sites)
    wy = yy + 0.08 * size * _smooth(rng, size, size // 8)
    wx = xx + 0.08 * size * _smooth(rng, size, size // 8)
    cell = np.argmin((wy[None] - sy[:, None, None]) ** 2 + (wx[None] - sx[:, None, None]) ** 2, axis=0)
    land = np.array([4, 5, 6, 7, 8, 9, 3, 6, 7, 4, 5, 8])  # land-cover classes parcels draw from
    parcel_class = rng.choice(land, size=sites)
    mask = parcel_class[cell].astype(np.uint8)
    # Water: a meandering river (calm or rough) or a lake.
    water = 1 if rng.random() < 0.4 else 0
    if rng.random() < 0.7:
        mask[river_band(rng, xx, yy, shift=0.3, amp=(0.03, 0.1), period=(0.6, 1.5), half_width=(0.04, 0.09))] = water
    else:
        lake = _smooth(rng, size, size // 8)
        mask[lake > np.quantile(lake, rng.uniform(0.75, 0.88))] = water
    # Urban: one or two blocks, dense or suburban.
    for _ in range(int(rng.integers(1, 3))):
        h, w = (rng.uniform(0.15, 0.35, size=2) * size).astype(int) + 2
        y0, x0 = int(rng.integers(0, size - h + 1)), int(rng.integers(0, size - w + 1))
        mask[y0 : y0 + h, x0 : x0 + w] = 2 if rng.random() < 0.5 else 3

    vv_db = np.zeros((size, size))
    ratio_db = np.zeros((size, size))
    looks = np.zeros((size, size))
    nu = np.zeros((size, size))
    for cls in range(len(HARD_CLASS_NAMES)):
        db, ratio, n_looks, order, rows = _RADIOMETRY[int(wears[cls])]
        sel = mask == cls
        if not sel.any():
            continue
        vv_db[sel], ratio_db[sel], looks[sel], nu[sel] = db, ratio, n_looks, order
        if rows:
            # each parcel's rows have their own orientation and phase
            for c in np.unique(cell[sel]):
                a = rng.uniform(0, np.pi)
                part = sel & (cell == c)
                wave = np.sin(2 * np.pi * (xx * np.cos(a) + yy * np.sin(a)) / rng.uniform(5.0, 8.0) + rng.uniform(0, 2 * np.pi))
                vv_db[part] += rows * wave[part]
    vv_db += 0.7 * _smooth(rng, size, size // 16)  # mild within-field variation
    vv_db += rng.uniform(-1.5, 1.5)  # per-scene calibration offset
    for signature, density in _POINT_DENSITY.items():
        cls = int(np.flatnonzero(wears == signature)[0])
        points = (mask == cls) & (rng.random((size, size)) < density)
        vv_db += np.where(points, rng.uniform(8.0, 14.0, size=(size, size)), 0.0)
    vh_db = vv_db - ratio_db
    sigma0 = 10.0 ** (np.stack([vv_db, vh_db]) / 10.0)
    floor = region_noise_floor_db(region)
    if floor is not None:
        sigma0 += 10.0 ** (floor / 10.0)  # thermal noise adds power, and is speckled with the signal
    # K-distributed texture (Gamma of order nu, mean 1; shared by both channels), then speckle.
    textured = nu > 0
    tex = np.ones((size, size))
    order = np.where(textured, nu, 1.0)
    tex[textured] = rng.gamma(shape=order, scale=1.0 / order)[textured]
    speckle = rng.gamma(shape=np.broadcast_to(looks, sigma0.shape), scale=1.0 / np.broadcast_to(looks, sigma0.shape))
    return (sigma0 * tex[None] * speckle).astype(np.float32), mask
