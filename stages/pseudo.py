"""`samoe pseudo-label`: a teacher checkpoint labels an unlabelled SAR folder once (strategy 3).

Writes OUT/images/ (links or copies of the inputs), OUT/masks/<stem>.png (argmax
of the gating model's fused segmentation; pixels whose confidence is below the
threshold become the ignore index 255) and OUT/confidence/<stem>.tif (max
softmax probability, float32 in [0, 1]). OUT's manifest (upscale.ownership)
records each file before it is made; each is written under a temporary name
and renamed, and an image whose mask and confidence already exist is skipped,
so an interrupted run resumes where it stopped. OUT is then a
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
from upscale.dirfd import Dir
from upscale.errors import SamoeError
from upscale.ownership import Owned, check_separate, open_output

from .augment import tta_mean
from .data import IGNORE_INDEX, UnlabelledFolder, write_confidence, write_mask


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
                 on_image: Callable[[], None] | None = None, tta: bool = False) -> dict[str, int]:
    """Label every image of IMAGES/images not yet labelled in OUT; return counts.

    OUT must be new, empty, or an earlier pseudo-label output whose manifest records all it holds:
    never a folder holding masks someone else wrote. A failure or Ctrl-C leaves only recorded,
    complete files and says what this run wrote (the exception's `samoe_left`).
    """
    out = Path(out)
    check_separate(out, "--out", {"--images": images, "the teacher checkpoint": ckpt})
    created = not (out.exists() or out.is_symlink())
    target = open_output(out, "pseudo-label", "--out", force=False, resume=True)
    done = [0]

    def counted() -> None:
        done[0] += 1
        if on_image:
            on_image()

    try:
        return _pseudo_label(ckpt, images, target, threshold, batch_size, on_start, counted, torch.device(device), precision,
                             tta)
    except BaseException as e:
        if created and done[0] == 0:
            target.discard()
        elif isinstance(e, Exception | KeyboardInterrupt):
            e.samoe_left = f"{done[0]} new mask(s) were written to {out}; re-run the same command to finish"
        raise
    finally:
        target.dir.close()


@torch.no_grad()
def _pseudo_label(ckpt: Path, images: Path, out: Owned, threshold: float = 0.0, batch_size: int = 4,
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
    data_native = UnlabelledFolder(images)  # validates the folder; native sizes
    model = load_model(ckpt, device=device)
    model.eval()
    size = model.config.img_size
    subs = ("images", "masks", "confidence")
    out.record(*subs, kind="dir")
    image_dir, mask_dir, conf_dir = (out.dir.sub(sub, create=True) for sub in subs)
    todo = [i for i, name in enumerate(data_native.names)
            if not (mask_dir.kind(f"{name}.png") == "file" and conf_dir.kind(f"{name}.tif") == "file")]
    if on_start:
        on_start(len(data_native), len(todo))
    ignored = labelled = pixels = 0
    for start in range(0, len(todo), batch_size):
        idx = todo[start : start + batch_size]
        items = [data_native[i] for i in idx]
        out.record(*[f"{sub}/{data_native.items[i].name}{ext}" for i in idx
                     for sub, ext in (("masks", ".png"), ("confidence", ".tif"))],
                   *[f"images/{data_native.items[i].image.name}" for i in idx])
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
            _place_image(out, image_dir, src_image, src_image.name)
            with conf_dir.atomic(f"{name}.tif", out.token) as f:
                write_confidence(f, conf.clamp(0, 1).numpy())
            with mask_dir.atomic(f"{name}.png", out.token) as f:
                write_mask(f, mask)
            labelled += 1
            if on_image:
                on_image()
    return {"images": len(data_native), "labelled": labelled, "skipped": len(data_native) - len(todo), "ignored_pixels": ignored,
            "pixels": pixels, "kept_fraction": 1 - ignored / pixels if pixels else None}
