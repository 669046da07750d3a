"""`samoe plot`: training curves of one or more runs from `metrics.csv` and `selector_log.csv`.

Runs are drawn one after another in the order given (s1 s2 s3 -> one step axis,
each run's steps shifted by the steps before it) with the boundaries marked, so a
reader sees whether one stage settled before the next began. Per-layer routing
columns (`new_share:<layer>`, `group_scale:<layer>:<group>`) are drawn when the
runs have them: one line per layer, group scales averaged over a layer's routed
groups. A run directory is untrusted input: its files are opened relative to it,
never through a link or a FIFO (upscale.dirfd); a missing or malformed file, a
missing column or a value out of range is one `SamoeError` naming the file, the
line and the fix. Cost is linear in the rows, and at most `MAX_LINES` lines are
drawn per panel, however many columns a log has.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize

from upscale.dirfd import Dir
from upscale.errors import SamoeError

from .figures import Written, check_format, layer_label, layer_order, new_figure, output_dirs, save_figure, shorten

LOSSES = ("loss", "loss_sup", "loss_unsup")
TASKS = ("seg", "sdf", "boundary", "aux")
TASK_NAMES = {"seg": "segmentation", "sdf": "signed distance", "boundary": "boundary", "aux": "router balance (aux)"}
MAX_BYTES = 512 * 1024 * 1024  # a metrics.csv larger than this is not one samoe wrote
MAX_COLUMNS = 4096  # a 10B run logs a few hundred (routing per layer and group)
MAX_VALUE = 1e30  # larger magnitudes are not losses, rates or shares samoe logs (and overflow log axes)
MAX_STEP = 2**53  # steps are integers a float holds exactly
MAX_LINES = 48  # lines drawn per panel; further columns are named in the title, not drawn
MAX_MARKERS = 200  # points drawn with markers; longer series are plain lines
REQUIRED = ("step",)  # the x axis (`epoch` is needed only to place selector_log.csv rows)


@dataclass
class RunLog:
    """One run's logs: metric columns by step, selector columns by the step their epoch ended."""

    name: str
    stage: int | None
    columns: dict[str, np.ndarray]  # always has "step"
    selector: dict[str, np.ndarray] = field(default_factory=dict)  # has "step" when not empty

    @property
    def steps(self) -> np.ndarray:
        return self.columns["step"]

    def label(self) -> str:
        return f"{self.name} (stage {self.stage})" if self.stage is not None else self.name


def _read_csv(d: Dir, name: str) -> dict[str, np.ndarray]:
    """Columns of a numeric CSV of run folder `d` as float arrays (empty cells and `nan` -> NaN), checked."""
    path = d.path / name
    if d.kind(name) != "file":
        what = "missing" if d.kind(name) is None else "not a regular file (a link, FIFO or folder)"
        raise SamoeError(f"{path} is {what}: pass a run directory written by `samoe train`")
    try:
        with io.TextIOWrapper(d.open_read(name, MAX_BYTES), newline="", encoding="utf-8") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if not header:
                raise SamoeError(f"{path} is empty: the run has not logged a step yet")
            if len(header) > MAX_COLUMNS or len(set(header)) != len(header):
                what = f"{len(header)} columns" if len(header) > MAX_COLUMNS else "a column name twice"
                raise SamoeError(f"{path} has {what}: not a samoe log")
            rows = []
            for line, row in enumerate(reader, start=2):
                if len(row) != len(header):
                    raise SamoeError(f"{path} line {line} has {len(row)} fields, the header {len(header)}: the file is damaged")
                try:
                    rows.append([float(v) if v.strip() else math.nan for v in row])
                except ValueError:
                    raise SamoeError(f"{path} line {line} holds a value that is not a number: the file is damaged") from None
    except UnicodeDecodeError:
        raise SamoeError(f"{path} is not UTF-8 text: not a samoe log") from None
    except csv.Error as e:  # NUL bytes, a field over csv's size limit
        raise SamoeError(f"{path} is not a CSV samoe wrote ({str(e)[:60]}): the file is damaged") from None
    data = np.asarray(rows, dtype=np.float64).reshape(len(rows), len(header))
    with np.errstate(invalid="ignore"):
        bad = np.argwhere(np.abs(data) > MAX_VALUE)  # +-inf too; NaN (a missing value) passes
    if len(bad):
        r, c = bad[0]
        raise SamoeError(f"{path} line {r + 2} holds {header[c]}={data[r, c]:g}, outside the range samoe logs "
                         f"(|x| <= {MAX_VALUE:g}): the file is damaged")
    return {name: data[:, i] for i, name in enumerate(header)}


