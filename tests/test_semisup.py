"""Tests for upscale/heads.py, stages/semisup.py, stages/optim.py and the two-phase step of stages/engine.py (seed 004).

Oracles: values worked by hand from the formulas of seed 004 (sigmoid ramp-up,
uncertainty-weighted multi-task loss, selector modulation, soft Dice), reference
computations written here with plain torch ops (using the modules' own conv
weights), the optimizer table of seed 004 (param groups, lrs, weight decay
weight_decay 5e-5), and the gradient table of seed 004 (sup: everything trains; unsup:
everything but the gating model), observed on the real `engine.train_step`.
"""

from __future__ import annotations

import ast
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import default_collate

from stages.data import LabelledFolder, UnlabelledFolder
from stages.engine import apply_stage, train_step
from stages.optim import apply_lr, build_optimizers, lr_factor
from stages.semisup import MultiTaskLoss, gating_without_grad, pseudo_targets, sigmoid_rampup, task_losses
from upscale.checkpoint import Checkpoint, load_model
from upscale.config import PRESETS
from upscale.expand import GrowthSpec, expand_checkpoint, resolve_groups
from upscale.heads import TASKS, GatingModel, MultiScaleTaskSelector, TaskDWSelector

REPO = Path(__file__).resolve().parents[1]
TINY = PRESETS["tiny"]


