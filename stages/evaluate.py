"""`samoe eval`: metrics, a paired bootstrap, and the routing report.

Scenes are scored whole, at their own resolution: each is cut into the model's
windows and their outputs blended (stages/predict.py, the engine `predict` uses),
so a 1200 x 2000 scene is scored on its 2.4 million pixels, not squashed to the
model's size. The report states the resolution. Class names come from the
checkpoint's record or the data's classes.json (stages/classes.py); checkpoints
that name different classes are not compared.

Metrics on a labelled folder, from the task heads (not the gate):
- per-class IoU and Dice/F1 from the dataset's summed confusion matrix; classes
  absent from both prediction and target (union 0) are left out of the means;
  ignore-index pixels (255) count nowhere;
- pixel accuracy; boundary precision/recall/F1 of sigmoid(boundary) > 0.5 against
  the boundary band target; SDF error = mean |tanh(sdf) - target| of each window
  against its own target (the SDF is normalised per window, as in training);
- interior mIoU: the mIoU of the pixels farther than half a patch (the model's
  token) from any class border. It separates telling land cover apart, which
  capacity buys, from placing borders inside a token, which it does not: on the
  hard scenes a tiny model classifies parcel interiors at 98-99% accuracy while
  its mIoU is 0.77, and a grown model's gain shows here first.
With several checkpoints, every metric's difference to the first checkpoint gets
a paired bootstrap 95% interval over images (seeded: the same call gives the
same numbers), so a user sees whether a difference is real.
Per-class IoU differences get the same intervals (same resamples).

Routing report, per MoE layer: assignments per group and per expert, dead
experts (no tokens), load imbalance (coefficient of variation of expert
counts), mean top-level router entropy, traffic to source (core) vs new groups (by assignments, and by routing weight:
new groups gated by a still-zero `group_scale` get tokens but no weight),
and for encoder layers which groups each class's patches go to.

Figures and the Markdown report are drawn from this report by `stages.figures`
and `stages.report` (this module only measures).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from upscale.checkpoint import Checkpoint, load_model
from upscale.config import expert_offsets
from upscale.errors import SamoeError

from .classes import CLASSES_JSON, ClassList, check_same, read_classes
from .data import IGNORE_INDEX, LabelledFolder, boundary_target, sdf_target
from .dataspec import class_list, recorded
from .predict import Band, Scene, Tiling, Window, file_scene, resized_bands, sliding_windows
from .rasters import open_raster
from .units import UnitOptions, Units, resolve_units

METRICS = ("miou", "mean_dice", "pixel_accuracy", "boundary_f1", "sdf_mae", "miou_interior")


# --------------------------------------------------------------------------- metric functions


def confusion_matrix(pred: np.ndarray, target: np.ndarray, num_classes: int, ignore_index: int = IGNORE_INDEX) -> np.ndarray:
    """(C, C) counts, rows = target class, columns = predicted class; ignored pixels dropped."""
    keep = target != ignore_index
    t, p = target[keep].astype(np.int64), pred[keep].astype(np.int64)
    if t.size and (t.max() >= num_classes or t.min() < 0):
        raise SamoeError(f"target class id {int(t.max())} is outside 0..{num_classes - 1}: check the masks")
    return np.bincount(t * num_classes + p, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def interior_mask(target: torch.Tensor, margin: int) -> torch.Tensor:
    """(N, H, W) bool: pixels farther than `margin` px from every class border.

    The complement of `boundary_target`'s band with the margin as its radius (a Euclidean
    disk around each labelled pixel whose 4-neighbour holds another class; ignored pixels
    make no border), so the boundary head and this metric share one definition of "near a
    border".
    """
    return torch.from_numpy(np.stack([boundary_target(t, margin) == 0 for t in target.cpu().numpy()]))


def iou_per_class(cm: np.ndarray) -> np.ndarray:
    """TP / (TP + FP + FN) per class; NaN where the class is in neither target nor prediction."""
    tp = np.diag(cm).astype(np.float64)
    union = cm.sum(0) + cm.sum(1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, tp / union, np.nan)


def dice_per_class(cm: np.ndarray) -> np.ndarray:
    """2 TP / (2 TP + FP + FN) per class; NaN where the class is in neither."""
    tp = np.diag(cm).astype(np.float64)
    denom = cm.sum(0) + cm.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, 2 * tp / denom, np.nan)


def pixel_accuracy(cm: np.ndarray) -> float:
    total = cm.sum()
    return float(np.trace(cm) / total) if total else float("nan")


def f1_from_counts(tp: float, fp: float, fn: float) -> tuple[float, float, float]:
    """(precision, recall, F1); an empty prediction and target counts as perfect (1, 1, 1)."""
    if tp + fp + fn == 0:
        return 1.0, 1.0, 1.0
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * tp / (2 * tp + fp + fn)
    return precision, recall, f1


def _nanmean(values: np.ndarray) -> float:
    """Mean over the defined (non-NaN) entries; NaN when none is defined."""
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if finite.size else float("nan")


@dataclass
class ImageStats:
    """Everything per image that dataset metrics are summed from (so the bootstrap can resample images)."""

    cm: np.ndarray  # (N, C, C)
    boundary: np.ndarray  # (N, 3) tp, fp, fn
    sdf: np.ndarray  # (N, 2) sum |err|, count
    interior: np.ndarray | None = None  # (N, C, C): cm of the pixels away from class borders (interior_mask)

    def metrics(self, idx: np.ndarray | None = None) -> dict[str, float]:
        sel = slice(None) if idx is None else idx
        cm = self.cm[sel].sum(0)
        b = self.boundary[sel].sum(0)
        s = self.sdf[sel].sum(0)
        return {
            "miou": _nanmean(iou_per_class(cm)),
            "mean_dice": _nanmean(dice_per_class(cm)),
            "pixel_accuracy": pixel_accuracy(cm),
            "boundary_f1": f1_from_counts(*b)[2],
            "sdf_mae": float(s[0] / s[1]) if s[1] else float("nan"),
            "miou_interior": (_nanmean(iou_per_class(self.interior[sel].sum(0))) if self.interior is not None
                              else float("nan")),
        }


def _members(clusters: np.ndarray | None) -> list[np.ndarray] | None:
    """The image indices of each cluster (one label per image, e.g. the training seed that produced it)."""
    return None if clusters is None else [np.flatnonzero(clusters == c) for c in np.unique(clusters)]


def _resample_runs(rng: np.random.Generator, count: int, members: list[np.ndarray] | None) -> list[np.ndarray]:
    """One bootstrap resample of `count` images, as index arrays: one array of images drawn with replacement, or
    with `members` (`_members` of the clusters) a two-stage draw: clusters with replacement, then images with
    replacement inside each drawn cluster, one array per drawn cluster."""
    if members is None:
        return [rng.integers(0, count, count)]
    drawn = rng.integers(0, len(members), len(members))
    return [members[c][rng.integers(0, len(members[c]), len(members[c]))] for c in drawn]


def _run_mean(st: ImageStats, runs: list[np.ndarray]) -> dict[str, float]:
    """Each metric computed on every run's images on its own, then averaged over the runs."""
    per_run = [st.metrics(idx) for idx in runs]
    return {m: float(np.mean([r[m] for r in per_run])) for m in METRICS}


