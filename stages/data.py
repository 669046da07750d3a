"""SAR image/mask folders, demo data, pseudo-labels, and the targets made from masks.

Everything the training stages read goes through this module, so the on-disk
conventions and the pixel normalisation live in one place.

On-disk layout
--------------
A *folder* is a directory with ``images/`` and, when labelled, ``masks/``::

    root/images/<stem>.tif|.tiff|.png    SAR image (see "Images" below); any size
    root/masks/<stem>.png|.tif           class ids, one 8- or 16-bit band; the ignore value
                                         (255 unless classes.json says otherwise) = unlabelled
    root/confidence/<stem>.tif           pseudo-labels only: float32 HxW in [0, 1]
    root/classes.json                    optional: class names, colours, ignore value (stages/classes.py)
    root/data.json                       optional: input scale and polarisations (stages/units.py)

classes.json and data.json may also sit beside the folders (in their parent),
one file for A/, A-test/ and B/. ``make_demo_data(out)`` writes ``out/A``
(labelled), ``out/A-test`` (held-out labelled) and ``out/B`` (images only), plus
``out/demo-data.json`` (the summary), ``out/classes.json`` and ``out/data.json``.

Images
------
* 1 or 2 bands (VV[, VH], or HH[, HV]: ``--polarisations``), stored as GeoTIFF,
  TIFF or PNG and read with rasterio (stages/rasters.py): tiled and striped TIFFs
  by windows, PNGs whole. Multi-page TIFF stacks (HxWxC pages) are read with
  tifffile. The demo data is written as float32 ``(2, H, W)`` (planar, one page).
* the values' unit is declared, not guessed (``--input-scale`` or data.json;
  stages/units.py): linear power (the default), dB, amplitude, calibrated DN,
  or ``display`` for 8/16-bit quick-looks whose integer range spans -30..+5 dB.
  Values that contradict the declared unit are refused.
* scenes may be larger than the model's window: training reads a random window
  of each scene per epoch (``window=``), evaluation and prediction slide windows
  over whole scenes (stages/predict.py). ``--resize`` squashes scenes instead.
  Pixels a GeoTIFF marks as nodata (or NaN) enter the model as 0 (the pad value)
  and are ignored by the losses and metrics.

Normalisation (``sar_to_input``), fixed constants, no dataset statistics, so
that pseudo-labelling B, training on A and evaluating on A-test see exactly
the same mapping and nothing has to be computed or stored first::

    db = to_db(x, units)                             # stages/units.py; linear: 10 * log10(max(x, 1e-6))
    u  = (clip(db, DB_MIN, DB_MAX) - DB_MIN) / (DB_MAX - DB_MIN)   # [-30, +5] dB -> [0, 1]
    ratio_db = (u_vv - u_vh) * (DB_MAX - DB_MIN)     # VV - VH in dB (of the clipped values)
    u_ratio  = clip((ratio_db - RATIO_DB_MIN) / (RATIO_DB_MAX - RATIO_DB_MIN), 0, 1)  # [-5, 20] dB
    out = (u - NORM_MEAN) / NORM_STD                 # 0.5 and 0.25 for every channel: [0,1] -> [-2, 2]

(``display`` quick-looks: u = x / dtype max, no log.) Channels: one channel ->
(u, u, u); two channels -> (u_vv, u_vh, u_ratio). The result is float32
``(3, H, W)`` and already standardised: the model must not normalise it again
(SAM's ImageNet pixel mean/std do not apply to SAR).

Targets (numpy, scipy)
----------------------
``boundary_target`` marks pixels within ``radius`` (Euclidean) of a class
change; ``sdf_target`` gives one-vs-rest normalised signed distances from an
exact Euclidean distance transform (scipy.ndimage). See
their docstrings for the precise formulas.

Validation
----------
Folder datasets check everything they can at construction and raise
``DataError`` (a ``ValueError`` and a ``SamoeError``: the CLI prints it as one
line and exits 2). Masks (and confidence maps) are read at construction, by
bands of rows, to check sizes and class ids: a bad label found at step 40 000
of a run costs far more than the scan. Images are checked from their headers
(shape, bands) and a sample of the first few for their unit; a file whose pixel
data is corrupt behind a valid header raises ``DataError`` when it is read.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import tifffile
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

from .classes import CLASSES_JSON, IGNORE_INDEX, ClassList, write_classes
from .rasters import DataError, RASTER_SUFFIXES, Raster, channels_first, check_memory, open_raster
from .synth import river_band, smooth_noise
from .units import DATA_JSON, Units, check_bands, check_plausible, to_db

__all__ = [
    "CLASS_NAMES",
    "ConcatFolders",
    "DB_MAX",
    "DB_MIN",
    "DEMO_CLASSES",
    "DataError",
    "IGNORE_INDEX",
    "IMAGE_SUFFIXES",
    "LabelledFolder",
    "NORM_MEAN",
    "NORM_STD",
    "PseudoLabelFolder",
    "RATIO_DB_MAX",
    "RATIO_DB_MIN",
    "UnlabelledFolder",
    "boundary_target",
    "distance_transform",
    "load_images",
    "make_demo_data",
    "read_confidence",
    "read_image",
    "read_mask",
    "sar_to_input",
    "sdf_target",
    "to_model_input",
    "squared_distance_transform",
    "write_confidence",
    "write_image",
    "write_mask",
]

# --------------------------------------------------------------------------- constants

CLASS_NAMES: tuple[str, ...] = ("water", "urban", "vegetation", "bare_soil")
"""Class ids of the easy demo data, in order (0..3)."""

DEMO_CLASSES = ClassList.of(CLASS_NAMES, ("#1f5fbf", "#d62728", "#2ca02c", "#c9a66b"))
"""The easy demo preset's classes.json: names and colours."""

IMAGE_SUFFIXES: tuple[str, ...] = RASTER_SUFFIXES
SAMPLED_IMAGES = 8  # images of a folder whose values are checked against the declared unit

DB_MIN, DB_MAX = -30.0, 5.0
"""Clip range of sigma0 in dB: below -30 dB is the noise floor of C-band
sensors; above +5 dB is only strong point targets, which would otherwise
compress everything else into a few grey levels."""