def _check_steps(path: Path, columns: dict[str, np.ndarray]) -> None:
    missing = next((c for c in REQUIRED if c not in columns), None)
    if missing is not None:
        raise SamoeError(f"{path} has no {missing!r} column: not a samoe metrics log")
    steps = columns["step"]
    if not len(steps):
        raise SamoeError(f"{path} has no rows: the run has not logged a step yet")
    if not np.isfinite(steps).all():
        raise SamoeError(f"{path} has a row without a step number: the file is damaged")
    if (steps < 0).any() or (steps >= MAX_STEP).any() or (steps != np.floor(steps)).any():
        raise SamoeError(f"{path} has a step that is not a whole number in [0, 2**53): the file is damaged")


def _selector_steps(columns: dict[str, np.ndarray], selector_epochs: np.ndarray) -> np.ndarray:
    """The step each selector row belongs to: the last step of loader epoch e-1 (a row for epoch e is written
    when that epoch ends), NaN when no such step was logged. One sort and a binary search: linear-log time."""
    steps, epochs = columns["step"], columns["epoch"]
    order = np.argsort(epochs, kind="stable")  # NaN epochs sort last and are never "<= e - 1"
    cummax = np.maximum.accumulate(steps[order])
    idx = np.searchsorted(epochs[order], selector_epochs - 1, side="right") - 1
    with np.errstate(invalid="ignore"):
        ok = np.isfinite(selector_epochs) & (idx >= 0)
    return np.where(ok, cummax[np.clip(idx, 0, len(cummax) - 1)], np.nan)


def load_run(run_dir: Path) -> RunLog:
    """Read a run directory's `metrics.csv` (required) and `selector_log.csv` (optional)."""
    if not run_dir.is_dir():
        raise SamoeError(f"{run_dir} is not a directory: pass run directories written by `samoe train --run-dir`")
    with Dir.open(run_dir, "pass a run directory written by `samoe train`") as d:
        columns = _read_csv(d, "metrics.csv")
        _check_steps(run_dir / "metrics.csv", columns)
        selector: dict[str, np.ndarray] = {}
        if d.kind("selector_log.csv") is not None:
            selector = _read_csv(d, "selector_log.csv")
            if "epoch" in selector and "epoch" in columns and len(selector["epoch"]):
                selector["step"] = _selector_steps(columns, selector["epoch"])
            else:
                selector = {}
        stage = _stage(d)
    return RunLog(run_dir.name or str(run_dir), stage, columns, selector)


def _stage(d: Dir) -> int | None:
    """The run's stage from its run.json; None when it is missing or unreadable (the plot only labels with it)."""
    try:
        stage = d.read_json("run.json", 1024**2)["identity"]["stage"]
        return stage if type(stage) is int else None
    except (SamoeError, OSError, KeyError, TypeError):
        return None


@dataclass
class Timeline:
    """Runs laid end to end: each run's step offset and the boundaries between them."""

    runs: list[RunLog]
    offsets: list[float]

    @classmethod
    def of(cls, runs: list[RunLog]) -> "Timeline":
        offsets, total = [], 0.0
        for run in runs:
            offsets.append(total)
            total += float(np.nanmax(run.steps))
        return cls(runs, offsets)

    def series(self, column: str, table: str = "columns") -> tuple[np.ndarray, np.ndarray]:
        """A column over the concatenated step axis; NaN-separated between runs so lines do not join across stages."""
        return self.derived(lambda cols: cols.get(column), table)

    def derived(self, value: Any, table: str = "columns") -> tuple[np.ndarray, np.ndarray]:
        """`value(columns)` (an array per row, or None where a run lacks it) over the concatenated step axis."""
        xs, ys = [], []
        for run, off in zip(self.runs, self.offsets):
            cols = getattr(run, table)
            y = value(cols) if "step" in cols else None
            if y is not None:
                xs += [cols["step"] + off, [np.nan]]
                ys += [y, [np.nan]]
        if not xs:
            return np.array([]), np.array([])
        return np.concatenate(xs), np.concatenate(ys)

    def has(self, column: str, table: str = "columns") -> bool:
        x, y = self.series(column, table)
        return bool(np.isfinite(y).any())

    def columns(self, prefix: str) -> list[str]:
        seen: dict[str, None] = {}
        for run in self.runs:
            seen.update((c, None) for c in run.columns if c.startswith(prefix))
        return list(seen)

    def mark(self, axes: list[Any]) -> None:
        """Dashed lines at each run's start (after the first), the run's name over the top panel."""
        if len(self.runs) < 2:
            return
        for ax in axes:
            for off in self.offsets[1:]:
                ax.axvline(off, color="0.35", linestyle="--", linewidth=1)
        # each run's name over its stretch of the step axis, above the top panel (never over the curves)
        ends = self.offsets[1:] + [self.offsets[-1] + float(np.nanmax(self.runs[-1].steps))]
        top = axes[0].secondary_xaxis("top")
        top.set_xticks([(a + b) / 2 for a, b in zip(self.offsets, ends)], [shorten(r.label(), 24) for r in self.runs])
        top.tick_params(length=0, labelsize=8, labelcolor="0.25")


