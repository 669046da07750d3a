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
import json
import math
import shlex
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ContextManager

import torch
from torch.utils.data import DataLoader, Dataset

from upscale.checkpoint import Checkpoint, build_meta, lineage_entry, load_model, save_model
from upscale.device import autocast, check_precision, deterministic, resolve_device, to_device
from upscale.errors import SamoeError
from upscale.ownership import check_replaceable, check_separate, owner, write_marker
from upscale.roles import SEED004_ROLES, in_decoder, param_role

from .checkpointer import Checkpointer, read_run_json
from .optim import Optimizers, apply_lr, build_optimizers, drop_idle_grads, lr_factor
from .plan import STAGES, is_trainable
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


@dataclass
class TrainConfig:
    """Everything that defines a training run (saved in trainer_state.json)."""

    # what to train, on what
    stage: int
    source: str
    run_dir: str
    data: str
    unlabelled: str | None = None
    # how long: --epochs (default: the seed's 200-epoch timeline) or --max-steps
    epochs: int | None = None
    max_steps: int | None = None
    batch_size: int = 4
    seed: int = 0
    # optimizers (stages/optim.py): base lr per stage when None; weight_decay = 5 * 10**wd
    lr: float | None = None
    momentum: float = 0.9
    wd: float = -5.0
    router_lr_mult: float = 10.0
    last_k: int = 4  # stage 2 unfreezes the FFN/MoE of the last K ViT blocks
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
    skip_nonfinite: bool = False
    # hardware: not part of the run's identity
    workers: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N (upscale/device.py)
    precision: str = "fp32"  # fp32 | bf16: autocast on one device, FSDP2 mixed precision under torchrun
    compile: bool = False  # torch.compile each block in place (upscale/compile.py); resume is exact within a mode
    command: list[str] = field(default_factory=list)

    def identity(self) -> dict[str, Any]:
        """The options a resumed run must share with the original one."""
        keep = ("stage", "data", "unlabelled", "epochs", "max_steps", "batch_size", "lr", "last_k", "seed", "momentum",
                "wd", "unsup_weight", "alpha_rampup", "unsup_rampup", "warmup", "timeline", "aux_loss_coef", "router_lr_mult", "selector_gating",
                "handover_coef", "restart_ramps")
        ident = {k: getattr(self, k) for k in keep}
        return {**ident, "data_fingerprint": data_fingerprint(self.data, self.unlabelled)}


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


class Interrupted(Exception):
    """Raised after a checkpoint was saved because SIGINT/SIGTERM arrived."""

    def __init__(self, signum: int, step_dir: Path) -> None:
        super().__init__(signum)
        self.signum, self.step_dir = signum, step_dir


def check_stage_input(ckpt: Checkpoint, stage: int) -> None:
    """Refuse an input that does not fit the stage (the CLI's --force skips this).

    Only stages trained since the latest growth count: a source's own training
    history is carried into the grown checkpoint but says nothing about it.
    """
    since = ckpt.meta.get("growth", {}).get("stages_before", 0)
    done = [s.get("stage") for s in ckpt.stages[since:]]
    if stage == 1 and "growth" not in ckpt.meta:
        raise SamoeError(f"{ckpt.path} was never grown (no growth provenance): stage 1 trains the parts `samoe expand` adds; expand it first or pass --force")
    if stage == 2 and 1 not in done:
        raise SamoeError(f"{ckpt.path} has no stage 1 in its history: run `samoe train --stage 1` first or pass --force")
    if stage == 3 and 2 not in done:
        raise SamoeError(f"{ckpt.path} has no stage 2 in its history: run `samoe train --stage 2` first or pass --force")


def open_labelled(path: Path, num_classes: int, size: int) -> Dataset:
    from .data import LabelledFolder, PseudoLabelFolder

    if (path / "confidence").is_dir():
        return PseudoLabelFolder(path, num_classes, size=size)
    return LabelledFolder(path, num_classes, size=size)


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