RATIO_DB_MIN, RATIO_DB_MAX = -5.0, 20.0
"""Range of the VV - VH ratio in dB: typical land covers sit at 5-10 dB and
4-look speckle spreads single pixels by about +-10 dB around that."""

NORM_MEAN, NORM_STD = 0.5, 0.25
"""Fixed standardisation of every [0, 1] channel: maps it to [-2, 2]."""


# Demo scene model: class -> (VV sigma0 dB, VV - VH dB).
_DEMO_SIGMA0_DB: dict[int, tuple[float, float]] = {
    0: (-20.0, 6.0),  # water: specular, very dark
    1: (0.0, 8.0),  # urban: double bounce, bright, weak cross-pol
    2: (-8.0, 6.0),  # vegetation: volume scattering, strong cross-pol
    3: (-13.0, 8.0),  # bare soil: surface scattering
}
_DEMO_LOOKS = 4  # speckle: Gamma(L, 1/L), mean 1
_SPLITS: tuple[tuple[str, str, int, bool], ...] = (
    # (directory, file-stem prefix, seed stream, masks written)
    ("A", "a", 0, True),
    ("A-test", "t", 1, True),
    ("B", "b", 2, False),
)


# --------------------------------------------------------------------------- file I/O


def write_image(path: Path, image: np.ndarray) -> None:
    """Write a SAR image as an uncompressed TIFF with no timestamp or software tag.

    ``(C, H, W)`` arrays with C > 1 are written planar (one page, C samples), so
    they read back as ``(C, H, W)``. Byte-identical for identical arrays.
    """
    image = np.ascontiguousarray(image)
    extra: dict[str, Any] = {"planarconfig": "separate"} if image.ndim == 3 and image.shape[0] > 1 else {}
    tifffile.imwrite(path, image, photometric="minisblack", metadata=None, software=False, **extra)


def write_mask(path: Path, mask: np.ndarray) -> None:
    """Write class ids as a grey PNG: 8-bit when all ids fit, else 16-bit."""
    mask = np.asarray(mask)
    if mask.ndim != 2 or mask.size and (mask.min() < 0 or mask.max() > 65535):
        raise DataError(f"mask for {path} must be 2-D with ids in [0, 65535]: fix the array before writing")
    dtype = np.uint8 if mask.size == 0 or mask.max() <= 255 else np.uint16
    Image.fromarray(np.ascontiguousarray(mask.astype(dtype))).save(path, format="PNG")


def write_confidence(path: Path, confidence: np.ndarray) -> None:
    """Write a pseudo-label confidence map (float32 HxW in [0, 1]) as TIFF."""
    confidence = np.asarray(confidence, dtype=np.float32)
    if confidence.ndim != 2 or not np.all(np.isfinite(confidence)) or confidence.min(initial=0) < 0 or confidence.max(initial=0) > 1:
        raise DataError(f"confidence for {path} must be a finite 2-D array in [0, 1]: clip it before writing")
    write_image(path, confidence)


def read_image(path: Path) -> np.ndarray:
    """Read a SAR image file (TIFF or PNG) whole, as stored ((C, H, W)), raising ``DataError`` if unreadable.

    Bounded by the image memory budget (stages/rasters.py), checked from the header before decoding.
    """
    with open_raster(path) as r:
        c, h, w = r.image_shape()
        check_memory(c * h * w * r.dtype.itemsize, path, "image", "decoding it whole")
        return np.array(r.read())


def read_mask(path: Path) -> np.ndarray:
    """Read a class-id mask (PNG or TIFF, one integer band) whole as a 2-D integer array."""
    with open_raster(path, "mask") as r:
        h, w = r.mask_shape()
        check_memory(h * w * r.dtype.itemsize, path, "mask", "decoding it whole")
        arr = np.array(r.read()[0])
    if arr.min(initial=0) < 0:
        raise DataError(f"mask {path} has negative class ids: save class ids as unsigned integers")
    return arr


def read_confidence(path: Path, rows: tuple[int, int] | None = None, cols: tuple[int, int] | None = None) -> np.ndarray:
    """Read a pseudo-label confidence TIFF (or its window `rows` x `cols`) as float32 HxW in [0, 1]."""
    with open_raster(path, "confidence map") as r:
        if r.count != 1:
            raise DataError(f"confidence map {path} has shape {r.shape}: expected H x W float32 in [0, 1]")
        (y0, y1), (x0, x1) = rows or (0, r.height), cols or (0, r.width)
        arr = np.asarray(r.read(y0, y1, x0, x1)[0], dtype=np.float32)
    if not np.all(np.isfinite(arr)) or arr.min(initial=0) < 0 or arr.max(initial=0) > 1:
        raise DataError(f"confidence map {path} has values outside [0, 1] or NaN: re-run pseudo-labelling")
    return arr


# --------------------------------------------------------------------------- normalisation


def sar_to_input(img: np.ndarray, units: Units | None = None) -> np.ndarray:
    """Map a 1- or 2-channel SAR image to the model's float32 (3, H, W) input.

    Args:
        img: HxW, CxHxW or HxWxC with C in {1, 2}; two channels are (VV, VH).
        units: what the values are (stages/units.py); default linear power, except that integer
            images without declared units are display-scaled quick-looks, as before units existed.

    Returns:
        float32 (3, H, W), standardised with the fixed constants of this
        module (see the module docstring for the formula).
    """
    img = np.asarray(img)
    if img.dtype == np.bool_ or not (np.issubdtype(img.dtype, np.integer) or np.issubdtype(img.dtype, np.floating)):
        raise DataError(f"image dtype {img.dtype} is not supported: use float (linear power) or uint8/uint16")
    chw = channels_first(img)
    if units is None:
        units = Units("display" if np.issubdtype(chw.dtype, np.integer) else "linear")
    if units.scale == "display":
        if not np.issubdtype(chw.dtype, np.integer):
            raise DataError(f"--input-scale display means 8/16-bit integer quick-looks, not {chw.dtype} values")
        # Already scaled: the dtype's range stands for the [DB_MIN, DB_MAX] dB range.
        u = np.clip(chw.astype(np.float64) / float(np.iinfo(chw.dtype).max), 0.0, 1.0)
    else:
        u = (np.clip(to_db(chw, units), DB_MIN, DB_MAX) - DB_MIN) / (DB_MAX - DB_MIN)
    if u.shape[0] == 1:
        out = np.repeat(u, 3, axis=0)
    else:
        ratio_db = (u[0] - u[1]) * (DB_MAX - DB_MIN)
        ratio = np.clip((ratio_db - RATIO_DB_MIN) / (RATIO_DB_MAX - RATIO_DB_MIN), 0.0, 1.0)
        out = np.stack([u[0], u[1], ratio])
    return ((out - NORM_MEAN) / NORM_STD).astype(np.float32)