def _panel(ax: Any, tl: Timeline, columns: list[tuple[str, str]], ylabel: str, title: str, table: str = "columns",
           log: bool = False) -> bool:
    """Lines of the given (column, legend label) pairs; a log axis when `log` and the values span decades."""
    drawn = False
    for i, (col, label) in enumerate(columns[:MAX_LINES]):
        x, y = tl.series(col, table)
        if np.isfinite(y).any():
            marker = "o" if table == "selector" and len(x) <= MAX_MARKERS else None
            ax.plot(x, y, label=shorten(label, 40), color=f"C{i % 10}", linewidth=1.2, marker=marker, markersize=3)
            drawn = True
    if len(columns) > MAX_LINES:
        title += f" (first {MAX_LINES} of {len(columns)})"
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    if drawn:
        _legend(ax)
        y = np.concatenate([tl.series(c, table)[1] for c, _ in columns[:MAX_LINES]])
        y = y[np.isfinite(y)]
        if log and y.size and y.min() > 0 and y.max() / y.min() > 30:
            ax.set_yscale("log")
    return drawn


def _legend(ax: Any) -> None:
    """Legends right of the panel: they never hide a curve (constrained layout makes room)."""
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)


def _finish(fig: Any, axes: list[Any], tl: Timeline, title: str) -> None:
    tl.mark(axes)
    axes[-1].set_xlabel("training step" + (" (runs in the order given)" if len(tl.runs) > 1 else ""))
    fig.suptitle(title, fontsize=11)


def _runs_title(tl: Timeline, what: str) -> str:
    return shorten(f"{what}: " + " -> ".join(r.name for r in tl.runs), 70)


def loss_figure(tl: Timeline) -> Any:
    fig = new_figure(9.0, 6.5)
    axes = list(fig.subplots(2, 1, sharex=True))
    _panel(axes[0], tl, [(c, c) for c in LOSSES], "loss", "total, supervised and unsupervised loss", log=True)
    _panel(axes[1], tl, [(c, TASK_NAMES[c]) for c in TASKS], "loss", "loss per task", log=True)
    _finish(fig, axes, tl, _runs_title(tl, "Losses"))
    return fig


def schedule_figure(tl: Timeline) -> Any:
    lrs = tl.columns("lr")
    has_selector = tl.has("selector_mean", "selector")
    fig = new_figure(9.0, 8.5 if has_selector else 6.5)
    axes = list(fig.subplots(3 if has_selector else 2, 1, sharex=True))
    _panel(axes[0], tl, [(c, c) for c in lrs], "learning rate", "learning rate" + ("s per optimizer" if len(lrs) > 1 else ""),
           log=True)
    _panel(axes[1], tl, [("alpha", "selector alpha"), ("unsup_weight", "unsupervised weight")], "value",
           "selector alpha and unsupervised loss weight")
    if has_selector:
        ax = axes[2]
        x, mean = tl.series("selector_mean", "selector")
        _, std = tl.series("selector_std", "selector")
        if len(std) != len(mean):  # a run without a selector_std column
            std = np.zeros_like(mean)
        ax.plot(x, mean, color="C0", marker="o" if len(x) <= MAX_MARKERS else None, markersize=3, linewidth=1.2, label="mean")
        ax.fill_between(x, mean - std, mean + std, color="C0", alpha=0.25, label="± std")
        ax.set_ylabel("selector weight")
        ax.set_title("selector weights (end of each logged epoch)", fontsize=10)
        ax.grid(alpha=0.3)
        _legend(ax)
    _finish(fig, axes, tl, _runs_title(tl, "Schedules"))
    return fig


