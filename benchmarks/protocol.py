"""What `capacity.py` and `growth.py` share: running samoe, counting a step's FLOPs, scoring, caching, intervals.

Every training run goes through samoe's own CLI (`python -m cli train ...` from this tree), so what is
measured is what a user runs. Each finished run's scores are cached as JSON beside it, so a benchmark
that is stopped picks up where it was and a finished arm is never trained twice.
"""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

PRESET = "small"  # tiny with a decoder wide enough for 16 classes (upscale/config.py)
THREADS = 1  # OMP_NUM_THREADS of each samoe process: tiny models run fastest single-threaded, side by side


def samoe(*args: str, log: Path | None = None) -> str:
    """Run one samoe command from this tree; exit with its stderr when it fails."""
    t = time.perf_counter()
    env = dict(os.environ, OMP_NUM_THREADS=str(THREADS), PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-m", "cli", *args], capture_output=True, text=True, cwd=REPO, env=env)
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"samoe {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    print(f"  {time.perf_counter() - t:7.1f} s  samoe {' '.join(args)}", flush=True)
    return proc.stdout


def cached(path: Path, make: Any) -> Any:
    """The JSON at `path`, or `make()` written there first (atomically)."""
    if path.exists():
        return json.loads(path.read_text())
    value = make()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=1))
    os.replace(tmp, path)
    return value


def codebook_data(work: Path, signatures: int, labelled: int, val: int, test: int, grid: str = "fine") -> dict[str, Path]:
    """Train (A), validation and test folders of the codebook set: one table, scenes from different seeds."""
    out = {}
    for name, seed, lab, tst in (("train", 0, labelled, test), ("val", 1, 0, val)):
        d = work / f"codebook-{grid}-{signatures}-{name}"
        if not (d / "demo-data.json").exists():
            samoe("demo-data", "--preset", "codebook", "--grid", grid, "--signatures", str(signatures), "--out", str(d), "--force",
                  "--labelled-scenes", str(lab), "--unlabelled-scenes", "0", "--test-scenes", str(tst), "--seed", str(seed))
        out[name] = d
    return {"A": out["train"] / "A", "test": out["train"] / "A-test", "val": out["val"] / "A-test"}


def init_checkpoint(out: Path, seed: int, num_classes: int, grow: dict[str, Any] | None = None) -> Path:
    """A freshly initialised tiny model, or (with `grow`, GrowthSpec keywords) the grown layout initialised at random:
    every expert drawn independently, as a model of that layout trained from scratch would start."""
    if (out / "samoe.json").exists():
        return out
    import torch

    from upscale.config import PRESETS
    from upscale.create import init_from_preset
    from upscale.expand import GrowthSpec, grown_config

    cfg = PRESETS[PRESET].replace(num_classes=num_classes)
    if grow is not None:
        cfg = grown_config(cfg, GrowthSpec(**grow))
    init_from_preset(cfg, out, seed, torch.float32, ["benchmarks", "init", json.dumps(grow)], True)
    return out


