"""A knowledge-bound synthetic SAR set: `samoe demo-data --preset codebook`.

At fixed compute per token, more experts buy memory: more facts stored, not finer
perception. This set is built so that what a model must learn is many facts, each
easy to perceive:

- a scene is 4-8 parcels (Voronoi cells of random sites, borders warped a little);
- each parcel wears one *signature* drawn from a grid of radiometric properties
  that a 16-px token carries on its own:
  VV level (dB), VV - VH ratio (dB), number of looks, and K-texture order;
- a seeded random table maps every signature to one of 16 classes, each class
  getting the same number of signatures (to within one).

`N` signatures (`--signatures`) are drawn from the grid without replacement; the
draw and the table depend on `N` and the table seed only, never on the scene
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

# The signature grid. VV levels and ratios keep VH above -30 dB, where samoe's input
# scaling clips (stages/data.py, DB_MIN), so every signature stays visible in both channels.
VV_LEVELS_DB: tuple[float, ...] = tuple(float(v) for v in range(-20, 0))  # -20 .. -1 dB, 1 dB steps
RATIOS_DB: tuple[float, ...] = tuple(float(r) for r in range(2, 10))  # 2 .. 9 dB, 1 dB steps
LOOKS: tuple[int, ...] = (1, 4, 16)
TEXTURE_ORDERS: tuple[float, ...] = (0.0, 2.0)  # 0: no texture; 2: strong K-distributed texture
GRID_SIZE = len(VV_LEVELS_DB) * len(RATIOS_DB) * len(LOOKS) * len(TEXTURE_ORDERS)
DEFAULT_SIGNATURES = 960
TABLE_SEED = 0x5C0DE


@dataclass(frozen=True)
class Signature:
    """The radiometry a parcel wears."""

    vv_db: float
    ratio_db: float
    looks: int
    texture: float


@dataclass(frozen=True)
class Codebook:
    """N signatures and the class each one means."""

    signatures: tuple[Signature, ...]
    classes: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.signatures)


@lru_cache(maxsize=8)
def codebook(n: int = DEFAULT_SIGNATURES, table_seed: int = TABLE_SEED) -> Codebook:
    """The first `n` signatures of a seeded shuffle of the grid, and a balanced random class for each.

    Seeded by `table_seed` alone: the same (n, table_seed) gives the same table on any machine.
    """
    if not 1 <= n <= GRID_SIZE:
        raise ValueError(f"signatures must be between 1 and {GRID_SIZE} (the grid's size), got {n}")
    rng = np.random.default_rng([table_seed, n])
    cells = rng.permutation(GRID_SIZE)[:n]
    shape = (len(VV_LEVELS_DB), len(RATIOS_DB), len(LOOKS), len(TEXTURE_ORDERS))
    sigs = []
    for cell in cells:
        i, j, k, t = np.unravel_index(int(cell), shape)
        sigs.append(Signature(VV_LEVELS_DB[i], RATIOS_DB[j], LOOKS[k], TEXTURE_ORDERS[t]))
    classes = rng.permutation(np.arange(n) % NUM_CLASSES)  # every class gets n // 16 or n // 16 + 1 signatures
    return Codebook(tuple(sigs), tuple(int(c) for c in classes))


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


def codebook_scene(rng: np.random.Generator, size: int, signatures: int = DEFAULT_SIGNATURES,
                   table_seed: int = TABLE_SEED) -> tuple[np.ndarray, np.ndarray]:
    """One scene: (float32 (2, H, W) VV/VH linear sigma0, uint8 (H, W) class ids 0..15).

    Each parcel draws its signature uniformly from the codebook (`codebook_layout`); its pixels get that
    signature's statistics and its mask the signature's class.
    """
    book = codebook(signatures, table_seed)
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
