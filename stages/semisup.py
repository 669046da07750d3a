"""The semi-supervised regime of seed 004: multi-scale task selector, gating, task loss, ramps.

Semi-MoE's three task branches (segmentation, SDF, boundary) become three views
of one shared encoder/decoder. A `MultiScaleTaskSelector` modulates the shared
decoder features per task at 5 scales; each task head reads its own modulated
features; a `GatingModel` fuses the three task features per image into the
outputs that become pseudo-labels of unlabelled images; a `MultiTaskLoss` with a
learnable sigma per task weighs the three losses.

The 5 scales. SAM's ViT has a single 1/16 resolution, so the scales are built
explicitly as a parameter-free pyramid of the decoder's upscaled features F
(resolution 4h for an h x h ViT grid): F average-pooled to 4h, 2h, h, h/2, h/4,
i.e. x4, x2, x1, x1/2, x1/4 of the ViT grid (the ViTDet simple-pyramid scales).
Each of the 3 x 5 `TaskDWSelector`s (a depthwise 3x3 conv) turns its scale into
a sigmoid weight map w and returns the seed's `x * (1 + alpha * w)`; the task
feature is F plus every scale's modulation upsampled back:
    T_task = F + sum_s up(P_s * (1 + alpha * w_s) - P_s)
so with alpha = 0 (the start of the ramp) every head sees exactly F.

Known flaws of the original code that are avoided here: SDF prediction and
target must have identical shapes (checked, no broadcasting); targets are defined
for all-foreground / all-background crops (stages/data.py); no threshold is ever
tuned on evaluation data (pseudo-labels use argmax / sign / 0.5, fixed).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

TASKS = ("seg", "sdf", "boundary")
NUM_SCALES = 5
IGNORE_INDEX = 255


def sigmoid_rampup(current: float, rampup_length: float) -> float:
    """exp(-5 (1 - t/T)^2) with t clipped to [0, T]; 1.0 when T == 0 (seed 004, section 3)."""
    if rampup_length == 0:
        return 1.0
    current = float(np.clip(current, 0.0, rampup_length))
    phase = 1.0 - current / rampup_length
    return float(np.exp(-5.0 * phase * phase))


def _stats(w: Tensor | None) -> dict[str, float]:
    if w is None:
        return {"mean": 0.0, "std": 0.0, "min": 0.0, "max": 0.0}
    w = w.float()
    return {"mean": float(w.mean()), "std": float(w.std()) if w.numel() > 1 else 0.0,
            "min": float(w.min()), "max": float(w.max())}


class TaskDWSelector(nn.Module):
    """One task at one scale: depthwise conv -> sigmoid weight map; x * (1 + alpha * w).

    Arguments:
        channels (int): feature channels (depthwise: one 3x3 filter each).
    `alpha` is a buffer so the ramp's current value travels with checkpoints.
    """

    def __init__(self, channels: int, kernel_size: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size, padding=kernel_size // 2, groups=channels)
        self.register_buffer("alpha", torch.zeros(()))
        self.last_weight: Tensor | None = None

    def set_alpha(self, alpha: float) -> None:
        self.alpha.fill_(alpha)

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, C, H, W)."""
        w = torch.sigmoid(self.conv(x))
        self.last_weight = w.detach()
        return x * (1 + self.alpha.to(x.dtype) * w)

    def get_weight_stats(self) -> dict[str, float]:
        """mean/std/min/max of the weight map of the last forward."""
        return _stats(self.last_weight)


