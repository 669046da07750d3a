"""Save and resume training state; the only code that writes a run's checkpoints.

RUN/checkpoints/step-N/ of a single-process run:
    model/                  a samoe checkpoint directory (safetensors + samoe.json)
    optimizer.safetensors   every optimizer's state tensors, keyed by parameter name
    trainer_state.json      step, epoch, data positions, RNG states, optimizer hyper-parameters,
                            the task-loss weights (`task_loss`: the objective's, not the model's)
RUN/checkpoints/step-N/ of a distributed (FSDP) run:
    dcp/                    torch.distributed.checkpoint, sharded: `model.<name>` and
                            `optim.<optimizerK>.<param name>.<key>`, resharded on load
    trainer_state.json      the same, plus "format": "dcp" and "world_size"
RUN/checkpoints/latest      the name of the newest complete step directory

Either kind resumes either kind of run: one process reads a DCP step without a
process group, and N processes read a safetensors step, each keeping its shard.

A step directory is written under a temporary name and renamed into place, and
`latest` is replaced atomically after that, so a kill at any moment leaves the
previous checkpoint usable. Leftover temporaries of dead processes are removed
by the next run.
"""

from __future__ import annotations

import base64
import json
import math
import os
import random
import re
import shutil
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from upscale.checkpoint import _fsync_path, atomic_write_text, clean_stale_temporaries, save_model
from upscale.safe_io import load_json, read_bounded
from upscale.errors import SamoeError

from .optim import Optimizers

if TYPE_CHECKING:
    from .distributed import Distributed


