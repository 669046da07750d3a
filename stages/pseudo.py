"""`samoe pseudo-label`: a teacher checkpoint labels an unlabelled SAR folder once (strategy 3).

Writes OUT/images/ (links or copies of the inputs), OUT/masks/<stem>.png (argmax
of the gating model's fused segmentation; pixels whose confidence is below the
threshold become the ignore index 255) and OUT/confidence/<stem>.tif (max
softmax probability, float32 in [0, 1]). Each file is written under a temporary
name and renamed, and an image whose mask and confidence already exist is
skipped, so an interrupted run resumes where it stopped. OUT is then a
`PseudoLabelFolder` for `samoe train --stage 1 --data OUT`.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from upscale.checkpoint import load_model
from upscale.errors import SamoeError
from upscale.ownership import OWNER_FILE, check_separate, is_empty_dir, owner, write_marker

from .augment import tta_mean
from .data import IGNORE_INDEX, UnlabelledFolder, write_confidence, write_mask


def _atomic(path: Path, write: Callable[[Path], None]) -> None:
    """Write into OUT/.partial/ (never listed as data), then rename into place."""
    tmp = path.parent.parent / ".partial" / f"{os.getpid()}-{path.name}"
    tmp.parent.mkdir(exist_ok=True)
    write(tmp)
    os.replace(tmp, path)


def _place_image(src: Path, dst: Path) -> None:
    if dst.exists():
        return

    def link_or_copy(tmp: Path) -> None:
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)

    _atomic(dst, link_or_copy)


def pseudo_label(ckpt: Path, images: Path, out: Path, threshold: float = 0.0, batch_size: int = 4,
                 device: torch.device | str = "cpu", precision: str = "fp32", on_start: Callable[[int, int], None] | None = None,
                 on_image: Callable[[], None] | None = None, tta: bool = False) -> dict[str, int]:
    """Label every image of IMAGES/images not yet labelled in OUT; return counts.

    OUT must be new, empty, or an earlier pseudo-label output (its `.samoe-owner.json`):
    never a folder holding masks someone else wrote. A failure or Ctrl-C removes
    `.partial/` and says what this run wrote (the exception's `samoe_left`).
    """
    out = Path(out)
    check_separate(out, "--out", {"--images": images, "the teacher checkpoint": ckpt})
    if (out.exists() or out.is_symlink()) and not is_empty_dir(out) and owner(out) != "pseudo-label":
        raise SamoeError(f"{out} exists and was not written by samoe pseudo-label (no {OWNER_FILE}): refusing to write "
                         "into it, it may hold masks of its own; choose a new --out")
    created = not out.exists()
    done = [0]

    def counted() -> None:
        done[0] += 1
        if on_image:
            on_image()

    try:
        out.mkdir(parents=True, exist_ok=True)
        if owner(out) != "pseudo-label":
            write_marker(out, "pseudo-label")
        return _pseudo_label(ckpt, images, out, threshold, batch_size, on_start, counted, torch.device(device), precision, tta)
    except BaseException as e:
        if created and done[0] == 0:
            shutil.rmtree(out, ignore_errors=True)
        elif isinstance(e, Exception | KeyboardInterrupt):
            e.samoe_left = f"{done[0]} new mask(s) were written to {out}; re-run the same command to finish"
        raise
    finally:
        shutil.rmtree(out / ".partial", ignore_errors=True)


@torch.no_grad()
def _pseudo_label(ckpt: Path, images: Path, out: Path, threshold: float = 0.0, batch_size: int = 4,
                  on_start: Callable[[int, int], None] | None = None, on_image: Callable[[], None] | None = None,
                  device: torch.device = torch.device("cpu"), precision: str = "fp32", tta: bool = False) -> dict[str, int]:
    """Label every image of IMAGES/images not yet labelled in OUT; return counts.

    The teacher runs on `device` (bf16 autocast with `precision` bf16); masks and confidences are
    computed from its fp32 probabilities on the CPU, at each image's native size. With `tta` the
    probabilities are the mean over the 8 symmetries of the square (a better teacher than one view).
    """
    from upscale.device import autocast

    if not 0.0 <= threshold <= 1.0:
        raise SamoeError(f"--threshold {threshold} must be in [0, 1]")
    if batch_size < 1:
        raise SamoeError("--batch-size must be >= 1")
    if out.resolve() == images.resolve():
        raise SamoeError("--out must differ from --images: pseudo-labels go to a new folder")
    data_native = UnlabelledFolder(images)  # validates the folder; native sizes
    model = load_model(ckpt, device=device)
    model.eval()
    size = model.config.img_size
    for sub in ("images", "masks", "confidence"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    todo = [i for i, name in enumerate(data_native.names)
            if not ((out / "masks" / f"{name}.png").exists() and (out / "confidence" / f"{name}.tif").exists())]
    if on_start:
        on_start(len(data_native), len(todo))
    ignored = labelled = pixels = 0
    for start in range(0, len(todo), batch_size):
        idx = todo[start : start + batch_size]
        items = [data_native[i] for i in idx]
        x = torch.stack([F.interpolate(it["image"][None], (size, size), mode="bilinear", align_corners=False)[0] for it in items])
        x = x.to(device, next(model.parameters()).dtype)

        def teacher(v: torch.Tensor) -> torch.Tensor:
            with autocast(device, precision):
                return model(v)["gate_seg"].float().softmax(dim=1)

        probs = (tta_mean(teacher, x) if tta else teacher(x)).cpu()
        for it, i, p in zip(items, idx, probs):
            h, w = it["image"].shape[-2:]
            p = F.interpolate(p[None], (h, w), mode="bilinear", align_corners=False)[0]
            conf, mask = p.max(dim=0)
            mask = mask.numpy().astype(np.int64)
            mask[conf.numpy() < threshold] = IGNORE_INDEX
            ignored += int((mask == IGNORE_INDEX).sum())
            pixels += mask.size
            name = it["name"]
            src_image = data_native.items[i].image
            _place_image(src_image, out / "images" / src_image.name)
            _atomic(out / "confidence" / f"{name}.tif", lambda t: write_confidence(t, conf.clamp(0, 1).numpy()))
            _atomic(out / "masks" / f"{name}.png", lambda t: write_mask(t, mask))
            labelled += 1
            if on_image:
                on_image()
    shutil.rmtree(out / ".partial", ignore_errors=True)
    return {"images": len(data_native), "labelled": labelled, "skipped": len(data_native) - len(todo), "ignored_pixels": ignored,
            "pixels": pixels, "kept_fraction": 1 - ignored / pixels if pixels else None}
