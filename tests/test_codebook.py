"""The knowledge-bound codebook set (`demo-data --preset codebook`): a fixed table, parcels that wear it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from stages.codebook import (
    DEFAULT_GRID,
    GRIDS,
    NUM_CLASSES,
    codebook,
    codebook_layout,
    codebook_scene,
)
from stages.data import DataError, make_demo_data, read_image, read_mask


@pytest.mark.parametrize("grid", list(GRIDS))
def test_the_table_is_balanced_distinct_and_fixed_by_its_size_alone(grid: str) -> None:
    g = GRIDS[grid]
    book = codebook(100, grid=grid)
    assert len(book) == 100 and len(set(book.signatures)) == 100  # drawn without replacement
    counts = np.bincount(book.classes, minlength=NUM_CLASSES)
    assert counts.min() == 100 // NUM_CLASSES and counts.max() == 100 // NUM_CLASSES + 1
    for s in book.signatures:
        assert s.vv_db in g.vv_db and s.ratio_db in g.ratios_db and s.looks in g.looks and s.texture in g.textures
        assert s.vv_db - s.ratio_db >= -30  # VH stays above samoe's input clip (stages/data.py DB_MIN)
    codebook.cache_clear()
    assert codebook(100, grid=grid) == book  # a function of (n, table seed, grid), not of any scene seed
    assert codebook(100, table_seed=1, grid=grid) != book and codebook(101, grid=grid).signatures[:100] != book.signatures
    assert len(codebook(g.size, grid=grid)) == g.size and len(set(codebook(g.size, grid=grid).signatures)) == g.size
    assert len(codebook(grid=grid)) == g.default_signatures
    with pytest.raises(ValueError, match="between 1 and"):
        codebook(g.size + 1, grid=grid)


def test_the_grids() -> None:
    """Worked by hand: fine is VV -20..-1 dB and ratio 2..9 dB in 0.25 dB steps (77 x 29), one look count, no
    texture; coarse is 1 dB steps (20 x 8) x looks {1, 4, 16} x texture {0, 2}. The default is fine."""
    fine, coarse = GRIDS["fine"], GRIDS["coarse"]
    assert fine.size == 77 * 29 == 2233 and fine.vv_db[:3] == (-20.0, -19.75, -19.5) and fine.ratios_db[-1] == 9.0
    assert fine.looks == (16,) and fine.textures == (0.0,)
    assert coarse.size == 20 * 8 * 3 * 2 == 960 and coarse.vv_db == tuple(float(v) for v in range(-20, 0))
    assert DEFAULT_GRID == "fine"
    assert codebook(100, grid="fine").signatures != codebook(100, grid="coarse").signatures
    with pytest.raises(ValueError, match="unknown codebook grid"):
        codebook(10, grid="medium")


def _expected_cv2(looks: int, texture: float) -> float:
    """Squared coefficient of variation of texture x speckle: Gamma(L) speckle and Gamma(nu) texture, both mean 1."""
    speckle = 1.0 + 1.0 / looks
    tex = 1.0 + 1.0 / texture if texture else 1.0
    return speckle * tex - 1.0


@pytest.mark.parametrize("seed,grid", [(3, "coarse"), (11, "coarse"), (5, "fine")])
def test_each_parcel_carries_its_signatures_statistics_and_class(seed: int, grid: str) -> None:
    """Per parcel, mean VV, VV/VH ratio, the spread of VV and the mask agree with the signature it was dealt
    (moments worked out from the Gamma laws, with tolerances of several standard errors)."""
    n, size = 48, 384
    book = codebook(n, grid=grid)
    image, mask = codebook_scene(np.random.default_rng(seed), size, signatures=n, grid=grid)
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
        assert abs(10 * np.log10(vv[sel].mean() / vh[sel].mean()) - sig.ratio_db) < (0.5 if grid == "coarse" else 0.1)
        assert abs(vv[sel].var() / vv[sel].mean() ** 2 - cv2) < 0.25 * cv2 + 0.02
        checked += 1
    assert checked >= 3


def test_demo_data_is_deterministic_and_shares_its_table_across_seeds(tmp_path: Path) -> None:
    args = dict(labelled=3, unlabelled=1, test=2, size=64, preset="codebook", signatures=40)
    a = make_demo_data(tmp_path / "a", seed=5, **args)
    b = make_demo_data(tmp_path / "b", seed=5, **args)
    c = make_demo_data(tmp_path / "c", seed=6, **args)
    assert a["num_classes"] == NUM_CLASSES and a["signatures"] == 40 and a["grid"] == DEFAULT_GRID
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
    with pytest.raises(DataError, match="between 1 and 960 .the coarse grid"):
        make_demo_data(tmp_path / "y", preset="codebook", signatures=961, grid="coarse")
    with pytest.raises(DataError, match="--grid needs --preset codebook"):
        make_demo_data(tmp_path / "z", preset="easy", grid="fine")
    with pytest.raises(DataError, match="unknown codebook grid"):
        make_demo_data(tmp_path / "w", preset="codebook", grid="medium")
    assert not any((tmp_path / n).exists() for n in "xyzw")