def to_model_input(raw: np.ndarray, units: Units, valid: np.ndarray | None = None) -> np.ndarray:
    """`sar_to_input` of a (C, H, W) read, with pixels that hold no data (`valid` False) set to 0, the pad value."""
    out = sar_to_input(raw, units)
    if valid is not None and not valid.all():
        out[:, ~valid] = 0.0
    return out


# --------------------------------------------------------------------------- distance transforms


def squared_distance_transform(features: np.ndarray) -> np.ndarray:
    """Exact squared Euclidean distance from every pixel to the nearest True pixel.

    Args:
        features: bool array (..., H, W); leading axes are independent images.

    Returns:
        float64 array of the same shape holding integer squared distances
        (0 on True pixels), ``inf`` in images with no True pixel. Each image is
        scipy's exact Euclidean distance transform (``ndimage.distance_transform_edt``).
    """
    from scipy import ndimage

    features = np.asarray(features, dtype=bool)
    if features.ndim < 2:
        raise ValueError(f"features must be at least 2-D (..., H, W), got shape {features.shape}")
    h, w = features.shape[-2:]
    flat = features.reshape(-1, h, w)
    out = np.full(flat.shape, np.inf)
    for i, f in enumerate(flat):
        if f.any():
            d = ndimage.distance_transform_edt(~f)
            out[i] = np.rint(d * d)  # squared distances are integers (< 2**52: exact in float64)
    return out.reshape(features.shape)


def distance_transform(features: np.ndarray) -> np.ndarray:
    """Exact Euclidean distance to the nearest True pixel (see ``squared_distance_transform``)."""
    return np.sqrt(squared_distance_transform(features))


# --------------------------------------------------------------------------- targets


def boundary_target(mask: np.ndarray, radius: int = 2, ignore_index: int = IGNORE_INDEX) -> np.ndarray:
    """Pixels within ``radius`` of a class change, as uint8 HxW (1 = boundary).

    An *edge* pixel is a labelled pixel with a 4-neighbour that is labelled
    with a different class (both sides of a change are edges). The target is
    1 where the Euclidean distance to the nearest edge pixel is <= ``radius``
    (a dilation by a disk), 0 elsewhere. Ignore pixels never create edges,
    though they may lie within ``radius`` of one. A single-class mask gives
    all zeros.
    """
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask must be H x W, got shape {mask.shape}")
    if radius < 0:
        raise ValueError(f"radius must be >= 0, got {radius}")
    valid = mask != ignore_index
    edge = np.zeros(mask.shape, dtype=bool)
    for axis in (0, 1):
        a = [slice(None)] * 2
        b = [slice(None)] * 2
        a[axis], b[axis] = slice(1, None), slice(None, -1)
        change = (mask[tuple(a)] != mask[tuple(b)]) & valid[tuple(a)] & valid[tuple(b)]
        edge[tuple(a)] |= change
        edge[tuple(b)] |= change
    if not edge.any():
        return np.zeros(mask.shape, dtype=np.uint8)
    if radius > 8:
        return (squared_distance_transform(edge) <= radius * radius).astype(np.uint8)
    # Small disks: OR of the shifted edge map, one shift per disk offset.
    h, w = mask.shape
    out = np.zeros_like(edge)
    for dy in range(-radius, radius + 1):
        for dx in range(-radius, radius + 1):
            if dy * dy + dx * dx <= radius * radius:
                out[max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] |= edge[
                    max(-dy, 0) : h + min(-dy, 0), max(-dx, 0) : w + min(-dx, 0)
                ]
    return out.astype(np.uint8)


def sdf_target(mask: np.ndarray, num_classes: int) -> np.ndarray:
    """One-vs-rest normalised signed distance per class, float32 (C, H, W).

    For class c, with "inside" the pixels labelled c and "outside" all others
    (ignore pixels included), and distances between pixel centres within the
    image (the image border is not a boundary)::

        d_out(p) = distance from p to the nearest outside pixel   (>= 1 inside)
        d_in(p)  = distance from p to the nearest inside pixel    (>= 1 outside)
        inside:  sdf = (d_out - 1) / M,  M = max over inside of (d_out - 1), or 1 if that is 0
        outside: sdf = -d_in / N,        N = max over outside of d_in

    So sdf is 0 on the inner boundary, +1 at the deepest inside pixel, -1 at
    the farthest outside pixel, and ``sdf >= 0`` exactly on class pixels. An
    absent class is -1 everywhere; a class covering the whole image is +1
    everywhere. Never NaN or Inf.
    """
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask must be H x W, got shape {mask.shape}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    sdf = np.full((num_classes, *mask.shape), -1.0, dtype=np.float32)  # absent classes
    ids = np.unique(mask)
    present = ids[ids < num_classes].astype(np.int64)
    inside = mask[None] == present.reshape(-1, 1, 1)
    whole = inside.all(axis=(1, 2))
    sdf[present[whole]] = 1.0
    inside = inside[~whole]  # classes with inside and outside pixels: only these need distances
    if len(inside):
        d = distance_transform(np.concatenate([~inside, inside]))
        d_out, d_in = d[: len(inside)], d[len(inside) :]
        inner = np.where(inside, d_out - 1.0, 0.0)
        outer = np.where(~inside, d_in, 0.0)
        m = inner.max(axis=(1, 2), initial=0.0)
        n = outer.max(axis=(1, 2), initial=0.0)
        m = np.where(m > 0, m, 1.0)[:, None, None]
        n = np.where(n > 0, n, 1.0)[:, None, None]
        sdf[present[~whole]] = np.where(inside, inner / m, -outer / n)
    return sdf.astype(np.float32)


