"""Figures of `samoe eval --plots`: routing and per-class metrics, drawn with matplotlib.

Why these choices: the figures are read by people deciding whether growth worked,
often pasted into papers, so every figure has one colour scale (matrices are never
rescaled per row, so rows compare), a colour bar, labelled axes, group boundaries
drawn, values written in cells while the matrix is small enough to read them, and
a title short enough to fit. Figures are built as plain `Figure` objects on the Agg
canvas (no pyplot global state), so tests can inspect texts before anything is
saved. An output folder gets samoe's manifest first (upscale.ownership), each
figure is recorded before it is written, and files are written atomically
(temporary name, then rename) relative to the folder's descriptor: an interrupted
command leaves a folder the same command with --force replaces.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import Normalize
from matplotlib.figure import Figure

from upscale.config import expert_offsets
from upscale.dirfd import Dir
from upscale.errors import SamoeError
from upscale.ownership import Owned, check_owned, check_plain_path, check_separate, exclusive, open_output

FORMATS = ("png", "svg", "pdf")
DPI = 200
CMAP = "viridis"
MAX_ANNOTATED_CELLS = 24 * 12  # values are written in cells up to this many cells per panel
MAX_TITLE = 60


@dataclass(frozen=True)
class Written:
    """One figure written to disk: what it shows (a caption for reports) and where."""

    key: str
    caption: str
    path: Path


# --------------------------------------------------------------------------- output handling


def check_format(fmt: str) -> str:
    if fmt not in FORMATS:
        raise SamoeError(f"--format {fmt!r} is not supported: use one of {', '.join(FORMATS)}")
    return fmt


def check_output_dir(path: Path, force: bool, option: str, inputs: Mapping[str, Path | str | None] | None = None) -> None:
    """Refuse an output folder samoe may not write into; checked before any work, so a refusal leaves nothing.

    A new or empty folder is fine. A non-empty one needs --force, and even then only
    a folder whose manifest (`upscale.ownership`) records everything in it, never
    a user's folder, a file, a symlink, or a folder overlapping the command's inputs.
    """
    check_plain_path(path, option)
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        raise SamoeError(f"{path} exists and is not a directory: choose another {option}")
    check_separate(path, option, inputs or {})
    if path.is_dir() and any(path.iterdir()):
        if not force:
            raise SamoeError(f"{path} already exists and is not empty: choose a new {option} or pass --force to overwrite its figures")
        with Dir.open(path, f"choose another {option}", follow=False) as d:
            check_owned(d, option)


@contextmanager
def output_dirs(dirs: list[tuple[Path, str]], command: str, force: bool = False) -> Iterator[dict[Path, Owned]]:
    """Hold the one-job lock of each output folder and open it for writing: a new folder gets its manifest
    first; with `force`, a folder samoe wrote is written into (upscale.ownership.open_output). Yields each
    folder's writer by resolved path."""
    unique = {d.resolve(): (d, option) for d, option in dirs}
    with ExitStack() as stack:
        for d, option in unique.values():
            stack.enter_context(exclusive(d, option))
        outs = {}
        for key, (d, option) in unique.items():
            outs[key] = open_output(d, command, option, force=force)
            stack.callback(outs[key].dir.close)
        yield outs


def new_figure(width: float, height: float) -> Figure:
    """A figure on the Agg canvas with constrained layout (titles and colour bars never overlap)."""
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Figure, out: Owned, name: str, fmt: str = "png") -> Path:
    """Write `fig` at 200 dpi into output folder `out` as `name` (which may lie in one of its folders, e.g.
    `previews/a.png`): recorded first, then written atomically (a crash never leaves half a file under the
    final name)."""
    out.record(name)
    folder, _, base = name.rpartition("/")
    d = out.dir.sub(folder) if folder else out.dir
    try:
        with d.atomic(base, out.token) as f:
            fig.savefig(f, format=fmt, dpi=DPI, facecolor="white")
    finally:
        if folder:
            d.close()
    return out.dir.path / name