def _scale_columns(tl: Timeline) -> dict[str, list[str]]:
    """`group_scale:<layer>:<group>` columns by layer."""
    out: dict[str, list[str]] = {}
    for col in tl.columns("group_scale:"):
        layer, _, group = col.removeprefix("group_scale:").rpartition(":")
        if layer and group.isdigit():
            out.setdefault(layer, []).append(col)
    return out


def routing_figure(tl: Timeline) -> Any | None:
    """New-group share of routing weight and mean group scale per layer; None when the runs logged neither."""
    shares = {c.removeprefix("new_share:"): c for c in tl.columns("new_share:")}
    scales = _scale_columns(tl)
    panels = [p for p in (("share", shares), ("scale", scales)) if p[1]]
    if not panels:
        return None
    every = sorted(set(shares) | set(scales), key=layer_order)
    layers = every[:MAX_LINES]
    cmap = Normalize(0, max(len(layers) - 1, 1))
    fig = new_figure(9.0, 1.0 + 3.0 * len(panels))
    axes = list(np.atleast_1d(fig.subplots(len(panels), 1, sharex=True)))
    colour = {name: colormaps["viridis"](0.9 * cmap(i)) for i, name in enumerate(layers)}
    for ax, (kind, cols) in zip(axes, panels):
        for layer in layers:
            if layer not in cols:
                continue
            if kind == "share":
                x, y = tl.series(cols[layer])
            else:
                x, y = tl.derived(lambda c, names=cols[layer]: _row_mean([c[n] for n in names if n in c]))
            ax.plot(x, y, color=colour[layer], linewidth=1.2, label=layer_label(layer))
        if kind == "share":
            ax.set_ylabel("new-group share")
            ax.set_title("new groups' share of routing weight, per MoE layer", fontsize=10)
        else:
            ax.set_ylabel("mean group scale")
            ax.set_title("group scale of the routed groups (mean per layer)", fontsize=10)
        ax.grid(alpha=0.3)
        if len(layers) <= 10:
            _legend(ax)
    if len(layers) > 10:  # too many lines for a legend: colour encodes the layer's depth
        sm = ScalarMappable(norm=Normalize(0, (len(layers) - 1) / 0.9), cmap=colormaps["viridis"])
        bar = fig.colorbar(sm, ax=axes, label="MoE layer (encoder first, then decoder)", shrink=0.9)
        bar.set_ticks([0, len(layers) - 1], labels=[layer_label(layers[0]), layer_label(layers[-1])])
    what = "Routing engagement" + (f" (first {MAX_LINES} of {len(every)} layers)" if len(every) > MAX_LINES else "")
    _finish(fig, axes, tl, _runs_title(tl, what))
    return fig


def _row_mean(columns: list[np.ndarray]) -> np.ndarray | None:
    """Mean over a layer's group-scale columns per row (NaN cells left out); None when the run has none."""
    if not columns:
        return None
    stack = np.vstack(columns)
    with np.errstate(invalid="ignore"):
        count = np.isfinite(stack).sum(0)
        return np.where(count > 0, np.nansum(stack, 0) / np.maximum(count, 1), np.nan)


def curve_figures(runs: list[RunLog]) -> list[tuple[str, str, Any]]:
    """(file stem, caption, figure) for every training figure the runs support."""
    tl = Timeline.of(runs)
    out = [("losses", "Losses per task", loss_figure(tl)),
           ("schedules", "Learning rate, selector alpha, unsupervised weight and selector weights", schedule_figure(tl)),
           ("routing", "New-group weight share and group scale per MoE layer", routing_figure(tl))]
    return [(stem, caption, fig) for stem, caption, fig in out if fig is not None]


def write_curves(run_dirs: list[Path], out: Path, fmt: str = "png", force: bool = False) -> list[Written]:
    """Read every run first (a bad one fails before anything is written), then write the figures."""
    check_format(fmt)
    runs = [load_run(Path(r)) for r in run_dirs]
    figures = curve_figures(runs)
    with output_dirs([(out, "--out")], "plot", force) as outs:
        target = outs[out.resolve()]
        return [Written(stem, caption, save_figure(fig, target, f"{stem}.{fmt}", fmt)) for stem, caption, fig in figures]