# --------------------------------------------------------------------------- folder datasets


def _as_size(size: int | Sequence[int] | None) -> tuple[int, int] | None:
    if size is None:
        return None
    if isinstance(size, int):
        size = (size, size)
    size = tuple(int(s) for s in size)
    if len(size) != 2 or min(size) < 1:
        raise DataError(f"size must be a positive int or (height, width), got {size!r}")
    return size  # type: ignore[return-value]


def _list_images(root: Path) -> dict[str, Path]:
    """Map stem -> image path in ``root/images``, checking that the folder is usable."""
    if not root.is_dir():
        raise DataError(f"data folder {root} does not exist: pass a folder containing images/")
    images = root / "images"
    if not images.is_dir():
        raise DataError(f"{root} has no images/ folder: put the SAR images in {images}/")
    found: dict[str, Path] = {}
    for p in sorted(images.iterdir()):
        if p.name.startswith(".") or not p.is_file() or p.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        if p.stem in found:
            raise DataError(f"{found[p.stem]} and {p} share the name {p.stem!r}: keep one of them")
        found[p.stem] = p
    if not found:
        raise DataError(f"{images} holds no .tif/.tiff/.png images: add images or point to another folder")
    return found


def _find_masks(root: Path, stems: Sequence[str], sub: str = "masks") -> dict[str, Path]:
    masks = root / sub
    if not masks.is_dir():
        raise DataError(f"{root} has no {sub}/ folder: put one <name>.png (or .tif) mask per image in {masks}/")
    found: dict[str, Path] = {}
    for p in sorted(masks.iterdir()):
        if p.name.startswith(".") or p.suffix.lower() not in IMAGE_SUFFIXES or not p.is_file():
            continue
        if p.stem in found:
            raise DataError(f"{found[p.stem]} and {p} are masks of the same image {p.stem!r}: keep one of them")
        found[p.stem] = p
    for stem in stems:
        if stem not in found:
            raise DataError(f"image {stem!r} in {root / 'images'} has no mask {masks / (stem + '.png')}: add it or remove the image")
    orphans = sorted(set(found) - set(stems))
    if orphans:
        raise DataError(f"mask {found[orphans[0]]} has no image in {root / 'images'}: add the image or remove the mask")
    return found


BAND_BYTES = 64 * 1024**2  # rows of a mask read at once while checking it