def shorten(text: str, limit: int = MAX_TITLE) -> str:
    """Cut the middle out of long texts (paths), keeping both ends readable."""
    if len(text) <= limit:
        return text
    keep = limit - 1
    return text[: keep // 2] + "…" + text[len(text) - (keep - keep // 2):]


def checkpoint_label(report: dict[str, Any], k: int) -> str:
    """`[k] parent/name`: run checkpoints are all called `final`, their folder tells them apart."""
    p = Path(report["checkpoints"][k]["path"])
    return shorten(f"[{k}] {p.parent.name}/{p.name}" if p.parent.name else f"[{k}] {p.name}", 36)


def layer_label(name: str) -> str:
    """`enc 2` for image_encoder.blocks.2.mlp, `dec 0` for mask_decoder.transformer.layers.0.mlp."""
    if name.startswith("image_encoder.blocks."):
        return "enc " + name.removeprefix("image_encoder.blocks.").removesuffix(".mlp")
    if name.startswith("mask_decoder.transformer.layers."):
        return "dec " + name.removeprefix("mask_decoder.transformer.layers.").removesuffix(".mlp")
    return shorten(name, 24)


def layer_order(name: str) -> tuple[int, int, str]:
    """Encoder blocks first, then decoder layers, each by index (the grown model adds blocks at the encoder's end)."""
    parts = name.split(".")
    index = next((int(p) for p in parts if p.isdigit()), 0)
    return (0 if name.startswith("image_encoder.") else 1, index, name)


def group_labels(ck: dict[str, Any]) -> list[str]:
    """Each group's tick label: the source's core groups and the new ones, or with replicas (`expand --replicate`)
    group 0, which holds the source's own experts, and its copies. Reports written before `replicas` have none."""
    groups = range(len(ck["groups"]))
    if ck.get("replicas"):
        return [f"g{g} source" if g == 0 else f"g{g} copy" for g in groups]
    return [f"g{g} core" if g < ck["core_groups"] else f"g{g} new" for g in groups]


def _annotate(ax: Any, m: np.ndarray, norm: Normalize, fmt: str, size: float) -> None:
    """Write each value in its cell, white on dark cells and black on light ones."""
    cmap = ax.images[0].get_cmap()
    for (r, c), v in np.ndenumerate(m):
        if not np.isfinite(v):
            continue
        rgb = cmap(norm(v))[:3]
        light = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2] > 0.5
        ax.text(c, r, format(v, fmt), ha="center", va="center", fontsize=size, color="black" if light else "white")


# --------------------------------------------------------------------------- routing figures


def expert_usage_figure(report: dict[str, Any], k: int) -> Figure | None:
    """Layers x experts heatmap of each expert's share of its layer's assignments, groups delimited."""
    ck = report["checkpoints"][k]
    layers = list(ck["routing"])
    if not layers:
        return None
    usage = np.array([ck["routing"][n]["expert_share"] for n in layers], dtype=np.float64) * 100
    n_layers, n_experts = usage.shape
    groups = list(ck["groups"])
    width = float(np.clip(2.8 + 0.42 * n_experts, 6.0, 16.0))
    height = float(np.clip(1.9 + 0.36 * n_layers, 3.2, 12.0))
    fig = new_figure(width, height)
    ax = fig.add_subplot()
    norm = Normalize(0.0, max(float(usage.max()), 1e-9))
    im = ax.imshow(usage, cmap=CMAP, norm=norm, aspect="auto", interpolation="nearest")
    starts = np.array(expert_offsets(groups))
    for b in starts[1:-1]:
        ax.axvline(b - 0.5, color="white", linewidth=2.5)
        ax.axvline(b - 0.5, color="black", linewidth=0.8)
    ax.set_yticks(range(n_layers), [layer_label(n) for n in layers])
    step = 1 if n_experts <= 32 else int(np.ceil(n_experts / 32))
    ax.set_xticks(range(0, n_experts, step))
    ax.tick_params(axis="x", labelsize=8 if n_experts > 16 else 9)
    ax.set_xlabel("expert id")
    ax.set_ylabel("MoE layer")
    top = ax.secondary_xaxis("top")
    top.set_xticks((starts[:-1] + starts[1:] - 1) / 2, group_labels(ck))
    top.tick_params(length=0, labelsize=9)
    if usage.size <= MAX_ANNOTATED_CELLS and n_experts <= 24:
        _annotate(ax, usage, norm, ".0f" if usage.max() >= 10 else ".1f", 7)
    fig.colorbar(im, ax=ax, label="% of the layer's assignments", shrink=0.9)
    ax.set_title(f"Expert usage per MoE layer: {checkpoint_label(report, k)}", fontsize=11)
    return fig


