"""Which regime a grown model's source was in when it grew: growth pays only where capacity binds.

More experts at the same compute per token store more facts; they do not sharpen borders, and they do
not beat a source that simply had not finished learning. So, read from the source's own training log
(`RUN/metrics.csv` beside `RUN/final`, found through the grown checkpoint's `growth.source`) and from
the source run on the held-out data `eval` was given:

- still learning: its training loss fell by more than 1% over its last 1000 steps: training it further
  is likely the better use of compute;
- data-bound: its segmentation loss on held-out data is over 1.2x its final training loss: it overfits,
  more data helps more than more parameters;
- border-bound: its interior mIoU (pixels away from class borders) is already 0.95 or more: what it gets
  wrong is where borders fall, which experts do not buy;
- capacity-bound otherwise: at its plateau, fitting new data as well as its own, confusing classes inside
  regions: where growth can pay.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from upscale.checkpoint import Checkpoint, load_model

from .data import LabelledFolder
from .evaluate import run_model
from .semisup import task_losses

PLATEAU_DROP = 0.01  # relative fall of the training loss per 1000 steps below which a run is at its plateau
OVERFIT_RATIO = 1.2  # held-out / training segmentation loss above which a model is data-bound
BORDER_INTERIOR_MIOU = 0.95  # interior mIoU above which the errors left are at borders
MAX_LOG_BYTES = 64 * 1024**2  # a training log larger than this is not read


@dataclass
class Regime:
    verdict: str  # still learning | data-bound | border-bound | capacity-bound | unknown
    line: str
    loss_drop_per_1000: float | None = None
    train_seg_loss: float | None = None
    heldout_seg_loss: float | None = None
    interior_miou: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def training_log(source: Path) -> Path | None:
    """The metrics.csv of the run whose `final/` is `source`, when it is a regular file of sane size."""
    if source.name != "final":
        return None
    log = source.parent / "metrics.csv"
    try:
        ok = log.is_file() and not log.is_symlink() and log.stat().st_size <= MAX_LOG_BYTES
    except OSError:
        return None
    return log if ok else None


def loss_tail(log: Path, window: int = 1000) -> tuple[float, float] | None:
    """(relative fall of the total training loss per 1000 steps over the last `window` steps, mean segmentation loss
    of the last tenth of those steps), or None for a log without usable rows. First and last fifths of the window
    are averaged, so one noisy batch does not decide it."""
    rows = []
    with log.open(newline="") as f:
        for row in csv.DictReader(io.StringIO(f.read(MAX_LOG_BYTES))):
            try:
                step, loss, seg = int(row["step"]), float(row["loss_sup"]), float(row["seg"])
            except (KeyError, TypeError, ValueError):
                continue
            if math.isfinite(loss) and math.isfinite(seg):
                rows.append((step, loss, seg))
    if len(rows) < 10:
        return None
    last = rows[-1][0]
    tail = [r for r in rows if r[0] > last - window]
    k = max(1, len(tail) // 5)
    first, end = sum(r[1] for r in tail[:k]) / k, sum(r[1] for r in tail[-k:]) / k
    span = max(tail[-1][0] - tail[0][0], 1)
    drop = (first - end) / abs(first) * 1000 / span if first else 0.0
    seg_rows = tail[-max(1, len(tail) // 10):]
    return drop, sum(r[2] for r in seg_rows) / len(seg_rows)


@torch.no_grad()
def heldout(source: Path, data_dir: Path, limit: int = 64, batch_size: int = 8) -> tuple[float, float]:
    """(mean segmentation loss, interior mIoU) of `source` on up to `limit` images of a labelled folder."""
    model = load_model(source)
    cfg = model.config
    data = LabelledFolder(data_dir, cfg.num_classes, size=cfg.img_size)
    subset = torch.utils.data.Subset(data, range(min(limit, len(data))))
    model.eval()
    losses = []
    for start in range(0, len(subset), batch_size):
        batch = torch.utils.data.default_collate([subset[i] for i in range(start, min(start + batch_size, len(subset)))])
        losses.append(float(task_losses(model(batch["image"]), batch)["seg"]) * len(batch["name"]))
    stats, _ = run_model(model, subset, batch_size)
    return sum(losses) / len(subset), float(stats.metrics()["miou_interior"])


def source_regime(grown: Checkpoint, data_dir: Path) -> Regime:
    """The regime of `grown`'s source (see the module docstring), with the numbers it rests on."""
    source = grown.meta.get("growth", {}).get("source")
    log = training_log(Path(source)) if source else None
    tail = loss_tail(log) if log else None
    if tail is None:
        return Regime("unknown", "regime of the source: unknown (its training log, RUN/metrics.csv beside RUN/final, "
                                 "was not found)")
    drop, train_seg = tail
    if drop > PLATEAU_DROP:
        return Regime("still learning", f"regime of the source: still learning (its training loss was falling at a rate of "
                      f"{drop:.1%} per 1000 steps at the end): training it further is likely the better use of compute than growth",
                      drop, train_seg)
    try:
        held_seg, interior = heldout(Path(source), data_dir)
    except Exception as e:  # the source moved or no longer loads: say so, do not fail the evaluation
        return Regime("unknown", f"regime of the source: at its plateau; not scored on held-out data ({e})", drop, train_seg)
    numbers = (f"loss fell {drop:.1%} per 1000 steps at the end; held-out / training segmentation loss "
               f"{held_seg:.3f} / {train_seg:.3f}; interior mIoU {interior:.3f}")
    if held_seg > OVERFIT_RATIO * train_seg:
        verdict, why = "data-bound", "it fits its training data better than new data: more data helps more than growth"
    elif interior >= BORDER_INTERIOR_MIOU:
        verdict, why = "border-bound", "its errors sit at class borders, which more experts do not fix"
    else:
        verdict, why = "capacity-bound", "at its plateau, fitting new data as well as its own: growth can pay"
    return Regime(verdict, f"regime of the source: {verdict} ({numbers}): {why}", drop, train_seg, held_seg, interior)