def _truncate_csv(path: Path, key: str, last: float) -> None:
    """Drop rows written after the checkpoint we resume from (they will be written again)."""
    if not path.exists() and not path.is_symlink():
        return
    fix = "the run directory is damaged; pass --force to start over or use a new --run-dir"
    if path.is_symlink() or not path.is_file():
        raise SamoeError(f"{path} is not a regular file of the run (a link or a folder): samoe never writes through it; {fix}")
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
            fields = rows[0].keys() if rows else None
        if fields is None:
            return
        kept = [r for r in rows if float(r[key]) <= last]
    except (ValueError, KeyError, TypeError, csv.Error) as e:  # UnicodeDecodeError is a ValueError
        raise SamoeError(f"{path} is damaged ({type(e).__name__}): {fix}") from None
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(fields))
        w.writeheader()
        w.writerows(kept)


class CsvLog:
    def __init__(self, path: Path, fields: tuple[str, ...]) -> None:
        self.path, self.fields = path, fields
        new = not path.exists() or path.stat().st_size == 0
        self.f = open(path, "a", newline="")
        self.w = csv.DictWriter(self.f, fieldnames=list(fields))
        if new:
            self.w.writeheader()
            self.f.flush()

    def write(self, row: dict[str, Any]) -> None:
        self.w.writerow({k: (f"{row[k]:.8g}" if isinstance(row[k], float) else row[k]) for k in self.fields})
        self.f.flush()

    def close(self) -> None:
        self.f.close()


