"""`samoe train --stage N`: the resumable training loop.

One run directory per stage. Each step runs seed 004's two phases: an
unsupervised phase on an unlabelled batch (when `--unlabelled` is given; gating
under torch.no_grad(), optimizers 1 and 2) and a supervised phase (all three
optimizers); separate forwards, no retain_graph. Frozen parameters (the stage
plan) have requires_grad=False and appear in no optimizer.

Exact resume: the data order of every epoch is a permutation seeded by
(seed, epoch), the position inside it is saved, and model, optimizer and RNG
states are restored from the latest step checkpoint; the same command continues
where it stopped and gives bit-identical weights on CPU. SIGINT/SIGTERM finish
the current step, save, print the resume command and exit.

Devices and precision (`--device`, `--precision`, upscale/device.py): the model,
every batch and the optimizer state live on the run's device; bf16 runs the
forward under autocast with fp32 weights, gradients and optimizer state, except
that expert banks are stored in bf16 with fp32 masters (stages/master.py: the
same numbers without casting GBs of expert weights every step). CPU
training runs under deterministic algorithms (scoped to the run) and resumes
bit-exactly; CUDA runs resume from the same state but agree to float rounding.

Under torchrun (WORLD_SIZE > 1) the same loop runs in every process on the
FSDP2-sharded model, each on a contiguous slice of the global batch, with the
losses formed over the global batch (stages/distributed.py); step checkpoints
are then sharded DCP directories and rank 0 writes the logs and RUN/final.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import shlex
import signal
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ContextManager

import torch
from torch.utils.data import DataLoader, Dataset

from upscale.checkpoint import Checkpoint, build_meta, lineage_entry, load_model, save_model
from upscale.device import autocast, check_precision, deterministic, resolve_device, to_device
from upscale.errors import SamoeError
from upscale.dirfd import Dir
from upscale.ownership import (Owned, check_separate, first_unknown, read_manifest, remove_recorded, remove_temporaries,
                               unknown_error)
from upscale.roles import SEED004_ROLES, in_decoder, param_role

from .checkpointer import Checkpointer, read_run_json
from .optim import Optimizers, apply_lr, build_optimizers, drop_idle_grads, lr_factor
from .plan import STAGES, is_trainable, stage_lr
from .semisup import (continue_rampup, gating_without_grad, losses_from_stats, pseudo_targets, scaled_epochs, sigmoid_rampup,
                      task_stats)

if TYPE_CHECKING:
    from .distributed import Distributed

# One of the selector's alpha buffers (all hold the same ramp value): read from the source file, not
# from the model, which may live on any device.
ALPHA_KEY = "selector.selectors.seg_scale1.alpha"
METRIC_FIELDS = ("step", "epoch", "loss", "loss_sup", "loss_unsup", "seg", "sdf", "boundary", "aux", "handover", "lr", "alpha",
                 "unsup_weight", "sigma_seg", "sigma_sdf", "sigma_boundary")
SELECTOR_FIELDS = ("epoch", "alpha", "unsup_weight", "selector_mean", "selector_std")


# TrainConfig fields that are not recipe keys: what a run reads and writes, where, and the command itself
RECIPE_SKIP = ("stage", "source", "run_dir", "data", "unlabelled", "val_data", "device", "command")

# the range of every numeric setting: (lowest, highest, lowest excluded); None is always allowed where the default is
_BOUNDS: dict[str, tuple[float, float, bool]] = {
    "epochs": (1, math.inf, False), "max_steps": (1, math.inf, False), "batch_size": (1, math.inf, False),
    "seed": (0, 2**32 - 1, False), "lr": (0, math.inf, True), "lr_scale": (0, math.inf, True),
    "momentum": (0, 1, False), "weight_decay": (0, 1, False), "router_lr_mult": (0, math.inf, False), "last_k": (0, math.inf, False),
    "timeline": (1, math.inf, False), "warmup": (0, math.inf, False), "alpha_rampup": (0, math.inf, False),
    "unsup_rampup": (0, math.inf, False), "unsup_weight": (0, math.inf, False), "aux_loss_coef": (0, math.inf, False),
    "handover_coef": (0, math.inf, False), "checkpoint_every": (1, math.inf, False), "keep": (1, math.inf, False),
    "log_every": (1, math.inf, False), "print_every": (1, math.inf, False), "val_every": (1, math.inf, False),
    "workers": (0, 256, False), "dn_calibration": (0, math.inf, True),
}


@dataclass
class TrainConfig:
    """Everything that defines a training run (saved in trainer_state.json)."""

    # what to train, on what
    stage: int
    source: str
    run_dir: str
    data: list[str]  # labelled or pseudo-labelled folders, trained on as one set
    unlabelled: str | None = None
    # what the pixels are (stages/units.py; None: each folder's data.json, else the source's record, else linear)
    input_scale: str | None = None
    dn_calibration: float | None = None
    polarisations: str | None = None  # band names in order, e.g. "VV,VH"
    resize: bool = False  # squash scenes to img_size; default: a random img_size window of each scene per epoch
    # validation: mIoU on val_data every val_every steps (None: at each epoch's end); RUN/best keeps the best step
    val_data: str | None = None
    val_every: int | None = None
    # how long: --epochs (default: the seed's 200-epoch timeline) or --max-steps
    epochs: int | None = None
    max_steps: int | None = None
    batch_size: int = 4
    seed: int = 0
    # optimizers (stages/optim.py): base lr absolute, or lr_scale x the source's recorded peak lr (default: the
    # stage's scale, stages/plan.py)
    lr: float | None = None
    lr_scale: float | None = None
    momentum: float = 0.9
    weight_decay: float = 5e-5
    router_lr_mult: float = 10.0
    last_k: int = 4  # stage 2 unfreezes the FFN/MoE of the last K ViT blocks
    augment: bool = False  # each labelled image and its targets under a random symmetry of the square (stages/augment.py)
    selector_gating: bool = False  # stage 1 also trains the source's selector and gating (seed 004)
    # seed 004's schedules, in epochs of a `timeline`-epoch run (they scale to the run's length)
    timeline: int = 200
    warmup: float = 10.0
    alpha_rampup: float = 20.0
    unsup_rampup: float = 80.0
    unsup_weight: float = 1.0
    restart_ramps: bool = False  # ramp the selector's alpha from 0 again, as a fresh seed-004 run (changes the function)
    # MoE losses: expert-level balance and the top-level (core vs new groups) one, upscale/moe.py
    aux_loss_coef: float = 0.01
    handover_coef: float = 0.1
    # checkpoints and logs
    checkpoint_every: int = 50
    keep: int = 2
    log_every: int = 5
    print_every: int = 10  # a plain progress line every N steps where the output is not a terminal (SLURM logs)
    skip_nonfinite: bool = False
    # hardware: not part of the run's identity
    workers: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N (upscale/device.py)
    precision: str = "fp32"  # fp32 | bf16: autocast on one device, FSDP2 mixed precision under torchrun
    compile: bool = False  # torch.compile each block in place (upscale/compile.py); resume is exact within a mode
    command: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if isinstance(self.data, (str, Path)):
            self.data = [str(self.data)]
        self.data = [str(d) for d in self.data]

    def check(self) -> "TrainConfig":
        """Refuse a setting outside its range (from a recipe or --set), naming the key."""
        for key, (low, high, open_low) in _BOUNDS.items():
            value = getattr(self, key)
            if value is None:
                continue
            if not math.isfinite(value) or value < low or value == low and open_low or value > high:
                bound = f"> {low:g}" if open_low else f"in [{low:g}, {high:g}]" if math.isfinite(high) else f">= {low:g}"
                raise SamoeError(f"{key} = {value!r} must be a finite number {bound}: fix the recipe or --set {key}=...")
        return self

    def recipe(self) -> dict[str, Any]:
        """The resolved settings of this run (every recipe key), as recorded in its checkpoint's lineage."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in RECIPE_SKIP}

    def identity(self) -> dict[str, Any]:
        """The options a resumed run must share with the original one."""
        keep = ("stage", "data", "unlabelled", "epochs", "max_steps", "batch_size", "lr", "lr_scale", "last_k", "seed", "momentum",
                "weight_decay", "unsup_weight", "alpha_rampup", "unsup_rampup", "warmup", "timeline", "aux_loss_coef", "router_lr_mult", "selector_gating",
                "handover_coef", "restart_ramps", "augment")
        ident = {k: getattr(self, k) for k in keep}
        # only when set: runs started before these options existed still resume
        for k in ("input_scale", "dn_calibration", "polarisations", "resize"):
            if getattr(self, k) not in (None, False):
                ident[k] = getattr(self, k)
        declared = data_declarations(*self.data, self.unlabelled)
        if declared:
            ident["declared"] = declared
        return {**ident, "data_fingerprint": data_fingerprint(*self.data, self.unlabelled)}