# --------------------------------------------------------------------------- fixtures


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def grown(src: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    spec = GrowthSpec(experts=8, groups=resolve_groups(4, 8, "2", 1), extra_blocks=1, noise_std=0.01)
    return expand_checkpoint(src, tmp_path_factory.mktemp("grown") / "g", spec, ["test"])


def _batch(folder, idx) -> dict:
    return default_collate([folder[i] for i in idx])


# --------------------------------------------------------------------------- ramps


@pytest.mark.parametrize(
    "t,T,want",
    [(0, 20, math.exp(-5)), (10, 20, math.exp(-1.25)), (20, 20, 1.0), (25, 20, 1.0), (5, 0, 1.0),
     (-3, 20, math.exp(-5)), (15, 20, math.exp(-5 * 0.25**2))],
)
def test_sigmoid_rampup_hand_values(t, T, want):
    assert sigmoid_rampup(t, T) == pytest.approx(want, rel=1e-12)
    assert isinstance(sigmoid_rampup(t, T), float)


def test_lr_factor_warmup_then_poly_by_hand():
    # 1 step/epoch, 100 steps, warm-up 10 epochs: linear (step+1)/10, then (1 - (step-10)/90)^0.9
    assert lr_factor(0, 1, 100, 10) == pytest.approx(0.1)
    assert lr_factor(4, 1, 100, 10) == pytest.approx(0.5)
    assert lr_factor(9, 1, 100, 10) == pytest.approx(1.0)
    assert lr_factor(55, 1, 100, 10) == pytest.approx(0.5**0.9)
    assert lr_factor(3, 2, 100, 0) == pytest.approx((1 - 3 / 100) ** 0.9)


# --------------------------------------------------------------------------- selector


def _selector(c=4, seed=0) -> MultiScaleTaskSelector:
    torch.manual_seed(seed)
    sel = MultiScaleTaskSelector(c)
    with torch.no_grad():  # make the weight maps far from constant
        for s in sel.selectors.values():
            s.conv.weight.normal_(0, 0.5)
            s.conv.bias.normal_(0, 0.5)
    return sel


def test_selector_has_15_task_by_scale_selectors():
    sel = MultiScaleTaskSelector(8)
    want = {f"{t}_scale{s}" for t in ("seg", "sdf", "boundary") for s in range(1, 6)}
    assert set(sel.selectors.keys()) == want and len(want) == 15
    for s in sel.selectors.values():
        assert isinstance(s, TaskDWSelector)
        assert s.conv.groups == 8 and tuple(s.conv.weight.shape) == (8, 1, 3, 3)  # depthwise 3x3
        assert float(s.alpha) == 0.0  # ramp starts at 0


def test_selector_alpha_zero_is_exact_identity():
    sel = _selector()
    x = torch.randn(2, 4, 32, 32)
    sel.set_alpha(0.0)
    out = sel(x)
    assert set(out) == set(TASKS)
    for t in TASKS:
        assert torch.equal(out[t], x)


def test_selector_alpha_one_matches_hand_reference():
    sel = _selector()
    x = torch.randn(2, 4, 32, 32)
    sel.set_alpha(1.0)
    out = sel(x)
    for t in TASKS:
        ref = x.clone()
        for s in range(5):
            p = x if s == 0 else F.avg_pool2d(x, 2**s)  # 32, 16, 8, 4, 2
            w = torch.sigmoid(sel.selectors[f"{t}_scale{s + 1}"].conv(p))
            d = p * w  # P * (1 + w) - P
            ref = ref + (d if s == 0 else F.interpolate(d, (32, 32), mode="bilinear", align_corners=False))
        torch.testing.assert_close(out[t], ref, atol=1e-5, rtol=1e-5)
    # alpha = 0.5 is halfway: T - x scales linearly with alpha
    sel.set_alpha(0.5)
    half = sel(x)
    for t in TASKS:
        torch.testing.assert_close(half[t] - x, 0.5 * (out[t] - x), atol=1e-5, rtol=1e-4)


def test_selector_weight_stats_by_hand():
    sel = _selector()
    assert sel.get_weight_stats() == {"mean": 0.0, "std": 0.0, "min": 0.0, "max": 0.0}  # before any forward
    x = torch.randn(3, 4, 16, 16)
    sel.set_alpha(0.3)
    sel(x)
    allstats = sel.get_all_weight_stats()
    assert set(allstats) == set(sel.selectors.keys())
    maps = []
    for t in TASKS:
        for s in range(5):
            p = x if s == 0 else F.adaptive_avg_pool2d(x, (16 >> s, 16 >> s))
            w = torch.sigmoid(sel.selectors[f"{t}_scale{s + 1}"].conv(p)).detach()
            maps.append(w.flatten())
            got = allstats[f"{t}_scale{s + 1}"]
            assert set(got) == {"mean", "std", "min", "max"}
            assert got["mean"] == pytest.approx(float(w.mean()), abs=1e-6)
            assert got["std"] == pytest.approx(float(w.std()), abs=1e-6)
            assert got["min"] == pytest.approx(float(w.min()), abs=1e-6)
            assert got["max"] == pytest.approx(float(w.max()), abs=1e-6)
            assert sel.selectors[f"{t}_scale{s + 1}"].get_weight_stats() == got
    pooled = torch.cat(maps)
    got = sel.get_weight_stats()
    assert got["mean"] == pytest.approx(float(pooled.mean()), abs=1e-6)
    assert got["std"] == pytest.approx(float(pooled.std()), abs=1e-6)
    assert got["min"] == pytest.approx(float(pooled.min()), abs=1e-6)
    assert got["max"] == pytest.approx(float(pooled.max()), abs=1e-6)


def test_selector_set_alpha_sets_all():
    sel = MultiScaleTaskSelector(4)
    sel.set_alpha(0.625)
    assert sel.alpha == 0.625
    assert all(float(s.alpha) == 0.625 for s in sel.selectors.values())
    # alpha is a buffer: it travels with the state dict (and checkpoints)
    assert all(k.endswith(".alpha") or ".conv." in k for k in sel.state_dict())
    assert sum(k.endswith(".alpha") for k in sel.state_dict()) == 15


# --------------------------------------------------------------------------- gating


def test_gating_per_image_weights_and_hand_mix():
    torch.manual_seed(1)
    c, n_cls = 6, 4
    gate = GatingModel(c, n_cls, hidden=16)
    feats = {t: torch.randn(3, c, 8, 8) for t in TASKS}
    out = gate(feats)
    w = gate.last_weights
    assert tuple(w.shape) == (3, 3, 3)  # (image, output task, branch): per image, not per pixel
    torch.testing.assert_close(w.sum(-1), torch.ones(3, 3))
    assert (w > 0).all()
    # hand reference
    stacked = torch.stack([feats[t] for t in TASKS], 1)
    pooled = torch.cat([feats[t].mean(dim=(2, 3)) for t in TASKS], 1)
    lin1, lin2 = gate.mlp[0], gate.mlp[2]
    logits = F.linear(torch.relu(F.linear(pooled, lin1.weight, lin1.bias)), lin2.weight, lin2.bias).view(3, 3, 3)
    wref = torch.softmax(logits, -1)
    torch.testing.assert_close(w, wref)
    want_ch = {"seg": n_cls, "sdf": n_cls, "boundary": 1}
    for i, t in enumerate(TASKS):
        mixed = sum(wref[:, i, j, None, None, None] * stacked[:, j] for j in range(3))
        head = gate.heads[t]
        ref = F.conv2d(mixed, head.weight, head.bias)
        assert out[t].shape == (3, want_ch[t], 8, 8)
        torch.testing.assert_close(out[t], ref, atol=1e-5, rtol=1e-5)
    # per image: image 0's outputs do not depend on image 1's features
    feats2 = {t: f.clone() for t, f in feats.items()}
    feats2["sdf"][1] += 5.0
    out2 = gate(feats2)
    for t in TASKS:
        torch.testing.assert_close(out2[t][0], out[t][0])
        torch.testing.assert_close(out2[t][2], out[t][2])


# --------------------------------------------------------------------------- multi-task loss


def test_multitask_loss_by_hand():
    mtl = MultiTaskLoss()
    assert torch.equal(mtl.log_vars.detach(), torch.ones(3))
    L = {"seg": torch.tensor(0.3), "sdf": torch.tensor(0.7), "boundary": torch.tensor(1.1)}
    c = (1.0, 0.5, 1.0)
    want = sum(c[i] * math.exp(-1.0) * float(L[t]) + 0.4 * math.exp(1.0) for i, t in enumerate(TASKS))
    total = mtl(L)
    assert float(total.detach()) == pytest.approx(want, rel=1e-6)
    total.backward()
    grad_want = [-c[i] * math.exp(-1.0) * float(L[t]) + 0.4 * math.exp(1.0) for i, t in enumerate(TASKS)]
    assert mtl.log_vars.grad.tolist() == pytest.approx(grad_want, rel=1e-5)
    with torch.no_grad():
        mtl.log_vars.copy_(torch.tensor([0.0, -0.5, 2.0]))
    s = (0.0, -0.5, 2.0)
    want = sum(c[i] * math.exp(-s[i]) * float(L[t]) + 0.4 * math.exp(s[i]) for i, t in enumerate(TASKS))
    assert float(mtl(L).detach()) == pytest.approx(want, rel=1e-6)


# --------------------------------------------------------------------------- per-task losses
# task_losses is the one implementation used by training (one process or many); these
# wrappers feed it a single task's prediction so each term is checked against hand values.


def _batch_for(b: int, c: int, h: int, w: int, **kw) -> tuple[dict, dict]:
    out = {"seg": torch.zeros(b, c, h, w), "sdf": torch.zeros(b, c, h, w), "boundary": torch.zeros(b, 1, h, w)}
    batch = {"mask": torch.zeros(b, h, w, dtype=torch.long), "sdf": torch.zeros(b, c, h, w), "boundary": torch.zeros(b, 1, h, w)}
    for k, v in kw.items():
        (out if k.startswith("pred_") else batch)[k.removeprefix("pred_")] = v
    return out, batch


def soft_dice_loss(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The Dice part of the seg loss: task_losses' seg minus a plain cross-entropy (checked by hand below)."""
    b, c, h, w = logits.shape
    seg = task_losses(*_batch_for(b, c, h, w, pred_seg=logits, mask=mask))["seg"]
    valid = mask != 255
    ce = F.cross_entropy(logits, mask.clamp(max=c - 1), reduction="none")[valid]
    return seg - (ce.mean() if ce.numel() else 0.0)


def test_seg_loss_adds_pixel_cross_entropy_by_hand():
    q = torch.tensor([[0.5, 0.75], [0.25, 0.9]])
    mask = torch.tensor([[[1, 1], [0, 255]]])
    b, c, h, w = 1, 2, 2, 2
    seg = float(task_losses(*_batch_for(b, c, h, w, pred_seg=_logits_for(q), mask=mask))["seg"])
    # Dice over the 3 valid pixels: class 1 inter .5+.75 = 1.25, denom 1.5 + 2; class 0 inter .75, denom 1.5 + 1
    dice = 1 - (2 * 1.25 / 3.5 + 2 * 0.75 / 2.5) / 2
    ce = -(math.log(0.5) + math.log(0.75) + math.log(0.75)) / 3
    assert seg == pytest.approx(dice + ce, abs=1e-5)


def sdf_loss(pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    b, c, h, w = pred.shape
    mask = torch.zeros(b, h, w, dtype=torch.long) if valid is None else torch.where(valid[:, 0] > 0, 0, 255)
    return task_losses(*_batch_for(b, c, h, w, pred_sdf=pred, sdf=target, mask=mask))["sdf"]


def boundary_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    b, _, h, w = logits.shape
    return task_losses(*_batch_for(b, 1, h, w, pred_boundary=logits, boundary=target))["boundary"]


def _logits_for(q: torch.Tensor) -> torch.Tensor:
    """2-class logits whose softmax gives class 1 probability q per pixel."""
    return torch.stack([torch.zeros_like(q), torch.log(q / (1 - q))])[None]


def test_soft_dice_hand_example_2x2():
    q = torch.tensor([[0.5, 0.75], [0.25, 0.5]])
    logits = _logits_for(q)
    mask = torch.tensor([[[1, 1], [1, 0]]])
    # class 1: inter .5+.75+.25 = 1.5, denom 2 + 3 -> 0.6; class 0: inter .5, denom 2 + 1 -> 1/3
    want = 1 - (0.6 + 1 / 3) / 2
    assert float(soft_dice_loss(logits, mask)) == pytest.approx(want, abs=1e-5)


def test_soft_dice_ignore_index_excluded():
    q = torch.tensor([[0.5, 0.75], [0.25, 0.9]])
    mask = torch.tensor([[[1, 1], [1, 255]]])
    got = float(soft_dice_loss(_logits_for(q), mask))
    # only the 3 valid pixels: class 1 inter 1.5, denom (.5+.75+.25) + 3 = 4.5; class 0 inter 0, denom 1.5 + 0
    want = 1 - (3 / 4.5 + 0.0) / 2
    assert got == pytest.approx(want, abs=1e-5)
    # whatever is predicted at the ignored pixel does not matter
    q2 = q.clone()
    q2[1, 1] = 0.01
    assert float(soft_dice_loss(_logits_for(q2), mask)) == pytest.approx(got, abs=1e-7)
    # same as the loss on the valid pixels alone (a 1x3 image)
    qv = torch.tensor([[0.5, 0.75, 0.25]])
    assert float(soft_dice_loss(_logits_for(qv), torch.tensor([[[1, 1, 1]]]))) == pytest.approx(got, abs=1e-6)


def test_soft_dice_class_absent_from_both_is_not_averaged():
    q = torch.tensor([[0.5, 0.75], [0.25, 0.5]])
    two = _logits_for(q)
    three = torch.cat([two, torch.full((1, 1, 2, 2), -1e4)], 1)  # class 2: probability exactly 0, not in the mask
    assert float(torch.softmax(three, 1)[:, 2].max()) == 0.0
    mask = torch.tensor([[[1, 1], [1, 0]]])
    assert float(soft_dice_loss(three, mask)) == pytest.approx(float(soft_dice_loss(two, mask)), abs=1e-6)


def test_soft_dice_perfect_prediction_is_zero():
    mask = torch.tensor([[[0, 1], [2, 1]]])
    logits = F.one_hot(mask, 3).permute(0, 3, 1, 2).float() * 50
    assert float(soft_dice_loss(logits, mask)) == pytest.approx(0.0, abs=1e-5)


def test_sdf_loss_values_and_shape_check():
    pred = torch.tensor([[[[0.0, 1.0], [-1.0, 0.5]]]])
    target = torch.tensor([[[[0.5, 0.0], [0.0, 0.5]]]])
    errs = (torch.tanh(pred) - target) ** 2
    assert float(sdf_loss(pred, target)) == pytest.approx(float(errs.mean()), rel=1e-6)
    valid = torch.tensor([[[[1.0, 0.0], [1.0, 1.0]]]])
    assert float(sdf_loss(pred, target, valid)) == pytest.approx(float((errs * valid).sum() / 3), rel=1e-6)
    # the original Semi-MoE broadcast (B,H,W) against (B,1,H,W) silently; here it must raise
    for key, bad in (("sdf", torch.zeros(2, 8, 8)), ("boundary", torch.zeros(2, 8, 8))):
        out, batch = _batch_for(2, 1, 8, 8)
        batch[key] = bad
        with pytest.raises(ValueError):
            task_losses(out, batch)
        out, batch = _batch_for(2, 1, 8, 8)
        out[key] = bad
        with pytest.raises(ValueError):
            task_losses(out, batch)


def test_boundary_loss_is_dice_plus_balanced_bce_by_hand():
    logits = torch.tensor([[[[0.0, 100.0], [-100.0, 2.0]]]])  # p = .5, 1, 0, sigmoid(2)
    target = torch.tensor([[[[1.0, 1.0], [0.0, 0.0]]]])
    p3 = 1 / (1 + math.exp(-2.0))
    # Dice: inter = .5 + 1 = 1.5; sums (1.5 + p3) + 2.
    # BCE: band pixels (ln 2 + 0) / 2, other pixels (0 + -ln(1 - p3)) / 2, averaged.
    want = (1 - 3 / (3.5 + p3)) + 0.5 * (math.log(2) / 2 - math.log(1 - p3) / 2)
    assert float(boundary_loss(logits, target)) == pytest.approx(want, abs=1e-5)


def test_constant_band_prediction_is_no_longer_a_boundary_optimum():
    """Regression: with Dice alone, predicting the band everywhere scored like a real edge map."""
    target = torch.zeros(1, 1, 8, 8)
    target[..., 3:5, :] = 1.0  # a 2-px band, 25% of the pixels
    everywhere = torch.full_like(target, 2.0)
    exact = (target * 2 - 1) * 4.0
    assert float(boundary_loss(exact, target)) < 0.5 * float(boundary_loss(everywhere, target))


def test_confidence_weights_every_loss_by_hand():
    """Pseudo-label confidence weights each pixel: confidence 0 contributes nothing, 0.5 half."""
    conf = torch.tensor([[[1.0, 0.5, 0.0]]])  # (B, H, W) = (1, 1, 3)
    sdf_pred = torch.tensor([[[[0.0, 0.0, 5.0]]]])
    sdf_t = torch.tensor([[[[0.5, -0.5, -1.0]]]])
    seg = torch.tensor([[[[2.0, 0.0, -3.0]], [[0.0, 1.0, 3.0]]]])  # (1, 2, 1, 3)
    mask = torch.tensor([[[0, 1, 0]]])
    bnd = torch.tensor([[[[1.0, -1.0, 4.0]]]])
    bnd_t = torch.tensor([[[[1.0, 0.0, 0.0]]]])
    out, batch = _batch_for(1, 2, 1, 3, pred_seg=seg, pred_boundary=bnd, mask=mask, boundary=bnd_t, confidence=conf)
    out["sdf"], batch["sdf"] = sdf_pred.expand(1, 2, 1, 3), sdf_t.expand(1, 2, 1, 3)
    got = {k: float(v) for k, v in task_losses(out, batch).items()}
    # by hand, weights w = (1, .5, 0)
    p = torch.softmax(seg, 1)[0, :, 0]  # (2, 3)
    w = [1.0, 0.5, 0.0]
    dice = []
    for c in range(2):
        t = [float(mask[0, 0, i] == c) for i in range(3)]
        inter = sum(w[i] * float(p[c, i]) * t[i] for i in range(3))
        denom = sum(w[i] * float(p[c, i]) for i in range(3)) + sum(w[i] * t[i] for i in range(3))
        dice.append((2 * inter + 1e-5) / (denom + 1e-5))
    ce = [-math.log(float(p[int(mask[0, 0, i]), i])) for i in range(3)]
    assert got["seg"] == pytest.approx(1 - sum(dice) / 2 + sum(w[i] * ce[i] for i in range(3)) / sum(w), abs=1e-6)
    e = [(math.tanh(float(sdf_pred[0, 0, 0, i])) - float(sdf_t[0, 0, 0, i])) ** 2 for i in range(3)]
    assert got["sdf"] == pytest.approx(2 * sum(w[i] * e[i] for i in range(3)) / (2 * 3), abs=1e-6)
    pb = [1 / (1 + math.exp(-float(bnd[0, 0, 0, i]))) for i in range(3)]
    tb = [float(bnd_t[0, 0, 0, i]) for i in range(3)]
    bdice = 1 - (2 * sum(w[i] * pb[i] * tb[i] for i in range(3)) + 1e-5) / (sum(w[i] * pb[i] for i in range(3)) + sum(w[i] * tb[i] for i in range(3)) + 1e-5)
    bce = [-(tb[i] * math.log(pb[i]) + (1 - tb[i]) * math.log(1 - pb[i])) for i in range(3)]
    # balanced BCE: band pixel 0 (weight 1) alone; other pixels 1 (weight .5) and 2 (weight 0)
    assert got["boundary"] == pytest.approx(bdice + 0.5 * (bce[0] + (0.5 * bce[1] + 0 * bce[2]) / 0.5), abs=1e-6)
    # a confidence-0 pixel changes nothing, whatever is predicted there
    out["sdf"] = out["sdf"].clone()
    out["sdf"][..., 2] = -7.0
    out["seg"] = out["seg"].clone()
    out["seg"][..., 2] = 9.0
    assert {k: float(v) for k, v in task_losses(out, batch).items()} == pytest.approx(got, abs=1e-7)


def test_pseudo_targets_rules():
    gate = {"seg": torch.tensor([[[[0.1]], [[2.0]], [[-1.0]]]]), "sdf": torch.tensor([[[[0.3]]]]),
            "boundary": torch.tensor([[[[0.1]], ]]), }
    p = pseudo_targets(gate)
    assert p["mask"].tolist() == [[[1]]]
    assert float(p["sdf"]) == pytest.approx(math.tanh(0.3))
    assert p["boundary"].tolist() == [[[[1.0]]]]  # sigmoid(0.1) > 0.5
    assert pseudo_targets({**gate, "boundary": torch.tensor([[[[-0.1]]]])})["boundary"].tolist() == [[[[0.0]]]]


# --------------------------------------------------------------------------- optimizers


@pytest.mark.parametrize("stage,selector_gating", [(1, False), (1, True), (3, False)])
def test_optimizer_structure(grown: Path, stage: int, selector_gating: bool):
    ckpt = Checkpoint.open(grown)
    model = load_model(grown)
    apply_stage(model, ckpt.provenance, stage, 4, selector_gating)
    seed004 = stage >= 2 or selector_gating  # stage 1 freezes the source's selector and gating by default
    lr = 0.01
    opts = build_optimizers(model, lr, momentum=0.9, weight_decay=5e-5)
    names = {id(p): n for n, p in opts.named_parameters(model).items()}
    wd = 5e-5
    o1, o2, o3 = opts.opt1, opts.opt2, opts.opt3
    assert isinstance(o1, torch.optim.SGD) and isinstance(o2, torch.optim.Adam) and isinstance(o3, torch.optim.SGD)
    groups = {g["name"]: g for g in o1.param_groups}
    assert list(groups)[:3] == ["backbone", "decoder", "selector"]
    # an optional extra group may hold the MoE routers only (a higher router lr is a deliberate extension)
    assert set(groups) - {"backbone", "decoder", "selector"} <= {"router"}
    assert groups["backbone"]["lr"] == lr and groups["decoder"]["lr"] == lr
    assert groups["selector"]["lr"] == pytest.approx(5 * lr)
    for g in o1.param_groups + o3.param_groups + o2.param_groups:
        assert g["weight_decay"] == pytest.approx(wd, rel=1e-12)
    for g in o1.param_groups + o3.param_groups:
        assert g["momentum"] == 0.9
    assert len(o2.param_groups) == 1 and o2.param_groups[0]["lr"] == 0.05
    assert [id(p) for p in o2.param_groups[0]["params"]] == [id(p) for p in opts.loss.parameters()]
    assert not any(n.startswith("loss.") for n, _ in model.named_parameters())  # the objective's, not the model's
    assert len(o3.param_groups) == 1 and o3.param_groups[0]["lr"] == lr
    assert {id(p) for p in o3.param_groups[0]["params"]} == ({id(p) for p in model.gating.parameters()} if seed004 else set())
    members = {
        "backbone": [names[id(p)] for p in groups["backbone"]["params"]],
        "decoder": [names[id(p)] for p in groups["decoder"]["params"]],
        "selector": [names[id(p)] for p in groups["selector"]["params"]],
    }
    if "router" in groups:
        routers = [names[id(p)] for p in groups["router"]["params"]]
        assert routers and all(".router." in n for n in routers)
        assert groups["router"]["momentum"] == 0.9
    assert bool(members["selector"]) == seed004 and all(n.startswith("selector.") for n in members["selector"])
    assert members["decoder"] and all(n.startswith("mask_decoder.") for n in members["decoder"])
    assert members["backbone"] and all(n.startswith("image_encoder.") for n in members["backbone"])
    seen: dict[str, int] = {}
    for opt in (o1, o2, o3):
        for g in opt.param_groups:
            for p in g["params"]:
                seen[names[id(p)]] = seen.get(names[id(p)], 0) + 1
    trainable = {n for n, p in opts.named_parameters(model).items() if p.requires_grad}
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert set(seen) == trainable and all(v == 1 for v in seen.values())
    assert not (frozen & set(seen))
    if stage == 1:
        assert "image_encoder.blocks.0.attn.qkv.weight" in frozen
        assert "image_encoder.blocks.2.mlp.experts.0.w1" in frozen  # source experts
        assert "image_encoder.blocks.2.mlp.experts.1.w1" in trainable  # new experts
        assert "image_encoder.blocks.2.mlp.router.expert_gates.0.weight" in trainable  # every router
        parts = ("selector.", "gating.", "loss.") if seed004 else ("loss.",)
        assert {n for n in trainable if n.startswith(("selector.", "gating.", "loss."))} == {
            n for n in opts.named_parameters(model) if n.startswith(parts)}
    else:
        assert not frozen
    assert build_optimizers(model, lr, weight_decay=5e-4).opt1.param_groups[0]["weight_decay"] == pytest.approx(5e-4, rel=1e-12)
    # warm-up factor touches optimizers 1 and 3 only
    base = [g["lr"] for g in o1.param_groups]
    apply_lr(opts, 0.25)
    assert [g["lr"] for g in o1.param_groups][:3] == pytest.approx([0.25 * lr, 0.25 * lr, 0.25 * 5 * lr])
    assert [g["lr"] for g in o1.param_groups] == pytest.approx([0.25 * b for b in base])
    assert o3.param_groups[0]["lr"] == pytest.approx(0.25 * lr)
    assert o2.param_groups[0]["lr"] == 0.05
    apply_lr(opts, 1.0)
    assert [g["lr"] for g in o1.param_groups] == pytest.approx(base)


# --------------------------------------------------------------------------- gradient table (seed 004)


def _part(name: str) -> str:
    """The columns of seed 004's gradient table."""
    for prefix, part in (("image_encoder.", "encoder"), ("mask_decoder.", "decoder"), ("selector.", "selector"),
                         ("gating.", "gating"), ("loss.", "loss")):
        if name.startswith(prefix):
            return part
    raise AssertionError(name)


def _changed_by_role(params: dict[str, torch.Tensor], before) -> dict[str, list[bool]]:
    out: dict[str, list[bool]] = {}
    for n, p in params.items():
        out.setdefault(_part(n), []).append(not torch.equal(p.detach(), before[n]))
    return out


@pytest.fixture()
def stage3_model(src: Path):
    model = load_model(src)
    apply_stage(model, Checkpoint.open(src).provenance, 3, 4)
    assert all(p.requires_grad for p in model.parameters())
    model.selector.set_alpha(0.5)  # alpha > 0: the selector is in the graph (it is exp(-5) > 0 at epoch 0)
    model.train()
    return model


def test_supervised_phase_updates_every_group(stage3_model, data: Path):
    model = stage3_model
    opts = build_optimizers(model, 1e-2)
    batch = _batch(LabelledFolder(data / "A", 4, size=128), [0, 1])
    params = opts.named_parameters(model)
    before = {n: p.detach().clone() for n, p in params.items()}
    train_step(model, opts, batch, None, 1.0, 0.01, False, 0)
    changed = _changed_by_role(params, before)
    assert set(changed) == {"encoder", "decoder", "selector", "gating", "loss"}
    for role in ("encoder", "decoder", "selector", "gating", "loss"):
        assert all(changed[role]), role
    assert all(p.grad is not None for p in model.gating.parameters())


def test_unsupervised_phase_never_touches_gating(stage3_model, data: Path):
    """Observed inside the real train_step: state right after the unsup phase's optimizer2.step."""
    model = stage3_model
    opts = build_optimizers(model, 1e-2)
    batch = _batch(LabelledFolder(data / "A", 4, size=128), [0, 1])
    ubatch = _batch(UnlabelledFolder(data / "B", size=128), [0, 1])
    params = opts.named_parameters(model)
    before = {n: p.detach().clone() for n, p in params.items()}
    seen: dict[str, object] = {}
    calls = {"opt1": 0, "opt2": 0, "opt3": 0, "forward": []}
    orig2, orig1, orig3 = opts.opt2.step, opts.opt1.step, opts.opt3.step

    def step1(*a, **k):
        calls["opt1"] += 1
        return orig1(*a, **k)

    def step3(*a, **k):
        calls["opt3"] += 1
        return orig3(*a, **k)

    def step2(*a, **k):
        calls["opt2"] += 1
        r = orig2(*a, **k)
        if calls["opt2"] == 1:  # end of the unsupervised phase
            seen["params"] = {n: p.detach().clone() for n, p in params.items()}
            seen["gate_grads"] = [p.grad for p in model.gating.parameters()]
            seen["opt3_calls"] = calls["opt3"]
        return r

    orig_forward = model.gating.forward

    def forward(feats):
        calls["forward"].append(torch.is_grad_enabled())
        return orig_forward(feats)

    opts.opt1.step, opts.opt2.step, opts.opt3.step = step1, step2, step3
    model.gating.forward = forward
    try:
        m = train_step(model, opts, batch, ubatch, 1.0, 0.01, False, 0)
    finally:
        del model.gating.forward
    assert calls["forward"] == [False, True]  # separate forwards: unsup (gate under no_grad), then sup
    assert calls["opt1"] == 2 and calls["opt2"] == 2 and calls["opt3"] == 1
    assert seen["opt3_calls"] == 0
    assert all(g is None for g in seen["gate_grads"])
    after_unsup = seen["params"]
    for n in before:
        if n.startswith("gating."):
            assert torch.equal(after_unsup[n], before[n]), n
    roles: dict[str, list[bool]] = {}
    for n in before:
        roles.setdefault(_part(n), []).append(not torch.equal(after_unsup[n], before[n]))
    assert not any(roles["gating"])
    for role in ("encoder", "decoder", "selector", "loss"):
        assert all(roles[role]), role
    # the supervised phase then trains the gate
    assert all(not torch.equal(p.detach(), before[n]) for n, p in params.items() if n.startswith("gating."))
    assert m["loss_unsup"] != 0.0 and math.isfinite(m["loss_sup"])


def test_gating_without_grad_builds_no_graph_through_gating(stage3_model, data: Path):
    model = stage3_model
    x = _batch(UnlabelledFolder(data / "B", size=128), [0])["image"]
    with gating_without_grad(model):
        out = model(x)
    assert torch.is_grad_enabled()
    for t in TASKS:
        assert not out[f"gate_{t}"].requires_grad
        assert out[t].requires_grad
    out = model(x)  # the hooks are gone
    assert all(out[f"gate_{t}"].requires_grad for t in TASKS)


def test_task_losses_shapes_match_model_outputs(stage3_model, data: Path):
    batch = _batch(LabelledFolder(data / "A", 4, size=128), [0, 1])
    with torch.no_grad():
        out = stage3_model(batch["image"])
    for prefix in ("", "gate_"):
        losses = task_losses(out, batch, prefix)
        assert set(losses) == set(TASKS) and all(torch.isfinite(v) for v in losses.values())


def test_no_retain_graph_anywhere():
    """No call passes retain_graph (seed 004); checked on the syntax tree, so the docstrings' 'no retain_graph' is fine."""
    files = sorted((REPO / "upscale").rglob("*.py")) + sorted((REPO / "stages").rglob("*.py")) + [REPO / "cli.py"]
    assert len(files) > 5
    offenders = []
    for f in files:
        tree = ast.parse(f.read_text(), str(f))
        for node in ast.walk(tree):
            if isinstance(node, ast.keyword) and node.arg in ("retain_graph", "create_graph"):
                offenders.append(f"{f.name}:{node.value.lineno}")
            if isinstance(node, (ast.Name, ast.Attribute)) and getattr(node, "id", getattr(node, "attr", "")) == "retain_graph":
                offenders.append(f"{f.name}:{node.lineno}")
        code_only = [ln.split("#")[0] for ln in f.read_text().splitlines()]
        assert not any("retain_graph=" in ln.replace(" ", "") for ln in code_only), f
    assert not offenders, offenders


def test_model_package_does_not_import_training_package():
    """upscale/ (the model and its growth) never imports stages/ (training): the dependency points one way."""
    offenders = []
    for f in sorted((REPO / "upscale").rglob("*.py")):
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            offenders += [f"{f.name}:{node.lineno}" for n in names if n == "stages" or n.startswith("stages.")]
    assert not offenders, offenders


def test_lr_table_comes_from_the_optimizer_groups():
    """The CLI's learning-rate table reads the optimizers: an extra block's routers show the router lr, its MLP the base lr."""
    from stages.engine import component_lrs
    from upscale.expand import grown_config
    from upscale.model import build_model

    cfg = grown_config(TINY, GrowthSpec(experts=8, groups=resolve_groups(4, 8, "2", 1), extra_blocks=1))
    model = build_model(cfg)
    lrs = component_lrs(model, build_optimizers(model, 0.01, router_lr_mult=10.0))
    assert lrs["extra_blocks"] == pytest.approx([0.01, 0.1])
    assert lrs["routers"] == pytest.approx([0.1]) and lrs["selector"] == pytest.approx([0.05])
    assert lrs["encoder"] == pytest.approx([0.01])


def test_param_roles():
    from upscale.roles import param_role

    assert param_role("image_encoder.blocks.5.mlp.router.group_gate.weight") == "router"
    assert param_role("mask_decoder.transformer.layers.0.mlp.experts.0.w1") == "expert"
    assert param_role("mask_decoder.mask_tokens.weight") == "head"
    assert param_role("selector.selectors.seg_scale1.conv.weight") == "selector"
    assert param_role("gating.mlp.0.weight") == "gating"
    assert param_role("image_encoder.patch_embed.proj.weight") == "encoder"
    assert param_role("mask_decoder.transformer.final_attn_token_to_image.q_proj.weight") == "decoder"
