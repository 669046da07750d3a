"""Raster files in and out: SAR scenes, masks and confidence maps read by windows, GeoTIFF outputs written by rows.

Reading goes through rasterio (GDAL) for `.tif/.tiff/.png`, restricted to the
GTiff and PNG drivers, so a file named `.tif` that holds something else (a VRT
pointing at other files, say) is refused, never followed. Tiled and striped
TIFFs are read by windows; PNGs and multi-page TIFF stacks (tifffile's HxWxC
pages, which GDAL exposes only page by page) are decoded whole, because neither
format can be read at an arbitrary row without decoding everything above it.

Cost is bounded by memory, not by a pixel count: every decode is checked against
the *image memory budget* (`--image-memory`, `SAMOE_IMAGE_MEMORY`, default 1 GiB)
before it allocates, from what the header declares. A window of a huge tiled
GeoTIFF costs only its window; a 130 KB PNG that declares 8192 x 8192 pixels
costs its 64 MB (within the budget) and is decoded once; a TIFF that declares
65536 x 65536 pixels in one strip is refused from its header. GDAL's block cache
is capped too (an eighth of the budget), since its default is 5% of the RAM.

GDAL never writes beside a user's files (`GDAL_PAM_ENABLED=NO`: no `.aux.xml`),
never lists a scene's folder on open, and its warnings (and tifffile's) are kept
off the terminal: a bad file is one `DataError` line, nothing else.
"""

from __future__ import annotations

import logging
import math
import os
import re
import warnings
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from upscale.errors import DataError, SamoeError

DEFAULT_IMAGE_MEMORY = 1024**3
IMAGE_MEMORY_ENV = "SAMOE_IMAGE_MEMORY"
RASTER_SUFFIXES: tuple[str, ...] = (".tif", ".tiff", ".png")
_DRIVERS = {".tif": "GTiff", ".tiff": "GTiff", ".png": "PNG"}
_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}

for _name in ("rasterio", "tifffile"):  # their log lines and warnings would print before samoe's one-line error
    _logger = logging.getLogger(_name)
    _logger.addHandler(logging.NullHandler())
    _logger.propagate = False
    warnings.filterwarnings("ignore", module=_name + r"(\.|$)")


def chw_shape(shape: Any, name: str = "image") -> tuple[int, int, int]:
    """(C, H, W) of an HxW, CxHxW or HxWxC shape with C in {1, 2}, else ``DataError``.

    A shape that fits both layouts (e.g. (2, H, 2)) is read as CxHxW, the
    layout the demo data is written in.
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) == 2:
        chw = (1, *shape)
    elif len(shape) == 3 and shape[0] in (1, 2):
        chw = shape
    elif len(shape) == 3 and shape[-1] in (1, 2):
        chw = (shape[-1], shape[0], shape[1])
    elif len(shape) == 3:
        raise DataError(
            f"{name} has shape {shape}, i.e. {min(shape[0], shape[-1])} channels: "
            "expected 1 or 2 (VV[, VH]) as HxW, CxHxW or HxWxC"
        )
    else:
        raise DataError(f"{name} has shape {shape}: expected HxW, CxHxW or HxWxC with 1 or 2 channels")
    if chw[1] == 0 or chw[2] == 0:
        raise DataError(f"{name} has shape {shape}: it has no pixels, replace it")
    return chw  # type: ignore[return-value]


def channels_first(img: np.ndarray, name: str = "image") -> np.ndarray:
    """(C, H, W) view of an image in any accepted layout (see ``chw_shape``)."""
    c, h, w = chw_shape(img.shape, name)
    if img.ndim == 2:
        return img[None]
    return img if img.shape[0] == c and img.shape[1:] == (h, w) else np.moveaxis(img, -1, 0)


_budget: list[int] = []  # set by the CLI's --image-memory; else the environment or the default


def parse_bytes(text: str, what: str) -> int:
    """`1073741824`, `512M`, `1G`, `1.5GiB` -> bytes (binary units); anything else is a one-line SamoeError."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*", str(text), flags=re.IGNORECASE)
    if m is None:
        raise SamoeError(f"{what} {text!r} is not a size: write bytes or a number with K, M, G or T, e.g. 1G")
    value = int(float(m.group(1)) * _UNITS[m.group(2).upper()])
    if value < 1024**2:
        raise SamoeError(f"{what} {text!r} is below 1 MiB: give samoe at least 1M to decode images with")
    return value


def set_image_memory(nbytes: int | None) -> None:
    """The budget of this process (the CLI's --image-memory); None goes back to the environment or default."""
    _budget.clear()
    if nbytes is not None:
        _budget.append(int(nbytes))