class MultiScaleTaskSelector(nn.Module):
    """3 tasks x 5 scales of `TaskDWSelector` over a pyramid of the shared features.

    Arguments:
        channels (int): channels of the decoder's upscaled features.
    """

    def __init__(self, channels: int, tasks: tuple[str, ...] = TASKS, num_scales: int = NUM_SCALES) -> None:
        super().__init__()
        self.tasks = tasks
        self.num_scales = num_scales
        self.selectors = nn.ModuleDict(
            {self.key(t, s): TaskDWSelector(channels) for t in tasks for s in range(num_scales)}
        )

    @staticmethod
    def key(task: str, scale: int) -> str:
        return f"{task}_scale{scale + 1}"

    def set_alpha(self, alpha: float) -> None:
        for sel in self.selectors.values():
            sel.set_alpha(alpha)

    @property
    def alpha(self) -> float:
        return float(next(iter(self.selectors.values())).alpha)

    def pyramid(self, x: Tensor) -> list[Tensor]:
        h, w = x.shape[-2:]
        return [x] + [F.adaptive_avg_pool2d(x, (max(1, h >> s), max(1, w >> s))) for s in range(1, self.num_scales)]

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """(B, C, H, W) shared features -> {task: (B, C, H, W)} task features."""
        levels = self.pyramid(x)
        out = {}
        for task in self.tasks:
            feat = x
            for s, p in enumerate(levels):
                delta = self.selectors[self.key(task, s)](p) - p
                feat = feat + (delta if s == 0 else F.interpolate(delta, x.shape[-2:], mode="bilinear", align_corners=False))
            out[task] = feat
        return out

    def get_all_weight_stats(self) -> dict[str, dict[str, float]]:
        """{task_scaleK: {mean, std, min, max}} for all tasks x scales (last forward)."""
        return {k: sel.get_weight_stats() for k, sel in self.selectors.items()}

    def get_weight_stats(self) -> dict[str, float]:
        """Pooled stats over all 15 weight maps of the last forward (what the 5-epoch log prints)."""
        maps = [s.last_weight.flatten() for s in self.selectors.values() if s.last_weight is not None]
        return _stats(torch.cat(maps) if maps else None)


class GatingModel(nn.Module):
    """Semi-MoE's gate: per image and per task, softmax weights over the three task branches.

    The three task feature maps are concatenated and average-pooled; an MLP
    predicts, for each output task, one weight per branch (per image, not per
    pixel); the mixed feature goes through a 1x1 head (seg C, sdf C, boundary 1).

    Arguments:
        channels (int): task feature channels.
        num_classes (int): segmentation classes C.
        hidden (int): MLP width.
    """

    def __init__(self, channels: int, num_classes: int, hidden: int = 64) -> None:
        super().__init__()
        n = len(TASKS)
        self.mlp = nn.Sequential(nn.Linear(n * channels, hidden), nn.ReLU(), nn.Linear(hidden, n * n))
        outs = {"seg": num_classes, "sdf": num_classes, "boundary": 1}
        self.heads = nn.ModuleDict({t: nn.Conv2d(channels, outs[t], 1) for t in TASKS})
        self.last_weights: Tensor | None = None

    def forward(self, feats: dict[str, Tensor]) -> dict[str, Tensor]:
        """{task: (B, C, H, W)} -> {task: (B, out_t, H, W)} fused outputs."""
        stacked = torch.stack([feats[t] for t in TASKS], dim=1)  # (B, branches, C, H, W)
        b = stacked.shape[0]
        weights = self.mlp(stacked.mean(dim=(3, 4)).flatten(1)).view(b, len(TASKS), len(TASKS)).softmax(-1)
        self.last_weights = weights.detach()
        out = {}
        for i, task in enumerate(TASKS):
            mixed = (weights[:, i, :, None, None, None] * stacked).sum(dim=1)
            out[task] = self.heads[task](mixed)
        return out


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


# --------------------------------------------------------------------------- per-task losses


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
    valid = (mask != IGNORE_INDEX).unsqueeze(1).to(seg.dtype)
    w = pixel_weights(batch, seg.dtype)
    probs = seg.softmax(dim=1)
    onehot = F.one_hot(mask.clamp(0, c - 1), c).permute(0, 3, 1, 2).to(seg.dtype)
    sdf, sdf_t = out[prefix + "sdf"].float(), batch["sdf"]
    _check_shapes(sdf, sdf_t, "sdf")
    err = (torch.tanh(sdf) - sdf_t).pow(2)
    bnd, bnd_t = out[prefix + "boundary"].float(), batch["boundary"].float()
    _check_shapes(bnd, bnd_t, "boundary")
    p = torch.sigmoid(bnd)
    bce = F.binary_cross_entropy_with_logits(bnd, bnd_t, reduction="none")
    ce = -(seg.log_softmax(dim=1) * onehot).sum(dim=1, keepdim=True)
    return torch.cat([
        (probs * onehot * w).sum(dim=(0, 2, 3)), (probs * w).sum(dim=(0, 2, 3)), (onehot * w).sum(dim=(0, 2, 3)),
        torch.stack([(err * w).sum(), valid.expand_as(err).sum(), (p * bnd_t * w).sum(), (p * w).sum(), (bnd_t * w).sum(),
                     (bce * bnd_t * w).sum(), (bnd_t * w).sum(), (bce * (1 - bnd_t) * w).sum(), ((1 - bnd_t) * w).sum(),
                     (ce * w).sum(), w.sum()]),
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
        "mask": gate["seg"].argmax(dim=1),
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