def bootstrap_diff(a: ImageStats, b: ImageStats, n: int = 1000, seed: int = 0,
                   clusters: np.ndarray | None = None, per_cluster: bool = False) -> dict[str, dict[str, float]]:
    """Paired bootstrap over images of metric(b) - metric(a): point estimate and 95% interval.

    `clusters` (one label per image) resamples clusters first, then images inside them: where the images come
    from a few training runs (seeds), the interval then carries the run-to-run spread too, which resampling
    pooled images alone treats as if every image were an independent run.

    `per_cluster` (with `clusters`) compares the mean over clusters of each cluster's own metric instead of the
    metric of the pooled images. mIoU pooled over seeds sums their confusion matrices, so two seeds that each
    learnt a different one of two look-alike classes score better together than either alone; the mean of the
    seeds' own mIoU is what a user who trains one model can expect."""
    if per_cluster and clusters is None:
        raise ValueError("per_cluster needs clusters (one label per image)")
    rng = np.random.default_rng(seed)
    count = a.cm.shape[0]

    def stat(st: ImageStats, runs: list[np.ndarray] | None) -> dict[str, float]:
        return _run_mean(st, runs) if per_cluster else st.metrics(None if runs is None else np.concatenate(runs))

    members = _members(clusters)
    whole = members if per_cluster else None
    base_a, base_b = stat(a, whole), stat(b, whole)
    samples = {m: [] for m in METRICS}
    for _ in range(n):
        runs = _resample_runs(rng, count, members)
        ma, mb = stat(a, runs), stat(b, runs)
        for m in METRICS:
            samples[m].append(mb[m] - ma[m])
    out = {}
    for m in METRICS:
        vals = np.asarray(samples[m], dtype=np.float64)
        vals = vals[np.isfinite(vals)]
        lo, hi = (np.percentile(vals, [2.5, 97.5]) if vals.size else (np.nan, np.nan))
        out[m] = {"diff": base_b[m] - base_a[m], "ci_low": float(lo), "ci_high": float(hi)}
    return out


