"""A knowledge-bound synthetic SAR set: `samoe demo-data --preset codebook`.

At fixed compute per token, more experts buy memory: more facts stored, not finer
perception. This set is built so that what a model must learn is many facts, each
easy to perceive:

- a scene is 4-8 parcels (Voronoi cells of random sites, borders warped a little);
- each parcel wears one *signature* drawn from a grid of radiometric properties
  that a 16-px token carries on its own:
  VV level (dB), VV - VH ratio (dB), number of looks, and K-texture order
  (`--grid`: `fine`, the default, clean 0.25 dB steps; or `coarse`, see GRIDS);
- a seeded random table maps every signature to one of 16 classes, each class
  getting the same number of signatures (to within one).

`N` signatures (`--signatures`) are drawn from the grid without replacement; the
draw and the table depend on `N`, the grid and the table seed only, never on the scene
seed, so a training set and a test set made with other `--seed`s share the same
facts. With N small a tiny model holds the whole table; as N grows it runs out
of room first and a larger layout pulls ahead (`benchmarks/capacity.py` finds
the N where that happens).

Pixels are linear sigma0 (VV, VH): `level * texture * speckle`, texture a Gamma
field of order nu and mean 1 shared by both channels (none where nu = 0), speckle
an independent Gamma(L, 1/L) per channel. There is no calibration offset and no
within-parcel trend: telling signatures apart is meant to be easy, knowing what
each one means is the task.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from .classes import ClassList
from .synth import smooth_noise

NUM_CLASSES = 16
CODEBOOK_CLASS_NAMES: tuple[str, ...] = tuple(f"cover_{c:02d}" for c in range(NUM_CLASSES))
CODEBOOK_CLASSES = ClassList.of(CODEBOOK_CLASS_NAMES)  # classes.json of the preset (matplotlib's tab20 colours)

@dataclass(frozen=True)
class Signature:
    """The radiometry a parcel wears."""

    vv_db: float
    ratio_db: float
    looks: int
    texture: float


def _steps(low: float, high: float, step: float) -> tuple[float, ...]:
    return tuple(float(v) for v in np.round(np.arange(low, high + step / 2, step), 6))


@dataclass(frozen=True)
class Grid:
    """The signatures a codebook draws from: every combination of these values, in C order.

    VV levels and ratios keep VH above -30 dB, where samoe's input scaling clips (stages/data.py, DB_MIN), so every
    signature stays visible in both channels. `seed_tag` enters the table's seed, so two grids never share a table
    by accident."""

    vv_db: tuple[float, ...]
    ratios_db: tuple[float, ...]
    looks: tuple[int, ...]
    textures: tuple[float, ...]  # K-texture orders; 0: no texture
    default_signatures: int
    seed_tag: tuple[int, ...] = ()

    @property
    def size(self) -> int:
        return len(self.vv_db) * len(self.ratios_db) * len(self.looks) * len(self.textures)

    def signature(self, cell: int) -> Signature:
        i, j, k, t = np.unravel_index(cell, (len(self.vv_db), len(self.ratios_db), len(self.looks), len(self.textures)))
        return Signature(self.vv_db[i], self.ratios_db[j], self.looks[k], self.textures[t])


GRIDS: dict[str, Grid] = {
    # clean and fine: 0.25 dB steps, 16 looks, no texture. A 16-px token tells its cells apart, and 2233 of them
    # are more facts than the tiny layout holds: at N = 2200 the token tier's 8-group layout beat tiny by +0.22
    # mIoU (docs/growth-experiments.md, 2026-12-07)
    "fine": Grid(_steps(-20, -1, 0.25), _steps(2, 9, 0.25), (16,), (0.0,), 2200, (1,)),
    # the first grid: 1 dB steps, looks {1, 4, 16}, texture {none, strong}. Speckle and texture blur its cells, so
    # what limits a model on it is telling them apart, not storing the table: tiny and the 8-group layout tie at N = 960
    "coarse": Grid(_steps(-20, -1, 1), _steps(2, 9, 1), (1, 4, 16), (0.0, 2.0), 960),
}
DEFAULT_GRID = "fine"
TABLE_SEED = 0x5C0DE


@dataclass(frozen=True)
class Codebook:
    """N signatures and the class each one means."""

    signatures: tuple[Signature, ...]
    classes: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.signatures)


def grid_named(name: str) -> Grid:
    if name not in GRIDS:
        raise ValueError(f"unknown codebook grid {name!r}: choose {' or '.join(GRIDS)}")
    return GRIDS[name]


@lru_cache(maxsize=8)
def codebook(n: int | None = None, table_seed: int = TABLE_SEED, grid: str = DEFAULT_GRID) -> Codebook:
    """The first `n` signatures (default: the grid's default) of a seeded shuffle of the grid, and a balanced
    random class for each.

    Seeded by `table_seed`, `n` and the grid alone: the same arguments give the same table on any machine.
    """
    g = grid_named(grid)
    n = g.default_signatures if n is None else n
    if not 1 <= n <= g.size:
        raise ValueError(f"signatures must be between 1 and {g.size} (the {grid} grid's size), got {n}")
    rng = np.random.default_rng([table_seed, n, *g.seed_tag])
    cells = rng.permutation(g.size)[:n]
    sigs = tuple(g.signature(int(cell)) for cell in cells)
    classes = rng.permutation(np.arange(n) % NUM_CLASSES)  # every class gets n // 16 or n // 16 + 1 signatures
    return Codebook(sigs, tuple(int(c) for c in classes))


def parcels(rng: np.random.Generator, size: int, low: int = 4, high: int = 8) -> np.ndarray:
    """(H, W) int cell ids 0..P-1 of a Voronoi partition into P in [low, high] parcels, borders warped by smooth noise."""
    sites = int(rng.integers(low, high + 1))
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    sy, sx = rng.uniform(0, size, sites), rng.uniform(0, size, sites)
    wy = yy + 0.05 * size * smooth_noise(rng, size, size // 8)
    wx = xx + 0.05 * size * smooth_noise(rng, size, size // 8)
    return np.argmin((wy[None] - sy[:, None, None]) ** 2 + (wx[None] - sx[:, None, None]) ** 2, axis=0)


def codebook_layout(rng: np.random.Generator, size: int, book: Codebook) -> tuple[np.ndarray, np.ndarray]:
    """The parcels of a scene and the signature each wears: (H, W) parcel ids, (P,) indices into `book`."""
    cell = parcels(rng, size)
    return cell, rng.integers(len(book), size=int(cell.max()) + 1)


def codebook_scene(rng: np.random.Generator, size: int, signatures: int | None = None,
                   table_seed: int = TABLE_SEED, grid: str = DEFAULT_GRID) -> tuple[np.ndarray, np.ndarray]:
    """One scene: (float32 (2, H, W) VV/VH linear sigma0, uint8 (H, W) class ids 0..15).

    Each parcel draws its signature uniformly from the codebook (`codebook_layout`); its pixels get that
    signature's statistics and its mask the signature's class.
    """
    book = codebook(signatures, table_seed, grid)
    cell, chosen = codebook_layout(rng, size, book)
    sig = [book.signatures[i] for i in chosen]
    mask = np.asarray([book.classes[i] for i in chosen], dtype=np.uint8)[cell]
    vv_db = np.asarray([s.vv_db for s in sig])[cell]
    ratio_db = np.asarray([s.ratio_db for s in sig])[cell]
    looks = np.asarray([s.looks for s in sig], dtype=np.float64)[cell]
    nu = np.asarray([s.texture for s in sig])[cell]
    sigma0 = 10.0 ** (np.stack([vv_db, vv_db - ratio_db]) / 10.0)
    textured = nu > 0
    tex = np.ones((size, size))
    order = np.where(textured, nu, 1.0)
    tex[textured] = rng.gamma(shape=order, scale=1.0 / order)[textured]
    shape = np.broadcast_to(looks, sigma0.shape)
    speckle = rng.gamma(shape=shape, scale=1.0 / shape)
    return (sigma0 * tex[None] * speckle).astype(np.float32), mask
