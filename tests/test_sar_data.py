"""A SAR user's own data: declared units, classes.json, scenes larger than the model, validation while training.

Oracles: the unit conversions worked by hand (each scale of one scene gives the
linear scene's input), values that contradict a scale, the class names a
classes.json declares and where they must show up, mask pixels counted by hand,
and the validation rows that RUN/best must match.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import shutil
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import cli
from stages.classes import ClassList, read_classes
from stages.data import DEMO_CLASSES, DataError, LabelledFolder, read_mask, sar_to_input, write_image, write_mask
from stages.evaluate import evaluate, resolution_text, run_model
from stages.rasters import set_image_memory
from stages.units import UnitOptions, Units, check_plausible, resolve_units
from upscale import load_model
from upscale.checkpoint import Checkpoint
from upscale.config import PRESETS
from upscale.create import init_from_preset
from upscale.expand import GrowthSpec, expand_checkpoint, resolve_groups
from conftest import one_error_line

pytestmark = pytest.mark.usefixtures("one_thread")
SIX = ["open_water", "flooded_forest", "city", "forest", "cropland", "bare"]


def samoe(*args):
    return CliRunner().invoke(cli.app, [str(a) for a in args])


def power(seed: int, shape: tuple[int, ...]) -> np.ndarray:
    """Linear sigma0 around -10 dB with 4-look speckle, like a real scene."""
    return np.random.default_rng(seed).gamma(4, 0.025, size=shape).astype(np.float32)


def as_scale(p: np.ndarray, scale: str) -> np.ndarray:
    """The same scene stored in another unit."""
    return {"linear": p, "db": (10 * np.log10(p)).astype(np.float32), "amplitude": np.sqrt(p).astype(np.float32),
            "dn": np.round(np.sqrt(p.astype(np.float64)) * 474.0).astype(np.uint16)}[scale]


def units_of(scale: str) -> Units:
    return Units(scale, 474.0 if scale == "dn" else None)


# --------------------------------------------------------------------------- units


@pytest.mark.parametrize("scale", ["db", "amplitude", "dn"])
def test_each_scale_declared_rightly_gives_the_linear_input(scale):
    p = power(0, (2, 32, 40))
    stored = as_scale(p, scale)
    linear = p if scale != "dn" else ((stored.astype(np.float64) / 474.0) ** 2).astype(np.float32)  # DN are rounded
    np.testing.assert_allclose(sar_to_input(stored, units_of(scale)), sar_to_input(linear, Units("linear")), atol=2e-5)


@pytest.mark.parametrize("actual, declared", [
    ("db", "linear"), ("db", "amplitude"), ("db", "dn"),
    ("dn", "linear"), ("dn", "amplitude"), ("dn", "db"),
    ("amplitude", "db"), ("amplitude", "dn"),
    ("linear", "db"), ("linear", "dn"),
])
def test_wrongly_declared_units_are_refused(actual, declared):
    stored = as_scale(power(1, (2, 64, 64)), actual)
    with pytest.raises(DataError, match="--input-scale"):
        check_plausible(stored, stored.dtype, units_of(declared), "scene x.tif")
    check_plausible(stored, stored.dtype, units_of(actual), "scene x.tif")  # rightly declared: accepted


def test_display_scale_is_for_integers_only():
    with pytest.raises(DataError, match="display"):
        check_plausible(np.ones((1, 4, 4), np.float32), np.dtype("float32"), Units("display"), "x")


def _folder(root: Path, images: dict[str, np.ndarray], masks: bool = True) -> Path:
    (root / "images").mkdir(parents=True)
    if masks:
        (root / "masks").mkdir()
    for stem, img in images.items():
        write_image(root / "images" / f"{stem}.tif", img)
        if masks:
            write_mask(root / "masks" / f"{stem}.png", np.zeros(img.shape[-2:], np.uint8))
    return root


def test_data_json_is_read_beside_the_folders_and_the_option_must_agree(tmp_path):
    folder = _folder(tmp_path / "data" / "A", {"a": as_scale(power(2, (2, 16, 16)), "db")})
    assert resolve_units(folder) == Units("linear")  # nothing declared, nothing recorded: linear
    (tmp_path / "data" / "data.json").write_text('{"input_scale": "db", "polarisations": ["VV", "VH"]}')
    assert resolve_units(folder) == Units("db", None, ("VV", "VH"))  # the parent's data.json serves A/
    assert resolve_units(folder, UnitOptions("db")) == Units("db", None, ("VV", "VH"))
    with pytest.raises(DataError, match="--input-scale linear contradicts .*data.json"):
        resolve_units(folder, UnitOptions("linear"))
    (folder / "data.json").write_text('{"input_scale": "db", "typo": 1}')
    with pytest.raises(DataError, match="unknown key 'typo'"):
        resolve_units(folder)
    (folder / "data.json").write_text('{"input_scale": "dn"}')
    with pytest.raises(Exception, match="dn needs the calibration constant"):
        resolve_units(folder)
    assert resolve_units(folder, UnitOptions(dn_calibration=474.0)).dn_calibration == 474.0


# --------------------------------------------------------------------------- classes


def test_class_lists_check_names_colours_and_ignore():
    c = ClassList.of(SIX)
    assert len(c.colors) == 6 and c.ignore_index == 255
    assert ClassList.from_json(json.loads(json.dumps(c.to_json())), "x") == c
    for bad, match in (({"classes": [{"name": "a"}, {"name": "a"}]}, "appears twice"),
                       ({"classes": [{"name": "a", "color": "red"}]}, "#rrggbb"),
                       ({"classes": [{"name": "a"}], "ignore_index": 0}, "not a class id"),
                       ({"classes": [{"name": "[bold]a"}]}, "printable"),
                       ({"classes": [{"name": "a", "id": 3}]}, "positions"),
                       ({"classes": [{"name": "a"}], "colour": 1}, "unknown key")):
        with pytest.raises(Exception, match=match):
            ClassList.from_json(bad, "classes.json")


def test_demo_data_writes_its_presets_classes(data):
    assert read_classes(data / "A") == DEMO_CLASSES
    assert json.loads((data / "data.json").read_text()) == {"input_scale": "linear", "polarisations": ["VV", "VH"]}


@pytest.fixture(scope="module")
def six(tmp_path_factory, data: Path) -> dict[str, Path]:
    """A 6-class data set with classes.json (ignore value 7) and a 6-class tiny checkpoint."""
    root = tmp_path_factory.mktemp("six")
    for split in ("A", "A-test"):
        shutil.copytree(data / split / "images", root / split / "images")
        (root / split / "masks").mkdir()
        for m in sorted((data / split / "masks").iterdir()):
            mask = read_mask(m).astype(np.uint8)
            mask[:16, :64], mask[:16, 64:] = 4, 5  # two more classes in a band at the top
            mask[16:20] = 7  # unlabelled under this data set's ignore value
            write_mask(root / split / "masks" / m.name, mask)
    (root / "classes.json").write_text(json.dumps({"classes": [{"name": n} for n in SIX], "ignore_index": 7}))
    (root / "data.json").write_text('{"input_scale": "linear", "polarisations": ["VV", "VH"]}')
    ckpt = init_from_preset(dataclasses.replace(PRESETS["tiny"], num_classes=6), root / "ck", 0, torch.float32, ["test"], False)
    return {"root": root, "A": root / "A", "test": root / "A-test", "ckpt": Path(ckpt)}


def test_other_ignore_values_become_255_inside(six):
    ds = LabelledFolder(six["test"], 6, ignore_index=7, window=128)
    mask = ds[0]["mask"]
    assert (mask[16:20] == 255).all() and set(mask.unique().tolist()) <= {0, 1, 2, 3, 4, 5, 255}
    with pytest.raises(DataError, match=r"class id\(s\) \[7\]"):
        LabelledFolder(six["test"], 6)  # 7 is a class id under the default ignore value 255


def test_six_class_names_show_in_eval_report_and_figures(six, tmp_path):
    from stages.figures import eval_figures

    res = samoe("eval", six["ckpt"], "--data", six["test"], "--bootstrap", 5, "--report", tmp_path / "rep")
    assert res.exit_code == 0, res.stderr
    for name in SIX:
        assert f"IoU {name}" in res.stdout
        assert f"| {name} |" in (tmp_path / "rep" / "report.md").read_text()
    assert "water" not in res.stdout.replace("open_water", "")
    report = evaluate([six["ckpt"]], six["test"], bootstrap=5)
    assert report["classes"] == SIX and report["ignore_index"] == 7
    figures = {stem: fig for stem, _, fig in eval_figures(report)}
    ticks = [t.get_text() for ax in figures["class-metrics"].axes for t in ax.get_xticklabels()]
    assert all(name in ticks for name in SIX)
    ticks = [t.get_text() for ax in figures["class-groups-ckpt0"].axes for t in ax.get_yticklabels()]
    assert all(name in ticks for name in SIX)


@pytest.fixture(scope="module")
def six_trained(six, tmp_path_factory) -> dict[str, Path]:
    """Stage 1 on the 6-class data with validation every step: RUN/final and RUN/best record the classes."""
    grown = expand_checkpoint(six["ckpt"], tmp_path_factory.mktemp("g6") / "g", GrowthSpec(
        experts=8, groups=resolve_groups(4, 8, "2", 1), extra_blocks=1, noise_std=0.01), ["test"])
    run = tmp_path_factory.mktemp("runs6") / "s1"
    res = samoe("train", "--stage", 1, "--from", grown, "--run-dir", run, "--data", six["A"], "--set", "max_steps=3",
                "--set", "batch_size=4", "--val-data", six["test"], "--set", "val_every=1", "--set", "print_every=1", "--set", "lr=0.5")
    assert res.exit_code == 0, res.stderr
    return {**six, "grown": Path(grown), "run": run, "stdout": res.stdout}


def test_val_data_writes_rows_and_best_holds_the_best_step(six_trained):
    run = six_trained["run"]
    with open(run / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    scores = {int(r["step"]): float(r["val_miou"]) for r in rows}
    assert sorted(scores) == [1, 2, 3] and all(0 <= v <= 1 for v in scores.values())
    best_step = max(scores, key=lambda s: (scores[s], -s))  # the first step reaching the best score
    validation = Checkpoint.open(run / "best").meta["validation"]
    assert validation["step"] == best_step and validation["val_miou"] == pytest.approx(scores[best_step], rel=1e-6)
    assert Checkpoint.open(run / "best").stages[-1]["steps"] == best_step
    # plain lines, not a progress bar, when the output is not a terminal
    assert "step 1/3 epoch" in six_trained["stdout"] and "validation mIoU" in six_trained["stdout"]
    evaluated = evaluate([run / "best"], six_trained["test"], bootstrap=5, ablate_new=False)
    assert evaluated["checkpoints"][0]["metrics"]["miou"] == pytest.approx(scores[best_step], abs=1e-6)


def test_training_records_classes_and_units_and_eval_refuses_other_classes(six_trained, tmp_path):
    final = six_trained["run"] / "final"
    record = Checkpoint.open(final).meta["data"]
    assert [c["name"] for c in record["classes"]["classes"]] == SIX and record["classes"]["ignore_index"] == 7
    assert record["input_scale"] == "linear" and record["polarisations"] == ["VV", "VH"] and record["resize"] is False
    other = tmp_path / "other"
    shutil.copytree(final, other)
    meta = json.loads((other / "samoe.json").read_text())
    meta["data"]["classes"]["classes"][2]["name"] = "urban"
    (other / "samoe.json").write_text(json.dumps(meta))
    one_error_line(samoe("eval", final, other, "--data", six_trained["test"], "--bootstrap", 5),
                   "name different classes", "class 2 is 'city' vs 'urban'")
    (six_trained["root"] / "classes.json").rename(tmp_path / "moved.json")  # the checkpoint alone names the classes
    try:
        res = samoe("eval", final, "--data", six_trained["test"], "--bootstrap", 5, "--no-ablate-new")
        assert res.exit_code == 0, res.stderr
        assert all(f"IoU {name}" in res.stdout for name in SIX)  # and knows the ignore value 7
    finally:
        (tmp_path / "moved.json").rename(six_trained["root"] / "classes.json")


# --------------------------------------------------------------------------- scenes larger than the model


@pytest.fixture(scope="module")
def large(tmp_path_factory) -> Path:
    """One 200 x 300 labelled scene (2 bands, linear) with a mask of known class counts."""
    root = tmp_path_factory.mktemp("large") / "L"
    img = power(5, (2, 200, 300))
    mask = np.zeros((200, 300), np.uint8)
    mask[:, 150:] = 2
    mask[50:60] = 255
    _folder(root, {"big": img}, masks=False)
    (root / "masks").mkdir()
    write_mask(root / "masks" / "big.png", mask)
    return root


def test_training_windows_are_drawn_per_seed_and_epoch(large):
    ds = LabelledFolder(large, 4, window=128)
    first = ds[0]
    assert first["image"].shape == (3, 128, 128) and first["mask"].shape == (128, 128)
    region = ds._region(0)
    np.testing.assert_array_equal(first["mask"].numpy(), read_mask(large / "masks" / "big.png")[
        region.y:region.y + 128, region.x:region.x + 128])
    assert torch.equal(ds[0]["image"], first["image"])  # the same epoch, the same window
    ds.set_epoch(0, 1)
    assert ds._region(0) != region  # another epoch, another window (fixed by seed and epoch)
    resized = LabelledFolder(large, 4, size=128)  # --resize: the whole scene squashed
    assert resized[0]["image"].shape == (3, 128, 128)


def test_eval_scores_a_large_scene_at_native_resolution(src, large):
    model = load_model(src)
    ds = LabelledFolder(large, 4, units=Units("linear"))
    stats, _ = run_model(model, ds, batch_size=4)
    assert stats.cm.sum() == 200 * 300 - 10 * 300  # every labelled pixel once, at native resolution
    assert stats.cm.sum(axis=2)[0].tolist() == [190 * 150, 0, 190 * 150, 0]
    report = evaluate([src], large, bootstrap=5)
    r = report["resolution"]
    assert r["mode"] == "native" and r["largest"] == [200, 300] and r["windows"] == 2 * 3
    res = samoe("eval", src, "--data", large, "--bootstrap", 5)
    assert res.exit_code == 0 and "native" in res.stdout and "200x300" in res.stdout, res.stdout


def test_train_on_large_scenes_reads_windows(src, large, tmp_path):
    grown = expand_checkpoint(src, tmp_path / "g", GrowthSpec(experts=8, groups=resolve_groups(4, 8, "2", 1)), ["test"])
    res = samoe("train", "--stage", 1, "--from", grown, "--run-dir", tmp_path / "run", "--data", large,
                "--set", "max_steps=2", "--set", "batch_size=1", "--set", "lr=0.01")
    assert res.exit_code == 0, res.stderr
    assert "random 128 px windows" in res.stdout
    res = samoe("train", "--stage", 2, "--from", tmp_path / "run" / "final", "--run-dir", tmp_path / "run2",
                "--data", large, "--set", "max_steps=1", "--set", "batch_size=1", "--set", "resize=true", "--set", "lr=0.01")
    one_error_line(res, "drop --resize")


def test_resize_is_recorded_and_predict_follows_it(src, large, tmp_path):
    grown = expand_checkpoint(src, tmp_path / "g", GrowthSpec(experts=8, groups=resolve_groups(4, 8, "2", 1)), ["test"])
    res = samoe("train", "--stage", 1, "--from", grown, "--run-dir", tmp_path / "run", "--data", large,
                "--set", "max_steps=1", "--set", "batch_size=1", "--set", "resize=true", "--set", "lr=0.01")
    assert res.exit_code == 0, res.stderr
    final = tmp_path / "run" / "final"
    assert Checkpoint.open(final).meta["data"]["resize"] is True
    res = samoe("predict", final, "--images", large, "--out", tmp_path / "pred", "--json")
    assert res.exit_code == 0, res.stderr
    with Image.open(tmp_path / "pred" / "masks" / "big.png") as im:  # the scene squashed for the model, the mask at its size
        assert im.size == (300, 200)
    report = evaluate([final], large, bootstrap=5, ablate_new=False)
    assert report["resolution"]["mode"] == "resized" and report["checkpoints"][0]["metrics"]["pixel_accuracy"] >= 0
    assert "resized to 128 px" in resolution_text(report)


def test_pseudo_label_writes_the_teachers_classes_and_the_images_units(six_trained, tmp_path):
    out = tmp_path / "pl"
    res = samoe("pseudo-label", six_trained["run"] / "final", "--images", six_trained["test"], "--out", out)
    assert res.exit_code == 0, res.stderr
    assert read_classes(out).names == tuple(SIX)
    assert json.loads((out / "data.json").read_text()) == {"input_scale": "linear", "dn_calibration": None,
                                                          "polarisations": ["VV", "VH"]}


def test_train_refuses_db_data_declared_linear(src, tmp_path):
    folder = _folder(tmp_path / "db", {f"s{i}": as_scale(power(i, (2, 64, 64)), "db") for i in range(2)})
    grown = expand_checkpoint(src, tmp_path / "g", GrowthSpec(experts=8, groups=resolve_groups(4, 8, "2", 1)), ["test"])
    one_error_line(samoe("train", "--stage", 1, "--from", grown, "--run-dir", tmp_path / "run", "--data", folder,
                         "--set", "max_steps=1", "--set", "lr=0.01"), "s0.tif", "input_scale", "negative")
    res = samoe("train", "--stage", 1, "--from", grown, "--run-dir", tmp_path / "run", "--data", folder,
                "--set", "max_steps=1", "--set", "batch_size=2", "--set", "input_scale=db", "--set", "lr=0.01")
    assert res.exit_code == 0, res.stderr
    assert Checkpoint.open(tmp_path / "run" / "final").meta["data"]["input_scale"] == "db"
    # the recorded scale applies to data that declares none: predict reads the same dB files without an option
    res = samoe("predict", tmp_path / "run" / "final", "--images", folder, "--out", tmp_path / "pred", "--json")
    assert res.exit_code == 0, res.stderr


# --------------------------------------------------------------------------- a PNG declaring 8192 x 8192 pixels


def _big_png(root: Path) -> Path:
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    a = np.zeros((8192, 8192), np.uint8)
    a[::512] = 1
    Image.fromarray(a).save(root / "images" / "big.png", optimize=True)
    Image.fromarray(a).save(root / "masks" / "big.png", optimize=True)
    assert (root / "images" / "big.png").stat().st_size < 200_000
    return root


def test_small_png_of_8192_squared_pixels_is_bounded_by_the_memory_budget(src, tmp_path):
    """Before: eval decoded it whole into float64 and resized it (41 s, 5.1 GB). Now its decode is checked
    against --image-memory from the header, and within the budget it is read once and cut into windows."""
    root = _big_png(tmp_path / "big")
    t = time.perf_counter()
    one_error_line(samoe("--image-memory", "32M", "eval", src, "--data", root, "--input-scale", "display"),
                   "big.png", "64.0 MiB", "--image-memory")
    assert time.perf_counter() - t < 10
    set_image_memory(None)  # the option held for that command; the library call below uses the default (1 GiB)
    tracemalloc.start()
    t = time.perf_counter()
    ds = LabelledFolder(root, 4, window=128, units=Units("display"))
    item = ds[0]
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert item["image"].shape == (3, 128, 128) and time.perf_counter() - t < 20
    assert peak < 400 * 2**20, peak / 2**20  # the 64 MiB decode and small windows, not float64 copies of the scene
