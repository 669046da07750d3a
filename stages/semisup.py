"""The semi-supervised regime of seed 004: task losses, ramps, pseudo targets.

Semi-MoE's three task branches (segmentation, SDF, boundary) become three views
of one shared encoder/decoder. A `MultiScaleTaskSelector` modulates the shared
decoder features per task at 5 scales; each task head reads its own modulated
features; a `GatingModel` fuses the three task features per image into the
outputs that become pseudo-labels of unlabelled images. Those two are model parts
(upscale/heads.py, where the 5 scales are explained); this module holds the
training maths around them, including the `MultiTaskLoss` whose learnable sigma
per task weighs the three losses (training state: the trainer checkpoints it).

Known flaws of the original code that are avoided here: SDF prediction and
target must have identical shapes (checked, no broadcasting); targets are defined
for all-foreground / all-background crops (stages/data.py); no threshold is ever
tuned on evaluation data (pseudo-labels use argmax / sign / 0.5, fixed).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from upscale.heads import TASKS

IGNORE_INDEX = 255


def sigmoid_rampup(current: float, rampup_length: float) -> float:
    """exp(-5 (1 - t/T)^2) with t clipped to [0, T]; 1.0 when T == 0 (seed 004, section 3)."""
    if rampup_length == 0:
        return 1.0
    current = float(np.clip(current, 0.0, rampup_length))
    phase = 1.0 - current / rampup_length
    return float(np.exp(-5.0 * phase * phase))


# --------------------------------------------------------------------------- per-task losses


class MultiTaskLoss(nn.Module):
    """Uncertainty weighting as in Semi-MoE: sum_t c_t * exp(-s_t) * L_t + 0.4 * exp(s_t).

    `s_t` (one per task, init 1.0) is learnable and trained by its own Adam
    (optimizer2, lr 0.05). c = (1, 0.5, 1) for (seg, sdf, boundary).
    """

    def __init__(self, coefficients: tuple[float, ...] = (1.0, 0.5, 1.0), init: float = 1.0, reg: float = 0.4) -> None:
        super().__init__()
        self.log_vars = nn.Parameter(torch.full((len(TASKS),), float(init)))
        self.register_buffer("coefficients", torch.tensor(coefficients, dtype=torch.float32))
        self.reg = reg

    def forward(self, losses: dict[str, Tensor]) -> Tensor:
        s = self.log_vars
        total = s.new_zeros(())
        for i, task in enumerate(TASKS):
            total = total + self.coefficients[i] * torch.exp(-s[i]) * losses[task] + self.reg * torch.exp(s[i])
        return total


@contextmanager
def gating_without_grad(model: nn.Module) -> Iterator[None]:
    """Inside, `model.gating` runs under torch.no_grad() (seed 004's unsupervised phase: the gate that makes
    the pseudo-labels must not learn to confirm itself); the rest of the forward keeps its gradients."""
    grad_mode: list[bool] = []

    def before(module: nn.Module, args: tuple) -> None:
        grad_mode.append(torch.is_grad_enabled())
        torch.set_grad_enabled(False)

    def after(module: nn.Module, args: tuple, out: object) -> None:
        torch.set_grad_enabled(grad_mode.pop())

    outer = torch.is_grad_enabled()
    handles = [model.gating.register_forward_pre_hook(before), model.gating.register_forward_hook(after)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        torch.set_grad_enabled(outer)


def _check_shapes(pred: Tensor, target: Tensor, what: str) -> None:
    if pred.shape != target.shape:
        raise ValueError(f"{what}: prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ")


def pixel_weights(batch: dict[str, Tensor], dtype: torch.dtype) -> Tensor:
    """(B, 1, H, W) loss weight of each pixel: 0 where ignored, else its pseudo-label confidence (1 for true labels).

    A pixel of confidence 0 contributes nothing to any task loss, one of 0.5 half
    as much as a labelled pixel; `pseudo-label --threshold` only decides which
    pixels are dropped outright.
    """
    w = (batch["mask"] != IGNORE_INDEX).to(dtype)
    if "confidence" in batch:
        conf = batch["confidence"].to(dtype)
        if conf.shape != w.shape:
            raise ValueError(f"confidence {tuple(conf.shape)} and mask {tuple(w.shape)} differ")
        w = w * conf
    return w.unsqueeze(1)


def task_stats(out: dict[str, Tensor], batch: dict[str, Tensor], prefix: str = "") -> Tensor:
    """The sums every task loss is made of, as one 1-d tensor (see `losses_from_stats`).

    Losses are ratios of sums over the batch, so N data-parallel processes get
    the global losses by all-reducing these sums (stages/distributed.py) and one
    process uses them as they are: one formula for any world size.
    Layout: per class C: Dice intersection, prob sum, target sum; then
    SDF weighted squared error, SDF element count, boundary Dice intersection,
    prob sum, target sum, then the boundary BCE sums and weights of band pixels
    and of the other pixels, then the segmentation cross-entropy sum and weight.
    """
    seg = out[prefix + "seg"].float()
    mask = batch["mask"]
    if seg.shape[0] != mask.shape[0] or seg.shape[-2:] != mask.shape[-2:]:
        raise ValueError(f"seg: logits {tuple(seg.shape)} and mask {tuple(mask.shape)} differ")
    c = seg.shape[1]
    w = pixel_weights(batch, seg.dtype)
    logp = seg.log_softmax(dim=1)
    target = mask.clamp(0, c - 1).unsqueeze(1)
    logp_t = logp.gather(1, target)  # log-probability of each pixel's target class
    # per-class sums by class index: a (B, C, H, W) one-hot and three products with it were the
    # costliest part of this function on CPU (forward + backward 38 -> 24 ms for a tiny-preset batch)
    if torch.compiler.is_compiling():  # a one-hot product fuses into the sums; a scatter would be a sorting fallback
        onehot = target == torch.arange(c, device=seg.device)[:, None, None]
        inter = (logp_t.exp() * w * onehot).sum(dim=(0, 2, 3))
        target_sum = (w * onehot).sum(dim=(0, 2, 3))
    else:
        t = target.flatten()
        inter = seg.new_zeros(c).index_add(0, t, (logp_t.exp() * w).flatten())
        target_sum = torch.bincount(t, weights=w.flatten(), minlength=c).to(seg.dtype)
    sdf, sdf_t = out[prefix + "sdf"].float(), batch["sdf"]
    _check_shapes(sdf, sdf_t, "sdf")
    err = (torch.tanh(sdf) - sdf_t).pow(2)
    bnd, bnd_t = out[prefix + "boundary"].float(), batch["boundary"].float()
    _check_shapes(bnd, bnd_t, "boundary")
    p = torch.sigmoid(bnd)
    bce = F.binary_cross_entropy_with_logits(bnd, bnd_t, reduction="none")
    valid = (mask != IGNORE_INDEX).sum().to(seg.dtype) * err.shape[1]
    band_w = bnd_t * w  # weights of band pixels; w - band_w those of the others
    rest_w = w - band_w
    n_band = band_w.sum()
    return torch.cat([
        inter, (logp.exp() * w).sum(dim=(0, 2, 3)), target_sum,
        torch.stack([(err * w).sum(), valid, (p * band_w).sum(), (p * w).sum(), n_band,
                     (bce * band_w).sum(), n_band, (bce * rest_w).sum(), rest_w.sum(), -(logp_t * w).sum(), w.sum()]),
    ])


def losses_from_stats(stats: Tensor, num_classes: int) -> dict[str, Tensor]:
    """Per-task losses from `task_stats` sums (of one batch, or all-reduced over processes).

    seg: multi-class soft Dice (mean over classes present in the target or the
    prediction) plus pixel cross-entropy, as nnU-Net trains: Semi-MoE's Dice
    alone gives near-flat gradients from a random start with many classes (a
    10-class source did not move off Dice 0.91 in 128 steps); sdf: mean squared error of tanh(pred) against the normalised SDF;
    boundary: soft Dice plus class-balanced pixel BCE (the mean BCE of band pixels
    and of the other pixels, averaged, as HED's edge loss balances them).
    Semi-MoE's Dice-only boundary loss has a degenerate optimum that predicts the
    band everywhere (the F1 of a constant prediction); the BCE term makes every
    pixel count, and balancing keeps a thin band from being predicted nowhere.
    """
    c = num_classes
    inter, denom = stats[:c], stats[c : 2 * c] + stats[2 * c : 3 * c]
    err, count, b_inter, b_p, b_t, bce_pos, n_pos, bce_neg, n_neg, ce, n_ce = stats[3 * c :]
    present = denom > 0
    if not present.any():
        seg = stats.sum() * 0
    else:
        seg = 1 - ((2 * inter[present] + 1e-5) / (denom[present] + 1e-5)).mean() + ce / n_ce.clamp_min(1e-6)
    return {
        "seg": seg,
        "sdf": err / count.clamp_min(1),
        "boundary": (1 - (2 * b_inter + 1e-5) / (b_p + b_t + 1e-5)
                     + 0.5 * (bce_pos / n_pos.clamp_min(1e-6) + bce_neg / n_neg.clamp_min(1e-6))),
    }


def task_losses(out: dict[str, Tensor], batch: dict[str, Tensor], prefix: str = "") -> dict[str, Tensor]:
    """Per-task losses of outputs `{prefix}seg/sdf/boundary` against batch targets (pixels weighted by `pixel_weights`)."""
    return losses_from_stats(task_stats(out, batch, prefix), out[prefix + "seg"].shape[1])


@torch.no_grad()
def pseudo_targets(gate: dict[str, Tensor]) -> dict[str, Tensor]:
    """Pseudo-labels from the gate's fused outputs: argmax(seg), tanh(sdf), sigmoid(boundary) > 0.5."""
    return {
        "mask": gate["seg"].max(dim=1).indices,  # = argmax(dim=1) (first maximum), 4-5x faster across channels on CPU
        "sdf": torch.tanh(gate["sdf"]),
        "boundary": (torch.sigmoid(gate["boundary"]) > 0.5).to(gate["boundary"].dtype),
    }


def continue_rampup(start: float, current: float, rampup_length: float) -> float:
    """The selector's alpha at epoch `current` of a run whose source ended its ramp at `start`.

    A fresh model (start 0) ramps exactly as seed 004 does. A trained or grown one
    (start 1) keeps alpha at 1: ramping from 0 again would switch the selector's
    modulation off at every stage start, which changes the function growth just
    preserved (on the growth benchmark a 31-step stage 3 trained at alpha 0.007 and
    was saved at 1: mIoU 0.446 -> 0.412).
    """
    return start + (1.0 - start) * sigmoid_rampup(current, rampup_length)


def scaled_epochs(seed_epochs: float, epochs: int, timeline: int = 200) -> float:
    """Seed 004 gives epochs for a 200-epoch run; a run of `epochs` keeps the same shape."""
    return seed_epochs * epochs / timeline


def warmup_factor(progress_epochs: float, warmup_epochs: float) -> float:
    """Linear LR warm-up over `warmup_epochs` (optimizers 1 and 3 only)."""
    if warmup_epochs <= 0:
        return 1.0
    return min(1.0, progress_epochs / warmup_epochs)


def poly_factor(progress: float, power: float = 0.9) -> float:
    """Polynomial decay after warm-up, as Semi-MoE's training scripts use."""
    return max(0.0, 1.0 - progress) ** power if math.isfinite(progress) else 0.0