def _check_mask(path: Path, hw: tuple[int, int], num_classes: int, ignore_index: int,
                on_band: Callable[[int, np.ndarray], None] | None = None) -> None:
    """Check a mask's size and class ids, reading it by bands of rows (`on_band(y0, rows)` sees each band)."""
    with open_raster(path, "mask") as r:
        shape = r.mask_shape()
        if shape != hw:
            raise DataError(f"mask {path} is {shape[0]}x{shape[1]} but its image is {hw[0]}x{hw[1]}: regenerate the mask at the image size")
        step = max(1, BAND_BYTES // max(1, r.width * r.dtype.itemsize))
        ids: set[int] = set()
        for y0 in range(0, r.height, step):
            band = r.read(y0, min(r.height, y0 + step))[0]
            ids.update(np.unique(band).tolist())
            if on_band is not None:
                on_band(y0, band)
    if min(ids, default=0) < 0:
        raise DataError(f"mask {path} has negative class ids: save class ids as unsigned integers")
    bad = sorted(i for i in ids if i >= num_classes and i != ignore_index)
    if bad:
        raise DataError(
            f"mask {path} has class id(s) {bad[:5]} >= num_classes={num_classes} "
            f"(ignore is {ignore_index}): fix the mask or raise num_classes"
        )


def _resize(t: torch.Tensor, size: tuple[int, int] | None, mode: str) -> torch.Tensor:
    """Resize a (C, H, W) tensor; bilinear (antialiased) for images, nearest-exact for labels."""
    if size is None or tuple(t.shape[-2:]) == size:
        return t
    if mode == "bilinear":
        return F.interpolate(t[None], size=size, mode="bilinear", align_corners=False, antialias=True)[0]
    return F.interpolate(t[None].float(), size=size, mode="nearest-exact")[0].to(t.dtype)


def _pad(a: np.ndarray, size: int, value: float) -> np.ndarray:
    """(..., h, w) -> (..., size, size), `value` past the bottom and right edges."""
    h, w = a.shape[-2:]
    if (h, w) == (size, size):
        return a
    out = np.full((*a.shape[:-2], size, size), value, dtype=a.dtype)
    out[..., :h, :w] = a
    return out


@dataclass(frozen=True)
class _Item:
    name: str
    image: Path
    mask: Path | None = None
    confidence: Path | None = None


@dataclass(frozen=True)
class _Region:
    """The part of a scene an item reads: rows [y, y + rows) x columns [x, x + cols), padded to `pad` when given."""

    y: int
    x: int
    rows: int
    cols: int
    pad: int | None = None


class UnlabelledFolder(Dataset):
    """Images of ``root/images/`` for unsupervised steps, pseudo-labelling and `expand --verify`.

    Args:
        root (Path): folder with an ``images/`` subfolder.
        size (int | tuple[int, int] | None): resize every image to this
            (height, width), bilinearly (``--resize``); None keeps the stored size.
        window (int | None): items are a `window` x `window` window of each scene, at an offset
            drawn from (seed, epoch, index) (`set_epoch`), so a run resumes with the same windows;
            scenes smaller than the window are padded with 0 (and ignore in masks).
        units (Units | None): what the pixel values are; None: the folder's data.json, else linear.
            The first images' values are checked against it (`stages.units.check_plausible`).

    Items: ``dict(image=float32 (3, H, W), name=str)``, in sorted file order.
    """

    def __init__(self, root: str | Path, size: int | Sequence[int] | None = None, window: int | None = None,
                 units: Units | None = None) -> None:
        from .units import resolve_units

        self.root = Path(root)
        self.size = _as_size(size)
        if window is not None and (window < 1 or self.size is not None):
            raise DataError("give a dataset a size (resize) or a window (crop), not both")
        self.window = window
        self.units = units if units is not None else resolve_units(self.root)
        self.items: list[_Item] = []
        self._hw: dict[str, tuple[int, int]] = {}
        self.seed, self.epoch = 0, 0
        for i, (stem, path) in enumerate(_list_images(self.root).items()):
            with open_raster(path) as r:
                count, h, w = r.image_shape()
                check_bands(count, self.units, f"image {path}")
                if i < SAMPLED_IMAGES:
                    check_plausible(r.sample(), r.dtype, self.units, f"image {path}")
            self._hw[stem] = (h, w)
            self.items.append(_Item(stem, path))

    def __len__(self) -> int:
        return len(self.items)

    @property
    def names(self) -> list[str]:
        return [it.name for it in self.items]

    def scene_size(self, i: int) -> tuple[int, int]:
        """(height, width) of item i's scene as stored."""
        return self._hw[self.items[i].name]

    def set_epoch(self, seed: int, epoch: int) -> None:
        """The windows items read from here on: those of (seed, epoch) (the training loader calls this)."""
        self.seed, self.epoch = seed, epoch

    def _region(self, index: int) -> _Region | None:
        """Where item `index` reads its window (None: the whole scene)."""
        if self.window is None:
            return None
        h, w = self._hw[self.items[index].name]
        win = self.window
        rng = np.random.default_rng([self.seed, self.epoch, index])
        y = int(rng.integers(0, h - win + 1)) if h > win else 0
        x = int(rng.integers(0, w - win + 1)) if w > win else 0
        return _Region(y, x, min(win, h), min(win, w), win)

    def _read(self, path: Path, region: _Region | None, what: str) -> tuple[Raster, np.ndarray]:
        r = open_raster(path, what)
        try:
            if region is None:
                check_memory(r.count * r.height * r.width * 24, path, what, "converting it whole")
                return r, r.read()
            return r, r.read(region.y, region.y + region.rows, region.x, region.x + region.cols)
        except BaseException:
            r.close()
            raise

    def _load_image(self, item: _Item, region: _Region | None) -> tuple[torch.Tensor, np.ndarray]:
        """The model input of an item and its (H, W) map of pixels with data (False where padded)."""
        r, raw = self._read(item.image, region, "image")
        with r:
            valid = r.valid(values=raw) if region is None else r.valid(region.y, region.y + region.rows, region.x,
                                                                          region.x + region.cols, values=raw)
        image = to_model_input(raw, self.units, valid)
        if region is not None and region.pad is not None:
            image, valid = _pad(image, region.pad, 0.0), _pad(valid, region.pad, False)
        return _resize(torch.from_numpy(image), self.size, "bilinear"), valid

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = self.items[i]
        return {"image": self._load_image(item, self._region(i))[0], "name": item.name}


class LabelledFolder(UnlabelledFolder):
    """Images with class-id masks (``root/images/``, ``root/masks/``) for supervised steps.

    Args:
        root (Path): folder with ``images/`` and ``masks/``.
        num_classes (int): number of classes C; mask ids must be < C or ``ignore_index``.
        size (int | tuple[int, int] | None): resize image (bilinear) and mask
            (nearest) to this (height, width); targets are computed after resizing.
        ignore_index (int): mask value of unlabelled pixels (classes.json's); items carry 255 there.
        boundary_radius (int): radius of ``boundary_target``.
        cache_bytes (int): keep the targets (mask, SDF, boundary) of items up to
            this many bytes in memory. They depend only on the mask file, and the
            SDF's distance transforms cost ~40x an image read (a third of a tiny
            training step), so every epoch after the first reuses them; items
            past the budget are recomputed each time. 0 turns caching off. Items
            read a different window each epoch are never cached.
        window, units: as ``UnlabelledFolder``; pixels without data are ignored in the targets.

    Items: ``dict(image=float32 (3, H, W), mask=int64 (H, W), sdf=float32
    (C, H, W), boundary=float32 (1, H, W), name=str)``; masks hold 255 (IGNORE_INDEX) where unlabelled.
    """

    DEFAULT_CACHE_BYTES = 1024**3

    def __init__(
        self,
        root: str | Path,
        num_classes: int,
        size: int | Sequence[int] | None = None,
        ignore_index: int = IGNORE_INDEX,
        boundary_radius: int = 2,
        cache_bytes: int | None = None,
        window: int | None = None,
        units: Units | None = None,
    ) -> None:
        if num_classes < 1:
            raise DataError(f"num_classes must be >= 1, got {num_classes}")
        super().__init__(root, size, window, units)
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.boundary_radius = boundary_radius
        self.cache_bytes = self.DEFAULT_CACHE_BYTES if cache_bytes is None else cache_bytes
        self._cache: dict[str, dict[str, torch.Tensor]] = {}
        self._cached_bytes = 0
        masks = _find_masks(self.root, self.names)
        self.items = [_Item(it.name, it.image, masks[it.name]) for it in self.items]
        for it in self.items:
            _check_mask(it.mask, self._hw[it.name], num_classes, ignore_index,  # type: ignore[arg-type]
                        functools.partial(self._mask_band_checked, it))

    def _mask_band_checked(self, item: _Item, y0: int, band: np.ndarray) -> None:
        """Called with each band of rows of an item's mask, read at construction anyway (subclasses use it)."""

    def _read_mask(self, item: _Item, region: _Region | None, valid: np.ndarray) -> np.ndarray:
        """The item's class ids (int64) in `region`, 255 where unlabelled, without data or padded."""
        r, raw = self._read(item.mask, region, "mask")  # type: ignore[arg-type]
        with r:
            r.mask_shape()
        mask = raw[0].astype(np.int64)
        if self.ignore_index != IGNORE_INDEX:
            mask[mask == self.ignore_index] = IGNORE_INDEX
        if region is not None and region.pad is not None:
            mask = _pad(mask, region.pad, IGNORE_INDEX)
        mask[~valid] = IGNORE_INDEX
        return mask

    def _cacheable(self, item: _Item) -> bool:
        """Targets that are the same every epoch: the whole scene, or a window that covers it."""
        return self.window is None or max(self._hw[item.name]) <= self.window

    def _mask_targets(self, item: _Item, region: _Region | None, valid: np.ndarray) -> dict[str, torch.Tensor]:
        """mask, sdf and boundary of an item: from the cache or computed (and cached if they fit)."""
        cached = self._cache.get(item.name)
        if cached is not None:
            return _expand_targets(cached, self.num_classes)
        mask = torch.from_numpy(self._read_mask(item, region, valid))
        mask = _resize(mask[None], self.size, "nearest")[0]
        m = mask.numpy()
        targets = {
            "mask": mask,
            "sdf": torch.from_numpy(sdf_target(m, self.num_classes)),
            "boundary": torch.from_numpy(boundary_target(m, self.boundary_radius, IGNORE_INDEX)[None].astype(np.float32)),
        }
        compact = _compact_targets(targets)
        nbytes = sum(t.numel() * t.element_size() for t in compact.values())
        if self._cacheable(item) and self._cached_bytes + nbytes <= self.cache_bytes:
            self._cache[item.name] = compact
            self._cached_bytes += nbytes
        return targets

    def _targets(self, i: int) -> dict[str, Any]:
        item, region = self.items[i], self._region(i)
        image, valid = self._load_image(item, region)
        return {"image": image, **self._mask_targets(item, region, valid), "name": item.name}

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self._targets(i)


def _compact_targets(targets: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What the cache keeps of an item's targets: the mask and boundary in 8 bits (a 16-bit mask in 32), the SDF of the
    classes present only (an absent class's SDF is -1 everywhere). A tile holds a few of many classes, so
    this keeps several times more items in the same budget than the full float tensors."""
    sdf = targets["sdf"]
    present = torch.nonzero((sdf != -1).flatten(1).any(1)).flatten()
    mask = targets["mask"]
    small = mask.numel() == 0 or (mask.min() >= 0 and mask.max() <= 255)
    return {"mask": mask.to(torch.uint8 if small else torch.int32), "boundary": targets["boundary"].to(torch.uint8),
            "present": present, "sdf": sdf[present].clone()}


def _expand_targets(compact: dict[str, torch.Tensor], num_classes: int) -> dict[str, torch.Tensor]:
    """The full targets again (new tensors: callers may modify what they get)."""
    mask = compact["mask"]
    sdf = torch.full((num_classes, *mask.shape), -1.0)
    sdf[compact["present"]] = compact["sdf"]
    return {"mask": mask.long(), "sdf": sdf, "boundary": compact["boundary"].float()}


class PseudoLabelFolder(LabelledFolder):
    """Pseudo-labelled images: a ``LabelledFolder`` plus ``root/confidence/<stem>.tif``.

    Masks hold the pseudo-labels (255 = ignore, e.g. low confidence); the
    confidence maps (float32 H x W in [0, 1]) let the loss weight each pixel.
    Arguments as ``LabelledFolder``. Items add ``confidence=float32 (H, W)``,
    of the same window (or resized nearest, so each pixel keeps its own label's confidence).
    """

    def __init__(self, root: str | Path, num_classes: int, **options: Any) -> None:
        self._kept = self._total = 0.0
        super().__init__(root, num_classes, **options)
        conf_dir = self._confidence_dir()  # also for a folder without images
        self.items = [_Item(it.name, it.image, it.mask, conf_dir / f"{it.name}.tif") for it in self.items]
        # Share of the pixels' loss weight that survives (ignored pixels weigh 0, others their confidence).
        self.kept_weight = self._kept / self._total if self._total else 0.0

    def _confidence_dir(self) -> Path:
        conf_dir = self.root / "confidence"
        if not conf_dir.is_dir():
            raise DataError(f"{self.root} has no confidence/ folder: re-run pseudo-labelling into a fresh --out")
        return conf_dir

    def _mask_band_checked(self, item: _Item, y0: int, band: np.ndarray) -> None:
        """Check the item's confidence map over the mask's band and add its kept weight."""
        path = self._confidence_dir() / f"{item.name}.tif"
        if not path.is_file():
            raise DataError(f"image {item.name!r} has no confidence map {path}: re-run pseudo-labelling")
        hw = self._hw[item.name]
        with open_raster(path, "confidence map") as r:
            if (r.height, r.width) != hw:
                raise DataError(f"confidence map {path} is {r.height}x{r.width} but its image is {hw[0]}x{hw[1]}: "
                                "re-run pseudo-labelling")
        conf = read_confidence(path, (y0, y0 + band.shape[0]))
        self._kept += float(conf[band != self.ignore_index].sum(dtype=np.float64))
        self._total += conf.size

    def __getitem__(self, i: int) -> dict[str, Any]:
        item, region = self.items[i], self._region(i)
        out = self._targets(i)
        if region is None:
            conf = read_confidence(item.confidence)  # type: ignore[arg-type]
        else:
            conf = _pad(read_confidence(item.confidence, (region.y, region.y + region.rows),  # type: ignore[arg-type]
                                        (region.x, region.x + region.cols)), region.pad, 0.0)  # type: ignore[arg-type]
        out["confidence"] = _resize(torch.from_numpy(conf)[None], self.size, "nearest")[0]
        return out


class ConcatFolders(Dataset):
    """Several labelled folders as one training set, e.g. labelled data mixed into stage 1's pseudo-labels.

    When any folder is pseudo-labelled, items of the others get a confidence of 1 everywhere (true labels
    count fully), so that every batch has the same keys.
    """

    def __init__(self, folders: Sequence[LabelledFolder]) -> None:
        self.folders = list(folders)
        self.starts = np.cumsum([0] + [len(f) for f in self.folders])
        self.confidence = any(isinstance(f, PseudoLabelFolder) for f in self.folders)

    def __len__(self) -> int:
        return int(self.starts[-1])

    def set_epoch(self, seed: int, epoch: int) -> None:
        """Each folder's windows of (seed, epoch) (see `UnlabelledFolder.set_epoch`)."""
        for folder in self.folders:
            folder.set_epoch(seed, epoch)

    def __getitem__(self, i: int) -> dict[str, Any]:
        k = int(np.searchsorted(self.starts, i, side="right")) - 1
        item = self.folders[k][i - int(self.starts[k])]
        if self.confidence and "confidence" not in item:
            item["confidence"] = torch.ones(item["mask"].shape, dtype=torch.float32)
        return item


def load_images(folder: Path, size: int, limit: int, units: Units | None = None) -> torch.Tensor:
    """Up to `limit` images of a samoe data folder (DIR/images/*), as a (B, 3, size, size) batch of windows (`expand --verify`)."""
    if not (folder / "images").is_dir():
        raise DataError(f"{folder} has no images/ folder: pass a data folder such as data/A (see `samoe demo-data`)")
    data = UnlabelledFolder(folder, window=size, units=units)
    n = min(limit, len(data))
    return torch.stack([data[i]["image"] for i in range(n)])


# --------------------------------------------------------------------------- demo data


def _demo_scene(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic scene: (float32 (2, H, W) VV/VH linear sigma0, uint8 (H, W) class ids)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    # Fields: vegetation vs bare soil from thresholded smooth noise.
    field = smooth_noise(rng, size, size // 10)
    mask = np.where(field > np.quantile(field, rng.uniform(0.35, 0.65)), 2, 3).astype(np.uint8)
    # Water: a meandering river band at a random angle, or a lake.
    if rng.random() < 0.75:
        mask[river_band(rng, xx, yy, shift=0.25, amp=(0.03, 0.12), period=(0.5, 1.5), half_width=(0.03, 0.07))] = 0
    else:
        lake = smooth_noise(rng, size, size // 8)
        mask[lake > np.quantile(lake, rng.uniform(0.8, 0.9))] = 0
    # Urban: one to three rectangular blocks.
    urban = np.zeros((size, size), dtype=bool)
    for _ in range(int(rng.integers(1, 4))):
        h, w = (rng.uniform(0.12, 0.3, size=2) * size).astype(int) + 2
        y0, x0 = int(rng.integers(0, size - h + 1)), int(rng.integers(0, size - w + 1))
        urban[y0 : y0 + h, x0 : x0 + w] = True
    mask[urban] = 1

    vv_db = np.zeros((size, size))
    ratio_db = np.zeros((size, size))
    for cls, (db, ratio) in _DEMO_SIGMA0_DB.items():
        vv_db[mask == cls] = db
        ratio_db[mask == cls] = ratio
    vv_db += 1.0 * smooth_noise(rng, size, size // 16)  # +-1 dB texture within fields
    # Urban point scatterers: small clusters (seed pixel plus its 4-neighbours) +10..+15 dB.
    seeds = urban & (rng.random((size, size)) < 0.015)
    points = seeds.copy()
    points[1:] |= seeds[:-1]
    points[:-1] |= seeds[1:]
    points[:, 1:] |= seeds[:, :-1]
    points[:, :-1] |= seeds[:, 1:]
    points &= urban
    vv_db += np.where(points, rng.uniform(10.0, 15.0, size=(size, size)), 0.0)
    vh_db = vv_db - ratio_db
    sigma0 = 10.0 ** (np.stack([vv_db, vh_db]) / 10.0)
    speckle = rng.gamma(shape=_DEMO_LOOKS, scale=1.0 / _DEMO_LOOKS, size=sigma0.shape)
    return (sigma0 * speckle).astype(np.float32), mask


@dataclass(frozen=True)
class DemoPreset:
    """A demo-data preset: its scene generator `scene(rng, size) -> (float32 (2, H, W) VV/VH sigma0, class ids)`
    and its classes (names and colours, written as classes.json)."""

    scene: Callable[[np.random.Generator, int], tuple[np.ndarray, np.ndarray]]
    classes: ClassList


def demo_presets() -> dict[str, DemoPreset]:
    """Every `demo-data --preset`, by name (the scene modules import this one, so they are imported here)."""
    from .codebook import CODEBOOK_CLASSES, codebook_scene
    from .hard_scenes import HARD_CLASSES, hard_scene

    return {"easy": DemoPreset(_demo_scene, DEMO_CLASSES), "hard": DemoPreset(hard_scene, HARD_CLASSES),
            "codebook": DemoPreset(codebook_scene, CODEBOOK_CLASSES)}


DEMO_UNITS = Units("linear", None, ("VV", "VH"))
"""What demo images hold (data.json): linear sigma0 in two bands."""


def _demo_scenes(preset: str, size: int, counts: tuple[int, ...], regions: int = 1,
                 region: int | None = None, signatures: int | None = None,
                 grid: str | None = None) -> tuple[Any, ClassList]:
    """The scene generator and classes of a demo-data preset, after checking the options."""
    from .codebook import DEFAULT_GRID, grid_named
    from .hard_scenes import hard_scene

    presets = demo_presets()
    if preset not in presets:
        raise DataError(f"unknown demo-data preset {preset!r}: choose {', '.join(presets)}")
    if signatures is not None and preset != "codebook":
        raise DataError("--signatures needs --preset codebook")
    if grid is not None and preset != "codebook":
        raise DataError("--grid needs --preset codebook")
    if preset == "codebook":
        grid = DEFAULT_GRID if grid is None else grid
        try:
            g = grid_named(grid)
        except ValueError as e:
            raise DataError(str(e)) from None
        n = g.default_signatures if signatures is None else signatures
        if not 1 <= n <= g.size:
            raise DataError(f"--signatures {n} must be between 1 and {g.size} (the {grid} grid's size)")
        return functools.partial(presets[preset].scene, signatures=n, grid=grid), presets[preset].classes
    if regions < 1:
        raise DataError(f"--regions must be >= 1, got {regions}")
    if region is not None and not 0 <= region < regions:
        raise DataError(f"--region {region} is not one of the {regions} regions: use 0..{regions - 1} or raise --regions")
    if (regions > 1 or region is not None) and preset != "hard":
        raise DataError("--regions and --region need --preset hard")
    if size < 16:
        raise DataError(f"size {size} is too small for demo scenes: use --size 16 or more")
    if min(counts) < 0:
        raise DataError("scene counts must be >= 0")
    scene, classes = presets[preset].scene, presets[preset].classes
    if regions > 1:
        scene = functools.partial(hard_scene, regions=regions, region=region)
    return scene, classes


def _write_demo_split(out: Any, split: str, prefix: str, n: int, with_masks: bool, scene: Any, num_classes: int,
                      size: int, seed: int, stream: int) -> np.ndarray:
    """Write `n` scenes into split/images (and split/masks) of `out` (an upscale.ownership.Owned folder, all
    names recorded before any is made); return the masks' class pixel counts.

    Scene i draws from its own generator seeded by (seed, stream, i), so a split's
    files do not depend on how many scenes the other splits hold.
    """
    stems = [f"{prefix}-{i:04d}" for i in range(n)]
    subs = ["images"] + (["masks"] if with_masks else [])
    out.record(split, *[f"{split}/{sub}" for sub in subs], kind="dir", save=False)
    out.record(*[f"{split}/images/{s}.tif" for s in stems], *[f"{split}/masks/{s}.png" for s in stems if with_masks])
    hist = np.zeros(num_classes, dtype=np.int64)
    with out.dir.sub(split, create=True) as folder:
        images = folder.sub("images", create=True)
        masks = folder.sub("masks", create=True) if with_masks else None
        for i, stem in enumerate(stems):
            rng = np.random.default_rng([seed, stream, i])
            image, mask = scene(rng, size)
            with images.create(f"{stem}.tif") as f:
                write_image(f, image)
            if masks is not None:
                with masks.create(f"{stem}.png") as f:
                    write_mask(f, mask)
                hist += np.bincount(mask.ravel(), minlength=num_classes)
    return hist


def make_demo_data(
    out: Path,
    labelled: int = 24,
    unlabelled: int = 48,
    test: int = 12,
    size: int = 128,
    seed: int = 0,
    force: bool = False,
    preset: str = "easy",
    regions: int = 1,
    region: int | None = None,
    signatures: int | None = None,
    grid: str | None = None,
) -> dict[str, Any]:
    """Write synthetic SAR scenes: ``out/A`` (labelled), ``out/A-test`` (held out), ``out/B`` (images only),
    and beside them ``out/classes.json`` (the preset's classes) and ``out/data.json`` (linear VV/VH).

    Scenes have 4 classes (``CLASS_NAMES``: water ~-20 dB, urban ~0 dB with
    bright point clusters, vegetation ~-8 dB, bare soil ~-13 dB; VH 6-8 dB
    below VV) laid out as thresholded smooth noise (fields), a meandering
    river or a lake, and rectangular urban blocks; intensities are linear
    sigma0 times 4-look Gamma speckle. Images are float32 ``(2, H, W)``
    (VV, VH) TIFFs, masks 8-bit PNGs.

    Deterministic: scene i of a split depends only on (seed, split, i), so the
    same arguments give byte-identical files (no timestamps are written).
    Atomic: everything is built in ``.<name>.tmp-<token>`` beside ``out`` and
    renamed into place (upscale.ownership.NewOutput); ``out`` is never half-written,
    and ``--force`` replaces only a folder whose manifest records all it holds.

    Args:
        out: the folder to create; must not exist unless ``force``.
        labelled, unlabelled, test: number of scenes in A, B and A-test.
        size: scene height and width in pixels (>= 16).
        seed: the random seed.
        force: replace an existing ``out``.
        preset: ``easy`` (the scenes above) or ``hard`` (10 classes, capacity-bound:
            stages/hard_scenes.py).
        regions: ``hard`` only: scenes come from this many regions, each with its own
            class signatures and sensor noise floor (stages/hard_scenes.py).
        region: ``hard`` only: every scene from this one of the ``regions`` (a per-region
            test set).
        signatures: ``codebook`` only: how many signature -> class facts the scenes draw
            from (stages/codebook.py); the table depends on this number, not on ``seed``.
        grid: ``codebook`` only: the signature grid (``fine``, the default, or ``coarse``).

    Returns:
        A JSON-able summary: counts, size, seed, class names and the class
        pixel fractions of each labelled split.
    """
    out = Path(out)
    scene, classes = _demo_scenes(preset, size, (labelled, unlabelled, test), regions, region, signatures, grid)
    class_names = classes.names
    if (out.exists() or out.is_symlink()) and not force:
        raise DataError(f"{out} already exists: pass --force to replace it or choose another --out")
    from upscale.ownership import NewOutput

    counts = {"A": labelled, "A-test": test, "B": unlabelled}
    summary: dict[str, Any] = {
        "seed": seed,
        "size": size,
        "preset": preset,
        "num_classes": len(class_names),
        "classes": list(class_names),
        "ignore_index": IGNORE_INDEX,
        "image_layout": "float32 (2, H, W) TIFF: VV, VH linear sigma0",
        "counts": counts,
        "class_fractions": {},
    }
    if preset == "codebook":
        summary["signatures"] = scene.keywords["signatures"]
        summary["grid"] = scene.keywords["grid"]
    if regions > 1:
        summary["regions"] = regions
        if region is not None:
            summary["region"] = region
    with NewOutput(out, "demo-data", force) as new:  # --force replaces only a folder samoe wrote
        for split, prefix, stream, with_masks in _SPLITS:
            hist = _write_demo_split(new.owned, split, prefix, counts[split], with_masks, scene, len(class_names),
                                     size, seed, stream)
            if with_masks:
                total = max(int(hist.sum()), 1)
                summary["class_fractions"][split] = {
                    name: round(int(n) / total, 6) for name, n in zip(class_names, hist)
                }
        new.owned.record("demo-data.json", CLASSES_JSON, DATA_JSON)
        new.dir.write_bytes("demo-data.json", (json.dumps(summary, indent=2, sort_keys=True) + "\n").encode())
        write_classes(new.dir, classes)
        units = {k: v for k, v in DEMO_UNITS.to_json().items() if v is not None}
        new.dir.write_bytes(DATA_JSON, (json.dumps(units) + "\n").encode())
        new.commit()
    return {"out": str(out), **summary}