def bootstrap_class_diff(a: ImageStats, b: ImageStats, names: list[str], n: int = 1000,
                         seed: int = 0) -> dict[str, dict[str, float | None]]:
    """Per-class IoU(b) - IoU(a) with a paired bootstrap 95% interval.

    Draws the same resamples as `bootstrap_diff` with the same seed, so the per-class
    intervals and the mIoU interval come from one set of resampled data sets.
    None where a class is absent (IoU undefined) in every resample.
    """
    rng = np.random.default_rng(seed)
    count = a.cm.shape[0]
    samples = np.empty((n, len(names)))
    for i in range(n):
        idx = np.concatenate(_resample_runs(rng, count, None))
        samples[i] = iou_per_class(b.cm[idx].sum(0)) - iou_per_class(a.cm[idx].sum(0))
    point = iou_per_class(b.cm.sum(0)) - iou_per_class(a.cm.sum(0))
    out: dict[str, dict[str, float | None]] = {}
    for c, name in enumerate(names):
        vals = samples[:, c][np.isfinite(samples[:, c])]
        lo, hi = np.percentile(vals, [2.5, 97.5]) if vals.size else (np.nan, np.nan)
        out[name] = {"diff": _num(point[c]), "ci_low": _num(lo), "ci_high": _num(hi)}
    return out


# --------------------------------------------------------------------------- running a model


@dataclass
class RoutingAccumulator:
    """Sums routing statistics of one MoE layer over an evaluation."""

    groups: tuple[int, ...]
    core_groups: int  # the leading groups of the source's own experts (MoEConfig.source_groups)
    num_classes: int
    expert_counts: np.ndarray = field(init=False)
    class_group: np.ndarray = field(init=False)
    entropy_sum: float = 0.0
    batches: int = 0
    weight_new: float = 0.0  # routing weight on experts of the new groups (summed apart: exactly 0 at growth)
    weight_total: float = 0.0

    def __post_init__(self) -> None:
        self.expert_counts = np.zeros(sum(self.groups), dtype=np.int64)
        self.class_group = np.zeros((self.num_classes, len(self.groups)), dtype=np.int64)

    def group_of(self) -> np.ndarray:
        return np.repeat(np.arange(len(self.groups)), self.groups)

    def report(self) -> dict[str, Any]:
        counts = self.expert_counts
        total = max(int(counts.sum()), 1)
        offsets = expert_offsets(self.groups)
        group_counts = np.array([counts[lo:hi].sum() for lo, hi in zip(offsets, offsets[1:])])
        core = int(group_counts[: self.core_groups].sum())
        mean = counts.mean()
        return {
            "assignments": int(counts.sum()),
            "group_share": (group_counts / total).round(6).tolist(),
            "expert_share": (counts / total).round(6).tolist(),
            "dead_experts": int((counts == 0).sum()),
            "dead_expert_ids": np.flatnonzero(counts == 0).tolist(),
            "load_cv": float(counts.std() / mean) if mean > 0 else float("nan"),
            "router_entropy": self.entropy_sum / max(self.batches, 1),
            "source_share": core / total,
            "new_share": 1 - core / total,
            "new_weight_share": self.weight_new / self.weight_total if self.weight_total > 0 else 0.0,
            "class_group_share": (self.class_group / np.maximum(self.class_group.sum(1, keepdims=True), 1)).round(6).tolist(),
        }


