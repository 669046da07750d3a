"""`samoe pseudo-label`: a teacher checkpoint labels an unlabelled SAR folder once (strategy 3).

Writes OUT/images/ (links or copies of the inputs), OUT/masks/<stem>.png (argmax
of the gating model's fused segmentation over sliding windows at the scene's own
resolution; pixels whose confidence is below the threshold, or without data,
become the ignore index 255), OUT/confidence/<stem>.tif (max softmax probability,
float32 in [0, 1]) and OUT/classes.json, OUT/data.json (the teacher's classes,
the images' units). OUT's manifest (upscale.ownership) records each file before
it is made; each is written under a temporary name and renamed, and an image
whose mask and confidence already exist is skipped, so an interrupted run
resumes where it stopped. OUT is then a `PseudoLabelFolder` for
`samoe train --stage 1 --data OUT`.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from upscale.checkpoint import load_model
from upscale.dirfd import Dir
from upscale.errors import SamoeError
from upscale.ownership import Owned, check_separate

from .augment import tta_mean
from .classes import CLASSES_JSON, read_classes, write_classes
from .data import IGNORE_INDEX, UnlabelledFolder, write_confidence, write_mask
from .dataspec import class_list, recorded
from .outputs import resumable_output
from .predict import Scene, Tiling, model_forward, open_scene, resized_bands, sliding_windows
from .rasters import check_memory
from .units import DATA_JSON, UnitOptions, resolve_units


def _place_image(out: Owned, images: Dir, src: Path, name: str) -> None:
    """A hard link to the input image (a copy where links are impossible), renamed into place."""
    if images.kind(name) == "file":
        return
    tmp = out.temp(name)
    try:
        os.link(src, tmp, dst_dir_fd=images.fd)
    except OSError:
        with open(src, "rb") as f, images.create(tmp) as g:
            shutil.copyfileobj(f, g)
    try:
        images.replace(tmp, name)
    except BaseException:
        images.unlink(tmp, missing_ok=True)
        raise


def pseudo_label(ckpt: Path, images: Path, out: Path, threshold: float = 0.0, batch_size: int = 4,
                 device: torch.device | str = "cpu", precision: str = "fp32", on_start: Callable[[int, int], None] | None = None,
                 on_image: Callable[[], None] | None = None, unit_options: UnitOptions | None = None,
                 overlap: float | None = None, stride: int | None = None, tta: bool = False) -> dict[str, int]:
    """Label every image of IMAGES/images not yet labelled in OUT; return counts.

    OUT must be new, empty, or an earlier pseudo-label output whose manifest records all it holds:
    never a folder holding masks someone else wrote. A failure or Ctrl-C leaves only recorded,
    complete files and says what this run wrote (the exception's `samoe_left`).
    """
    out = Path(out)
    check_separate(out, "--out", {"--images": images, "the teacher checkpoint": ckpt})
    with resumable_output(out, "pseudo-label", "new mask(s)") as (target, done):

        def counted() -> None:
            done[0] += 1
            if on_image:
                on_image()

        return _pseudo_label(ckpt, images, target, threshold, batch_size, on_start, counted, torch.device(device), precision,
                             unit_options, overlap, stride, tta)


def _pseudo_label(ckpt: Path, images: Path, out: Owned, threshold: float = 0.0, batch_size: int = 4,
                  on_start: Callable[[int, int], None] | None = None, on_image: Callable[[], None] | None = None,
                  device: torch.device = torch.device("cpu"), precision: str = "fp32",
                  unit_options: UnitOptions | None = None, overlap: float | None = None,
                  stride: int | None = None, tta: bool = False) -> dict[str, int]:
    """Label every image of IMAGES/images not yet labelled in OUT; return counts.

    The teacher runs on `device` (bf16 autocast with `precision` bf16) over sliding windows of each
    scene at its own resolution (stages/predict.py); masks and confidences come from the blended fp32
    probabilities of its gating model; with `tta`, each window's are the mean over the 8 symmetries of the
    square (a better teacher than one view). OUT gets the teacher's classes.json and the images' data.json,
    so training on OUT reads its images in their units.
    """
    from upscale.checkpoint import Checkpoint

    if not 0.0 <= threshold <= 1.0:
        raise SamoeError(f"--threshold {threshold} must be in [0, 1]")
    if batch_size < 1:
        raise SamoeError("--batch-size must be >= 1")
    teacher = Checkpoint.open(ckpt)  # opened once: its record and its weights come from the same files
    spec = recorded(teacher.meta, str(teacher.path / "samoe.json"))
    units = resolve_units(images, unit_options or UnitOptions(), spec.units if spec else None)
    data_native = UnlabelledFolder(images, units=units)  # validates the folder and the units; native sizes
    c = teacher.config.num_classes
    classes = class_list(spec, c) or read_classes(images)
    if classes is not None and len(classes.names) != c:
        raise SamoeError(f"{images}'s {CLASSES_JSON} names {len(classes.names)} classes but the teacher predicts {c}: "
                         "label with a teacher of those classes")
    tiling = Tiling.of(teacher.config.img_size, overlap, stride)
    resize = bool(spec and spec.resize)
    subs = ("images", "masks", "confidence")
    out.record(*subs, kind="dir", save=False)
    out.record(CLASSES_JSON, DATA_JSON)
    image_dir, mask_dir, conf_dir = (out.dir.sub(sub, create=True) for sub in subs)
    if classes is not None:
        write_classes(out.dir, classes, out.token)
    out.dir.write_bytes(DATA_JSON, (json.dumps(units.to_json()) + "\n").encode(), out.token)
    todo = [i for i, name in enumerate(data_native.names)
            if not (mask_dir.kind(f"{name}.png") == "file" and conf_dir.kind(f"{name}.tif") == "file")]
    if on_start:
        on_start(len(data_native), len(todo))
    model = load_model(teacher, device=device)
    model.eval()
    teacher = model_forward(model, next(model.parameters()).device, precision, lambda o: o["gate_seg"].softmax(dim=1))

    def forward(x: torch.Tensor, windows: list) -> torch.Tensor:
        return tta_mean(lambda v: teacher(v, windows), x) if tta else teacher(x, windows)
    counts = {"ignored": 0, "labelled": 0, "pixels": 0}
    opened: list[Scene] = []

    def scenes() -> Iterator[Scene]:
        for i in todo:
            item = data_native.items[i]
            h, w = data_native.scene_size(i)
            check_memory(h * w * (4 * c + 16), item.image, "image", "pseudo-labelling it whole (mask and confidence)")
            out.record(f"images/{item.image.name}", f"masks/{item.name}.png", f"confidence/{item.name}.tif")
            opened.append(open_scene(item.image, item.name, units, tiling, c, resize, check_units=False))
            opened[-1].tag = (opened[-1].tag, item.image, [])
            yield opened[-1]

    try:
        for band in resized_bands(sliding_windows(scenes(), tiling, batch_size, c, forward)):
            raster, src_image, parts = band.scene.tag
            parts.append(band)
            if not band.last:
                continue
            probs = np.concatenate([b.values for b in parts], axis=1)
            valid = np.concatenate([b.valid for b in parts])
            conf, mask = probs.max(axis=0), probs.argmax(axis=0).astype(np.int64)
            mask[(conf < threshold) | ~valid] = IGNORE_INDEX
            conf[~valid] = 0.0
            counts["ignored"] += int((mask == IGNORE_INDEX).sum())
            counts["pixels"] += mask.size
            name = band.scene.name
            _place_image(out, image_dir, src_image, src_image.name)
            with conf_dir.atomic(f"{name}.tif", out.token) as f:
                write_confidence(f, np.clip(conf, 0, 1))
            with mask_dir.atomic(f"{name}.png", out.token) as f:
                write_mask(f, mask)
            raster.close()
            counts["labelled"] += 1
            if on_image:
                on_image()
    finally:
        for scene in opened:
            scene.tag[0].close()
    ignored, pixels = counts["ignored"], counts["pixels"]
    return {"images": len(data_native), "labelled": counts["labelled"], "skipped": len(data_native) - len(todo),
            "ignored_pixels": ignored, "pixels": pixels, "kept_fraction": 1 - ignored / pixels if pixels else None}
