"""The model parts of seed 004's regime: multi-scale task selector and gating model.

They live with the model because checkpoints carry them (`selector.*`, `gating.*`);
the training maths that uses them (task losses and their learnable weights, ramps,
pseudo targets) is in stages/semisup.py.

The 5 scales. SAM's ViT has a single 1/16 resolution, so the scales are built
explicitly as a parameter-free pyramid of the decoder's upscaled features F
(resolution 4h for an h x h ViT grid): F average-pooled to 4h, 2h, h, h/2, h/4,
i.e. x4, x2, x1, x1/2, x1/4 of the ViT grid (the ViTDet simple-pyramid scales).
Each of the 3 x 5 `TaskDWSelector`s (a depthwise 3x3 conv) turns its scale into
a sigmoid weight map w and returns the seed's `x * (1 + alpha * w)`; the task
feature is F plus every scale's modulation upsampled back:
    T_task = F + sum_s up(P_s * (1 + alpha * w_s) - P_s)
so with alpha = 0 (the start of the ramp) every head sees exactly F.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layout import GATING_HIDDEN, NUM_SCALES, TASKS


def bilinear_weights(n_in: int, n_out: int, dtype: torch.dtype, device: torch.device | None = None) -> Tensor:
    """(n_out, n_in) weights of `F.interpolate(mode="bilinear", align_corners=False)` along one axis."""
    src = ((torch.arange(n_out, dtype=torch.float64, device=device) + 0.5) * (n_in / n_out) - 0.5).clamp_min(0)
    lo = src.floor().clamp_max(n_in - 1)
    frac = (src - lo)[:, None]
    cols = torch.arange(n_in, dtype=torch.float64, device=device)[None, :]
    hi = (lo + 1).clamp_max(n_in - 1)[:, None]
    w = (1 - frac) * (cols == lo[:, None]) + frac * (cols == hi)
    return w.to(dtype)


@torch.library.custom_op("samoe::resize", mutates_args=())
def _resize(x: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    """rows @ x @ cols.T over the last two dims, in x's dtype whatever autocast says."""
    with torch.autocast(x.device.type, enabled=False):
        return rows @ x @ cols.t()


@_resize.register_fake
def _(x: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    return x.new_empty(*x.shape[:-2], rows.shape[0], cols.shape[0])


def _resize_setup(ctx, inputs, output) -> None:
    ctx.save_for_backward(inputs[1], inputs[2])


def _resize_backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
    rows, cols = ctx.saved_tensors
    return _resize(grad, rows.t(), cols.t()), None, None  # the adjoint of a resize is a resize by the transposes


_resize.register_autograd(_resize_backward, setup_context=_resize_setup)


def _register_resize_flops() -> None:
    """Interpolation is not counted (as F.interpolate is not): FLOP counts stay those of the model's function."""
    from torch.utils.flop_counter import register_flop_formula

    @register_flop_formula(torch.ops.samoe.resize)
    def _(*args, **kwargs) -> int:
        return 0


_register_resize_flops()


def resize_bilinear(x: Tensor, size: tuple[int, int]) -> Tensor:
    """(..., h, w) -> (..., *size): `F.interpolate(x, size, mode="bilinear", align_corners=False)` within float
    rounding, as two matmuls with the interpolation weights (one `samoe::resize` node when compiled).

    Why: the backward of F.interpolate is a scatter, slow on a CPU (a fifth of a tiny model's training
    step went to resizing its output maps) and slower still compiled under deterministic algorithms, where
    the compiler falls back to a sorting scatter; a matmul's backward is a matmul.
    """
    (h, w), (hh, ww) = x.shape[-2:], size
    if (h, w) == (hh, ww):
        return x
    return _resize(x, bilinear_weights(h, hh, x.dtype, x.device), bilinear_weights(w, ww, x.dtype, x.device))


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
                feat = feat + (delta if s == 0 else resize_bilinear(delta, x.shape[-2:]))
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

    def __init__(self, channels: int, num_classes: int, hidden: int = GATING_HIDDEN) -> None:
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