def class_group_figure(report: dict[str, Any], k: int) -> Figure | None:
    """One panel per MoE layer that sees classes: each class's share of routing into each group (rows sum to 1)."""
    ck = report["checkpoints"][k]
    layers = [n for n, v in ck["routing"].items() if np.asarray(v["class_group_share"]).sum() > 0]
    if not layers:
        return None
    classes = list(report["classes"])
    groups = list(ck["groups"])
    cols = min(len(layers), 4)
    rows = int(np.ceil(len(layers) / cols))
    panel_w = 0.6 + 0.55 * len(groups)
    label_w = 0.09 * max(len(c) for c in classes) + 0.6
    fig = new_figure(label_w + cols * panel_w + 1.3, 1.2 + rows * (0.9 + 0.42 * len(classes)))
    axes = fig.subplots(rows, cols, squeeze=False, sharey=True)
    norm = Normalize(0.0, 1.0)
    im = None
    annotate = len(groups) * len(classes) <= MAX_ANNOTATED_CELLS and len(groups) <= 12
    for i, ax in enumerate(axes.flat):
        if i >= len(layers):
            ax.set_visible(False)
            continue
        m = np.asarray(ck["routing"][layers[i]]["class_group_share"], dtype=np.float64)
        im = ax.imshow(m, cmap=CMAP, norm=norm, aspect="auto", interpolation="nearest")
        ax.set_title(layer_label(layers[i]), fontsize=10)
        ax.set_xticks(range(len(groups)), group_labels(ck), rotation=45 if len(groups) > 3 else 0,
                      ha="right" if len(groups) > 3 else "center", fontsize=8)
        ax.set_yticks(range(len(classes)), classes)
        for g in range(1, len(groups)):
            ax.axvline(g - 0.5, color="white", linewidth=0.8)
        if annotate:
            _annotate(ax, m, norm, ".2f", 7)
        if i % cols == 0:
            ax.set_ylabel("class (majority of the patch)")
        if i // cols == rows - 1 or i + cols >= len(layers):
            ax.set_xlabel("expert group")
    fig.colorbar(im, ax=axes, label="share of the class's assignments", shrink=0.9)
    fig.suptitle(f"Class -> group routing: {checkpoint_label(report, k)}", fontsize=11)
    return fig


def _grouped_bars(ax: Any, values: np.ndarray, labels: list[str], annotate: bool, fmt: str) -> None:
    """values (series, categories) drawn as side-by-side bars; NaN = no bar."""
    n_series, n_cat = values.shape
    width = 0.8 / n_series
    for s in range(n_series):
        x = np.arange(n_cat) - 0.4 + width * (s + 0.5)
        v = values[s]
        bars = ax.bar(x[np.isfinite(v)], v[np.isfinite(v)], width, label=labels[s], color=f"C{s}")
        if annotate:
            ax.bar_label(bars, [format(b, fmt) for b in v[np.isfinite(v)]], fontsize=7, padding=1)