def rng_state() -> dict[str, Any]:
    return {
        "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(),
        "numpy": _jsonable(np.random.get_state()),
        "python": _jsonable(random.getstate()),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the three generators; a damaged state is a bad input (exit 2), and nothing is set unless all three are valid."""
    saved = (torch.get_rng_state(), np.random.get_state(), random.getstate())
    try:
        kind, keys, pos, has_gauss, cached = state["numpy"]
        version, internal, gauss = state["python"]
        torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["torch"], validate=True)), dtype=torch.uint8))
        np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
        random.setstate((version, tuple(internal), gauss))
    except (KeyError, TypeError, ValueError, RuntimeError, OverflowError) as e:  # binascii.Error is a ValueError
        torch.set_rng_state(saved[0])
        np.random.set_state(saved[1])
        random.setstate(saved[2])
        raise SamoeError(f"the RNG state in trainer_state.json is damaged ({type(e).__name__}): "
                         "pass --force to start over or use a new --run-dir") from None


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, (tuple, list)):
        return [_jsonable(o) for o in obj]
    return obj


def optimizer_state(opts: Optimizers, names: dict[int, str]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Optimizer states as `{optimizerK.<param name>.<key>: tensor}` (as held, maybe sharded) plus JSON hyper-parameters."""
    tensors: dict[str, torch.Tensor] = {}
    hyper: dict[str, Any] = {}
    for oname, opt in opts.named().items():
        for p, state in opt.state.items():
            for key, value in state.items():
                if torch.is_tensor(value):
                    tensors[f"{oname}.{names[id(p)]}.{key}"] = value
        hyper[oname] = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    return tensors, hyper


def optimizer_tensors(opts: Optimizers, names: dict[int, str]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Flatten optimizer states to `{optimizerK.<param name>.<key>: tensor}` (CPU) plus JSON hyper-parameters."""
    tensors, hyper = optimizer_state(opts, names)
    return {k: v.detach().cpu().contiguous() for k, v in tensors.items()}, hyper


def model_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and buffers by name (the checkpoint's tensors)."""
    out = dict(model.named_parameters())
    out.update(model.named_buffers())
    return out


# Settings that choose how an optimizer steps (kernels), not its state: this run's choice stands
# (a one-process run fuses SGD, an FSDP run cannot, and either resumes the other's checkpoint).
_HOW_TO_STEP = ("foreach", "fused", "capturable", "differentiable")


def load_optimizer_tensors(opts: Optimizers, params: dict[str, torch.nn.Parameter], tensors: dict[str, torch.Tensor],
                           hyper: dict[str, Any], place: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None) -> None:
    """Install saved states; `place(value, param)` puts a value where the parameter lives (default: its device)."""
    for oname, opt in opts.named().items():
        groups = hyper.get(oname) if isinstance(hyper, dict) else None
        if not isinstance(groups, list) or len(groups) != len(opt.param_groups):
            raise SamoeError(f"trainer_state.json has no settings for {oname}'s {len(opt.param_groups)} parameter groups: "
                             "the run directory is damaged or from another model; use a new --run-dir or --force")
        for group, saved in zip(opt.param_groups, groups):
            saved = {k: v for k, v in saved.items() if k not in _HOW_TO_STEP}
            _check_group(oname, group, saved)
            group.update({k: tuple(v) if isinstance(group[k], tuple) else v for k, v in saved.items()})
        prefix = oname + "."
        for key, value in tensors.items():
            if not key.startswith(prefix):
                continue
            pname, _, skey = key[len(prefix):].rpartition(".")
            if pname not in params:
                raise SamoeError(f"optimizer state names parameter {pname} that the model lacks: the run directory belongs to another model; use a new --run-dir")
            p = params[pname]
            if tuple(value.shape) not in (tuple(p.shape), ()) or not (value.is_floating_point() or value.dim() == 0):
                raise SamoeError(f"optimizer state {key} has shape {list(value.shape)} for a parameter of shape {list(p.shape)}: "
                                 "the run directory is damaged or from another model; use a new --run-dir or --force")
            opt.state[p][skey] = place(value, p) if place is not None else value.to(p.device)


def _same_kind(new: Any, old: Any) -> bool:
    if isinstance(old, bool) or old is None:
        return type(new) is type(old) or old is None and new is None
    if isinstance(old, (int, float)):
        return type(new) in (int, float) and math.isfinite(new)
    if isinstance(old, (tuple, list)):
        return isinstance(new, list) and len(new) == len(old) and all(_same_kind(a, b) for a, b in zip(new, old))
    return type(new) is type(old)


def _check_group(oname: str, group: dict[str, Any], saved: dict[str, Any]) -> None:
    """Saved hyper-parameters name only settings this optimizer has, each of the same kind (number, flag, name)."""
    for key, value in saved.items():
        if key == "params" or key not in group or not _same_kind(value, group[key]):
            raise SamoeError(f"trainer_state.json sets {oname} {key}={str(value)[:40]}, which this optimizer does not take: "
                             "the run directory is damaged; pass --force to start over or use a new --run-dir")


_RUN_FIX = "the run directory is damaged; pass --force to start over or use a new --run-dir"


def read_run_file(path: Path) -> dict[str, Any]:
    """A JSON table from a run directory (run.json, trainer_state.json), read as hostile input."""
    data = load_json(path, f"{path.name} is damaged; pass --force to start over or use a new --run-dir")
    if not isinstance(data, dict):
        raise SamoeError(f"{path} is not a table: {_RUN_FIX}")
    return data


def read_run_json(path: Path) -> dict[str, Any]:
    """run.json: the identity of the run (a table of options) and the digest of its --from."""
    data = read_run_file(path)
    if not isinstance(data.get("identity"), dict) or not isinstance(data.get("source_digest"), str):
        raise SamoeError(f"{path} is damaged (identity or source_digest missing): {_RUN_FIX}")
    return data


def _loader_state(v: Any) -> bool:
    return isinstance(v, dict) and set(v) == {"epoch", "pos"} and all(type(v[k]) is int and 0 <= v[k] < 2**31 for k in v)


def read_trainer_state(step_dir: Path) -> dict[str, Any]:
    """trainer_state.json with the types resume relies on checked up front."""
    path = step_dir / "trainer_state.json"
    state = read_run_file(path)
    rng = state.get("rng")
    ok = (type(state.get("step")) is int and state["step"] >= 0 and _loader_state(state.get("loader"))
          and _loader_state(state.get("uloader")) and isinstance(state.get("optimizers"), dict)
          and all(isinstance(g, list) and all(isinstance(x, dict) for x in g) for g in state["optimizers"].values())
          and isinstance(rng, dict) and isinstance(rng.get("torch"), str) and isinstance(rng.get("numpy"), list)
          and isinstance(rng.get("python"), list))
    if not ok:
        raise SamoeError(f"{path} is damaged (step, loader, optimizers or rng missing or of the wrong type): {_RUN_FIX}")
    return state


def read_optimizer_file(step_dir: Path) -> dict[str, torch.Tensor]:
    """optimizer.safetensors after a strict header check (offsets, dtypes, sizes inside the file)."""
    from upscale.checkpoint import read_header

    path = step_dir / "optimizer.safetensors"
    if path.is_symlink() or not path.is_file():
        raise SamoeError(f"{path} is missing or not a regular file: {_RUN_FIX}")
    try:
        read_header(path)
        return load_file(str(path))
    except SamoeError as e:
        raise SamoeError(f"{e}; {_RUN_FIX}") from None
    except Exception as e:  # safetensors' own reader: SafetensorError and friends
        raise SamoeError(f"{path} is damaged ({type(e).__name__}): {_RUN_FIX}") from None


def _task_loss(opts: Optimizers) -> list[float]:
    """The task-loss weights as JSON numbers (float32 values, exact as float64)."""
    return [float(v) for v in opts.loss.log_vars.detach().cpu()]


def _load_task_loss(opts: Optimizers, state: dict[str, Any], step_dir: Path) -> None:
    values = state.get("task_loss")
    weights = opts.loss.log_vars
    if not (isinstance(values, list) and len(values) == weights.numel()
            and all(type(v) in (int, float) and math.isfinite(v) for v in values)):
        raise SamoeError(f"{step_dir / 'trainer_state.json'} has no valid task_loss weights (a damaged step, or one written "
                         f"before they were training state): {_RUN_FIX}")
    with torch.no_grad():
        weights.copy_(torch.tensor(values, dtype=weights.dtype))


class Checkpointer:
    """Owns RUN/checkpoints: save a step, find the latest, resume, prune to `keep`."""

    def __init__(self, run_dir: Path, keep: int = 2, dist: "Distributed | None" = None) -> None:
        self.dir = run_dir / "checkpoints"
        self.keep = max(1, keep)
        self.dist = dist
        # temporaries are named after the process that renames them (rank 0)
        self.owner = dist.broadcast(os.getpid()) if dist is not None else os.getpid()

    def latest(self) -> Path | None:
        pointer = self.dir / "latest"
        if not pointer.exists() and not pointer.is_symlink():
            return None
        fix = "delete the run directory's checkpoints/latest or use a new --run-dir (or --force to start over)"
        name = read_bounded(pointer, 256, fix).decode("utf-8", "replace").strip()
        if re.fullmatch(r"step-\d{1,12}", name) is None:
            raise SamoeError(f"{pointer} does not name a step directory (step-N): {fix}")
        step_dir = self.dir / name
        if step_dir.is_symlink() or not step_dir.is_dir():
            raise SamoeError(f"{pointer} points to {name}, which is not a directory of this run: {fix}")
        if not (step_dir / "trainer_state.json").exists():
            raise SamoeError(f"{pointer} points to {step_dir.name}, which is incomplete: remove the run directory or pass --force to start over")
        return step_dir

    def save(self, step: int, model: torch.nn.Module, meta: dict[str, Any], opts: Optimizers,
             trainer_state: dict[str, Any]) -> Path:
        if self.dist is not None:
            return self._save_sharded(step, model, opts, trainer_state)
        self.dir.mkdir(parents=True, exist_ok=True)
        final = self.dir / f"step-{step}"
        clean_stale_temporaries(final)
        tmp = self.dir / f".step-{step}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            save_model(model, tmp / "model", meta)
            names = {id(p): n for n, p in opts.named_parameters(model).items()}
            tensors, hyper = optimizer_tensors(opts, names)
            save_file(tensors, str(tmp / "optimizer.safetensors"))
            _fsync_path(tmp / "optimizer.safetensors")
            self._complete(tmp, final, dict(trainer_state, optimizers=hyper, rng=rng_state(), task_loss=_task_loss(opts)))
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return final

    def _complete(self, tmp: Path, final: Path, state: dict[str, Any]) -> None:
        """Write trainer_state.json, rename the step directory into place, move `latest`, prune."""
        atomic_write_text(tmp / "trainer_state.json", json.dumps(state, indent=1) + "\n")
        _fsync_path(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        atomic_write_text(self.dir / "latest", final.name + "\n")
        self._prune()

    def _save_sharded(self, step: int, model: torch.nn.Module, opts: Optimizers, trainer_state: dict[str, Any]) -> Path:
        """Every rank writes its shards with DCP into a temporary directory; rank 0 completes and renames it."""
        import torch.distributed.checkpoint as dcp

        d = self.dist
        final = self.dir / f"step-{step}"
        tmp = self.dir / f".step-{step}.tmp-{self.owner}"
        if d.is_main:
            self.dir.mkdir(parents=True, exist_ok=True)
            clean_stale_temporaries(final)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        d.barrier()
        names = {id(p): n for n, p in opts.named_parameters(model).items()}
        tensors, hyper = optimizer_state(opts, names)
        dcp.save({"model": model_tensors(model), "optim": tensors}, checkpoint_id=str(tmp / "dcp"))
        d.barrier()
        if d.is_main:
            try:
                self._complete(tmp, final, dict(trainer_state, optimizers=hyper, rng=rng_state(), task_loss=_task_loss(opts),
                                                format="dcp", world_size=d.world))
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        d.barrier()
        return final

    def _prune(self) -> None:
        steps = sorted((int(p.name.split("-")[1]), p) for p in self.dir.glob("step-*") if p.name.split("-")[1].isdigit())
        for _, path in steps[: -self.keep]:
            shutil.rmtree(path, ignore_errors=True)

    def load(self, step_dir: Path, model: torch.nn.Module, opts: Optimizers) -> dict[str, Any]:
        """Restore model weights, optimizer states and RNG; return the trainer state."""
        from upscale.checkpoint import Checkpoint

        if (step_dir / "dcp").is_dir():
            return self._load_sharded(step_dir, model, opts)
        if self.dist is not None:  # a single-process checkpoint into a sharded model
            self.dist.load_own_rows(model, Checkpoint.open(step_dir / "model"), str(step_dir))
            state = read_trainer_state(step_dir)
            load_optimizer_tensors(opts, opts.named_parameters(model), read_optimizer_file(step_dir),
                                   state["optimizers"], place=self.dist.shard_like)
            _load_task_loss(opts, state, step_dir)
            set_rng_state(state["rng"])
            return state
        ckpt = Checkpoint.open(step_dir / "model")
        with torch.no_grad():
            params = dict(model.named_parameters())
            buffers = dict(model.named_buffers())
            for name, tensor in ckpt.iter_tensors():
                target = params.get(name, buffers.get(name))
                if target is None or target.shape != tensor.shape:
                    raise SamoeError(f"{step_dir} does not match the model being trained ({name}): use a new --run-dir or --force")
                target.copy_(tensor)
        state = read_trainer_state(step_dir)
        load_optimizer_tensors(opts, opts.named_parameters(model), read_optimizer_file(step_dir),
                               state["optimizers"])
        _load_task_loss(opts, state, step_dir)
        set_rng_state(state["rng"])
        return state

    def _load_sharded(self, step_dir: Path, model: torch.nn.Module, opts: Optimizers) -> dict[str, Any]:
        """Read a DCP step into this run, whatever the world size that wrote it (1 = no process group)."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.api import CheckpointException

        from .dcp_safe import SafeFileSystemReader, read_metadata

        path = step_dir / "dcp"
        saved = read_metadata(path).state_dict_metadata  # allow-list unpickler: no code runs from the run directory
        targets = model_tensors(model)
        wrong = [n for n, t in targets.items() if f"model.{n}" not in saved or tuple(getattr(saved[f"model.{n}"], "size", ())) != tuple(t.shape)]
        wrong += [k[6:] for k in saved if k.startswith("model.") and k[6:] not in targets]
        if wrong:
            raise SamoeError(f"{step_dir} does not match the model being trained ({wrong[0]}): use a new --run-dir or --force")
        params = opts.named_parameters(model)
        optimizers = opts.named()
        optim: dict[str, torch.Tensor] = {}
        for key, info in saved.items():
            if not key.startswith("optim."):
                continue
            oname, _, rest = key[len("optim."):].partition(".")
            pname, _, skey = rest.rpartition(".")
            if oname not in optimizers or pname not in params:
                raise SamoeError(f"optimizer state names parameter {pname} that the model lacks: the run directory belongs to another model; use a new --run-dir")
            p = params[pname]
            if not hasattr(info, "properties") or tuple(info.size) not in (tuple(p.shape), ()):
                # the size is only declared: never allocate what the metadata merely claims
                raise SamoeError(f"{path} declares optimizer state {key} of size {list(getattr(info, 'size', []))} for a parameter "
                                 f"of shape {list(p.shape)}: the step is damaged or from another model; use a new --run-dir")
            dtype = info.properties.dtype
            optim[f"{oname}.{pname}.{skey}"] = (torch.zeros_like(p, dtype=dtype, requires_grad=False)
                                                if tuple(info.size) == tuple(p.shape) else torch.zeros(tuple(info.size), dtype=dtype))
        with torch.no_grad(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")  # one process: intended
            try:
                dcp.load({"model": targets, "optim": optim}, storage_reader=SafeFileSystemReader(str(path)),
                         no_dist=self.dist is None)
            except CheckpointException as e:  # a BaseException: never let it escape as a traceback
                first = next((pair[0] for pair in e.failures.values()), e)
                if isinstance(first, SamoeError):
                    raise first from None
                raise SamoeError(f"{path} could not be read ({type(first).__name__}): the step is damaged; "
                                 "delete it or use a new --run-dir (or --force to start over)") from None
        state = read_trainer_state(step_dir)
        load_optimizer_tensors(opts, params, optim, state["optimizers"], place=lambda value, p: value)
        _load_task_loss(opts, state, step_dir)
        set_rng_state(state["rng"])
        return state
