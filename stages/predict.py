"""Sliding-window inference on scenes of any size, and `samoe predict`: GeoTIFF in, GeoTIFF out.

The model sees `img_size` windows. A scene is cut into windows on a grid with
stride `stride` (the last window of a row or column is moved back to end at the
scene's edge, so no pixel is left out and none is padded unless the scene is
smaller than a window); the windows' outputs are blended with separable linear
ramps over the overlap (`ramp`), normalised by the summed weights, so seams do
not show and a pixel covered by one window gets exactly that window's output.
Blending is done by rows: once a row of windows is done, the rows above the next
row of windows are final and leave memory, so memory is bounded by one band of
rows (window height x scene width), never by the scene. `eval`, `pseudo-label`
and `predict` share this engine (`sliding_windows`).

`samoe predict CKPT --images DIR|FILE... --out DIR` writes per scene
    OUT/masks/<stem>.tif         class ids (GeoTIFF with the scene's CRS, transform or GCPs, and
                                 nodata = the ignore value where the scene has no data; a palette in
                                 the class colours), or masks/<stem>.png for a scene that is not georeferenced
    OUT/confidence/<stem>.tif    max class probability, float32 in (0, 1] (0 = no data)
    OUT/previews/<stem>.png      the classes in colour with a legend (at most 1024 px a side)
and OUT/predict.json (checkpoint, tiling, per-scene class fractions) and
OUT/classes.json. OUT's manifest (upscale.ownership) records each file before
it is made; files are written under temporary names beside their place and
renamed (relative to OUT's folders, never through a link); a scene whose three
files exist is skipped, so an interrupted run resumes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from upscale.dirfd import Dir
from upscale.errors import SamoeError
from upscale.ownership import Owned

from .classes import ClassList
from .rasters import RASTER_SUFFIXES, Raster, check_memory, open_raster
from .units import Units, check_bands, check_plausible

DEFAULT_OVERLAP = 0.25
PREVIEW_SIDE = 1024
CONVERT_COLUMNS = 2048  # scene rows are converted to the model's input this many columns at a time


# --------------------------------------------------------------------------- tiling and blending (pure)


def window_starts(length: int, window: int, stride: int) -> list[int]:
    """Start offsets of windows along one axis: every `stride`, the last one ending at the edge ([0] if it fits)."""
    if length <= window:
        return [0]
    starts = list(range(0, length - window, stride))
    return starts + [length - window]


def ramp(window: int, stride: int) -> np.ndarray:
    """1-D blending weights of a window: 1 inside, falling linearly over the overlap (window - stride) at both ends.

    w[i] = min(1, (i + 0.5) / r, (window - i - 0.5) / r) with r = window - stride; no overlap: all 1.
    Weights are never 0, so every pixel's normalised sum is defined.
    """
    r = window - stride
    if r <= 0:
        return np.ones(window, dtype=np.float32)
    i = np.arange(window, dtype=np.float64)
    return np.minimum(1.0, np.minimum((i + 0.5) / r, (window - i - 0.5) / r)).astype(np.float32)


@dataclass(frozen=True)
class Tiling:
    """Window size (the model's img_size) and stride of the sliding windows."""

    window: int
    stride: int

    @classmethod
    def of(cls, window: int, overlap: float | None = None, stride: int | None = None) -> "Tiling":
        """From --stride (pixels) or --overlap (a fraction of the window; default 0.25), checked."""
        if stride is not None and overlap is not None:
            raise SamoeError("give --stride or --overlap, not both")
        if stride is None:
            overlap = DEFAULT_OVERLAP if overlap is None else overlap
            if not 0 <= overlap < 1:
                raise SamoeError(f"--overlap {overlap} must be in [0, 1): the fraction of a window its neighbour covers")
            stride = max(1, round(window * (1 - overlap)))
        if not 1 <= stride <= window:
            raise SamoeError(f"--stride {stride} must be in 1..{window} (the window size): larger strides leave pixels out")
        return cls(window, stride)

    def axis_weights(self, length: int) -> np.ndarray:
        """Weights along an axis of `length` pixels: the ramp where windows overlap, all ones where one window covers it."""
        return ramp(self.window, self.stride) if len(window_starts(length, self.window, self.stride)) > 1 else \
            np.ones(self.window, dtype=np.float32)

    def count(self, height: int, width: int) -> int:
        return len(window_starts(height, self.window, self.stride)) * len(window_starts(width, self.window, self.stride))


# --------------------------------------------------------------------------- the engine


@dataclass(eq=False)
class Scene:
    """One image the engine runs windows over.

    `read(y0, y1)` returns the model input of rows [y0, y1): float32 (3, rows, width), 0 where
    the scene has no data, and the (rows, width) bool map of pixels with data. `native`: for a
    scene resized to the model's size, its own (height, width) and data map (`native_valid`);
    `resized_bands` brings outputs back to it. `tag` is the caller's (e.g. open files).
    """

    name: str
    height: int
    width: int
    read: Callable[[int, int], tuple[np.ndarray, np.ndarray]]
    native: tuple[int, int] | None = None
    native_valid: np.ndarray | None = None
    tag: Any = None


@dataclass(frozen=True, eq=False)
class Window:
    """A window of a scene: top-left (y, x) and the rows x cols of it inside the scene."""

    scene: Scene
    y: int
    x: int
    rows: int
    cols: int
    row_done: bool  # the last window of its row of windows
    scene_done: bool  # the last window of the scene
    valid: np.ndarray = field(repr=False, default=None)  # (window, window) bool: pixels with data (False past the edge)


@dataclass
class Band:
    """Final blended outputs of rows [y0, y1) of a scene: values (K, rows, width) float32, valid (rows, width)."""

    scene: Scene
    y0: int
    y1: int
    values: np.ndarray
    valid: np.ndarray
    last: bool


class _Blend:
    """Weighted sums of one scene's rows [lo, lo + n) that windows still add to, in buffers reused row band after
    row band (allocated once, grown only if more rows are in flight than a window and a stride)."""

    def __init__(self, scene: Scene, tiling: Tiling, channels: int) -> None:
        self.scene, self.tiling = scene, tiling
        self.wy, self.wx = tiling.axis_weights(scene.height), tiling.axis_weights(scene.width)
        self.ys = window_starts(scene.height, tiling.window, tiling.stride)
        self.lo = self.n = 0
        self._alloc(channels, min(scene.height, tiling.window + tiling.stride))

    def _alloc(self, channels: int, rows: int) -> None:
        width = self.scene.width
        self.acc = np.zeros((channels, rows, width), np.float32)
        self.wsum = np.zeros((rows, width), np.float32)
        self.valid = np.zeros((rows, width), bool)

    def _grow(self, upto: int) -> None:
        """Hold rows up to `upto` (rows [lo, upto))."""
        need = upto - self.lo
        if need > self.wsum.shape[0]:
            old = (self.acc, self.wsum, self.valid)
            self._alloc(self.acc.shape[0], max(need, 2 * self.wsum.shape[0]))
            self.acc[:, : self.n], self.wsum[: self.n], self.valid[: self.n] = (a[..., : self.n, :] for a in old)
        self.n = max(self.n, need)

    def set_valid(self, y0: int, valid: np.ndarray) -> None:
        self._grow(y0 + valid.shape[0])
        self.valid[y0 - self.lo: y0 - self.lo + valid.shape[0]] = valid

    def add(self, w: Window, out: np.ndarray) -> None:
        self._grow(w.y + w.rows)
        weight = self.wy[: w.rows, None] * self.wx[None, : w.cols]
        r = w.y - self.lo
        self.acc[:, r: r + w.rows, w.x: w.x + w.cols] += out[:, : w.rows, : w.cols] * weight
        self.wsum[r: r + w.rows, w.x: w.x + w.cols] += weight

    def flush(self, w: Window) -> Band:
        """Rows no later window covers, after the last window of `w`'s row of windows (0 where no window ran)."""
        later = [y for y in self.ys if y > w.y]
        upto = later[0] if later and not w.scene_done else self.scene.height
        k, m = upto - self.lo, self.n - (upto - self.lo)
        values = self.acc[:, :k] / np.maximum(self.wsum[:k], np.finfo(np.float32).tiny)
        band = Band(self.scene, self.lo, upto, values, self.valid[:k].copy(), w.scene_done)
        for a in (self.acc, self.wsum, self.valid):  # the rows still in flight move to the top
            a[..., :m, :] = a[..., k: k + m, :]
            a[..., m: self.n, :] = 0
        self.lo, self.n = upto, m
        return band


def _windows(scenes: Iterable[Scene], tiling: Tiling, blends: dict[int, _Blend],
             channels: int) -> Iterator[tuple[Window, np.ndarray]]:
    """Every window of every scene in order, as (Window, float32 (3, window, window) input zero-padded past the edge)."""
    size = tiling.window
    for scene in scenes:
        blend = blends[id(scene)] = _Blend(scene, tiling, channels)
        ys, xs = blend.ys, window_starts(scene.width, size, tiling.stride)
        for yi, y in enumerate(ys):
            rows = min(size, scene.height - y)
            inp, valid = scene.read(y, y + rows)
            blend.set_valid(y, valid)
            for xi, x in enumerate(xs):
                cols = min(size, scene.width - x)
                tile = np.zeros((3, size, size), np.float32)
                tile[:, :rows, :cols] = inp[:, :, x: x + cols]
                tile_valid = np.zeros((size, size), bool)
                tile_valid[:rows, :cols] = valid[:, x: x + cols]
                last_col = xi == len(xs) - 1
                yield Window(scene, y, x, rows, cols, last_col, last_col and yi == len(ys) - 1, tile_valid), tile
            del inp, valid  # before the next row is read: one row of input in memory at a time


def sliding_windows(scenes: Iterable[Scene], tiling: Tiling, batch_size: int, channels: int,
                    forward: Callable[[torch.Tensor, list[Window]], torch.Tensor],
                    on_skipped: Callable[[int], None] | None = None) -> Iterator[Band]:
    """Run `forward` on batches of windows of `scenes` (read lazily, in order) and yield the blended bands.

    `forward(x, windows)` takes float32 (B, 3, window, window) and returns the (B, `channels`, window,
    window) values to blend (e.g. class probabilities), on the CPU. Batches may span scenes; bands of a
    scene come in row order, the last one with `last=True`. A window without a pixel of data (a scene's
    nodata border) is not run (`on_skipped(1)`): its pixels get values 0 and `valid` False.
    """
    blends: dict[int, _Blend] = {}
    batch: list[tuple[Window, np.ndarray | None]] = []
    pending = [0]  # windows in `batch` that need the forward

    def run() -> Iterator[Band]:
        windows = [w for w, t in batch if t is not None]
        out = iter(forward(torch.from_numpy(np.stack([t for _, t in batch if t is not None])), windows).float().numpy()
                   if windows else [])
        entries = list(batch)
        batch.clear()
        pending[0] = 0
        for w, t in entries:
            blend = blends[id(w.scene)]
            if t is not None:
                blend.add(w, next(out))
            elif on_skipped:
                on_skipped(1)
            if w.row_done:
                yield blend.flush(w)
            if w.scene_done:
                del blends[id(w.scene)]

    for w, tile in _windows(scenes, tiling, blends, channels):
        has_data = bool(w.valid.any())
        batch.append((w, tile if has_data else None))
        pending[0] += has_data
        # a run of windows without data is passed on at once (rows must not pile up waiting for a forward)
        if pending[0] == batch_size or (pending[0] == 0 and w.row_done) or len(batch) >= 16 * batch_size:
            yield from run()
    if batch:
        yield from run()


def resized_bands(bands: Iterable[Band]) -> Iterator[Band]:
    """Bands of scenes the model saw resized (`Scene.native`) brought back to their own size (bilinear)."""
    for band in bands:
        if band.scene.native is None:
            yield band
            continue
        h, w = band.scene.native
        values = F.interpolate(torch.from_numpy(band.values)[None], (h, w), mode="bilinear", align_corners=False)[0].numpy()
        yield Band(band.scene, 0, h, values, band.scene.native_valid, True)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- scenes from files


def working_bytes(rows: int, width: int, bands: int, channels: int) -> int:
    """Memory to read, convert and blend `rows` x `width` pixels: raw + mask + input + blend sums and output."""
    return rows * width * (bands * 9 + 3 * 4 + (2 * channels + 2) * 4)


def file_scene(raster: Raster, name: str, units: Units, tiling: Tiling, channels: int, resize: bool = False) -> Scene:
    """A `Scene` reading `raster` (stored in `units`) by rows, or whole and resized to the window (`resize`)."""
    from .data import to_model_input

    size = tiling.window
    span = min(raster.height, 2 * size)
    check_memory(working_bytes(span, raster.width, raster.count, channels), raster.path, raster.what,
                 f"sliding {size} px windows along its {raster.width} px rows")

    def read(y0: int, y1: int) -> tuple[np.ndarray, np.ndarray]:
        raw = raster.read(y0, y1)
        valid = raster.valid(y0, y1, values=raw)
        out = np.zeros((3, y1 - y0, raster.width), np.float32)
        for x0 in range(0, raster.width, CONVERT_COLUMNS):  # float64 temporaries of a slice, not of the whole rows
            x1 = min(raster.width, x0 + CONVERT_COLUMNS)
            if valid[:, x0:x1].any():
                out[:, :, x0:x1] = to_model_input(raw[:, :, x0:x1], units, valid[:, x0:x1])
        return out, valid

    if not resize or (raster.height, raster.width) == (size, size):
        return Scene(name, raster.height, raster.width, read)
    check_memory(working_bytes(raster.height, raster.width, raster.count, channels), raster.path, raster.what,
                 "resizing it whole to the model's size (--resize)")
    whole, valid = read(0, raster.height)
    small = F.interpolate(torch.from_numpy(whole)[None], (size, size), mode="bilinear", align_corners=False,
                          antialias=True)[0].numpy()
    return Scene(name, size, size, lambda y0, y1: (small[:, y0:y1], np.ones((y1 - y0, size), bool)),
                 native=(raster.height, raster.width), native_valid=valid)


def open_scene(path: Path, name: str, units: Units, tiling: Tiling, channels: int, resize: bool = False,
               check_units: bool = True) -> Scene:
    """Open an image file as a `Scene` (the open `Raster` is `scene.tag`; close it with `close_scene`)."""
    raster = open_raster(path, "scene")
    try:
        count = raster.image_shape()[0]
        check_bands(count, units, f"scene {path}")
        if check_units:
            check_plausible(raster.sample(), raster.dtype, units, f"scene {path}")
        scene = file_scene(raster, name, units, tiling, channels, resize)
    except BaseException:
        raster.close()
        raise
    scene.tag = raster
    return scene


def close_scene(scene: Scene) -> None:
    if isinstance(scene.tag, Raster):
        scene.tag.close()


def model_forward(model: torch.nn.Module, device: torch.device, precision: str,
                  head: Callable[[dict[str, torch.Tensor]], torch.Tensor]) -> Callable[[torch.Tensor, list[Window]], torch.Tensor]:
    """`forward` for `sliding_windows`: the model on `device` (bf16 autocast with `precision` bf16), `head` picks
    the values to blend from its outputs (in fp32), returned on the CPU."""
    from upscale.device import autocast

    dtype = next(model.parameters()).dtype

    @torch.no_grad()
    def forward(x: torch.Tensor, windows: list[Window]) -> torch.Tensor:
        with autocast(device, precision):
            out = model(x.to(device, dtype))
        return head({k: v.float() for k, v in out.items()}).cpu()

    return forward


def seg_probabilities(out: dict[str, torch.Tensor]) -> torch.Tensor:
    """The segmentation head's class probabilities (what eval scores and predict writes)."""
    return out["seg"].softmax(dim=1)


# --------------------------------------------------------------------------- samoe predict


def list_scenes(inputs: list[Path]) -> list[tuple[str, Path, Path]]:
    """(stem, file, folder whose data.json applies) of every scene named: files, folders of them, or data folders."""
    found: dict[str, tuple[Path, Path]] = {}
    for given in inputs:
        given = Path(given)
        if given.is_dir():
            folder = given / "images" if (given / "images").is_dir() else given
            files = [p for p in sorted(folder.iterdir())
                     if not p.name.startswith(".") and p.suffix.lower() in RASTER_SUFFIXES and p.is_file()]
            if not files:
                raise SamoeError(f"{folder} holds no .tif/.tiff/.png scenes: point --images to scenes or a folder of them")
            pairs = [(p, given) for p in files]
        elif given.is_file():
            if given.suffix.lower() not in RASTER_SUFFIXES:
                raise SamoeError(f"--images {given} is not a .tif, .tiff or .png file: convert it to GeoTIFF")
            pairs = [(given, given.parent)]
        else:
            raise SamoeError(f"--images {given} does not exist: pass scene files or folders of them")
        for p, folder in pairs:
            if p.stem in found and found[p.stem][0].resolve() != p.resolve():
                raise SamoeError(f"{found[p.stem][0]} and {p} share the name {p.stem!r}: outputs are named by it; "
                                 "rename one or predict them into separate --out folders")
            found[p.stem] = (p, folder)
    return [(stem, p, folder) for stem, (p, folder) in found.items()]


@dataclass(frozen=True)
class PredictOptions:
    """How `predict` runs: tiling, batch, device, precision, units given on the command line; `compile` compiles
    the model's blocks (upscale/compile.py: the same maps within float rounding, the first batches pay the compile)."""

    overlap: float | None = None
    stride: int | None = None
    batch_size: int = 8
    device: str | torch.device = "cpu"
    precision: str = "fp32"
    units: Any = None  # stages.units.UnitOptions
    force: bool = False
    compile: bool = False


SUBDIRS = ("masks", "confidence", "previews")
RECORD = "predict.json"


def _outputs(stem: str, located: bool) -> dict[str, str]:
    """A scene's output files, relative to OUT."""
    return {"masks": f"masks/{stem}.{'tif' if located else 'png'}", "confidence": f"confidence/{stem}.tif",
            "previews": f"previews/{stem}.png"}


def _done(dirs: dict[str, Dir], stem: str) -> bool:
    return all(dirs[sub].kind(f"{stem}.{ext}") == "file" for sub, ext in (("confidence", "tif"), ("previews", "png"))) and \
        any(dirs["masks"].kind(f"{stem}.{ext}") == "file" for ext in ("tif", "png"))


class _SceneWriter:
    """A scene's outputs as its bands arrive: mask and confidence rasters by rows, a decimated class map for the preview.

    Its files are recorded in OUT's manifest first, then written under temporary names in their folders (GDAL gets
    the path of each folder's descriptor) and renamed into place when the scene is complete."""

    def __init__(self, out: Owned, dirs: dict[str, Dir], scene: Scene, raster: Raster, classes: ClassList) -> None:
        self.out, self.dirs, self.scene, self.classes = out, dirs, scene, classes
        h, w = scene.native or (scene.height, scene.width)
        self.h, self.w = h, w
        self.located = raster.georef.located
        self.final = _outputs(scene.name, self.located)
        out.record(*self.final.values())
        ignore = classes.ignore_index
        self.dtype = np.uint8 if max(ignore, len(classes.names) - 1) <= 255 else np.uint16
        palette = {i: tuple(int(v) for v in rgb) for i, rgb in enumerate(classes.rgb())}
        from .rasters import RasterWriter

        self.tmp = {"masks": out.temp(f"{scene.name}.mask.tif"), "confidence": out.temp(f"{scene.name}.tif")}
        self.mask = RasterWriter(self._path("masks"), h, w, self.dtype, raster.georef, nodata=ignore, colormap=palette)
        self.conf = RasterWriter(self._path("confidence"), h, w, np.float32, raster.georef, nodata=0.0)
        self.k = max(1, math.ceil(max(h, w) / PREVIEW_SIDE))
        self.preview = np.full((math.ceil(h / self.k), math.ceil(w / self.k)), ignore, dtype=np.int64)
        self.counts = np.zeros(len(classes.names), dtype=np.int64)
        self.nodata = 0

    def add(self, band: Band) -> None:
        probs = band.values
        conf = probs.max(axis=0)
        pred = probs.argmax(axis=0)
        valid = band.valid
        mask = np.where(valid, pred, self.classes.ignore_index).astype(self.dtype)
        self.mask.write_rows(band.y0, mask)
        self.conf.write_rows(band.y0, np.where(valid, conf, 0.0).astype(np.float32))
        self.counts += np.bincount(pred[valid], minlength=len(self.counts))
        self.nodata += int((~valid).sum())
        rows = np.arange(band.y0, band.y1)
        keep = rows % self.k == 0
        self.preview[rows[keep] // self.k] = mask[keep][:, :: self.k]

    def _path(self, sub: str, name: str | None = None) -> Path:
        """Where GDAL writes a temporary of folder `sub`: through the folder's descriptor, never its path."""
        return Path(self.dirs[sub].proc) / (name or self.tmp[sub])

    def finish(self) -> dict[str, Any]:
        self.mask.close()
        self.conf.close()
        final, masks = self.final, self.dirs["masks"]
        if not self.located:
            from .rasters import copy_to_png

            png = self.out.temp(f"{self.scene.name}.png")
            copy_to_png(self._path("masks"), self._path("masks", png))
            masks.replace(png, final["masks"].split("/")[1])
            masks.unlink(self.tmp["masks"])
        else:
            masks.replace(self.tmp["masks"], final["masks"].split("/")[1])
        self.dirs["confidence"].replace(self.tmp["confidence"], final["confidence"].split("/")[1])
        preview_figure(self.preview, self.classes, self.scene.name, (self.h, self.w), self.out, final["previews"])
        total = max(int(self.counts.sum()), 1)
        return {"height": self.h, "width": self.w, "georeferenced": self.located, "nodata_pixels": self.nodata,
                "class_fractions": {n: round(int(c) / total, 6) for n, c in zip(self.classes.names, self.counts)},
                "outputs": {k: str(self.out.dir.path / v) for k, v in final.items()}}

    def abort(self) -> None:
        for w in (self.mask, self.conf):
            try:
                w.close()
            except Exception:  # noqa: BLE001 - already failing; its temporaries are removed below
                pass
        for sub, name in self.tmp.items():
            self.dirs[sub].unlink(name, missing_ok=True)


def preview_figure(classes_map: np.ndarray, classes: ClassList, name: str, size: tuple[int, int], out: Owned,
                   rel: str) -> None:
    """The class map in the classes' colours (no-data white) with a legend of the classes present, as PNG `rel` of `out`."""
    from matplotlib.patches import Patch

    from .figures import new_figure, save_figure, shorten

    rgb = np.full((*classes_map.shape, 3), 255, dtype=np.uint8)
    palette = classes.rgb()
    known = classes_map < len(classes.names)
    rgb[known] = palette[classes_map[known]]
    h, w = classes_map.shape
    scale = 6.0 / max(h, w)
    fig = new_figure(max(w * scale, 2.0) + 2.4, max(h * scale, 2.0) + 0.6)
    ax = fig.subplots()
    ax.imshow(rgb, interpolation="nearest")
    ax.set_axis_off()
    present = np.unique(classes_map[known]) if known.any() else np.array([], dtype=int)
    handles = [Patch(facecolor=classes.colors[c], edgecolor="black", linewidth=0.4, label=classes.names[c]) for c in present]
    if not known.all():
        handles.append(Patch(facecolor="white", edgecolor="black", linewidth=0.4, label="no data"))
    if handles:
        fig.legend(handles=handles, loc="outside right upper", fontsize=8, frameon=False)
    ax.set_title(shorten(f"{name} ({size[0]} x {size[1]} px)", 50), fontsize=9)
    save_figure(fig, out, rel, "png")


def _check_out(out: Path, inputs: dict[str, Path], force: bool, record: dict[str, Any]) -> dict[str, Any] | None:
    """May predict write into `out`? The record of the earlier run it resumes (same checkpoint and tiling), or None.

    Only looks: what may be written or replaced is decided by `resumable_output` (upscale.ownership)."""
    from upscale.ownership import OWNER_FILE, check_separate, first_unknown, read_manifest, unknown_error

    check_separate(out, "--out", inputs)
    if force or not (out.exists() or out.is_symlink()):
        return None
    with Dir.open(out, "choose a new --out", follow=False) as d:
        if not d.names():
            return None
        manifest = read_manifest(d)
        if manifest is None or manifest.command != "predict":
            raise SamoeError(f"{out} exists and was not written by samoe predict (no {OWNER_FILE} listing its files): "
                             "refusing to write into it; choose a new --out")
        unknown = first_unknown(d, manifest)
        if unknown is not None:
            raise unknown_error(out, unknown, "--out")
        try:
            old = d.read_json(RECORD)
            same = isinstance(old, dict) and all(old.get(k) == record[k] for k in ("digest", "window", "stride"))
        except SamoeError:
            same = False
    if not same:
        raise SamoeError(f"{out} holds predictions of another checkpoint or tiling ({RECORD}): choose a new --out, "
                         "or pass --force to replace them")
    return old


def predict(checkpoint: Path, inputs: list[Path], out: Path, options: PredictOptions = PredictOptions(),
            on_start: Callable[[int, int, int], None] | None = None,
            on_windows: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Predict every scene of `inputs` into `out` (see the module docstring); returns the run's summary.

    `on_start(scenes, skipped, windows)` once the work is known; `on_windows(n)` after each batch.
    A failure, Ctrl-C or SIGTERM leaves only recorded, complete files (a rerun resumes) and says how many scenes are
    done (the exception's `samoe_left`).
    """
    import json

    from upscale.checkpoint import Checkpoint, load_model

    from .classes import write_classes
    from .dataspec import class_list, recorded
    from .outputs import resumable_output
    from .units import UnitOptions, resolve_units

    ckpt = Checkpoint.open(checkpoint)
    cfg = ckpt.config
    spec = recorded(ckpt.meta, str(ckpt.path / "samoe.json"))
    classes = class_list(spec, cfg.num_classes) or ClassList.generic(cfg.num_classes)
    tiling = Tiling.of(cfg.img_size, options.overlap, options.stride)
    scenes = list_scenes(inputs)
    unit_options = options.units or UnitOptions()
    units = {folder: resolve_units(folder, unit_options, spec.units if spec else None) for _, _, folder in scenes}
    record = {"checkpoint": str(ckpt.path), "digest": ckpt.digest, "window": tiling.window, "stride": tiling.stride,
              "classes": list(classes.names), "scenes": {}}
    inputs_named = {"the checkpoint": ckpt.path, **{f"--images {p}": p for p in inputs}}
    earlier = _check_out(out, inputs_named, options.force, record)
    if earlier is not None:
        record["scenes"] = earlier.get("scenes", {}) if isinstance(earlier.get("scenes"), dict) else {}
    done_stems: set[str] = set()
    if earlier is not None:
        with Dir.open(out, "choose a new --out", follow=False) as d:
            dirs = {sub: d.sub(sub) for sub in SUBDIRS if d.kind(sub) == "dir"}
            if len(dirs) == len(SUBDIRS):
                done_stems = {stem for stem, _, _ in scenes if _done(dirs, stem)}
    todo = [(stem, p, folder) for stem, p, folder in scenes if stem not in done_stems]
    resize = bool(spec and spec.resize)
    # open every scene once up front: a bad one is refused before any output exists or the model loads
    windows = 0
    for stem, p, folder in todo:
        with open_raster(p, "scene") as r:
            check_bands(r.image_shape()[0], units[folder], f"scene {p}")
            check_plausible(r.sample(), r.dtype, units[folder], f"scene {p}")
            windows += 1 if resize else tiling.count(r.height, r.width)
    if on_start:
        on_start(len(scenes), len(scenes) - len(todo), windows)
    writers: dict[int, _SceneWriter] = {}
    with resumable_output(out, "predict", "scene(s)", force=options.force) as (target, done):
        try:
            target.record(*SUBDIRS, kind="dir", save=False)
            target.record("classes.json", RECORD)
            dirs = {sub: target.dir.sub(sub, create=True) for sub in SUBDIRS}
            write_classes(target.dir, classes, target.token)
            if not todo:
                return _summary(record, len(scenes), 0)
            model = load_model(ckpt, device=options.device)  # the files opened above: the digest recorded is theirs
            model.eval()
            if options.compile:
                from upscale.compile import compile_model

                compile_model(model)
            device = next(model.parameters()).device
            forward = model_forward(model, device, options.precision, seg_probabilities)

            def counted(x: torch.Tensor, wins: list[Window]) -> torch.Tensor:
                result = forward(x, wins)
                if on_windows:
                    on_windows(len(wins))
                return result

            def opened() -> Iterator[Scene]:
                for stem, p, folder in todo:
                    yield open_scene(p, stem, units[folder], tiling, len(classes.names), resize, check_units=False)

            for band in resized_bands(sliding_windows(opened(), tiling, options.batch_size, len(classes.names), counted,
                                                      on_skipped=on_windows)):
                scene = band.scene
                writer = writers.get(id(scene))
                if writer is None:
                    writer = writers[id(scene)] = _SceneWriter(target, dirs, scene, scene.tag, classes)
                writer.add(band)
                if band.last:
                    record["scenes"][scene.name] = writer.finish()
                    del writers[id(scene)]
                    close_scene(scene)
                    target.dir.write_bytes(RECORD, (json.dumps(record, indent=1) + "\n").encode(), target.token)
                    done[0] += 1
            return _summary(record, len(scenes), done[0])
        finally:
            for w in writers.values():
                w.abort()
                close_scene(w.scene)


def _summary(record: dict[str, Any], scenes: int, predicted: int) -> dict[str, Any]:
    return {**record, "predicted": predicted, "skipped": scenes - predicted}
