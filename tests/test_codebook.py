"""The knowledge-bound codebook set (`demo-data --preset codebook`): a fixed table, parcels that wear it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from stages.codebook import (
    GRID_SIZE,
    LOOKS,
    NUM_CLASSES,
    RATIOS_DB,
    TEXTURE_ORDERS,
    VV_LEVELS_DB,
    codebook,
    codebook_layout,
    codebook_scene,
)
from stages.data import DataError, make_demo_data, read_image, read_mask


def test_the_table_is_balanced_distinct_and_fixed_by_its_size_alone() -> None:
    book = codebook(100)
    assert len(book) == 100 and len(set(book.signatures)) == 100  # drawn without replacement
    counts = np.bincount(book.classes, minlength=NUM_CLASSES)
    assert counts.min() == 100 // NUM_CLASSES and counts.max() == 100 // NUM_CLASSES + 1
    for s in book.signatures:
        assert s.vv_db in VV_LEVELS_DB and s.ratio_db in RATIOS_DB and s.looks in LOOKS and s.texture in TEXTURE_ORDERS
        assert s.vv_db - s.ratio_db >= -30  # VH stays above samoe's input clip (stages/data.py DB_MIN)
    codebook.cache_clear()
    assert codebook(100) == book  # a function of (n, table seed), not of any scene seed
    assert codebook(100, table_seed=1) != book and codebook(101).signatures[:100] != book.signatures
    assert len(codebook(GRID_SIZE)) == GRID_SIZE
    with pytest.raises(ValueError, match="between 1 and"):
        codebook(GRID_SIZE + 1)


def _expected_cv2(looks: int, texture: float) -> float:
    """Squared coefficient of variation of texture x speckle: Gamma(L) speckle and Gamma(nu) texture, both mean 1."""
    speckle = 1.0 + 1.0 / looks
    tex = 1.0 + 1.0 / texture if texture else 1.0
    return speckle * tex - 1.0


@pytest.mark.parametrize("seed", [3, 11])
def test_each_parcel_carries_its_signatures_statistics_and_class(seed: int) -> None:
    """Per parcel, mean VV, VV/VH ratio, the spread of VV and the mask agree with the signature it was dealt
    (moments worked out from the Gamma laws, with tolerances of several standard errors)."""
    n, size = 48, 384
    book = codebook(n)
    image, mask = codebook_scene(np.random.default_rng(seed), size, signatures=n)
    cell, chosen = codebook_layout(np.random.default_rng(seed), size, book)  # the same draws, layout first
    vv, vh = image.astype(np.float64)
    checked = 0
    for p, i in enumerate(chosen):
        sel = cell == p
        if sel.sum() < 2000:
            continue
        sig = book.signatures[i]
        assert (mask[sel] == book.classes[i]).all()
        cv2 = _expected_cv2(sig.looks, sig.texture)
        level = 10 ** (sig.vv_db / 10)
        se = np.sqrt(cv2 / sel.sum())
        assert abs(vv[sel].mean() / level - 1) < 6 * se + 0.02
        assert abs(10 * np.log10(vv[sel].mean() / vh[sel].mean()) - sig.ratio_db) < 0.5
        assert abs(vv[sel].var() / vv[sel].mean() ** 2 - cv2) < 0.25 * cv2 + 0.02
        checked += 1
    assert checked >= 3


def test_demo_data_is_deterministic_and_shares_its_table_across_seeds(tmp_path: Path) -> None:
    args = dict(labelled=3, unlabelled=1, test=2, size=64, preset="codebook", signatures=40)
    a = make_demo_data(tmp_path / "a", seed=5, **args)
    b = make_demo_data(tmp_path / "b", seed=5, **args)
    c = make_demo_data(tmp_path / "c", seed=6, **args)
    assert a["num_classes"] == NUM_CLASSES and a["signatures"] == 40
    for f in sorted((tmp_path / "a").rglob("*.*")):
        if f.name.startswith("."):
            continue
        twin = tmp_path / "b" / f.relative_to(tmp_path / "a")
        assert twin.read_bytes() == f.read_bytes(), f
    img = lambda root: read_image(root / "A" / "images" / "a-0000.tif")
    assert not np.array_equal(img(tmp_path / "a"), img(tmp_path / "c"))  # another seed: other scenes ...
    book = codebook(40)
    for root in (tmp_path / "a", tmp_path / "c"):  # ... drawn from the same 40 facts
        for m in (root / "A" / "masks").glob("*.png"):
            assert set(np.unique(read_mask(m))) <= set(book.classes)
    summary = json.loads((tmp_path / "c" / "demo-data.json").read_text())
    assert summary["preset"] == "codebook" and summary["signatures"] == 40 and len(summary["classes"]) == NUM_CLASSES


def test_signatures_are_checked(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="--signatures needs --preset codebook"):
        make_demo_data(tmp_path / "x", preset="hard", signatures=10)
    with pytest.raises(DataError, match="between 1 and"):
        make_demo_data(tmp_path / "y", preset="codebook", signatures=GRID_SIZE + 1)
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