def _patch_classes(mask: torch.Tensor, grid: tuple[int, int], num_classes: int) -> torch.Tensor:
    """Majority class of each encoder patch (B, h*w); patches with only ignored pixels -> -1."""
    valid = mask != IGNORE_INDEX
    onehot = F.one_hot(mask.clamp(0, num_classes - 1), num_classes).permute(0, 3, 1, 2).float() * valid[:, None]
    votes = F.adaptive_avg_pool2d(onehot, grid)
    cls = votes.argmax(1)
    cls[votes.sum(1) == 0] = -1
    return cls.flatten(1)


class _ScoredScene:
    """One labelled scene being scored: its open mask and the sums its ImageStats entry is made of."""

    def __init__(self, data: LabelledFolder, index: int, tiling: Tiling, resize: bool) -> None:
        self.data, self.item, self.tiling = data, data.items[index], tiling
        self.image = open_raster(self.item.image)
        try:
            self.scene = file_scene(self.image, self.item.name, data.units, tiling, data.num_classes + 1, resize)
            self.mask = open_raster(self.item.mask, "mask")  # type: ignore[arg-type]
        except BaseException:
            self.image.close()
            raise
        self.scene.tag = self
        c = data.num_classes
        self.cm, self.interior = np.zeros((c, c), np.int64), np.zeros((c, c), np.int64)
        self.boundary, self.sdf = np.zeros(3), np.zeros(2)
        self._small: np.ndarray | None = None

    def mask_rows(self, y0: int, y1: int) -> np.ndarray:
        """Class ids (int64) of rows [y0, y1), 255 where unlabelled."""
        m = self.mask.read(y0, y1)[0].astype(np.int64)
        if self.data.ignore_index != IGNORE_INDEX:
            m[m == self.data.ignore_index] = IGNORE_INDEX
        return m

    def window_mask(self, w: Window) -> np.ndarray:
        """The (window, window) class ids under `w` as the model saw it (resized scenes: the mask resized nearest)."""
        size = self.tiling.window
        if self.scene.native is not None:
            if self._small is None:
                whole = torch.from_numpy(self.mask_rows(0, self.mask.height))[None, None].float()
                self._small = F.interpolate(whole, (size, size), mode="nearest-exact")[0, 0].long().numpy()
            m = self._small.copy()
        else:
            m = np.full((size, size), IGNORE_INDEX, np.int64)
            m[: w.rows, : w.cols] = self.mask_rows(w.y, w.y + w.rows)[:, w.x: w.x + w.cols]
        m[~w.valid] = IGNORE_INDEX
        return m

    def score(self, band: Band, margin: int) -> None:
        """Add a final band's pixels: confusion matrices (all, interior) and boundary counts."""
        c, h = self.data.num_classes, self.mask.height
        halo = max(margin, 2) + 1
        a, b = max(0, band.y0 - halo), min(h, band.y1 + halo)
        rows = self.mask_rows(a, b)
        inner = slice(band.y0 - a, band.y1 - a)
        mask = rows[inner].copy()
        mask[~band.valid] = IGNORE_INDEX
        labelled = mask != IGNORE_INDEX
        pred = band.values[:c].argmax(axis=0)
        tb = boundary_target(rows, 2)[inner].astype(bool) & labelled
        pb = (band.values[c] > 0.5) & labelled
        inside = boundary_target(rows, margin)[inner] == 0
        self.cm += confusion_matrix(pred, mask, c)
        self.interior += confusion_matrix(pred[inside], mask[inside], c)
        self.boundary += [int((pb & tb).sum()), int((pb & ~tb).sum()), int((~pb & tb).sum())]

    def close(self) -> None:
        self.mask.close()
        self.image.close()