def new_share_figure(report: dict[str, Any]) -> Figure | None:
    """New-group share per layer, one bar per checkpoint: by routing weight and by tokens, one y scale."""
    cks = report["checkpoints"]
    layers = sorted({n for ck in cks for n in ck["routing"]}, key=layer_order)
    if not layers:
        return None
    weight = np.array([[ck["routing"][n]["new_weight_share"] if n in ck["routing"] else np.nan for n in layers] for ck in cks])
    tokens = np.array([[ck["routing"][n]["new_share"] if n in ck["routing"] else np.nan for n in layers] for ck in cks])
    annotate = len(layers) * len(cks) <= 24
    fig = new_figure(float(np.clip(3.0 + 0.5 * len(layers) * max(len(cks), 2) * 0.6, 7.0, 16.0)), 6.0)
    axes = fig.subplots(2, 1, sharex=True, sharey=True)
    labels = [checkpoint_label(report, k) for k in range(len(cks))]
    for ax, values, what in ((axes[0], weight, "routing weight"), (axes[1], tokens, "tokens (assignments)")):
        _grouped_bars(ax, values, labels, annotate, ".2f")
        ax.set_ylabel("new-group share")
        ax.set_title(f"by {what}", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    top = np.nanmax(np.concatenate([weight.ravel(), tokens.ravel()]))
    axes[0].set_ylim(0, max(float(top) * 1.18, 0.05))
    axes[1].set_xticks(range(len(layers)), [layer_label(n) for n in layers])
    axes[1].set_xlabel("MoE layer")
    axes[0].legend(fontsize=8, loc="upper left", ncols=min(len(cks), 3))
    fig.suptitle("Traffic to new expert groups per layer", fontsize=11)
    return fig


def class_metric_figure(report: dict[str, Any]) -> Figure | None:
    """Per-class IoU of every checkpoint, and each comparison's per-class IoU difference with its 95% bootstrap CI."""
    cks = report["checkpoints"]
    classes = list(report["classes"])
    if not cks or not classes:
        return None
    cats = classes + ["mean (mIoU)"]
    iou = np.array([[_nan(ck["metrics"]["iou"].get(c)) for c in classes] + [ck["metrics"]["miou"]] for ck in cks])
    comps = [c for c in report.get("comparisons", []) if "class_diff" in c]
    panels = 2 if comps else 1
    fig = new_figure(float(np.clip(2.5 + 0.55 * len(cats) * max(len(cks), 2) * 0.7, 7.0, 16.0)), 3.4 * panels)
    axes = np.atleast_1d(fig.subplots(panels, 1, sharex=True))
    labels = [checkpoint_label(report, k) for k in range(len(cks))]
    _grouped_bars(axes[0], iou, labels, len(cats) * len(cks) <= 30, ".2f")
    axes[0].set_ylim(0, 1.12)
    axes[0].set_ylabel("IoU")
    axes[0].set_title("IoU per class", fontsize=10)
    axes[0].legend(fontsize=8, loc="upper left", ncols=min(len(cks), 3))
    axes[0].grid(axis="y", alpha=0.3)
    if comps:
        ax = axes[1]
        width = 0.8 / len(comps)
        for s, comp in enumerate(comps):
            k = next(i for i, ck in enumerate(cks) if ck["path"] == comp["other"])
            rows = [comp["class_diff"].get(c) for c in classes] + [comp["diff"]["miou"]]
            d = np.array([_nan(r and r["diff"]) for r in rows])
            lo = np.array([_nan(r and r["ci_low"]) for r in rows])
            hi = np.array([_nan(r and r["ci_high"]) for r in rows])
            x = np.arange(len(cats)) - 0.4 + width * (s + 0.5)
            ok = np.isfinite(d)
            yerr = np.vstack([np.nan_to_num(d - lo), np.nan_to_num(hi - d)])[:, ok]
            ax.bar(x[ok], d[ok], width, yerr=yerr, capsize=3, color=f"C{k}", label=f"{labels[k]} - [0]",
                   error_kw={"elinewidth": 1, "ecolor": "black"})
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_ylabel("IoU difference")
        ax.set_title("difference to [0] with 95% paired bootstrap interval", fontsize=10)
        ax.legend(fontsize=8, loc="best")
        ax.grid(axis="y", alpha=0.3)
    axes[-1].set_xticks(range(len(cats)), cats)
    axes[-1].set_xlabel("class")
    fig.suptitle("Per-class segmentation quality", fontsize=11)
    return fig


def _nan(v: Any) -> float:
    return float("nan") if v is None else float(v)


# --------------------------------------------------------------------------- all eval figures


def eval_figures(report: dict[str, Any]) -> list[tuple[str, str, Figure]]:
    """(file stem, caption, figure) for every figure an eval report supports."""
    out: list[tuple[str, str, Figure | None]] = [("class-metrics", "Per-class IoU and differences with 95% CIs",
                                                  class_metric_figure(report))]
    out.append(("new-group-share", "New-group share of routing weight and tokens per layer", new_share_figure(report)))
    for k in range(len(report["checkpoints"])):
        label = checkpoint_label(report, k)
        out.append((f"expert-usage-ckpt{k}", f"Expert usage per layer, {label}", expert_usage_figure(report, k)))
        out.append((f"class-groups-ckpt{k}", f"Class -> group routing share, {label}", class_group_figure(report, k)))
    return [(stem, caption, fig) for stem, caption, fig in out if fig is not None]


def write_eval_figures(report: dict[str, Any], out: Owned, fmt: str = "png") -> list[Written]:
    """Render and save every eval figure into output folder `out` (opened by `output_dirs`)."""
    check_format(fmt)
    written = []
    for stem, caption, fig in eval_figures(report):
        written.append(Written(stem, caption, save_figure(fig, out, f"{stem}.{fmt}", fmt)))
    return written