def image_memory() -> int:
    """Bytes one image's decoded pixels and working arrays may take."""
    if _budget:
        return _budget[0]
    env = os.environ.get(IMAGE_MEMORY_ENV)
    return parse_bytes(env, IMAGE_MEMORY_ENV) if env else DEFAULT_IMAGE_MEMORY


def check_memory(nbytes: int, path: Path | str, what: str, doing: str) -> None:
    """Refuse work on `path` that needs more than the image memory budget, before anything is allocated."""
    budget = image_memory()
    if nbytes > budget:
        raise DataError(f"{what} {path}: {doing} needs {_size(nbytes)}, more than the image memory budget of {_size(budget)}: "
                        "convert it to a tiled GeoTIFF, cut it into smaller scenes, or raise --image-memory")


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


_configured: list[bool] = []


def _configure_gdal() -> None:
    """GDAL's process-wide options, set once before its first read: no sidecar files written or looked for, and a
    block cache of an eighth of the image memory budget (GDAL reads GDAL_CACHEMAX once, at its first block):
    128 MiB by default, a row of 512 px tiles of a 2-band float32 scene 16000 px wide."""
    if _configured:
        return
    from rasterio.env import set_gdal_config

    for key, value in (("GDAL_PAM_ENABLED", "NO"), ("GDAL_DISABLE_READDIR_ON_OPEN", "EMPTY_DIR"), ("CPL_DEBUG", "OFF"),
                       ("GDAL_CACHEMAX", max(image_memory() // 8, 16 * 1024**2))):
        set_gdal_config(key, value)
    _configured.append(True)


def _rasterio_open(path: Path, *args: Any, **kwargs: Any) -> Any:
    """rasterio.open with GDAL configured and its Python warnings (NotGeoreferencedWarning) kept off the terminal."""
    import rasterio

    _configure_gdal()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return rasterio.open(path, *args, **kwargs)


@dataclass(frozen=True)
class Georef:
    """Where a raster lies on the Earth: what predict copies from a scene to its outputs."""

    crs: Any = None
    transform: Any = None
    gcps: tuple[Any, ...] = ()
    gcps_crs: Any = None
    rpcs: Any = None

    @property
    def located(self) -> bool:
        """True for a GeoTIFF (a CRS with a transform, ground control points or RPCs), False for a plain image."""
        identity = self.transform is None or self.transform.is_identity
        return bool((self.crs is not None and not identity) or self.gcps or self.rpcs)


class Raster:
    """An image file opened for reading: its shape from the header, its pixels by windows.

    Attributes: `path`, `height`, `width`, `count` (bands), `dtype` (numpy), `nodata`,
    `georef` (`Georef`). `read(y0, y1, x0, x1)` returns (count, rows, cols) as stored;
    `valid(...)` the (rows, cols) pixels that hold data (False where the file's nodata
    value or mask says none, or a value is NaN/inf); `sample(side)` a decimated view
    for statistics. Use as a context manager, or call `close()`.
    """

    def __init__(self, path: Path, what: str = "image") -> None:
        self.path, self.what = Path(path), what
        self._stack = ExitStack()
        self._ds: Any = None
        self._whole: np.ndarray | None = None  # decoded once: PNGs and TIFF page stacks
        self._stack_shape: tuple[int, ...] | None = None
        self._png = False
        self.georef = Georef()
        self.nodata: float | None = None
        self._all_valid = True
        try:
            self._open()
        except BaseException:
            self.close()
            raise

    # -- opening
    def _fail(self, e: BaseException) -> DataError:
        return DataError(f"cannot read {self.what} {self.path} ({type(e).__name__}: {str(e)[:160]}): replace or remove the file")

    def _open(self) -> None:
        suffix = self.path.suffix.lower()
        if suffix not in _DRIVERS:
            raise DataError(f"{self.what} {self.path} is not a .tif, .tiff or .png file: convert it to GeoTIFF")
        if suffix == ".png":
            self._open_png()
            return
        try:
            ds = self._stack.enter_context(_rasterio_open(self.path, driver=_DRIVERS[suffix]))
        except DataError:
            raise
        except Exception as e:  # noqa: BLE001 - GDAL's errors name many causes; all mean a bad file here
            raise self._fail(e) from None
        if ds.subdatasets:  # a stack of pages: only tifffile sees it whole
            self._open_stack()
            return
        self._ds = ds
        self.height, self.width, self.count = ds.height, ds.width, ds.count
        self.dtype = np.dtype(ds.dtypes[0])
        self.nodata = ds.nodata
        gcps, gcps_crs = ds.gcps
        self.georef = Georef(ds.crs, ds.transform, tuple(gcps), gcps_crs, ds.rpcs)
        from rasterio.enums import MaskFlags

        self._all_valid = all(flags == [MaskFlags.all_valid] for flags in ds.mask_flag_enums)
        self._check_blocks()

    def _open_png(self) -> None:
        """PNGs are decoded whole by Pillow, which reports a truncated or corrupt file (GDAL's PNG reader may not)."""
        from PIL import Image

        Image.MAX_IMAGE_PIXELS = None  # the image memory budget decides, from the same header (check_memory)
        try:
            with Image.open(self.path) as im:
                if im.format != "PNG":
                    raise ValueError(f"it is a {im.format} image, not a PNG")
                (w, h), mode = im.size, im.mode
                self.count = len(im.getbands())
        except Exception as e:  # noqa: BLE001
            raise self._fail(e) from None
        self.height, self.width = h, w
        self.dtype = np.dtype({"1": "bool", "I": "int32", "F": "float32"}.get(mode, "uint16" if mode.startswith("I;16") else "uint8"))
        self._png = True

    def _open_stack(self) -> None:
        import tifffile

        self._stack.close()
        self._stack = ExitStack()
        try:
            with tifffile.TiffFile(self.path) as tf:
                shape, dtype = tuple(int(s) for s in tf.series[0].shape), np.dtype(tf.series[0].dtype)
        except Exception as e:  # noqa: BLE001
            raise self._fail(e) from None
        self.count, self.height, self.width = chw_shape(shape, f"{self.what} {self.path}")
        self.dtype, self._stack_shape = dtype, shape

    def _check_blocks(self) -> None:
        """GDAL decodes a whole block to read any pixel of it: one block of every band must fit the budget."""
        bh, bw = self._ds.block_shapes[0]
        check_memory(bh * bw * self.count * self.dtype.itemsize, self.path, self.what, f"decoding one {bh}x{bw} block")

    def _decode_whole(self) -> None:
        check_memory(self.height * self.width * self.count * self.dtype.itemsize, self.path, self.what,
                     f"decoding it whole ({self.count} x {self.height} x {self.width} {self.dtype} values)")
        try:
            if self._stack_shape is not None:
                import tifffile

                arr = np.asarray(tifffile.imread(self.path))
                self._whole = np.ascontiguousarray(channels_first(arr, f"{self.what} {self.path}"))
            elif self._png:
                self._whole = _decode_png(self.path)
            else:
                self._whole = self._ds.read()
                if not self._all_valid:
                    self._valid_whole = self._ds.read_masks().min(axis=0) > 0
        except DataError:
            raise
        except Exception as e:  # noqa: BLE001
            raise self._fail(e) from None

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.count, self.height, self.width

    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of a SAR image, refusing a band count other than 1 (VV or HH) or 2 (VV, VH or HH, HV)."""
        if self.count not in (1, 2):
            raise DataError(f"{self.what} {self.path} has shape {self.shape}, i.e. {self.count} channels: "
                            "expected 1 or 2 (VV[, VH]) bands")
        return self.shape

    def mask_shape(self) -> tuple[int, int]:
        """(H, W) of a class-id raster: one band of unsigned or non-negative integers."""
        if self.count != 1 or self.dtype.kind not in "ui":
            kind = {3: "a RGB", 4: "a RGBA"}.get(self.count, f"a {self.count}-band") if self.count != 1 else f"a {self.dtype}"
            raise DataError(f"{self.what} {self.path} is {kind} image: save class ids as one 8- or 16-bit integer band")
        return self.height, self.width

    # -- reading
    def read(self, y0: int = 0, y1: int | None = None, x0: int = 0, x1: int | None = None) -> np.ndarray:
        """(count, rows, cols) of the stored values in rows [y0, y1) and columns [x0, x1) (defaults: all)."""
        y1 = self.height if y1 is None else y1
        x1 = self.width if x1 is None else x1
        if self._ds is None and self._whole is None:
            self._decode_whole()
        if self._whole is not None:
            return self._whole[:, y0:y1, x0:x1]
        check_memory((y1 - y0) * (x1 - x0) * self.count * self.dtype.itemsize, self.path, self.what,
                     f"reading a {y1 - y0}x{x1 - x0} window")
        from rasterio.windows import Window

        try:
            return self._ds.read(window=Window(x0, y0, x1 - x0, y1 - y0))
        except Exception as e:  # noqa: BLE001
            raise self._fail(e) from None

    def valid(self, y0: int = 0, y1: int | None = None, x0: int = 0, x1: int | None = None,
              values: np.ndarray | None = None) -> np.ndarray:
        """(rows, cols) bool: pixels with data in every band (`values`: what `read` returned for the same window)."""
        y1 = self.height if y1 is None else y1
        x1 = self.width if x1 is None else x1
        values = self.read(y0, y1, x0, x1) if values is None else values
        ok = np.isfinite(values).all(axis=0) if values.dtype.kind == "f" else np.ones(values.shape[1:], dtype=bool)
        if self._all_valid:
            return ok
        if self._whole is not None:
            return ok & self._valid_whole[y0:y1, x0:x1]
        from rasterio.windows import Window

        try:
            return ok & (self._ds.read_masks(window=Window(x0, y0, x1 - x0, y1 - y0)).min(axis=0) > 0)
        except Exception as e:  # noqa: BLE001
            raise self._fail(e) from None

    def sample(self, side: int = 256) -> np.ndarray:
        """About side x side pixels spread over the scene (every k-th row and column), for statistics."""
        k = max(1, math.ceil(max(self.height, self.width) / side))
        if self._ds is not None and self._whole is None:
            out_shape = (self.count, math.ceil(self.height / k), math.ceil(self.width / k))
            try:
                values = self._ds.read(out_shape=out_shape)
                if not self._all_valid:
                    keep = self._ds.read_masks(out_shape=out_shape).min(axis=0) > 0
                    values = np.where(keep, values, np.nan) if values.dtype.kind == "f" else values[:, keep][:, None]
                return values
            except Exception as e:  # noqa: BLE001
                raise self._fail(e) from None
        whole = self.read()
        return whole[:, ::k, ::k]

    def close(self) -> None:
        self._stack.close()
        self._ds = None

    def __enter__(self) -> "Raster":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _decode_png(path: Path) -> np.ndarray:
    """(bands, H, W) of a PNG; 16-bit grey stays uint16 (Pillow may open it as 32-bit 'I')."""
    from PIL import Image

    with Image.open(path) as im:
        im.load()
        arr = np.asarray(im)
        if im.mode.startswith("I") and arr.dtype != np.uint16 and (not arr.size or (arr.min() >= 0 and arr.max() <= 65535)):
            arr = arr.astype(np.uint16)
    return arr[None] if arr.ndim == 2 else np.moveaxis(arr, -1, 0)


def open_raster(path: Path | str, what: str = "image") -> Raster:
    """Open an image file for reading (see `Raster`); a file GDAL cannot parse is one `DataError`."""
    return Raster(Path(path), what)


# --------------------------------------------------------------------------- writing


class RasterWriter:
    """A single-band GeoTIFF written by rows (tiled, DEFLATE), carrying a scene's georeferencing.

    Args:
        path: the file to create (the caller writes under a temporary name and renames).
        height, width: its size; dtype: numpy dtype of the band.
        georef: copied when it locates the scene (CRS + transform, or GCPs, or RPCs).
        nodata: the band's nodata value (None: none).
        colormap: {value: (r, g, b)} written as the band's palette (uint8/uint16 masks), so GIS
            software shows classes in their colours.
    """

    def __init__(self, path: Path, height: int, width: int, dtype: Any, georef: Georef | None = None,
                 nodata: float | None = None, colormap: dict[int, tuple[int, int, int]] | None = None) -> None:
        self._stack = ExitStack()
        dtype = np.dtype(dtype)
        profile: dict[str, Any] = dict(driver="GTiff", height=height, width=width, count=1, dtype=dtype.name,
                                       tiled=True, blockxsize=256, blockysize=256, compress="deflate",
                                       predictor=3 if dtype.kind == "f" else 2, BIGTIFF="IF_SAFER")
        if nodata is not None:
            profile["nodata"] = nodata
        g = georef if georef is not None and georef.located else None
        if g is not None and g.crs is not None and g.transform is not None and not g.transform.is_identity:
            profile.update(crs=g.crs, transform=g.transform)
        try:
            self.ds = self._stack.enter_context(_rasterio_open(path, "w", **profile))
            if g is not None and g.gcps and "transform" not in profile:
                self.ds.gcps = (list(g.gcps), g.gcps_crs)
            if g is not None and g.rpcs and "transform" not in profile:
                self.ds.rpcs = g.rpcs
            if colormap:
                self.ds.write_colormap(1, {k: (*v, 255) for k, v in colormap.items()})
        except BaseException:
            self._stack.close()
            raise

    def write_rows(self, y0: int, rows: np.ndarray) -> None:
        """Rows [y0, y0 + len(rows)) of the band."""
        from rasterio.windows import Window

        self.ds.write(rows[None], window=Window(0, y0, rows.shape[1], rows.shape[0]))

    def close(self) -> None:
        self._stack.close()


def copy_to_png(src: Path, dst: Path) -> None:
    """Re-encode a finished single-band TIFF as PNG, line by line (GDAL's CreateCopy streams)."""
    import rasterio.shutil

    _configure_gdal()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rasterio.shutil.copy(src, dst, driver="PNG")