@torch.no_grad()
def run_model(model: torch.nn.Module, data: LabelledFolder | torch.utils.data.Subset, batch_size: int,
              on_batch: Callable[[int], None] | None = None, precision: str = "fp32",
              tiling: Tiling | None = None, resize: bool = False,
              routing_stats: bool = True) -> tuple[ImageStats, dict[str, RoutingAccumulator]]:
    """Metrics and routing statistics of `model` on `data`'s scenes at their own resolution.

    Each scene is cut into the model's windows (`tiling`, default: 25% overlap), the windows' class
    and boundary probabilities blended (stages/predict.py) and scored against the whole mask, so a
    scene of any size is scored pixel for pixel at native resolution. With `resize` (a model trained
    on scenes squashed to its size) each scene is resized for the model and its outputs back. The SDF
    error is each window's, against the window's own target (as training sees it). Runs where the
    model lives (`precision` bf16: autocast forward); metrics are computed on the CPU in fp32.
    `on_batch(n)` after each batch of n windows. `data` may be a `Subset` of a folder (its scenes only); a
    folder that resizes its items (`size`) is scored as `resize`.
    """
    from upscale.device import autocast

    indices: list[int] | range = range(len(data))
    if isinstance(data, torch.utils.data.Subset):
        indices, data = list(data.indices), data.dataset
    resize = resize or data.size is not None
    cfg = model.config
    c = cfg.num_classes
    tiling = tiling or Tiling.of(cfg.img_size)
    grid = (cfg.img_size // cfg.patch_size,) * 2
    layers = dict(model.moe_layers()) if routing_stats else {}
    routing = {name: RoutingAccumulator(cfg.moe.groups, cfg.moe.source_groups, c) for name in layers}
    for layer in layers.values():
        layer.record = True
    margin = cfg.patch_size // 2
    model.eval()
    first = next(model.parameters())
    dtype, device = first.dtype, first.device

    def forward(x: torch.Tensor, windows: list[Window]) -> torch.Tensor:
        with autocast(device, precision):
            out = model(x.to(device, dtype))
        out = {k: v.float().cpu() for k, v in out.items() if k in ("seg", "boundary", "sdf")}
        masks = torch.from_numpy(np.stack([w.scene.tag.window_mask(w) for w in windows]))
        valid = (masks != IGNORE_INDEX)[:, None]
        err = ((torch.tanh(out["sdf"]) - torch.from_numpy(np.stack([sdf_target(m.numpy(), c) for m in masks]))).abs()
               * valid).sum((1, 2, 3))
        for w, e, n in zip(windows, err.tolist(), valid.sum((1, 2, 3)).tolist()):
            w.scene.tag.sdf += [e, n * c]
        _add_routing(routing, layers, masks, grid, c)
        if on_batch:
            on_batch(len(windows))
        return torch.cat([out["seg"].softmax(dim=1), torch.sigmoid(out["boundary"])], dim=1)

    opened: list[_ScoredScene] = []

    def scenes() -> Iterator[Scene]:
        for i in indices:
            opened.append(_ScoredScene(data, i, tiling, resize))
            yield opened[-1].scene

    cms, bounds, sdfs, interiors = [], [], [], []
    try:
        for band in resized_bands(sliding_windows(scenes(), tiling, batch_size, c + 1, forward, on_skipped=on_batch)):
            scored = band.scene.tag
            scored.score(band, margin)
            if band.last:
                cms.append(scored.cm)
                interiors.append(scored.interior)
                bounds.append(scored.boundary)
                sdfs.append(scored.sdf)
                scored.close()
    finally:
        for s in opened:
            s.close()
        for layer in layers.values():
            layer.record, layer.assignments = False, None
    return (ImageStats(np.stack(cms), np.asarray(bounds, dtype=np.float64), np.asarray(sdfs, dtype=np.float64),
                       np.stack(interiors)), routing)


def _add_routing(routing: dict[str, RoutingAccumulator], layers: dict[str, Any], masks: torch.Tensor,
                 grid: tuple[int, int], c: int) -> None:
    """Add the last forward's routing of every MoE layer; encoder tokens also by their patch's majority class."""
    if not layers:
        return
    classes = _patch_classes(masks, grid, c)
    for name, layer in layers.items():
        acc = routing[name]
        acc.expert_counts += layer.expert_counts.cpu().numpy()
        acc.entropy_sum += float(layer.entropy)
        acc.batches += 1
        token, expert, weight = (t.cpu() for t in layer.assignments)
        core = expert < sum(acc.groups[: acc.core_groups])
        acc.weight_new += float(weight[~core].abs().sum())
        acc.weight_total += float(weight.abs().sum())
        if name.startswith("image_encoder."):
            cls = classes.flatten()[token]
            keep = cls >= 0
            group = torch.from_numpy(acc.group_of())[expert[keep]]
            np.add.at(acc.class_group, (cls[keep].numpy(), group.numpy()), 1)


@dataclass(frozen=True)
class EvalData:
    """What the checkpoints and the data folder say about the data, agreed: units, classes, resolution."""

    units: Units
    classes: ClassList
    resize: bool
    named: bool  # classes come from a classes.json or a checkpoint, not made up


def agree_on_data(ckpts: list[Checkpoint], data_dir: Path, unit_options: UnitOptions | None = None) -> EvalData:
    """Refuse checkpoints whose classes, class counts, sizes or resolutions differ, or data naming other classes."""
    base = ckpts[0]
    specs = [recorded(ck.meta, str(ck.path / "samoe.json")) for ck in ckpts]
    lists = [class_list(s, ck.config.num_classes) for s, ck in zip(specs, ckpts)]
    for ck, spec, classes in zip(ckpts[1:], specs[1:], lists[1:]):
        if (ck.config.num_classes, ck.config.img_size) != (base.config.num_classes, base.config.img_size):
            raise SamoeError(f"{ck.path} predicts {ck.config.num_classes} classes at {ck.config.img_size}px but {base.path} "
                             f"{base.config.num_classes} at {base.config.img_size}px: compare checkpoints of the same task")
        check_same(lists[0], classes, str(base.path), str(ck.path), "compare checkpoints trained on the same classes")
        if bool(spec and spec.resize) != bool(specs[0] and specs[0].resize):
            raise SamoeError(f"{base.path} and {ck.path} were trained at different resolutions (one on scenes resized "
                             "with --resize, one on windows): compare checkpoints trained the same way")
    known = next((c for c in lists if c is not None), None)
    folder = read_classes(data_dir)
    check_same(known, folder, "the checkpoint", f"the data's {CLASSES_JSON}", "evaluate on data labelled with the "
               "checkpoint's classes, or fix the data's classes.json")
    if folder is not None and len(folder.names) != base.config.num_classes:
        raise SamoeError(f"the data's {CLASSES_JSON} names {len(folder.names)} classes but the checkpoint predicts "
                         f"{base.config.num_classes}: evaluate on data of the checkpoint's task")
    classes = folder or known or ClassList.generic(base.config.num_classes)
    recorded_units = next((s.units for s in specs if s is not None), None)
    units = resolve_units(data_dir, unit_options or UnitOptions(), recorded_units)
    return EvalData(units, classes, bool(specs[0] and specs[0].resize), folder is not None or known is not None)


def class_names(num_classes: int) -> list[str]:
    """Names of classes nobody named (no classes.json, no checkpoint record)."""
    return list(ClassList.generic(num_classes).names)


def evaluate(paths: list[Path], data_dir: Path, batch_size: int = 4, bootstrap: int = 1000, seed: int = 0,
             device: torch.device | str = "cpu", precision: str = "fp32", on_start: Callable[[int], None] | None = None,
             on_batch: Callable[[int], None] | None = None, ablate_new: bool = True,
             overlap: float | None = None, stride: int | None = None,
             unit_options: UnitOptions | None = None, compile: bool = False) -> dict[str, Any]:
    """Evaluate checkpoints on one labelled folder; the first is the baseline of the comparisons.

    Scenes are scored whole at their own resolution by sliding windows (`run_model`); `on_start(n)`
    gets the number of windows all runs will forward and `on_batch(n)` each batch's. With `compile`, each
    model's blocks are compiled (upscale/compile.py): the same metrics within float rounding.
    With `ablate_new`, each grown checkpoint is scored a second time with its new groups and extra blocks
    switched off (`upscale.ablate`), and its entry gets `new_parts_off`: those metrics and the paired
    difference, grown minus switched off, which is what the new capacity contributes.
    """
    from upscale.ablate import new_parts, switch_off_new_parts_
    from upscale.compile import compile_model
    from upscale.flops import forward_flops

    ckpts = [Checkpoint.open(p) for p in paths]
    base = ckpts[0].config
    agreed = agree_on_data(ckpts, data_dir, unit_options)
    data = LabelledFolder(data_dir, base.num_classes, ignore_index=agreed.classes.ignore_index, units=agreed.units)
    tiling = Tiling.of(base.img_size, overlap, stride)
    sizes = [data.scene_size(i) for i in range(len(data))]
    windows = sum(1 if agreed.resize else tiling.count(h, w) for h, w in sizes)
    runs = sum(1 + bool(ablate_new and new_parts(ck.config)) for ck in ckpts)
    if on_start:
        on_start(windows * runs)
    names = list(agreed.classes.names)
    results, stats = [], []
    for ck in ckpts:
        model = load_model(ck, device=device)  # the files opened above: the digest reported is of these weights
        if compile:
            compile_model(model)
        st, routing = run_model(model, data, batch_size, on_batch, precision, tiling, agreed.resize)
        cm = st.cm.sum(0)
        b = st.boundary.sum(0)
        b_precision, recall, f1 = f1_from_counts(*b)
        metrics = st.metrics()
        metrics.update(
            iou={n: _num(v) for n, v in zip(names, iou_per_class(cm))},
            dice={n: _num(v) for n, v in zip(names, dice_per_class(cm))},
            boundary_precision=b_precision, boundary_recall=recall,
        )
        results.append({
            "path": str(ck.path), "digest": ck.digest,
            "total_params": sum(info.numel for info in ck.tensors.values()),
            "forward_flops": forward_flops(ck.config),
            "stages": [s.get("stage") for s in ck.stages],
            "metrics": metrics,
            "routing": {name: acc.report() for name, acc in routing.items()},
            "groups": list(ck.config.moe.groups), "core_groups": ck.config.moe.core_groups,
            "replicas": ck.config.moe.replicas,
        })
        parts = new_parts(ck.config) if ablate_new else None
        if parts:
            switch_off_new_parts_(model)
            off, _ = run_model(model, data, batch_size, on_batch, precision, tiling, agreed.resize)
            results[-1]["new_parts_off"] = {"parts": parts, "metrics": off.metrics(),
                                            "diff": bootstrap_diff(off, st, bootstrap, seed)}
        if "growth" in ck.meta:
            from .regime import source_regime

            results[-1]["regime"] = source_regime(ck, data_dir).to_dict()
        stats.append(st)
        del model
    comparisons = [
        {"baseline": results[0]["path"], "other": results[i]["path"], "diff": bootstrap_diff(stats[0], stats[i], bootstrap, seed),
         "class_diff": bootstrap_class_diff(stats[0], stats[i], names, bootstrap, seed)}
        for i in range(1, len(results))
    ]
    resolution = {"mode": "resized" if agreed.resize else "native", "window": tiling.window, "stride": tiling.stride,
                  "windows": windows, "smallest": list(min(sizes, key=lambda s: s[0] * s[1])),
                  "largest": list(max(sizes, key=lambda s: s[0] * s[1])), "units": agreed.units.describe()}
    return {"data": str(data_dir), "images": len(data), "classes": names, "class_colors": list(agreed.classes.colors),
            "ignore_index": agreed.classes.ignore_index, "resolution": resolution, "bootstrap": bootstrap, "seed": seed,
            "checkpoints": results, "comparisons": comparisons}


def resolution_text(report: dict[str, Any]) -> str:
    """How the scenes were scored, in words (the eval table's title and the report's data line)."""
    r = report.get("resolution")
    if not r:
        return "resolution not recorded"
    lo, hi = r["smallest"], r["largest"]
    sizes = f"{lo[0]}x{lo[1]} px" if lo == hi else f"{lo[0]}x{lo[1]} to {hi[0]}x{hi[1]} px"
    if r["mode"] == "resized":
        return f"scenes ({sizes}) resized to {r['window']} px for the model, scored at native resolution"
    return (f"scored at native resolution ({sizes}) by {r['windows']} sliding windows of {r['window']} px, "
            f"stride {r['stride']}; input {r['units']}")


def _num(v: float) -> float | None:
    return None if np.isnan(v) else float(v)


# --------------------------------------------------------------------------- names


def short_layer(name: str) -> str:
    return name.replace("image_encoder.blocks.", "enc").replace("mask_decoder.transformer.layers.", "dec").removesuffix(".mlp")