def data_fingerprint(*folders: str | None) -> str:
    """sha256 over the relative name, size and mtime of every file under the data folders.

    Part of a run's identity: resuming on a changed data set (files added, removed,
    rewritten) would silently mix two data sets in one run. Costs one stat per file.
    """
    import hashlib

    h = hashlib.sha256()
    for folder in folders:
        h.update(b"folder\n")
        if folder is None:
            continue
        root = Path(folder)
        for path in sorted(root.rglob("*")):
            if path.is_file():
                st = path.stat()
                h.update(f"{path.relative_to(root).as_posix()}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    return "sha256:" + h.hexdigest()


def data_declarations(*folders: str | None) -> dict[str, Any]:
    """The data.json and classes.json each folder resolves to (they may sit beside it): part of a run's identity,
    since they change what the pixels and class ids mean."""
    from .classes import CLASSES_JSON, read_classes
    from .units import read_data_json

    out: dict[str, Any] = {}
    for folder in folders:
        if folder is None:
            continue
        units, path = read_data_json(Path(folder))
        if units is not None:
            out[f"{folder}:{path.name}"] = units.to_json()  # type: ignore[union-attr]
        classes = read_classes(Path(folder))
        if classes is not None:
            out[f"{folder}:{CLASSES_JSON}"] = classes.to_json()
    return out


class Interrupted(Exception):
    """Raised after a checkpoint was saved because SIGINT/SIGTERM arrived."""

    def __init__(self, signum: int, step_dir: Path) -> None:
        super().__init__(signum)
        self.signum, self.step_dir = signum, step_dir


def check_stage_input(ckpt: Checkpoint, stage: int) -> None:
    """Refuse an input that does not fit the stage (the CLI's --skip-stage-check skips this).

    Only stages trained since the latest growth count: a source's own training
    history is carried into the grown checkpoint but says nothing about it.
    """
    since = ckpt.meta.get("growth", {}).get("stages_before", 0)
    done = [s.get("stage") for s in ckpt.stages[since:]]
    if "growth" not in ckpt.meta:
        if stage == 3:  # a model that never grew trains in full: a source, or a source trained further
            return
        raise SamoeError(f"{ckpt.path} was never grown (no growth provenance): stage {stage} trains around the parts "
                         "`samoe expand` adds; expand it first, train it with --stage 3, or pass --skip-stage-check")
    if stage == 2 and 1 not in done:
        raise SamoeError(f"{ckpt.path} has no stage 1 in its history: run `samoe train --stage 1` first or pass --skip-stage-check")
    if stage == 3 and 2 not in done:
        raise SamoeError(f"{ckpt.path} has no stage 2 in its history: run `samoe train --stage 2` first or pass --skip-stage-check")


def open_labelled(path: Path, num_classes: int, size: int | None = None, **options: Any) -> Dataset:
    """A labelled or pseudo-labelled folder (it has confidence/); `options` as LabelledFolder's (window, units...)."""
    from .data import LabelledFolder, PseudoLabelFolder

    if (path / "confidence").is_dir():
        return PseudoLabelFolder(path, num_classes, size=size, **options)
    return LabelledFolder(path, num_classes, size=size, **options)


MIN_KEPT_WEIGHT = 0.01


def check_pseudo_labels(data: Dataset, path: str) -> None:
    """Refuse pseudo-labels that teach nothing: (nearly) every pixel ignored or of confidence 0."""
    kept = getattr(data, "kept_weight", None)
    if kept is not None and kept < MIN_KEPT_WEIGHT:
        raise SamoeError(f"{path}: only {kept:.2%} of the pseudo-labelled pixels' weight is kept (the rest is ignored or has "
                         "confidence 0), so training would learn nothing; re-run `samoe pseudo-label` with a lower --threshold")


def _batches(n: int, batch_size: int, seed: int, epoch: int, start: int) -> list[list[int]]:
    """This epoch's batches of indices, from batch `start` on (seeded by (seed, epoch))."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(n, generator=gen).tolist()
    return [order[i : i + batch_size] for i in range(start * batch_size, n, batch_size)]


class StreamingLoader:
    """Endless, resumable batches of a dataset: (epoch, batch position) fully define where it is.

    With `world` > 1 each global batch is cut into contiguous slices and this
    loader yields slice `rank`; the position counts global batches, so it means
    the same for any number of processes.
    """

    def __init__(self, data: Dataset, batch_size: int, seed: int, workers: int, epoch: int = 0, pos: int = 0,
                 rank: int = 0, world: int = 1, pin_memory: bool = False) -> None:
        self.data, self.batch_size, self.seed, self.workers = data, batch_size, seed, workers
        self.pin_memory = pin_memory  # page-locked batches copy to a GPU asynchronously
        self.epoch, self.pos = epoch, pos
        self.rank, self.world = rank, world
        self.steps_per_epoch = math.ceil(len(data) / batch_size)
        self._it = None
        self._sizes: list[int] = []
        self.global_size = 0  # images in the global batch last returned

    def _start(self) -> None:
        if hasattr(self.data, "set_epoch"):  # windows of large scenes are drawn per (seed, epoch): resumable
            self.data.set_epoch(self.seed, self.epoch)
        batches = _batches(len(self.data), self.batch_size, self.seed, self.epoch, self.pos)
        self._sizes = [len(b) for b in batches]
        if self.world > 1:
            from .distributed import rank_slice

            batches = [rank_slice(b, self.rank, self.world) for b in batches]
        self._it = iter(DataLoader(self.data, batch_sampler=batches, num_workers=self.workers, pin_memory=self.pin_memory))

    def next(self) -> dict[str, Any]:
        if self.pos >= self.steps_per_epoch:
            self.epoch, self.pos, self._it = self.epoch + 1, 0, None
        if self._it is None:
            self._start()
        batch = next(self._it)
        self.global_size = self._sizes.pop(0)
        self.pos += 1
        return batch

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "pos": self.pos}


def apply_stage(model: torch.nn.Module, provenance: dict[str, Any], stage: int, last_k: int,
                selector_gating: bool = False) -> dict[str, list[int]]:
    """Set requires_grad per the stage plan; return {component: [trainable, total]} counts."""
    from upscale.summary import component_of

    counts: dict[str, list[int]] = {}
    for name, p in model.named_parameters():
        train = is_trainable(name, provenance.get(name, "source"), stage, model.config, last_k, selector_gating)
        p.requires_grad_(train)
        c = counts.setdefault(component_of(name, model.config), [0, 0])
        c[0] += p.numel() if train else 0
        c[1] += p.numel()
    return counts


def component_lrs(model: torch.nn.Module, opts: Optimizers) -> dict[str, list[float]]:
    """Per component (as `apply_stage` counts them), the base learning rates its trainable parameters get.

    Read from the optimizers' own groups, so a table of them shows what training does;
    a component can hold several (an extra block's routers train at the router lr).
    """
    from upscale.summary import component_of

    lr_of = {id(p): g.get("base_lr", g["lr"]) for opt in opts.named().values() for g in opt.param_groups for p in g["params"]}
    lrs: dict[str, set[float]] = {}
    for name, p in model.named_parameters():
        if id(p) in lr_of:
            lrs.setdefault(component_of(name, model.config), set()).add(lr_of[id(p)])
    return {c: sorted(v) for c, v in lrs.items()}


MAX_LOG_BYTES = 512 * 1024**2  # a log larger than this is not one samoe wrote


def _truncate_csv(run: Owned, name: str, key: str, last: float, fields: tuple[str, ...] = ()) -> tuple[str, ...]:
    """Drop rows written after the checkpoint we resume from (they will be written again); return the header
    to write on with: the file's own, plus any of `fields` it lacks (e.g. val_miou added on resume)."""
    d = run.dir
    if d.kind(name) is None:
        return fields
    fix = "the run directory is damaged; pass --force to start over or use a new --run-dir"
    path = d.path / name
    try:
        with io.TextIOWrapper(d.open_read(name, MAX_LOG_BYTES), newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
            header = tuple(reader.fieldnames or ())
        if not header:
            return fields
        kept = [r for r in rows if float(r[key]) <= last]
    except (ValueError, KeyError, TypeError, csv.Error) as e:  # UnicodeDecodeError is a ValueError
        raise SamoeError(f"{path} is damaged ({type(e).__name__}): {fix}") from None
    header += tuple(f for f in fields if f not in header)
    text = io.StringIO(newline="")
    w = csv.DictWriter(text, fieldnames=list(header), restval="")
    w.writeheader()
    w.writerows(kept)
    d.write_bytes(name, text.getvalue().encode("utf-8"), run.token)
    return header


class CsvLog:
    """A CSV log of the run directory, appended row by row (recorded in its manifest before it is opened)."""

    def __init__(self, run: Owned, name: str, fields: tuple[str, ...]) -> None:
        run.record(name, kind="log")
        self.fields = fields
        raw = run.dir.open_append(name)
        new = os.fstat(raw.fileno()).st_size == 0
        self.f = io.TextIOWrapper(raw, newline="", encoding="utf-8")
        self.w = csv.DictWriter(self.f, fieldnames=list(fields))
        if new:
            self.w.writeheader()
            self.f.flush()

    def write(self, row: dict[str, Any]) -> None:
        """One row; fields the row lacks stay empty (val_miou between validations)."""
        self.w.writerow({k: (f"{row[k]:.8g}" if isinstance(row.get(k), float) else row.get(k, "")) for k in self.fields})
        self.f.flush()

    def close(self) -> None:
        self.f.close()


class _TensorBoard:
    """TensorBoard's writer in RUN/tb, a folder made and checked here: the writer only takes a path, so it
    gets the path of that folder's descriptor. Its events file is recorded in the run's manifest."""

    def __init__(self, writer_cls: Any, run: Owned) -> None:
        run.record("tb", kind="dir")
        self.dir = run.dir.sub("tb", create=True)
        before = set(self.dir.names())
        self.writer = writer_cls(self.dir.proc)
        run.record(*[f"tb/{n}" for n in self.dir.names() if n not in before], kind="log")

    def add_scalar(self, *args: Any) -> None:
        self.writer.add_scalar(*args)

    def close(self) -> None:
        self.writer.close()
        self.dir.close()


def _tensorboard(run: Owned) -> _TensorBoard | None:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is a dependency; keep training if an install lacks it
        return None
    return _TensorBoard(SummaryWriter, run)


def _losses(model: torch.nn.Module, out: dict[str, Any], targets: list[tuple[str, dict[str, Any]]],
            dist: "Distributed | None", stats: Callable[..., torch.Tensor] = task_stats,
            ) -> tuple[list[dict[str, torch.Tensor]], torch.Tensor, torch.Tensor]:
    """Per-task losses of each (output prefix, targets), the MoE aux loss and the hand-over loss:
    of this batch, or of the global one. `stats` is `task_stats` or its compiled form."""
    c = model.config.num_classes
    if dist is not None:
        return dist.global_losses(out, targets, c, stats)
    return [losses_from_stats(stats(out, t, prefix), c) for prefix, t in targets], model.aux_loss(), model.handover_loss()


def _forward(model: torch.nn.Module, amp: Callable[[], ContextManager] | None, image: torch.Tensor) -> dict[str, Any]:
    """The model's forward, under `amp` (bf16 autocast) when given; floating outputs back in fp32 for the losses."""
    if amp is None:
        return model(image)
    with amp():
        out = model(image)
    return {k: v.float() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in out.items()}


def _after_backward(model: torch.nn.Module, dist: "Distributed | None") -> None:
    """Parts that got no token (in any process) get no gradient (None): the optimizer skips them."""
    if dist is not None:
        dist.after_backward()
    else:
        drop_idle_grads([m for _, m in model.moe_layers()])


def train_step(model: torch.nn.Module, opts: Optimizers, batch: dict[str, Any], ubatch: dict[str, Any] | None,
               unsup_weight: float, aux_coef: float, skip_nonfinite: bool, step: int,
               dist: "Distributed | None" = None, handover_coef: float = TrainConfig.handover_coef,
               amp: Callable[[], ContextManager] | None = None,
               stats: Callable[..., torch.Tensor] = task_stats) -> dict[str, float]:
    """Seed 004's step: unsupervised phase (gate frozen under no_grad), then supervised phase.

    With `dist`, `batch`/`ubatch` are this process's slices and the losses are those of the global batch.
    `amp` makes the forward's precision context (bf16 autocast); the losses are computed in fp32, from
    the sums `stats` makes (`task_stats`, or its compiled form).
    """
    metrics = {"loss_unsup": 0.0}
    if ubatch is not None:
        opts.zero_grad([opts.opt1, opts.opt2])
        with gating_without_grad(model):
            out = _forward(model, amp, ubatch["image"])
        pseudo = pseudo_targets({t: out[f"gate_{t}"] for t in ("seg", "sdf", "boundary")})
        (per_task,), aux_u, hand_u = _losses(model, out, [("", pseudo)], dist, stats)
        loss_u = unsup_weight * opts.loss(per_task) + aux_coef * aux_u + handover_coef * hand_u
        if _finite(loss_u, step, skip_nonfinite):
            loss_u.backward()
            opts.after_backward()
            _after_backward(model, dist)
            opts.step([opts.opt1, opts.opt2])
            model.constrain_()
        metrics["loss_unsup"] = loss_u.item()
    opts.zero_grad(list(opts.named().values()))
    out = _forward(model, amp, batch["image"])
    (heads, gate), aux, handover = _losses(model, out, [("", batch), ("gate_", batch)], dist, stats)
    per_task = {t: heads[t] + gate[t] for t in heads}
    loss_s = opts.loss(per_task) + aux_coef * aux + handover_coef * handover
    if _finite(loss_s, step, skip_nonfinite):
        loss_s.backward()
        opts.after_backward()
        _after_backward(model, dist)
        opts.step(list(opts.named().values()))
        model.constrain_()
    metrics.update(loss_sup=loss_s.item(), aux=aux.item(), handover=handover.item(), **{t: v.item() for t, v in heads.items()})
    metrics["loss"] = metrics["loss_sup"] + metrics["loss_unsup"]
    return metrics


def _finite(loss: torch.Tensor, step: int, skip: bool) -> bool:
    if torch.isfinite(loss):
        return True
    if skip:
        return False
    raise SamoeError(f"non-finite loss at step {step + 1}: the last checkpoint is intact; lower lr (--set lr=...), or --set skip_nonfinite=true to skip such steps")


def run(cfg: TrainConfig, force: bool = False, on_start: Callable[[dict[str, Any]], None] | None = None,
        on_step: Callable[[dict[str, Any]], None] | None = None, on_log: Callable[[dict[str, Any]], None] | None = None,
        check_stage: bool = True) -> Path:
    """Run (or resume) one stage; return RUN/final. Under torchrun (WORLD_SIZE > 1) this is one process of a sharded run.
    `force`: start the run over; `check_stage`: refuse a source whose history lacks the previous stage."""
    from .distributed import Distributed

    check_precision(cfg.precision)
    dist = Distributed.from_env(cfg.precision, cfg.device)
    if dist is not None and not dist.is_main:
        on_start = on_step = on_log = None
    finished = False
    try:
        device = dist.device if dist is not None else resolve_device(cfg.device)
        # CPU: deterministic kernels make resume bit-exact (upscale/device.py); only for this run
        with deterministic(device.type == "cpu"):
            result = _run(cfg, force, check_stage, on_start, on_step, on_log, dist, device)
        finished = True
        return result
    finally:
        if dist is not None:
            dist.close(finished)


_RUN_FIX = "pass --force to start over or use a new --run-dir"


def _prepare_run_dir(cfg: TrainConfig, force: bool, identity: dict[str, Any], source: Checkpoint) -> tuple[Owned, bool, bool]:
    """Check (and with --force, empty) the run directory; its manifest writer, True when it holds this run
    to resume, and True when the folder was made here. Rank 0 only.

    A run directory is samoe's when its manifest records everything in it. It resumes when its run.json
    matches this command; it starts over (its recorded entries removed) with --force, or when it never
    started (no run.json and no checkpoint). A run.json missing beside checkpoints is damage: refused."""
    run_dir = Path(cfg.run_dir)
    # --force deletes the run dir: never when it holds (or lies inside) this run's own inputs
    check_separate(run_dir, "--run-dir", {"--from": cfg.source, **{f"--data {d}": d for d in cfg.data},
                                          "--unlabelled": cfg.unlabelled, "--val-data": cfg.val_data})
    not_ours = SamoeError(f"{run_dir} exists and is not a samoe run directory: choose a new --run-dir")
    with Dir.open(run_dir.parent, "choose another --run-dir", create=True) as parent:
        kind = parent.kind(run_dir.name)
        if kind not in (None, "dir"):
            raise not_ours
        d = parent.sub(run_dir.name, create=True)
    d.fix = f"the run directory is damaged; {_RUN_FIX}"
    if not d.names():
        return Owned.start(d, "train"), False, kind is None
    manifest = read_manifest(d)
    if manifest is None or manifest.command != "train":
        raise not_ours
    unknown = first_unknown(d, manifest)
    if unknown is not None:
        raise unknown_error(run_dir, unknown, "--run-dir")
    if d.kind("run.json") is None:
        started = next((n for n in ("checkpoints", "final", "best") if d.kind(n) is not None), None)
        if started is not None and not force:
            raise SamoeError(f"{run_dir} has {started}/ but no run.json: the run directory is damaged (a run that "
                             f"started is never read as a fresh one); {_RUN_FIX}")
        force = True  # a run that failed before its first step: nothing to resume
    if force:
        remove_recorded(d, manifest)
        return Owned.start(d, "train"), False, False
    saved = read_run_json(d)
    if saved["source_digest"] != source.digest:
        raise SamoeError(f"{run_dir} holds a run from another --from checkpoint: re-run the original command, use a new "
                         "--run-dir, or pass --force to start over")
    before = {k: v for k, v in saved["identity"].items() if k != "data_fingerprint"}
    now = {k: v for k, v in identity.items() if k != "data_fingerprint"}
    differs = next((k for k in sorted(set(before) | set(now)) if before.get(k) != now.get(k)), None)
    if differs is not None:
        raise SamoeError(f"{run_dir} holds a run with {differs} = {before.get(differs)!r}, this command has "
                         f"{now.get(differs)!r}: re-run with the original setting, use a new --run-dir, or pass --force "
                         "to start over")
    if saved["identity"].get("data_fingerprint") != identity["data_fingerprint"]:
        raise SamoeError(f"the files in --data/--unlabelled changed since {run_dir} started (names, sizes or times differ): "
                         "restore them, use a new --run-dir, or pass --force to start over")
    if d.kind("final") is not None:
        raise SamoeError(f"{run_dir} already finished: its result is {run_dir / 'final'}; use a new --run-dir or --force to train again")
    remove_temporaries(d, manifest)
    return Owned(d, manifest), True, False


def _run(cfg: TrainConfig, force: bool, check_stage: bool, on_start: Callable[[dict[str, Any]], None] | None,
         on_step: Callable[[dict[str, Any]], None] | None, on_log: Callable[[dict[str, Any]], None] | None,
         dist: "Distributed | None", device: torch.device) -> Path:
    """One stage as a sequence of named steps; their order is part of the bit-exact resume contract."""
    trainer = _Trainer(cfg, dist, device)
    trainer.open_source()
    resuming = trainer.prepare_run_dir(force)
    try:
        trainer.build_model(check_stage)
        trainer.open_data()
        trainer.schedule()
        trainer.build_optimizers()
        trainer.resume(resuming)
        trainer.store_banks_low()
        trainer.open_loaders()
        trainer.open_logs()
        trainer.announce(on_start)
        trainer.loop(on_step, on_log)
    except BaseException:
        trainer.abandon()
        raise
    return trainer.finish()


class _Trainer:
    """The state of one stage run, filled in by `_run`'s steps in order (rank 0 alone owns the logs)."""

    def __init__(self, cfg: TrainConfig, dist: "Distributed | None", device: torch.device) -> None:
        self.cfg, self.dist, self.device = cfg, dist, device
        self.main = dist is None or dist.is_main
        self.run_dir = Path(cfg.run_dir)
        self.run: Owned | None = None  # rank 0's manifest writer of the run directory
        self.made_dir = False  # the run directory was made by this run
        self.started = False  # run.json written: from now on the run resumes
        self.identity = cfg.identity() if self.main else {}
        self.plan = STAGES[cfg.stage]
        self.step = 0
        self.latest: Path | None = None
        self.loader_state = {"epoch": 0, "pos": 0}
        self.uloader_state = {"epoch": 0, "pos": 0}
        self.metrics_log: CsvLog | None = None
        self.selector_log: CsvLog | None = None
        self.tb: Any = None
        self.last_metrics: dict[str, Any] = {}

    def prepare_run_dir(self, force: bool) -> bool:
        """Only rank 0 looks at, and deletes, the run directory; the others wait for its verdict (no race)."""
        error, resuming = None, False
        if self.main:
            try:
                self.run, resuming, self.made_dir = _prepare_run_dir(self.cfg, force, self.identity, self.src)
                self.started = resuming
            except SamoeError as e:
                if self.dist is None:
                    raise
                error = str(e)
        if self.dist is not None:
            error, resuming = self.dist.broadcast((error, resuming))
            if error is not None:
                raise SamoeError(error)
        return resuming

    def open_source(self) -> None:
        """Open --from once: its digest (run identity, lineage) and its weights come from the same files.
        Under torchrun every process opens it and all must have opened the same checkpoint."""
        self.src = Checkpoint.open(self.cfg.source)
        if self.dist is not None and self.dist.broadcast(self.src.digest) != self.src.digest:
            raise SamoeError(f"--from {self.cfg.source} changed while the processes opened it: wait for the job writing it to finish")

    def abandon(self) -> None:
        """A run that stopped before its first step leaves nothing: what it wrote is removed by its manifest
        (the folder too, when this run made it). A started run keeps everything: it resumes."""
        if self.main and self.run is not None and not self.started:
            for log in (self.metrics_log, self.selector_log, self.tb):
                if log is not None:
                    log.close()
            self.run.discard(folder=self.made_dir)

    def build_model(self, check_stage: bool) -> None:
        """Load the source with this stage's trainable set; under torchrun each process reads only its shards."""
        cfg, dist, src = self.cfg, self.dist, self.src
        if check_stage:
            check_stage_input(src, cfg.stage)
        if dist is None:
            self.model = load_model(src, device=self.device)
            self.counts = apply_stage(self.model, src.provenance, cfg.stage, cfg.last_k, cfg.selector_gating)
        else:  # requires_grad is set before sharding
            self.model, self.counts = dist.build_model(src, lambda m: apply_stage(m, src.provenance, cfg.stage, cfg.last_k,
                                                                                   cfg.selector_gating))
        self.model_cfg = self.model.config
        self.task_stats = task_stats
        if cfg.compile:
            from upscale.compile import compile_fn, compile_model

            compile_model(self.model)
            self.task_stats = compile_fn(task_stats)
        # one process: bf16 autocast around the forward; under torchrun FSDP2's policy casts instead
        self.amp = (lambda: autocast(self.device, cfg.precision)) if dist is None and cfg.precision != "fp32" else None
        self.lr, self.reference_lr = stage_lr(cfg.stage, cfg.lr, cfg.lr_scale, src.stages, src.meta.get("growth"), str(src.path))

    def open_data(self) -> None:
        """The labelled (and optional unlabelled and validation) folders, checked against the model, the source's
        data record (classes, units, resolution) and the world size; sets `spec`, the record this run writes."""
        from .classes import check_same, read_classes
        from .data import LabelledFolder, UnlabelledFolder
        from .dataspec import DataSpec, class_list, recorded
        from .units import UnitOptions, parse_polarisations, resolve_units

        cfg, model_cfg = self.cfg, self.model_cfg
        c = model_cfg.num_classes
        source = recorded(self.src.meta, f"--from {cfg.source}")
        options = UnitOptions(cfg.input_scale, cfg.dn_calibration, parse_polarisations(cfg.polarisations))
        before = source.units if source is not None else None
        if source is not None and source.resize != cfg.resize:
            raise SamoeError(f"--from {cfg.source} was trained on {'scenes resized' if source.resize else 'windows of scenes'} "
                             f"(--resize {'on' if source.resize else 'off'}): {'pass' if source.resize else 'drop'} --resize "
                             "so the model keeps seeing scenes at one scale")
        classes, origin = class_list(source, c), f"--from {cfg.source}"
        folders = [(f"--data {d}", d) for d in cfg.data] + [(f"--unlabelled {cfg.unlabelled}", cfg.unlabelled),
                                                              (f"--val-data {cfg.val_data}", cfg.val_data)]
        for name, folder in folders:
            declared = read_classes(Path(folder)) if folder else None
            if declared is not None and len(declared.names) != c:
                raise SamoeError(f"{name} names {len(declared.names)} classes in classes.json but the model predicts {c}: "
                                 "train a model of that many classes (samoe init --num-classes) or fix classes.json")
            check_same(classes, declared, origin, name, "train on data labelled with the same classes")
            if classes is None and declared is not None:
                classes, origin = declared, name
        units = [resolve_units(Path(d), options, before) for d in cfg.data]
        self.spec = DataSpec(units[0], classes, cfg.resize)  # the first --data folder's units are recorded
        ignore = classes.ignore_index if classes is not None else 255
        shape = {"size": model_cfg.img_size} if cfg.resize else {"window": model_cfg.img_size}
        labelled = [open_labelled(Path(d), c, ignore_index=ignore, units=u, **shape) for d, u in zip(cfg.data, units)]
        for folder, path in zip(labelled, cfg.data):
            check_pseudo_labels(folder, path)
        if len(labelled) == 1:
            self.data = labelled[0]
        else:
            from .data import ConcatFolders

            self.data = ConcatFolders(labelled)
        self.udata = None
        if cfg.unlabelled:
            self.udata = UnlabelledFolder(Path(cfg.unlabelled), units=resolve_units(Path(cfg.unlabelled), options, before),
                                          **shape)
        self.vdata = None
        if cfg.val_data:
            self.vdata = LabelledFolder(Path(cfg.val_data), c, ignore_index=ignore,
                                        units=resolve_units(Path(cfg.val_data), options, before))
        if self.dist is not None:
            from .distributed import check_split

            check_split(len(self.data), cfg.batch_size, self.dist.world, f"--data {' '.join(cfg.data)}")
            if self.udata is not None:
                check_split(len(self.udata), cfg.batch_size, self.dist.world, f"--unlabelled {cfg.unlabelled}")

    def schedule(self) -> None:
        """Steps, epochs and seed 004's ramps, scaled to this run's length."""
        cfg = self.cfg
        self.spe = spe = math.ceil(len(self.data) / cfg.batch_size)
        self.epochs = cfg.epochs if cfg.epochs is not None else math.ceil((cfg.max_steps or spe) / spe)
        self.total = cfg.max_steps if cfg.max_steps is not None else self.epochs * spe
        self.t_alpha = scaled_epochs(cfg.alpha_rampup, self.epochs, cfg.timeline)
        # Where the source's alpha ramp ended; read before any resume, so a resumed run ramps the same way.
        self.alpha0 = 0.0 if cfg.restart_ramps else float(self.src.get(ALPHA_KEY))
        self.t_unsup = scaled_epochs(cfg.unsup_rampup, self.epochs, cfg.timeline)
        self.t_warm = scaled_epochs(cfg.warmup, self.epochs, cfg.timeline)

    def build_optimizers(self) -> None:
        cfg = self.cfg
        self.opts = build_optimizers(self.model, self.lr, cfg.momentum, cfg.weight_decay, router_lr_mult=cfg.router_lr_mult,
                                     fused=self.dist is None)
        if self.dist is None:  # FSDP manages its own gradient memory
            from .optim import KeptGrads

            self.opts.kept = KeptGrads(list(self.model.parameters()))
            if not cfg.compile:  # eager: the expert GEMMs write into those buffers (compiled code keeps the op)
                from .expert_grads import keep_expert_grads

                keep_expert_grads(self.model)

    def resume(self, resuming: bool) -> None:
        """When resuming, restore model, optimizers and loader positions from the latest step checkpoint."""
        self.checkpointer = Checkpointer(self.run_dir, self.cfg.keep, self.dist, run=self.run)
        self.latest = self.checkpointer.latest() if resuming else None
        if self.latest is not None:
            ts = self.checkpointer.load(self.latest, self.model, self.opts)
            self.step, self.loader_state, self.uloader_state = ts["step"], ts["loader"], ts["uloader"]
        self.best = self._best_so_far() if resuming else None
        if self.dist is not None:
            self.dist.barrier()

    def _best_so_far(self) -> tuple[int, float] | None:
        """(step, val mIoU) of RUN/best when it was validated at or before the step resumed from (later steps run again)."""
        with (Dir.open(self.run_dir, _RUN_FIX, follow=False) if self.run is None else nullcontext(self.run.dir)) as root:
            if root.kind("best") != "dir":
                return None
            with root.sub("best") as folder:
                if folder.kind("samoe.json") is None:
                    return None
                validation = Checkpoint.open(self.run_dir / "best", folder).meta.get("validation")
        if not isinstance(validation, dict) or type(validation.get("step")) is not int \
                or not isinstance(validation.get("val_miou"), float) or validation["step"] > self.step:
            return None
        return validation["step"], validation["val_miou"]

    def store_banks_low(self) -> None:
        """bf16 in one process: expert banks stored in bf16, fp32 masters in the optimizer (stages/master.py).
        After resume, which loads fp32 values into the fp32 parameters."""
        if self.dist is None and self.cfg.precision == "bf16":
            from .master import BankMasters, expert_bank_params

            self.opts.masters = BankMasters(expert_bank_params(self.model))

    def open_loaders(self) -> None:
        cfg = self.cfg
        rank, world = (self.dist.rank, self.dist.world) if self.dist is not None else (0, 1)
        pin = self.device.type == "cuda"
        self.loader = StreamingLoader(self.data, cfg.batch_size, cfg.seed, cfg.workers, **self.loader_state, rank=rank,
                                      world=world, pin_memory=pin)
        self.uloader = (StreamingLoader(self.udata, cfg.batch_size, cfg.seed + 1, cfg.workers, **self.uloader_state,
                                        rank=rank, world=world, pin_memory=pin) if self.udata is not None else None)

    def open_logs(self) -> None:
        """Rank 0's CSV logs (cut back to the resumed step) and TensorBoard writer."""
        if not self.main:
            return
        run, ls = self.run, self.loader_state
        fields = METRIC_FIELDS + tuple(self.model.routing_keys()) + (("val_miou",) if self.vdata is not None else ())
        fields = _truncate_csv(run, "metrics.csv", "step", self.step, fields)
        _truncate_csv(run, "selector_log.csv", "epoch", ls["epoch"] + (1 if ls["pos"] >= self.spe else 0))
        self.metrics_log = CsvLog(run, "metrics.csv", fields)
        self.selector_log = CsvLog(run, "selector_log.csv", SELECTOR_FIELDS)
        self.tb = _tensorboard(run)

    def announce(self, on_start: Callable[[dict[str, Any]], None] | None) -> None:
        """Build the step checkpoints' metadata and tell the caller what this run will do."""
        src = self.src
        self.meta = build_meta(self.model_cfg, src.provenance, src.lineage, src.stages, _dtype(self.model), **_carry(src.meta),
                               data=self.spec.to_record())
        if not on_start:
            return
        params = {r: 0 for r in ("selector", "encoder", "decoder", "gating", "loss")}
        for name, p in self.model.named_parameters():
            role = param_role(name)
            if role not in SEED004_ROLES:
                role = "decoder" if in_decoder(name) else "encoder"
            params[role] += p.numel()
        params["loss"] = sum(p.numel() for p in self.opts.loss.parameters())
        params["total"] = sum(params.values())
        on_start({"stage": self.plan, "lr": self.lr, "counts": self.counts, "lrs": component_lrs(self.model, self.opts),
                  "params": params, "total_steps": self.total,
                  "start_step": self.step, "epochs": self.epochs, "steps_per_epoch": self.spe,
                  "resumed_from": str(self.latest) if self.latest else None, "units": self.spec.units.describe(),
                  "classes": list(self.spec.classes.names) if self.spec.classes else None,
                  "scenes": "resized to the model's size" if self.cfg.resize else f"random {self.model_cfg.img_size} px windows",
                  "validation": (f"{self.cfg.val_data} every {self.cfg.val_every} steps" if self.cfg.val_every else
                                 f"{self.cfg.val_data} each epoch") if self.vdata is not None else None})

    def loop(self, on_step: Callable[[dict[str, Any]], None] | None, on_log: Callable[[dict[str, Any]], None] | None) -> None:
        """Train to the last step; a signal saves a step checkpoint and raises Interrupted. Closes the logs."""
        stop: list[int] = []
        handlers = {s: signal.signal(s, lambda signum, frame: stop.append(signum)) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            self.model.train()
            while self.step < self.total:
                t0 = time.perf_counter()
                row = self.train_one_step()
                self.validate(row)
                self.log_step(row, on_log)
                if on_step:
                    on_step(dict(row, images_per_s=self.loader.global_size / max(time.perf_counter() - t0, 1e-9),
                                 total=self.total))
                self.checkpoint_or_stop(stop)
        finally:
            for s, h in handlers.items():
                signal.signal(s, h)
            if self.metrics_log is not None:
                self.metrics_log.close()
                self.selector_log.close()
            if self.tb is not None:
                self.tb.close()

    def train_one_step(self) -> dict[str, Any]:
        """Set the ramps and learning rate of this step, run it, and return its metrics row."""
        cfg, model, dist, loader = self.cfg, self.model, self.dist, self.loader
        epoch = loader.epoch if loader.pos < loader.steps_per_epoch else loader.epoch + 1
        alpha = continue_rampup(self.alpha0, epoch, self.t_alpha)
        unsup_w = cfg.unsup_weight * sigmoid_rampup(epoch, self.t_unsup)
        model.selector.set_alpha(alpha)
        factor = lr_factor(self.step, self.spe, self.total, self.t_warm)
        apply_lr(self.opts, factor)
        batch = loader.next()
        if cfg.augment:  # drawn from (seed, step): a resumed run augments exactly as an uninterrupted one
            from .augment import augment_batch

            batch = augment_batch(batch, torch.Generator().manual_seed(cfg.seed * 1_000_003 + self.step + 1))
        batch = to_device(batch, self.device)
        ubatch = to_device(self.uloader.next(), self.device) if self.uloader is not None else None
        m = train_step(model, self.opts, batch, ubatch, unsup_w, cfg.aux_loss_coef, cfg.skip_nonfinite, self.step, dist,
                       cfg.handover_coef, self.amp, self.task_stats)
        self.step += 1
        if self.main and not self.started:  # the run has really started: from now on it resumes
            self.run.record("run.json")
            self.run.dir.write_bytes("run.json", (json.dumps({"identity": self.identity, "source_digest": self.src.digest,
                                                              "command": cfg.command}, indent=1) + "\n").encode(), self.run.token)
            self.started = True
        sig = self.opts.loss.log_vars.detach()
        row = dict(m, step=self.step, epoch=epoch, lr=self.lr * factor, alpha=alpha, unsup_weight=unsup_w,
                   sigma_seg=float(sig[0]), sigma_sdf=float(sig[1]), sigma_boundary=float(sig[2]),
                   **model.routing_stats())
        self.last_metrics = row
        return row

    def log_step(self, row: dict[str, Any], on_log: Callable[[dict[str, Any]], None] | None) -> None:
        """Metrics CSV and TensorBoard every step; the selector log every `log_every` epochs and at the end."""
        step = self.step
        if self.metrics_log is not None:
            self.metrics_log.write(row)
        if self.tb is not None:
            for k in METRIC_FIELDS[2:]:
                self.tb.add_scalar(f"train/{k}", row[k], step)
            if "val_miou" in row:
                self.tb.add_scalar("val/miou", row["val_miou"], step)
            for k, v in row.items():  # new capacity engaging: new_share:<layer>, group_scale:<layer>:<g>
                if k.startswith(("new_share:", "group_scale:")):
                    self.tb.add_scalar("routing/" + k.replace(":", "/"), v, step)
        epoch = row["epoch"]
        epoch_end = self.loader.pos >= self.loader.steps_per_epoch
        if epoch_end and ((epoch + 1) % self.cfg.log_every == 0 or step >= self.total):
            stats = self.model.selector.get_weight_stats() if self.dist is None else self.dist.selector_stats(self.model)
            srow = {"epoch": epoch + 1, "alpha": row["alpha"], "unsup_weight": row["unsup_weight"],
                    "selector_mean": stats["mean"], "selector_std": stats["std"]}
            if self.selector_log is not None:
                self.selector_log.write(srow)
            if on_log:
                on_log(srow)

    def checkpoint_or_stop(self, stop: list[int]) -> None:
        """Save every `checkpoint_every` steps; when a process was signalled, all save and stop at this step."""
        trainer_state = {"step": self.step, "loader": self.loader.state(),
                         "uloader": self.uloader.state() if self.uloader else {"epoch": 0, "pos": 0},
                         "config": asdict(self.cfg)}
        # processes are signalled at different moments: all stop at the first step where one was
        stopping = self.dist.any(bool(stop)) if self.dist is not None else bool(stop)
        if stopping:
            with self.opts.full_precision():
                path = self.checkpointer.save(self.step, self.model, self.meta, self.opts, trainer_state)
            raise Interrupted(stop[0] if stop else signal.SIGTERM, path)
        if self.step % self.cfg.checkpoint_every == 0 and self.step < self.total:
            with self.opts.full_precision():
                self.checkpointer.save(self.step, self.model, self.meta, self.opts, trainer_state)

    def validate(self, row: dict[str, Any]) -> None:
        """Every `val_every` steps (default: at each epoch's end) and at the last step: val mIoU into `row`, and
        RUN/best replaced when it is the best so far. Runs in every process (the forward is collective)."""
        if self.vdata is None:
            return
        cfg, step = self.cfg, self.step
        due = step % cfg.val_every == 0 if cfg.val_every else self.loader.pos >= self.loader.steps_per_epoch
        if not (due or step >= self.total):
            return
        from .evaluate import run_model

        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):  # validation must not move the training's random streams
            stats, _ = run_model(self.model, self.vdata, cfg.batch_size, precision=cfg.precision if self.dist is None else "fp32",
                                 resize=cfg.resize, routing_stats=False)
        self.model.train()
        miou = stats.metrics()["miou"]
        if self.dist is not None:
            miou = self.dist.broadcast(miou)  # rank 0's number decides for every process
        row["val_miou"] = miou
        if math.isfinite(miou) and (self.best is None or miou > self.best[1]):
            self.best = (step, miou)
            self.save(self.run_dir / "best", {"step": step, "val_miou": miou, "val_data": cfg.val_data})
            row["best"] = True

    def _history(self) -> list[dict[str, Any]]:
        """The source's stage history plus this stage up to the current step."""
        cfg = self.cfg
        entry = {
            "stage": cfg.stage, "name": self.plan.name, "steps": self.step, "epochs": self.epochs, "lr": self.lr,
            "reference_lr": self.reference_lr,
            "batch_size": cfg.batch_size, "data": cfg.data, "unlabelled": cfg.unlabelled,
            "last_k": cfg.last_k if cfg.stage == 2 else None,
            "trainable_params": sum(c[0] for c in self.counts.values()), "final_loss": self.last_metrics.get("loss"),
        }
        if self.vdata is not None:
            entry.update(val_data=cfg.val_data, best=self.best and {"step": self.best[0], "val_miou": self.best[1]})
        return list(self.src.stages) + [entry]

    def save(self, path: Path, validation: dict[str, Any] | None = None) -> Path:
        """The model as a plain checkpoint (RUN/final, RUN/best): this stage in its history; the gathered weights
        under torchrun (rank 0 writes, recording the folder in the run's manifest first)."""
        cfg, src, model = self.cfg, self.src, self.model
        extra = {"validation": validation} if validation is not None else {}
        meta = build_meta(self.model_cfg, src.provenance, src.lineage + [lineage_entry(cfg.command, cfg.seed, src, cfg.recipe())],
                          self._history(), _dtype(model), **_carry(src.meta), data=self.spec.to_record(), **extra)
        if self.main:
            self.run.record(path.name, kind="owned")
        if self.dist is None:
            with self.opts.full_precision():
                return save_model(model, path, meta, force=True, parent=self.run.dir)
        state = self.dist.full_state_dict(model)  # collective: rank 0 gets every tensor on CPU
        if self.main:
            save_model(_StateView(state), path, meta, force=True, parent=self.run.dir)
        self.dist.barrier()
        return path

    def finish(self) -> Path:
        """Write RUN/final with this stage added to the history and the selector's alpha at its end-of-run value."""
        self.model.selector.set_alpha(continue_rampup(self.alpha0, self.epochs, self.t_alpha))
        return self.save(self.run_dir / "final")


class _StateView:
    """A gathered state dict where save_model expects a module."""

    def __init__(self, state: dict[str, torch.Tensor]) -> None:
        self._state = state

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self._state


def _dtype(model: torch.nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype


def _carry(meta: dict[str, Any]) -> dict[str, Any]:
    """Metadata that follows a checkpoint through training (growth options, SAM source; the data record is each run's)."""
    return {k: meta[k] for k in ("growth", "sam_source") if k in meta}


def resume_command(command: list[str]) -> str:
    return " ".join(shlex.quote(c) for c in command if c != "--force")
