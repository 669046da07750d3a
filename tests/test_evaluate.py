"""Tests for `stages.evaluate` and `samoe eval`.

Oracles: confusion matrices, IoU, Dice, accuracy and F1 worked by hand on small
masks; dataset-level (summed confusion matrix) vs per-image metrics on a
two-image case; bootstrap intervals of a two-image case whose three possible
resamples are known; a growth that preserves the function exactly (so every
metric of source and grown model is equal and every difference is 0); plot
figure sizes from `stages.figures`' size rule; and the CLI contract (bad input ->
one `error:` line, exit 2).
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from stages.data import make_demo_data
from stages.evaluate import (
    METRICS,
    ImageStats,
    bootstrap_diff,
    confusion_matrix,
    dice_per_class,
    evaluate,
    f1_from_counts,
    interior_mask,
    iou_per_class,
    pixel_accuracy,
)
from upscale import expand
from upscale.config import PRESETS
from upscale.create import init_from_preset
from upscale.errors import SamoeError

# --------------------------------------------------------------------------- 1: metric functions

# 3x4 masks, 4 classes; class 3 is in neither, the 255 pixel has prediction 0 (must not count).
TARGET = np.array([[0, 0, 1, 1],
                   [0, 2, 2, 1],
                   [255, 2, 2, 0]], dtype=np.uint8)
PRED = np.array([[0, 1, 1, 1],
                 [0, 2, 1, 1],
                 [0, 2, 2, 2]], dtype=np.int64)
# rows = target, columns = prediction, counted by hand from the 11 non-ignored pixels
CM = np.array([[2, 1, 1, 0],
               [0, 3, 0, 0],
               [0, 1, 3, 0],
               [0, 0, 0, 0]])


def test_confusion_matrix_by_hand():
    cm = confusion_matrix(PRED, TARGET, 4)
    assert cm.shape == (4, 4)
    np.testing.assert_array_equal(cm, CM)
    assert cm.sum() == 11  # the ignored pixel counts nowhere


def test_ignored_pixels_count_nowhere():
    # changing the prediction under the ignored pixel changes nothing
    pred = PRED.copy()
    pred[2, 0] = 3
    np.testing.assert_array_equal(confusion_matrix(pred, TARGET, 4), CM)
    # all ignored -> zero matrix, accuracy NaN
    cm = confusion_matrix(PRED, np.full_like(TARGET, 255), 4)
    np.testing.assert_array_equal(cm, np.zeros((4, 4)))
    assert math.isnan(pixel_accuracy(cm))
    assert np.isnan(iou_per_class(cm)).all() and np.isnan(dice_per_class(cm)).all()
    # a custom ignore index
    t = np.array([[0, 7], [1, 1]])
    p = np.array([[0, 0], [1, 0]])
    np.testing.assert_array_equal(confusion_matrix(p, t, 2, ignore_index=7), [[1, 0], [1, 1]])


def test_iou_dice_accuracy_by_hand():
    iou = iou_per_class(CM)
    # class 0: tp 2, row 4, col 2 -> 2/4; class 1: tp 3, row 3, col 5 -> 3/5; class 2: tp 3, row 4, col 4 -> 3/5
    np.testing.assert_allclose(iou[:3], [0.5, 0.6, 0.6], rtol=0, atol=1e-15)
    assert math.isnan(iou[3])
    dice = dice_per_class(CM)
    np.testing.assert_allclose(dice[:3], [4 / 6, 6 / 8, 6 / 8], rtol=0, atol=1e-15)
    assert math.isnan(dice[3])
    assert pixel_accuracy(CM) == pytest.approx(8 / 11, abs=1e-15)


def test_class_only_in_prediction_has_iou_zero():
    target = np.zeros((2, 2), dtype=np.int64)
    pred = np.array([[0, 3], [0, 0]])
    cm = confusion_matrix(pred, target, 4)
    np.testing.assert_array_equal(cm[0], [3, 0, 0, 1])
    iou, dice = iou_per_class(cm), dice_per_class(cm)
    assert iou[0] == pytest.approx(3 / 4) and iou[3] == 0.0 and dice[3] == 0.0
    assert np.isnan(iou[1:3]).all()
    m = ImageStats(cm[None], np.zeros((1, 3)), np.array([[0.0, 1.0]])).metrics()
    assert m["miou"] == pytest.approx((3 / 4 + 0) / 2)  # absent classes 1, 2 excluded, class 3 counted as 0
    assert m["mean_dice"] == pytest.approx((6 / 7 + 0) / 2)


@pytest.mark.parametrize("bad", [3, 4, 200, 254])
def test_target_id_out_of_range_raises(bad):
    target = np.array([[0, 1], [2, bad]], dtype=np.uint8)
    with pytest.raises(SamoeError, match="outside 0..2"):
        confusion_matrix(np.zeros((2, 2), dtype=np.int64), target, 3)


def test_f1_from_counts():
    assert f1_from_counts(0, 0, 0) == (1.0, 1.0, 1.0)  # documented convention: empty vs empty is perfect
    p, r, f = f1_from_counts(3, 1, 2)
    assert (p, r) == (0.75, 0.6) and f == pytest.approx(6 / 9)
    assert f1_from_counts(0, 2, 0) == (0.0, 0.0, 0.0)  # only false positives
    assert f1_from_counts(0, 0, 5) == (0.0, 0.0, 0.0)  # only misses
    assert f1_from_counts(4, 0, 0) == (1.0, 1.0, 1.0)


def test_image_stats_metrics_single_image():
    st = ImageStats(CM[None], np.array([[3.0, 1.0, 2.0]]), np.array([[5.0, 10.0]]))
    m = st.metrics()
    assert set(m) == set(METRICS)
    assert m["miou"] == pytest.approx((0.5 + 0.6 + 0.6) / 3)  # NaN class 3 left out
    assert m["mean_dice"] == pytest.approx((4 / 6 + 0.75 + 0.75) / 3)
    assert m["pixel_accuracy"] == pytest.approx(8 / 11)
    assert m["boundary_f1"] == pytest.approx(6 / 9)
    assert m["sdf_mae"] == pytest.approx(0.5)


def test_interior_mask_hand_example():
    # columns 0-2 class 0, 3-5 class 1: border pixels are columns 2 and 3
    t = torch.tensor([[0, 0, 0, 1, 1, 1]] * 6)[None]
    cols = lambda m: sorted(set(torch.nonzero(m[0])[:, 1].tolist()))  # noqa: E731
    assert cols(interior_mask(t, 0)) == [0, 1, 4, 5]
    assert cols(interior_mask(t, 1)) == [0, 5]
    assert not interior_mask(t, 2).any()
    assert interior_mask(torch.zeros(1, 5, 5, dtype=torch.long), 3).all()  # one class: no border anywhere
    t[0, 0, 1] = 255  # an ignored pixel makes no border (it is left out of every metric anyway)
    assert interior_mask(t, 1)[0, 0, 0] and interior_mask(t, 1)[0, 1, 0]
    # a Euclidean disk, not a square: (0, 0) lies sqrt(8) from the border pixel (2, 2)
    t = torch.zeros(1, 5, 5, dtype=torch.long)
    t[0, 2, 2] = 1
    assert interior_mask(t, 2)[0, 0, 0] and not interior_mask(t, 2)[0, 0, 2]


def test_interior_mask_matches_brute_force():
    gen = torch.Generator().manual_seed(0)
    t = torch.randint(0, 3, (2, 4, 5), generator=gen).repeat_interleave(3, 1).repeat_interleave(3, 2)  # 12 x 15 blocks
    h, w = t.shape[1:]
    for margin in (0, 1, 2, 4):
        got = interior_mask(t, margin)
        for n in range(2):
            border = [(y, x) for y in range(h) for x in range(w)
                      if any(0 <= y + dy < h and 0 <= x + dx < w and t[n, y + dy, x + dx] != t[n, y, x]
                             for dy, dx in ((1, 0), (-1, 0), (0, 1), (0, -1)))]
            for y in range(h):
                for x in range(w):
                    want = all((y - by) ** 2 + (x - bx) ** 2 > margin**2 for by, bx in border)
                    assert bool(got[n, y, x]) == want, (margin, n, y, x)


def test_image_stats_interior_miou():
    inner = np.array([[[4, 0], [1, 3]]])  # IoU 4/5 and 3/4
    st = ImageStats(CM[None], np.zeros((1, 3)), np.array([[0.0, 1.0]]), inner)
    assert st.metrics()["miou_interior"] == pytest.approx((4 / 5 + 3 / 4) / 2)
    assert st.metrics()["miou"] == pytest.approx((0.5 + 0.6 + 0.6) / 3)  # the whole image's is unchanged
    assert math.isnan(ImageStats(CM[None], np.zeros((1, 3)), np.array([[0.0, 1.0]])).metrics()["miou_interior"])


def test_image_stats_all_ignored_gives_nan_not_error():
    st = ImageStats(np.zeros((1, 3, 3), dtype=np.int64), np.zeros((1, 3)), np.zeros((1, 2)))
    m = st.metrics()
    assert math.isnan(m["miou"]) and math.isnan(m["mean_dice"]) and math.isnan(m["pixel_accuracy"])
    assert math.isnan(m["sdf_mae"]) and m["boundary_f1"] == 1.0


# --------------------------------------------------------------------------- 2: dataset-level metrics

# image 0: 4 pixels of class 0, all right. image 1: target [0,1,1,1], prediction all 1.
CM_B = np.array([[[4, 0], [0, 0]],
                 [[0, 1], [0, 3]]])
B_BOUND = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]])
B_SDF = np.array([[2.0, 4.0], [3.0, 2.0]])
# the same images predicted perfectly
CM_A = np.array([[[4, 0], [0, 0]],
                 [[1, 0], [0, 3]]])
A_BOUND = np.array([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
A_SDF = np.array([[0.0, 4.0], [0.0, 2.0]])


def test_metrics_sum_confusion_over_images():
    st = ImageStats(CM_B, B_BOUND, B_SDF)
    m = st.metrics()
    # per image: miou 1 (class 1 absent) and (0 + 3/4)/2 -> mean 0.6875; summed [[4,1],[0,3]]: (4/5 + 3/4)/2
    assert m["miou"] == pytest.approx((4 / 5 + 3 / 4) / 2)
    assert m["miou"] != pytest.approx((1 + 0.375) / 2)
    assert m["mean_dice"] == pytest.approx((8 / 9 + 6 / 7) / 2)
    assert m["pixel_accuracy"] == pytest.approx(7 / 8)
    assert m["boundary_f1"] == pytest.approx(2 / 4)  # summed tp 1, fp 1, fn 1
    assert m["sdf_mae"] == pytest.approx(5 / 6)  # not the per-image mean (0.5 + 1.5) / 2
    # resampled subsets
    assert st.metrics(np.array([0]))["miou"] == 1.0
    assert st.metrics(np.array([1, 1]))["miou"] == pytest.approx(3 / 8)
    assert st.metrics(np.array([0, 0, 1]))["miou"] == pytest.approx((8 / 9 + 3 / 4) / 2)  # [[8,1],[0,3]]


# --------------------------------------------------------------------------- 3: bootstrap


def _random_stats(rng: np.random.Generator, n: int = 20, c: int = 3) -> ImageStats:
    cm = rng.integers(0, 30, size=(n, c, c)) + np.eye(c, dtype=np.int64) * 40
    bound = rng.integers(1, 20, size=(n, 3)).astype(np.float64)
    sdf = np.stack([rng.uniform(1, 10, n), rng.integers(10, 20, n).astype(np.float64)], 1)
    return ImageStats(cm, bound, sdf, cm // 2 + np.eye(c, dtype=np.int64) * rng.integers(0, 9, size=(n, 1, 1)))


def test_bootstrap_two_image_case_by_hand():
    a, b = ImageStats(CM_A, A_BOUND, A_SDF, CM_A), ImageStats(CM_B, B_BOUND, B_SDF, CM_B)
    out = bootstrap_diff(a, b, n=400, seed=0)
    assert out["miou_interior"] == out["miou"]  # the interiors here are the whole images
    assert set(out) == set(METRICS)
    # point estimates: a is perfect (miou 1, dice 1, acc 1, bf1 1, sdf 0)
    assert out["miou"]["diff"] == pytest.approx((4 / 5 + 3 / 4) / 2 - 1)
    assert out["mean_dice"]["diff"] == pytest.approx((8 / 9 + 6 / 7) / 2 - 1)
    assert out["pixel_accuracy"]["diff"] == pytest.approx(7 / 8 - 1)
    assert out["boundary_f1"]["diff"] == pytest.approx(-0.5)
    assert out["sdf_mae"]["diff"] == pytest.approx(5 / 6)
    ma, mb = a.metrics(), b.metrics()
    for m in METRICS:
        assert out[m]["diff"] == mb[m] - ma[m]  # exactly
    # the only resamples: {0,0} (p 1/4) -> miou diff 0; {1,1} (1/4) -> 3/8 - 1; {0,1} (1/2) -> point estimate.
    # With 400 draws both tails hold >> 2.5 %, so the interval is exactly [3/8 - 1, 0].
    assert out["miou"]["ci_low"] == pytest.approx(3 / 8 - 1, abs=1e-12)
    assert out["miou"]["ci_high"] == pytest.approx(0.0, abs=1e-12)
    for m in METRICS:
        assert out[m]["ci_low"] <= out[m]["diff"] <= out[m]["ci_high"], m
    # sdf: {0,0} -> 1/2, {1,1} -> 3/2
    assert out["sdf_mae"]["ci_low"] == pytest.approx(0.5) and out["sdf_mae"]["ci_high"] == pytest.approx(1.5)


def test_bootstrap_seeded():
    rng = np.random.default_rng(123)
    a, b = _random_stats(rng), _random_stats(rng)
    first = bootstrap_diff(a, b, n=200, seed=7)
    assert json.dumps(first) == json.dumps(bootstrap_diff(a, b, n=200, seed=7))
    other = bootstrap_diff(a, b, n=200, seed=8)
    assert any((first[m]["ci_low"], first[m]["ci_high"]) != (other[m]["ci_low"], other[m]["ci_high"]) for m in METRICS)
    for m in METRICS:
        assert first[m]["diff"] == other[m]["diff"]  # the point estimate does not depend on the seed
        assert first[m]["ci_low"] <= first[m]["diff"] <= first[m]["ci_high"], m


def test_bootstrap_clusters_carry_the_run_to_run_spread():
    # 2 runs (clusters) x 50 one-pixel images: in run 0 model a is right and b wrong on every image, in run 1 the
    # reverse. Pooled, b - a in pixel accuracy is 0, and resampling images keeps it near 0 (each resample holds
    # about 50 of each). Resampling runs first gives {0, 0} (p 1/4) -> -1, {1, 1} (1/4) -> +1, {0, 1} -> 0, and
    # inside a run every image is the same, so the 95% interval is exactly [-1, +1].
    right, wrong = np.array([[1, 0], [0, 0]]), np.array([[0, 1], [0, 0]])
    runs = np.repeat([0, 1], 50)
    zeros, sdf = np.zeros((100, 3)), np.ones((100, 2))
    a = ImageStats(np.stack([right if r == 0 else wrong for r in runs]), zeros, sdf)
    b = ImageStats(np.stack([wrong if r == 0 else right for r in runs]), zeros, sdf)
    pooled = bootstrap_diff(a, b, n=400, seed=0)["pixel_accuracy"]
    clustered = bootstrap_diff(a, b, n=400, seed=0, clusters=runs)["pixel_accuracy"]
    assert pooled["diff"] == clustered["diff"] == 0.0
    assert -0.4 < pooled["ci_low"] < 0 < pooled["ci_high"] < 0.4
    assert (clustered["ci_low"], clustered["ci_high"]) == (-1.0, 1.0)


def test_bootstrap_per_cluster_mean_by_hand():
    # run 0 holds 1 one-pixel image (a right, b wrong), run 1 holds 3 (a wrong, b right). Pooled pixel accuracy:
    # a 1/4, b 3/4, b - a = +0.5. Each run on its own: a 1 and 0, b 0 and 1, so the mean over runs is 0.5 for both
    # and b - a = 0. Resampling runs: {0, 0} (p 1/4) -> -1, {1, 1} (1/4) -> +1, {0, 1} -> 0; inside a run every image
    # is the same, so the 95% interval is exactly [-1, +1].
    right, wrong = np.array([[1, 0], [0, 0]]), np.array([[0, 1], [0, 0]])
    runs = np.array([0, 1, 1, 1])
    zeros, sdf = np.zeros((4, 3)), np.ones((4, 2))
    a = ImageStats(np.stack([right, wrong, wrong, wrong]), zeros, sdf)
    b = ImageStats(np.stack([wrong, right, right, right]), zeros, sdf)
    assert bootstrap_diff(a, b, n=50, seed=0, clusters=runs)["pixel_accuracy"]["diff"] == pytest.approx(0.5)
    mean = bootstrap_diff(a, b, n=400, seed=0, clusters=runs, per_cluster=True)["pixel_accuracy"]
    assert mean == {"diff": 0.0, "ci_low": -1.0, "ci_high": 1.0}
    with pytest.raises(ValueError, match="per_cluster needs clusters"):
        bootstrap_diff(a, b, n=10, per_cluster=True)


def test_bootstrap_per_cluster_miou_is_the_mean_of_each_runs_miou():
    # three runs of random images: the point estimate is the plain mean over runs of each run's own mIoU difference
    rng = np.random.default_rng(3)
    a, b = _random_stats(rng, n=30), _random_stats(rng, n=30)
    runs = np.repeat([0, 1, 2], [5, 10, 15])
    own = [b.metrics(np.flatnonzero(runs == r))["miou"] - a.metrics(np.flatnonzero(runs == r))["miou"] for r in range(3)]
    out = bootstrap_diff(a, b, n=200, seed=0, clusters=runs, per_cluster=True)["miou"]
    assert out["diff"] == pytest.approx(sum(own) / 3)
    assert out["diff"] != pytest.approx(b.metrics()["miou"] - a.metrics()["miou"])  # not the pooled figure
    assert out["ci_low"] < out["diff"] < out["ci_high"]


def test_bootstrap_identical_inputs_give_zero():
    st = _random_stats(np.random.default_rng(5))
    out = bootstrap_diff(st, st, n=100, seed=0)
    for m in METRICS:
        assert out[m] == {"diff": 0.0, "ci_low": 0.0, "ci_high": 0.0}, m


# --------------------------------------------------------------------------- 4: end to end on the tiny preset


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("eval")
    make_demo_data(tmp / "d", labelled=4, unlabelled=0, test=4, size=128, seed=0)
    src = init_from_preset(PRESETS["tiny"], tmp / "src", 0, torch.float32, ["test"], False)
    spec = expand.GrowthSpec(experts=8, groups=expand.resolve_groups(4, 8, "2", 1), extra_blocks=1)
    grown = expand.expand_checkpoint(src, tmp / "grown", spec, ["test"])
    return {"tmp": tmp, "data": tmp / "d" / "A-test", "src": Path(src), "grown": Path(grown)}


@pytest.fixture(scope="module")
def reports(setup) -> tuple[dict, dict, list[int], list[int]]:
    starts, batches = [], []
    first = evaluate([setup["src"], setup["grown"]], setup["data"], bootstrap=50, seed=0,
                     on_start=starts.append, on_batch=batches.append)
    second = evaluate([setup["src"], setup["grown"]], setup["data"], bootstrap=50, seed=0)
    return first, second, starts, batches


def test_evaluate_is_deterministic(reports):
    first, second, _, _ = reports
    assert json.dumps(first, sort_keys=True) == json.dumps(second, sort_keys=True)


def test_evaluate_report_shape(reports, setup):
    rep, _, starts, batches = reports
    assert rep["images"] == 4 and rep["bootstrap"] == 50 and rep["seed"] == 0
    assert rep["classes"] == ["water", "urban", "vegetation", "bare_soil"]
    assert [ck["path"] for ck in rep["checkpoints"]] == [str(setup["src"]), str(setup["grown"])]
    assert starts == [12]  # 4 images x (2 checkpoints + the grown one with its new parts off)
    assert sum(batches) == 12
    for ck in rep["checkpoints"]:
        m = ck["metrics"]
        for k in METRICS:
            assert math.isfinite(m[k])
        assert 0 <= m["miou"] <= 1 and 0 <= m["pixel_accuracy"] <= 1
        present = [v for v in m["iou"].values() if v is not None]
        assert m["miou"] == pytest.approx(sum(present) / len(present))
        dices = [v for v in m["dice"].values() if v is not None]
        assert m["mean_dice"] == pytest.approx(sum(dices) / len(dices))
        p, r = m["boundary_precision"], m["boundary_recall"]
        assert m["boundary_f1"] == pytest.approx(2 * p * r / (p + r) if p + r else 0.0)
    assert rep["checkpoints"][0]["groups"] == [4] and rep["checkpoints"][1]["groups"] == [4, 4]


def test_interior_counts_are_the_pixels_away_from_borders(setup):
    from stages.data import LabelledFolder
    from stages.evaluate import run_model
    from upscale.checkpoint import load_model

    model = load_model(setup["src"])
    data = LabelledFolder(setup["data"], model.config.num_classes, size=model.config.img_size)
    st, _ = run_model(model, data, 4)
    masks = torch.stack([data[i]["mask"] for i in range(len(data))])
    kept = interior_mask(masks, model.config.patch_size // 2).sum((1, 2))
    np.testing.assert_array_equal(st.interior.sum((1, 2)), kept.numpy())  # each image's interior pixels, counted once
    assert (st.interior <= st.cm).all() and 0 < st.interior.sum() < st.cm.sum()


def test_growth_preserves_metrics_and_diffs_are_zero(reports):
    rep = reports[0]
    src, grown = rep["checkpoints"]
    assert src["metrics"] == grown["metrics"]
    (comp,) = rep["comparisons"]
    assert comp["baseline"] == src["path"] and comp["other"] == grown["path"]
    assert set(comp["diff"]) == set(METRICS)
    for m, d in comp["diff"].items():
        assert d == {"diff": 0.0, "ci_low": 0.0, "ci_high": 0.0}, m


def _check_routing(routing: dict, experts: int, groups: int) -> None:
    for name, v in routing.items():
        assert len(v["expert_share"]) == experts, name
        assert len(v["group_share"]) == groups, name
        assert sum(v["group_share"]) == pytest.approx(1.0, abs=1e-6), name
        assert sum(v["expert_share"]) == pytest.approx(1.0, abs=1e-5), name
        assert v["source_share"] + v["new_share"] == pytest.approx(1.0)
        assert v["dead_experts"] == len(v["dead_expert_ids"]) == sum(s == 0 for s in v["expert_share"])
        assert 0 <= v["router_entropy"]
        for row in v["class_group_share"]:
            assert len(row) == groups
            assert sum(row) == pytest.approx(1.0, abs=1e-5) or sum(row) == 0, (name, row)
        if not name.startswith("image_encoder."):
            assert all(sum(row) == 0 for row in v["class_group_share"]), name


def test_routing_report_source(reports):
    routing = reports[0]["checkpoints"][0]["routing"]
    assert set(routing) == {"image_encoder.blocks.2.mlp", "image_encoder.blocks.3.mlp",
                            "mask_decoder.transformer.layers.0.mlp", "mask_decoder.transformer.layers.1.mlp"}
    _check_routing(routing, 4, 1)
    for name, v in routing.items():
        assert v["group_share"] == [1.0] and v["new_share"] == 0.0 and v["new_weight_share"] == 0.0
        if name.startswith("image_encoder."):
            # 4 images x (128/16)^2 patches, top-2 experts each
            assert v["assignments"] == 4 * 64 * 2
            assert any(sum(row) > 0 for row in v["class_group_share"])


def test_routing_report_grown(reports):
    routing = reports[0]["checkpoints"][1]["routing"]
    enc = [n for n in routing if n.startswith("image_encoder.")]
    assert enc == ["image_encoder.blocks.2.mlp", "image_encoder.blocks.3.mlp", "image_encoder.blocks.4.mlp"]
    _check_routing(routing, 8, 2)
    for name, v in routing.items():
        assert v["new_weight_share"] == 0.0, name  # group_scale of the new group is zero at growth
        if name.startswith("image_encoder."):
            assert v["new_share"] > 0, name  # the new group still gets tokens
            # core group (top-2) plus one new group (top-2) per token
            assert v["assignments"] == 4 * 64 * 2 * 2
            assert any(sum(row) > 0 for row in v["class_group_share"])


@pytest.mark.slow  # 4 s: eval with figures
def test_cli_eval_json_and_plots(setup):
    from PIL import Image

    import cli

    plots = setup["tmp"] / "plots"
    result = CliRunner().invoke(cli.app, ["eval", str(setup["src"]), str(setup["grown"]), "--data", str(setup["data"]),
                                          "--json", "--bootstrap", "20", "--plots", str(plots)])
    assert result.exit_code == 0, result.output
    rep = json.loads(result.stdout)
    assert rep["bootstrap"] == 20 and len(rep["checkpoints"]) == 2
    for d in rep["comparisons"][0]["diff"].values():
        assert d == {"diff": 0.0, "ci_low": 0.0, "ci_high": 0.0}
    assert set(rep["comparisons"][0]["class_diff"]) == set(rep["classes"])
    for d in rep["comparisons"][0]["class_diff"].values():  # same function: 0, or undefined for an absent class
        assert d in ({"diff": 0.0, "ci_low": 0.0, "ci_high": 0.0}, {"diff": None, "ci_low": None, "ci_high": None})
    names = sorted(Path(p).name for p in rep["plots"])
    assert names == ["class-groups-ckpt0.png", "class-groups-ckpt1.png", "class-metrics.png", "expert-usage-ckpt0.png",
                     "expert-usage-ckpt1.png", "new-group-share.png"]
    # expert usage: width 2.8 + 0.42 in per expert (at least 6 in), height 1.9 + 0.36 in per layer (at least 3.2), 200 dpi
    expected = {"expert-usage-ckpt0.png": (1200, round(200 * (1.9 + 0.36 * 4))),  # enc2 enc3 dec0 dec1 x 4 experts
                "expert-usage-ckpt1.png": (round(200 * (2.8 + 0.42 * 8)), round(200 * (1.9 + 0.36 * 5)))}  # + enc4, 8 experts
    for p in rep["plots"]:
        path = Path(p)
        assert path.is_file() and path.parent == plots
        with Image.open(path) as im:
            im.load()
            assert im.format == "PNG"
            assert round(im.info["dpi"][0]) == 200
            assert im.size == expected.get(path.name, im.size), path.name
            assert min(im.size) >= 600, path.name
    assert not list(plots.glob(".*.tmp"))


@pytest.mark.slow  # 8 s: eval with figures, twice
@pytest.mark.parametrize("option", ["--plots", "--report"])
def test_cli_eval_refuses_non_empty_output_folder(setup, option):
    """eval once wrote its figures over existing files without --force: now refused."""
    import cli

    out = setup["tmp"] / f"taken{option}"
    out.mkdir()
    for name in ("expert-usage-ckpt0.png", "report.md", "notes.txt"):
        (out / name).write_bytes(b"the user's own file")
    args = ["eval", str(setup["src"]), "--data", str(setup["data"]), "--bootstrap", "5", option, str(out)]
    result = CliRunner().invoke(cli.app, args)
    _assert_one_line_error(result)
    assert str(out) in result.stderr and "--force" in result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["expert-usage-ckpt0.png", "notes.txt", "report.md"]
    assert all(p.read_bytes() == b"the user's own file" for p in out.iterdir())
    # a file where the folder should be is refused too, and left alone
    (setup["tmp"] / f"file{option}").write_text("x")
    result = CliRunner().invoke(cli.app, args[:-1] + [str(setup["tmp"] / f"file{option}")])
    _assert_one_line_error(result)
    assert (setup["tmp"] / f"file{option}").read_text() == "x"
    # a user's folder stays refused with --force (--force touches only what samoe wrote)
    result = CliRunner().invoke(cli.app, args + ["--force"])
    _assert_one_line_error(result)
    assert "not written by samoe" in result.stderr
    assert all(p.read_bytes() == b"the user's own file" for p in out.iterdir())
    # a folder samoe wrote: refused without --force, replaced with it
    mine = setup["tmp"] / f"mine{option}"
    args = args[:-1] + [str(mine)]
    assert CliRunner().invoke(cli.app, args).exit_code == 0
    written = mine / ("report.md" if option == "--report" else "expert-usage-ckpt0.png")
    written.write_bytes(b"stale")
    _assert_one_line_error(CliRunner().invoke(cli.app, args))
    assert written.read_bytes() == b"stale"
    result = CliRunner().invoke(cli.app, args + ["--force"])
    assert result.exit_code == 0, result.output
    assert written.read_bytes() != b"stale"
    # never into an input: the data folder is samoe's (demo-data) but is what eval reads
    result = CliRunner().invoke(cli.app, args[:-1] + [str(setup["data"]), "--force"])
    _assert_one_line_error(result)
    assert "overlaps" in result.stderr and not list(setup["data"].glob("*.png")) and not (setup["data"] / "report.md").exists()


@pytest.mark.slow  # 4 s: eval with a report
def test_cli_eval_report(setup):
    import cli

    out = setup["tmp"] / "report"
    plots = setup["tmp"] / "report-plots"
    result = CliRunner().invoke(cli.app, ["eval", str(setup["src"]), str(setup["grown"]), "--data", str(setup["data"]),
                                          "--bootstrap", "5", "--plots", str(plots), "--report", str(out), "--json"])
    assert result.exit_code == 0, result.output
    rep = json.loads(result.stdout)
    assert rep["report"] == str(out / "report.md")
    text = (out / "report.md").read_text()
    assert "## Metrics" in text and "| miou |" in text and "+0.0000 (+0.0000, +0.0000)" in text
    assert "| water |" in text and "### [1] groups [4, 4], core 1" in text and "| enc 4 |" in text
    links = [line[line.index("](") + 2:-1] for line in text.splitlines() if line.startswith("![")]
    assert len(links) == len(rep["plots"]) == 6
    for link in links:  # relative links that resolve to the --plots figures
        assert not Path(link).is_absolute() and (out / link).resolve() in {Path(p).resolve() for p in rep["plots"]}


def test_cli_eval_bad_format(setup):
    import cli

    result = CliRunner().invoke(cli.app, ["eval", str(setup["src"]), "--data", str(setup["data"]), "--plots",
                                          str(setup["tmp"] / "fmt"), "--format", "jpeg"])
    _assert_one_line_error(result)
    assert "--format" in result.stderr and not (setup["tmp"] / "fmt").exists()


def test_cli_eval_table(setup):
    import cli

    result = CliRunner().invoke(cli.app, ["eval", str(setup["src"]), str(setup["grown"]), "--data", str(setup["data"]),
                                          "--bootstrap", "5"])
    assert result.exit_code == 0, result.output
    assert "miou" in result.stdout and "IoU water" in result.stdout and "+0.0000" in result.stdout


# --------------------------------------------------------------------------- 5: bad input


def _assert_one_line_error(result) -> None:
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output


def test_cli_eval_folder_without_masks(setup):
    import cli

    nomask = setup["tmp"] / "nomask"
    shutil.copytree(setup["data"] / "images", nomask / "images")
    result = CliRunner().invoke(cli.app, ["eval", str(setup["src"]), "--data", str(nomask), "--bootstrap", "5"])
    _assert_one_line_error(result)
    assert "masks" in result.stderr


def test_cli_eval_different_num_classes(setup):
    import cli

    other = init_from_preset(dataclasses.replace(PRESETS["tiny"], num_classes=3), setup["tmp"] / "c3", 0,
                             torch.float32, ["test"], False)
    result = CliRunner().invoke(cli.app, ["eval", str(setup["src"]), str(other), "--data", str(setup["data"]),
                                          "--bootstrap", "5"])
    _assert_one_line_error(result)
    assert "classes" in result.stderr
    # alone, the 3-class checkpoint meets mask id 3 in the data: also a user error
    result = CliRunner().invoke(cli.app, ["eval", str(other), "--data", str(setup["data"]), "--bootstrap", "5"])
    _assert_one_line_error(result)


@pytest.mark.parametrize("args", [["--bootstrap", "0"], ["--batch-size", "0"]])
def test_cli_eval_bad_options(setup, args):
    import cli

    result = CliRunner().invoke(cli.app, ["eval", str(setup["src"]), "--data", str(setup["data"]), *args])
    _assert_one_line_error(result)


def test_cli_eval_missing_data_folder(setup):
    import cli

    result = CliRunner().invoke(cli.app, ["eval", str(setup["src"]), "--data", str(setup["tmp"] / "nope")])
    _assert_one_line_error(result)
