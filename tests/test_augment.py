"""Symmetries of the square as training augmentation and teacher TTA (stages/augment.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from stages.augment import augment_batch, d4, d4_inverse, tta_mean
from stages.data import ConcatFolders, LabelledFolder, boundary_target, make_demo_data, sdf_target


def test_the_eight_codes_are_the_eight_distinct_symmetries_and_invert() -> None:
    x = torch.arange(9.0).reshape(1, 3, 3)
    views = {tuple(d4(x, c).flatten().tolist()) for c in range(8)}
    assert len(views) == 8
    assert torch.equal(d4(x, 1)[0], torch.tensor([[2.0, 5, 8], [1, 4, 7], [0, 3, 6]]))  # 90 degrees counter-clockwise
    assert torch.equal(d4(x, 4)[0], torch.tensor([[2.0, 1, 0], [5, 4, 3], [8, 7, 6]]))  # flip left-right
    for c in range(8):
        assert torch.equal(d4_inverse(d4(x, c), c), x)


@pytest.mark.parametrize("code", range(8))
def test_targets_transform_with_the_mask(code: int) -> None:
    """The oracle: the SDF and boundary targets of a transformed mask are the transformed targets (exact EDT)."""
    rng = np.random.default_rng(code)
    mask = np.zeros((20, 20), dtype=np.uint8)
    mask[3:12, 5:17] = 1
    mask[rng.integers(0, 20, 30), rng.integers(0, 20, 30)] = 2
    moved = d4(torch.from_numpy(mask), code).numpy()
    assert np.array_equal(sdf_target(moved, 3), d4(torch.from_numpy(sdf_target(mask, 3)), code).numpy())
    assert np.array_equal(boundary_target(moved), d4(torch.from_numpy(boundary_target(mask)), code).numpy())


def test_augment_batch_moves_image_and_every_target_together() -> None:
    img = torch.arange(2 * 3 * 4 * 4.0).reshape(2, 3, 4, 4)
    batch = {"image": img, "mask": img[:, 0].long(), "sdf": img[:, :2] * 2, "boundary": img[:, :1] + 1,
             "confidence": img[:, 0] / 100, "name": ["a", "b"]}
    out = augment_batch(batch, torch.Generator().manual_seed(3))
    again = augment_batch(batch, torch.Generator().manual_seed(3))
    assert all(torch.equal(out[k], again[k]) for k in ("image", "mask"))  # seeded: resumes exactly
    for i in range(2):
        code = next(c for c in range(8) if torch.equal(d4(img[i], c), out["image"][i]))
        assert torch.equal(out["mask"][i], d4(batch["mask"][i], code))
        assert torch.equal(out["sdf"][i], d4(batch["sdf"][i], code))
        assert torch.equal(out["boundary"][i], d4(batch["boundary"][i], code))
        assert torch.equal(out["confidence"][i], d4(batch["confidence"][i], code))
    assert out["name"] == ["a", "b"]
    wide = {"image": torch.arange(2 * 4 * 6.0).reshape(2, 1, 4, 6)}
    for seed in range(10):  # non-square: only the symmetries that keep the shape
        assert augment_batch(wide, torch.Generator().manual_seed(seed))["image"].shape == (2, 1, 4, 6)


def test_tta_mean_of_a_pixelwise_function_is_the_function_and_averages_a_position_dependent_one() -> None:
    x = torch.randn(2, 3, 5, 5)
    assert torch.allclose(tta_mean(torch.sigmoid, x), torch.sigmoid(x), atol=1e-6)
    ramp = torch.arange(5.0).expand(5, 5)  # a predictor that adds the column index
    out = tta_mean(lambda v: v + ramp, x)
    # over the 8 symmetries each pixel's column index becomes every row and column index of its orbit: mean 2
    assert torch.allclose(out, x + 2.0, atol=1e-6)


def test_concat_folders_serve_every_item_once_with_confidence_for_true_labels(tmp_path: Path, src: Path) -> None:
    from stages.data import PseudoLabelFolder
    from stages.pseudo import pseudo_label

    make_demo_data(tmp_path / "d", labelled=3, unlabelled=2, test=2, size=32, seed=1)
    a, t = LabelledFolder(tmp_path / "d" / "A", 4), LabelledFolder(tmp_path / "d" / "A-test", 4)
    both = ConcatFolders([a, t])
    assert len(both) == 5 and [both[i]["name"] for i in range(5)] == a.names + t.names
    assert "confidence" not in both[0]  # no pseudo-labelled folder: items as they are
    pseudo_label(src, tmp_path / "d" / "B", tmp_path / "p")
    p = PseudoLabelFolder(tmp_path / "p", 4)
    mixed = ConcatFolders([a, p])
    assert len(mixed) == 5
    for i in range(3):
        assert torch.equal(mixed[i]["confidence"], torch.ones(32, 32))  # true labels count fully
        assert torch.equal(mixed[i]["mask"], a[i]["mask"])
    for i in range(2):
        assert torch.equal(mixed[3 + i]["confidence"], p[i]["confidence"])