def _tensorboard(run_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is a dependency; keep training if an install lacks it
        return None
    return SummaryWriter(str(run_dir / "tb"))


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
    raise SamoeError(f"non-finite loss at step {step + 1}: the last checkpoint is intact; lower --lr, or pass --skip-nonfinite to skip such steps")


def run(cfg: TrainConfig, force: bool = False, on_start: Callable[[dict[str, Any]], None] | None = None,
        on_step: Callable[[dict[str, Any]], None] | None = None, on_log: Callable[[dict[str, Any]], None] | None = None) -> Path:
    """Run (or resume) one stage; return RUN/final. Under torchrun (WORLD_SIZE > 1) this is one process of a sharded run."""
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
            result = _run(cfg, force, on_start, on_step, on_log, dist, device)
        finished = True
        return result
    finally:
        if dist is not None:
            dist.close(finished)


def _prepare_run_dir(cfg: TrainConfig, force: bool, identity: dict[str, Any]) -> bool:
    """Check (and with --force, empty) the run directory; True when it holds this run to resume. Rank 0 only."""
    import shutil

    run_dir = Path(cfg.run_dir)
    state_file = run_dir / "run.json"
    # --force deletes the run dir: never when it holds (or lies inside) this run's own inputs
    check_separate(run_dir, "--run-dir", {"--from": cfg.source, "--data": cfg.data, "--unlabelled": cfg.unlabelled})
    # run.json is written after the first step: a marked run dir without it is a run that never started
    never_started = not state_file.exists() and owner(run_dir) == "train"
    if (force or never_started) and run_dir.exists():
        check_replaceable(run_dir, True, "--run-dir")
        shutil.rmtree(run_dir)
    if state_file.exists():
        saved = read_run_json(state_file)
        options = {k: v for k, v in identity.items() if k != "data_fingerprint"}
        if {k: v for k, v in saved["identity"].items() if k != "data_fingerprint"} != options or saved["source_digest"] != Checkpoint.open(cfg.source).digest:
            raise SamoeError(f"{run_dir} holds a run with other options or another --from: re-run the original command, use a new --run-dir, or pass --force to start over")
        if saved["identity"].get("data_fingerprint") != identity["data_fingerprint"]:
            raise SamoeError(f"the files in --data/--unlabelled changed since {run_dir} started (names, sizes or times differ): "
                             "restore them, use a new --run-dir, or pass --force to start over")
        if (run_dir / "final" / "samoe.json").exists():
            raise SamoeError(f"{run_dir} already finished: its result is {run_dir / 'final'}; use a new --run-dir or --force to train again")
        return True
    if run_dir.exists() and any(run_dir.iterdir()):
        raise SamoeError(f"{run_dir} exists and is not a samoe run directory: choose a new --run-dir")
    return False


def _run(cfg: TrainConfig, force: bool, on_start: Callable[[dict[str, Any]], None] | None,
         on_step: Callable[[dict[str, Any]], None] | None, on_log: Callable[[dict[str, Any]], None] | None,
         dist: "Distributed | None", device: torch.device) -> Path:
    """One stage as a sequence of named steps; their order is part of the bit-exact resume contract."""
    trainer = _Trainer(cfg, dist, device)
    resuming = trainer.prepare_run_dir(force)
    trainer.build_model(force)
    trainer.open_data()
    trainer.schedule()
    trainer.build_optimizers()
    trainer.resume(resuming)
    trainer.store_banks_low()
    trainer.open_loaders()
    trainer.open_logs()
    trainer.announce(on_start)
    trainer.loop(on_step, on_log)
    return trainer.finish()


class _Trainer:
    """The state of one stage run, filled in by `_run`'s steps in order (rank 0 alone owns the logs)."""

    def __init__(self, cfg: TrainConfig, dist: "Distributed | None", device: torch.device) -> None:
        self.cfg, self.dist, self.device = cfg, dist, device
        self.main = dist is None or dist.is_main
        self.run_dir = Path(cfg.run_dir)
        self.state_file = self.run_dir / "run.json"
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
                resuming = _prepare_run_dir(self.cfg, force, self.identity)
            except SamoeError as e:
                if self.dist is None:
                    raise
                error = str(e)
        if self.dist is not None:
            error, resuming = self.dist.broadcast((error, resuming))
            if error is not None:
                raise SamoeError(error)
        return resuming

    def build_model(self, force: bool) -> None:
        """Load the source with this stage's trainable set; under torchrun each process reads only its shards."""
        cfg, dist = self.cfg, self.dist
        self.src = src = Checkpoint.open(cfg.source)
        if not force:
            check_stage_input(src, cfg.stage)
        if dist is None:
            self.model = load_model(src.path, device=self.device)
            self.counts = apply_stage(self.model, src.provenance, cfg.stage, cfg.last_k, cfg.selector_gating)
        else:  # requires_grad is set before sharding
            self.model, self.counts = dist.build_model(src.path, lambda m: apply_stage(m, src.provenance, cfg.stage, cfg.last_k,
                                                                                        cfg.selector_gating))
        self.model_cfg = self.model.config
        self.task_stats = task_stats
        if cfg.compile:
            from upscale.compile import compile_fn, compile_model

            compile_model(self.model)
            self.task_stats = compile_fn(task_stats)
        # one process: bf16 autocast around the forward; under torchrun FSDP2's policy casts instead
        self.amp = (lambda: autocast(self.device, cfg.precision)) if dist is None and cfg.precision != "fp32" else None
        self.lr = cfg.lr if cfg.lr is not None else self.plan.lr

    def open_data(self) -> None:
        """The labelled (and optional unlabelled) folders, checked against the model and the world size."""
        cfg, model_cfg = self.cfg, self.model_cfg
        self.data = open_labelled(Path(cfg.data), model_cfg.num_classes, model_cfg.img_size)
        check_pseudo_labels(self.data, cfg.data)
        self.udata = None
        if cfg.unlabelled:
            from .data import UnlabelledFolder

            self.udata = UnlabelledFolder(Path(cfg.unlabelled), size=model_cfg.img_size)
        if self.dist is not None:
            from .distributed import check_split

            check_split(len(self.data), cfg.batch_size, self.dist.world, f"--data {cfg.data}")
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
        self.opts = build_optimizers(self.model, self.lr, cfg.momentum, cfg.wd, router_lr_mult=cfg.router_lr_mult,
                                     fused=self.dist is None)
        if self.dist is None:  # FSDP manages its own gradient memory
            from .optim import KeptGrads

            self.opts.kept = KeptGrads(list(self.model.parameters()))

    def resume(self, resuming: bool) -> None:
        """Mark the run directory and, when resuming, restore model, optimizers and loader positions."""
        if self.main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            write_marker(self.run_dir, "train")
        self.checkpointer = Checkpointer(self.run_dir, self.cfg.keep, self.dist)
        self.latest = self.checkpointer.latest() if resuming else None
        if self.latest is not None:
            ts = self.checkpointer.load(self.latest, self.model, self.opts)
            self.step, self.loader_state, self.uloader_state = ts["step"], ts["loader"], ts["uloader"]
        if self.dist is not None:
            self.dist.barrier()

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
        run_dir, ls = self.run_dir, self.loader_state
        _truncate_csv(run_dir / "metrics.csv", "step", self.step)
        _truncate_csv(run_dir / "selector_log.csv", "epoch", ls["epoch"] + (1 if ls["pos"] >= self.spe else 0))
        self.metrics_log = CsvLog(run_dir / "metrics.csv", METRIC_FIELDS + tuple(self.model.routing_keys()))
        self.selector_log = CsvLog(run_dir / "selector_log.csv", SELECTOR_FIELDS)
        self.tb = _tensorboard(run_dir)

    def announce(self, on_start: Callable[[dict[str, Any]], None] | None) -> None:
        """Build the step checkpoints' metadata and tell the caller what this run will do."""
        src = self.src
        self.meta = build_meta(self.model_cfg, src.provenance, src.lineage, src.stages, _dtype(self.model), **_carry(src.meta))
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
                  "resumed_from": str(self.latest) if self.latest else None})

    def loop(self, on_step: Callable[[dict[str, Any]], None] | None, on_log: Callable[[dict[str, Any]], None] | None) -> None:
        """Train to the last step; a signal saves a step checkpoint and raises Interrupted. Closes the logs."""
        stop: list[int] = []
        handlers = {s: signal.signal(s, lambda signum, frame: stop.append(signum)) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            self.model.train()
            while self.step < self.total:
                t0 = time.perf_counter()
                row = self.train_one_step()
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
        batch = to_device(loader.next(), self.device)
        ubatch = to_device(self.uloader.next(), self.device) if self.uloader is not None else None
        m = train_step(model, self.opts, batch, ubatch, unsup_w, cfg.aux_loss_coef, cfg.skip_nonfinite, self.step, dist,
                       cfg.handover_coef, self.amp, self.task_stats)
        self.step += 1
        if self.main and not self.state_file.exists():  # the run has really started: from now on it resumes
            from upscale.checkpoint import atomic_write_text

            atomic_write_text(self.state_file, json.dumps({"identity": self.identity, "source_digest": self.src.digest,
                                                           "command": cfg.command}, indent=1) + "\n")
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

    def finish(self) -> Path:
        """Write RUN/final with this stage added to the history and the selector's alpha at its end-of-run value."""
        cfg, src, model = self.cfg, self.src, self.model
        final_dir = self.run_dir / "final"
        history = list(src.stages) + [{
            "stage": cfg.stage, "name": self.plan.name, "steps": self.step, "epochs": self.epochs, "lr": self.lr,
            "batch_size": cfg.batch_size, "data": cfg.data, "unlabelled": cfg.unlabelled,
            "last_k": cfg.last_k if cfg.stage == 2 else None,
            "trainable_params": sum(c[0] for c in self.counts.values()), "final_loss": self.last_metrics.get("loss"),
        }]
        final_meta = build_meta(self.model_cfg, src.provenance, src.lineage + [lineage_entry(cfg.command, cfg.seed, src)],
                                history, _dtype(model), **_carry(src.meta))
        model.selector.set_alpha(continue_rampup(self.alpha0, self.epochs, self.t_alpha))
        if self.dist is None:
            with self.opts.full_precision():
                return save_model(model, final_dir, final_meta, force=True)
        state = self.dist.full_state_dict(model)  # collective: rank 0 gets every tensor on CPU
        if self.main:
            save_model(_StateView(state), final_dir, final_meta, force=True)
        self.dist.barrier()
        return final_dir


class _StateView:
    """A gathered state dict where save_model expects a module."""

    def __init__(self, state: dict[str, torch.Tensor]) -> None:
        self._state = state

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self._state


def _dtype(model: torch.nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype


def _carry(meta: dict[str, Any]) -> dict[str, Any]:
    """Metadata that follows a checkpoint through training (growth options, SAM source)."""
    return {k: meta[k] for k in ("growth", "sam_source") if k in meta}


def resume_command(command: list[str]) -> str:
    return " ".join(shlex.quote(c) for c in command if c != "--force")