def step_flops(ckpt: Path, stage: int, data: Path, batch_size: int, unlabelled: Path | None = None) -> float:
    """Forward+backward FLOPs of one training step of `ckpt` in `stage` (torch's FlopCounterMode; frozen parts
    run forward only), counted on one real batch."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from stages.data import UnlabelledFolder
    from stages.engine import apply_stage, open_labelled, train_step
    from stages.optim import build_optimizers
    from upscale.checkpoint import Checkpoint, load_model

    ck = Checkpoint.open(ckpt)
    model = load_model(ckpt)
    apply_stage(model, ck.provenance, stage, 4)
    opts = build_optimizers(model, 0.0)  # lr 0: counting changes nothing that matters
    cfg = model.config
    ds = open_labelled(data, cfg.num_classes, cfg.img_size)
    batch = torch.utils.data.default_collate([ds[i] for i in range(batch_size)])
    ubatch = None
    if unlabelled is not None:
        uds = UnlabelledFolder(unlabelled, size=cfg.img_size)
        ubatch = torch.utils.data.default_collate([uds[i] for i in range(batch_size)])
    with FlopCounterMode(display=False) as counter:
        train_step(model, opts, batch, ubatch, 1.0, 0.01, False, 0)
    return float(counter.get_total_flops())


def train(stage: int, src: Path, run: Path, data: Path, steps: int, lr: float | None, seed: int, batch: int,
          every: int = 0, extra: tuple[str, ...] = ()) -> Path:
    """`samoe train` one stage (skipped when RUN/final exists); step checkpoints every `every` steps are all kept.
    `lr` None: the stage's default, relative to the source's recorded rate (`--set lr_scale=...` in `extra`)."""
    if (run / "final" / "samoe.json").exists():
        return run / "final"
    args = ["train", "--stage", str(stage), "--from", str(src), "--run-dir", str(run), "--data", str(data),
            "--set", f"max_steps={str(steps)}", "--seed", str(seed), "--set", f"batch_size={batch}",
            "--set", f"checkpoint_every={every or steps}", "--set", f"keep={max(1, steps // max(every, 1)) + 1}"]
    if lr is not None:
        args += ["--set", f"lr={lr:g}"]
    samoe(*args, *extra, log=run.parent / f"{run.name}.log")
    return run / "final"


def step_checkpoints(run: Path) -> dict[int, Path]:
    """step -> the model directory of each kept step checkpoint of a run, and RUN/final at the run's last step."""
    out = {int(p.name.split("-")[1]): p / "model" for p in (run / "checkpoints").glob("step-*") if (p / "model").is_dir()}
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    out[int(rows[-1]["step"])] = run / "final"
    return dict(sorted(out.items()))


def losses(run: Path) -> np.ndarray:
    """(steps, 2): step and supervised training loss of every logged step."""
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    return np.array([[float(r["step"]), float(r["loss_sup"])] for r in rows])


def loss_drop_per_1000(run: Path, window: int = 1000) -> float:
    """Relative fall of the training loss over the run's last `window` steps, per 1000 steps (the plateau test:
    under 1%). Mean loss of the first and last fifth of that window, so one noisy batch does not decide it."""
    steps, loss = losses(run).T
    tail = loss[steps > steps[-1] - window]
    k = max(1, len(tail) // 5)
    first, last = tail[:k].mean(), tail[-k:].mean()
    return float((first - last) / first * 1000 / window)


@dataclass
class Scores:
    """What a checkpoint scores on one folder: metrics and the per-image statistics for paired intervals."""

    metrics: dict[str, float]
    stats: Any


def score(ckpt: Path, data: Path, ablate: bool = False) -> Scores:
    """Metrics of `ckpt` on a labelled folder (with `ablate`, its new parts switched off: upscale.ablate)."""
    import torch

    from stages.data import LabelledFolder
    from stages.evaluate import run_model
    from upscale.ablate import switch_off_new_parts_
    from upscale.checkpoint import load_model

    torch.set_num_threads(THREADS)
    model = load_model(ckpt)
    if ablate:
        switch_off_new_parts_(model)
    folder = LabelledFolder(data, model.config.num_classes, size=model.config.img_size)
    stats, _ = run_model(model, folder, 16)
    return Scores({k: float(v) for k, v in stats.metrics().items()}, stats)


def t_interval(values: list[float], level: float = 0.95) -> tuple[float, float, float]:
    """Mean and two-sided t-interval of the mean over independent values (seeds)."""
    from scipy import stats

    v = np.asarray(values, dtype=float)
    n = len(v)
    mean = float(v.mean())
    if n < 2:
        return mean, math.nan, math.nan
    half = float(stats.t.ppf(0.5 + level / 2, n - 1)) * float(v.std(ddof=1)) / math.sqrt(n)
    return mean, mean - half, mean + half
