"""The symmetries of the square (rotations by 90 degrees, with or without a flip) as augmentation and TTA.

Noisy Student needs noise on the student (strong augmentation); a teacher is better averaged over
transformed views of an image (test-time augmentation). For land-cover segmentation of SAR scenes the
eight symmetries of the square are label-preserving and exact on the pixel grid: masks, distance-transform
(SDF) and boundary targets transform with the image, with no interpolation. Radiometric jitter is not
used: a scene's backscatter level is part of what tells classes apart.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

SPATIAL_KEYS = ("image", "mask", "sdf", "boundary", "confidence")  # batch entries whose last two dims are (H, W)


def d4(x: Tensor, code: int) -> Tensor:
    """Symmetry `code` in 0..7 of the last two (square) dims: rotate by 90 * (code % 4) degrees, then flip left-right
    when code >= 4."""
    x = torch.rot90(x, code % 4, dims=(-2, -1))
    return x.flip(-1) if code >= 4 else x


def d4_inverse(x: Tensor, code: int) -> Tensor:
    """Undo `d4(., code)`."""
    if code >= 4:
        x = x.flip(-1)
    return torch.rot90(x, -(code % 4), dims=(-2, -1))


def augment_batch(batch: dict[str, Any], gen: torch.Generator) -> dict[str, Any]:
    """Each image of a batch and its targets under one symmetry drawn per image (no quarter turns of non-square ones)."""
    h, w = batch["image"].shape[-2:]
    n = batch["image"].shape[0]
    # a non-square image keeps its shape under the codes 0, 2, 4, 6 only (identity, 180 degrees, the two flips)
    codes = torch.randint(8, (n,), generator=gen) if h == w else 2 * torch.randint(4, (n,), generator=gen)
    out = dict(batch)
    for key in SPATIAL_KEYS:
        if key in batch:
            out[key] = torch.stack([d4(t, int(c)) for t, c in zip(batch[key], codes)])
    return out


def tta_mean(predict: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    """The mean of `predict` over the 8 symmetries of x (B, C, H, W), each mapped back; a non-square x uses the 4 that
    keep its shape."""
    square = x.shape[-1] == x.shape[-2]
    codes = range(8) if square else (0, 2, 4, 6)
    return sum(d4_inverse(predict(d4(x, c)), c) for c in codes) / len(codes)
