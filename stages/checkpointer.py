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
previous checkpoint usable. Everything is reached from the run directory's
descriptor without following a link (upscale.dirfd), and recorded in the run's
manifest before it is made (upscale.ownership): temporaries are named with the
run writer's token, so a killed writer's leftovers are removed by the next one.
"""

from __future__ import annotations

import base64
import json
import math
import random
import re
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch

from upscale.checkpoint import read_safetensors, save_model, write_safetensors
from upscale.dirfd import Dir, new_token, temp_name
from upscale.errors import SamoeError
from upscale.ownership import Owned, check_owned, remove_owned_folder, remove_recorded

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


def read_run_file(d: Dir, name: str) -> dict[str, Any]:
    """A JSON table from a run directory (run.json, trainer_state.json), read as hostile input."""
    data = d.read_json(name)
    if not isinstance(data, dict):
        raise SamoeError(f"{d.path / name} is not a table: {_RUN_FIX}")
    return data


def read_run_json(d: Dir) -> dict[str, Any]:
    """run.json of run directory `d`: the identity of the run (a table of options) and the digest of its --from."""
    data = read_run_file(d, "run.json")
    if not isinstance(data.get("identity"), dict) or not isinstance(data.get("source_digest"), str):
        raise SamoeError(f"{d.path / 'run.json'} is damaged (identity or source_digest missing): {_RUN_FIX}")
    return data


def _loader_state(v: Any) -> bool:
    return isinstance(v, dict) and set(v) == {"epoch", "pos"} and all(type(v[k]) is int and 0 <= v[k] < 2**31 for k in v)


def read_trainer_state(step: Dir) -> dict[str, Any]:
    """trainer_state.json with the types resume relies on checked up front."""
    path = step.path / "trainer_state.json"
    state = read_run_file(step, "trainer_state.json")
    rng = state.get("rng")
    ok = (type(state.get("step")) is int and state["step"] >= 0 and _loader_state(state.get("loader"))
          and _loader_state(state.get("uloader")) and isinstance(state.get("optimizers"), dict)
          and all(isinstance(g, list) and all(isinstance(x, dict) for x in g) for g in state["optimizers"].values())
          and isinstance(rng, dict) and isinstance(rng.get("torch"), str) and isinstance(rng.get("numpy"), list)
          and isinstance(rng.get("python"), list))
    if not ok:
        raise SamoeError(f"{path} is damaged (step, loader, optimizers or rng missing or of the wrong type): {_RUN_FIX}")
    return state


def read_optimizer_file(step: Dir) -> dict[str, torch.Tensor]:
    """optimizer.safetensors after a strict header check (offsets, dtypes, sizes inside the file)."""
    if step.kind("optimizer.safetensors") != "file":
        raise SamoeError(f"{step.path / 'optimizer.safetensors'} is missing or not a regular file: {_RUN_FIX}")
    try:
        return read_safetensors(step, "optimizer.safetensors")
    except SamoeError as e:
        raise SamoeError(str(e) if _RUN_FIX in str(e) else f"{e}; {_RUN_FIX}") from None


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
    """Owns RUN/checkpoints: save a step, find the latest, resume, prune to `keep`.

    `run` is the run directory's manifest writer (rank 0's; None on the other ranks and for reading only):
    every step folder, `latest` and `checkpoints/` itself are recorded there before they are made."""

    def __init__(self, run_dir: Path, keep: int = 2, dist: "Distributed | None" = None, run: Owned | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.dir = self.run_dir / "checkpoints"
        self.keep = max(1, keep)
        self.dist = dist
        self.run = run
        # temporaries are named with the token rank 0's manifest recorded (rank 0 renames them)
        token = run.token if run is not None else new_token()
        self.token = dist.broadcast(token) if dist is not None else token
        self._ckdir: Dir | None = None

    def _checkpoints(self, create: bool = False) -> Dir | None:
        """RUN/checkpoints, reached from the run directory without following a link (made when `create`)."""
        if self._ckdir is None:
            root = self.run.dir if self.run is not None else Dir.open(self.run_dir, _RUN_FIX, follow=False)
            if root.kind("checkpoints") is None and not create:
                return None
            if self.run is not None and create:
                self.run.record("checkpoints", kind="dir")
                self._ckdir = root.sub("checkpoints", create=True)
                for name in self._ckdir.names():  # leftovers of a killed writer of this run: its token is recorded
                    if self.run.manifest.is_temporary(name):
                        self._ckdir.remove_tree(name)
            else:
                self._ckdir = root.sub("checkpoints")
        return self._ckdir

    def latest(self) -> Path | None:
        ck = self._checkpoints()
        if ck is None or ck.kind("latest") is None:
            return None
        pointer = self.dir / "latest"
        fix = "delete the run directory's checkpoints/latest or use a new --run-dir (or --force to start over)"
        try:
            name = ck.read_bytes("latest", 256).decode("utf-8", "replace").strip()
        except SamoeError as e:
            raise SamoeError(f"{str(e).rpartition(': ')[0]}: {fix}") from None
        if re.fullmatch(r"step-\d{1,12}", name) is None:
            raise SamoeError(f"{pointer} does not name a step directory (step-N): {fix}")
        if ck.kind(name) != "dir":
            raise SamoeError(f"{pointer} points to {name}, which is not a directory of this run: {fix}")
        with ck.sub(name) as step:
            if step.kind("trainer_state.json") is None:
                raise SamoeError(f"{pointer} points to {name}, which is incomplete: remove the run directory or pass --force to start over")
        return self.dir / name

    def _step(self, step_dir: Path) -> Dir:
        """The open folder of a step: from the run directory (never through a link) when it is one of this run's."""
        step_dir = Path(step_dir)
        if step_dir.parent == self.dir:
            ck = self._checkpoints()
            if ck is None:
                raise SamoeError(f"{self.dir} is missing: {_RUN_FIX}")
            return ck.sub(step_dir.name)
        return Dir.open(step_dir, _RUN_FIX)

    def save(self, step: int, model: torch.nn.Module, meta: dict[str, Any], opts: Optimizers,
             trainer_state: dict[str, Any]) -> Path:
        if self.dist is not None:
            return self._save_sharded(step, model, opts, trainer_state)
        ck = self._checkpoints(create=True)
        name, tmp = f"step-{step}", temp_name(f"step-{step}", self.token)
        if ck.kind(tmp) is not None:
            ck.remove_tree(tmp)  # our own token: an earlier try of this very writer
        with ck.mkdir(tmp) as folder:
            try:
                owned = Owned.start(folder, "train", self.token)
                owned.record("model", kind="owned")
                save_model(model, self.dir / tmp / "model", meta, parent=folder)
                names = {id(p): n for n, p in opts.named_parameters(model).items()}
                tensors, hyper = optimizer_tensors(opts, names)
                owned.record("optimizer.safetensors")
                write_safetensors(folder, "optimizer.safetensors", tensors)
                self._complete(ck, folder, owned, tmp, name, dict(trainer_state, optimizers=hyper, rng=rng_state(),
                                                                               task_loss=_task_loss(opts)))
            except BaseException:
                ck.remove_tree(tmp)
                raise
        return self.dir / name

    def _complete(self, ck: Dir, folder: Dir, owned: Owned, tmp: str, name: str, state: dict[str, Any]) -> None:
        """Write trainer_state.json, rename the step directory into place, move `latest`, prune."""
        owned.record("trainer_state.json")
        folder.write_bytes("trainer_state.json", (json.dumps(state, indent=1) + "\n").encode(), self.token)
        folder.fsync()
        self.run.record(f"checkpoints/{name}", kind="owned")
        if ck.kind(name) is not None:  # a step an earlier, longer try of this run wrote
            with ck.sub(name) as old:
                remove_recorded(old, check_owned(old, "--run-dir"))
            ck.rmdir(name)
        ck.replace(tmp, name)
        ck.fsync()
        self.run.record("checkpoints/latest")
        ck.write_bytes("latest", (name + "\n").encode(), self.token)
        self._prune(ck)

    def _save_sharded(self, step: int, model: torch.nn.Module, opts: Optimizers, trainer_state: dict[str, Any]) -> Path:
        """Every rank writes its shards with DCP into a temporary directory; rank 0 completes and renames it."""
        import torch.distributed.checkpoint as dcp

        d = self.dist
        name, tmp = f"step-{step}", temp_name(f"step-{step}", self.token)
        error = None
        if d.is_main:
            try:
                ck = self._checkpoints(create=True)
                if ck.kind(tmp) is not None:
                    ck.remove_tree(tmp)
                with ck.mkdir(tmp) as folder:
                    Owned.start(folder, "train", self.token).record("dcp", kind="dir")
                    folder.sub("dcp", create=True).close()
            except BaseException as e:
                error = f"{type(e).__name__}: {e}"
        error = d.broadcast(error)
        if error is not None:
            raise SamoeError(f"could not make the step folder in {self.dir}: {error}")
        ck = self._checkpoints()
        folder = ck.sub(tmp)
        try:
            names = {id(p): n for n, p in opts.named_parameters(model).items()}
            tensors, hyper = optimizer_state(opts, names)
            with folder.sub("dcp") as shards:
                dcp.save({"model": model_tensors(model), "optim": tensors}, checkpoint_id=shards.proc)
            d.barrier()
            if d.is_main:
                from upscale.ownership import read_manifest

                owned = Owned(folder, read_manifest(folder), self.token)
                with folder.sub("dcp") as shards:
                    owned.record(*[f"dcp/{n}" for n in shards.names()])
                self._complete(ck, folder, owned, tmp, name, dict(trainer_state, optimizers=hyper, rng=rng_state(), task_loss=_task_loss(opts),
                                                                  format="dcp", world_size=d.world))
        except BaseException:
            if d.is_main:
                ck.remove_tree(tmp)
            raise
        finally:
            folder.close()
        d.barrier()
        return self.dir / name

    def _prune(self, ck: Dir) -> None:
        steps = sorted((int(n.split("-")[1]), n) for n in ck.names() if re.fullmatch(r"step-\d{1,12}", n))
        for _, name in steps[: -self.keep]:
            if ck.kind(name) == "dir":
                remove_owned_folder(ck, name)  # a step folder holding anything unrecorded is left alone
            self.run.forget(f"checkpoints/{name}")

    def load(self, step_dir: Path, model: torch.nn.Module, opts: Optimizers) -> dict[str, Any]:
        """Restore model weights, optimizer states and RNG; return the trainer state."""
        with self._step(step_dir) as step:
            if step.kind("dcp") == "dir":
                return self._load_sharded(step, model, opts)
            return self._load_single(step, model, opts)

    def _load_single(self, step: Dir, model: torch.nn.Module, opts: Optimizers) -> dict[str, Any]:
        from upscale.checkpoint import Checkpoint

        step_dir = step.path
        with step.sub("model") as folder:
            ckpt = Checkpoint.open(step_dir / "model", folder)
        if self.dist is not None:  # a single-process checkpoint into a sharded model
            self.dist.load_own_rows(model, ckpt, str(step_dir))
            state = read_trainer_state(step)
            load_optimizer_tensors(opts, opts.named_parameters(model), read_optimizer_file(step),
                                   state["optimizers"], place=self.dist.shard_like)
            _load_task_loss(opts, state, step_dir)
            set_rng_state(state["rng"])
            return state
        with torch.no_grad():
            params = dict(model.named_parameters())
            buffers = dict(model.named_buffers())
            for name, tensor in ckpt.iter_tensors():
                target = params.get(name, buffers.get(name))
                if target is None or target.shape != tensor.shape:
                    raise SamoeError(f"{step_dir} does not match the model being trained ({name}): use a new --run-dir or --force")
                target.copy_(tensor)
        state = read_trainer_state(step)
        load_optimizer_tensors(opts, opts.named_parameters(model), read_optimizer_file(step),
                               state["optimizers"])
        _load_task_loss(opts, state, step_dir)
        set_rng_state(state["rng"])
        return state

    def _load_sharded(self, step: Dir, model: torch.nn.Module, opts: Optimizers) -> dict[str, Any]:
        """Read a DCP step into this run, whatever the world size that wrote it (1 = no process group)."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.api import CheckpointException

        from .dcp_safe import SafeFileSystemReader, read_metadata

        step_dir, path = step.path, step.path / "dcp"
        shards = step.sub("dcp")  # read through its descriptor's path: the folder checked here, whatever the path
        saved = read_metadata(Path(shards.proc), shown=path).state_dict_metadata  # allow-list unpickler: no code runs
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
                dcp.load({"model": targets, "optim": optim}, storage_reader=SafeFileSystemReader(shards.proc, shown=path),
                         no_dist=self.dist is None)
            except CheckpointException as e:  # a BaseException: never let it escape as a traceback
                first = next((pair[0] for pair in e.failures.values()), e)
                if isinstance(first, SamoeError):
                    raise first from None
                raise SamoeError(f"{path} could not be read ({type(first).__name__}): the step is damaged; "
                                 "delete it or use a new --run-dir (or --force to start over)") from None
            finally:
                shards.close()
        state = read_trainer_state(step)
        load_optimizer_tensors(opts, params, optim, state["optimizers"], place=lambda value, p: value)
        _load_task_loss(opts, state, step_dir)
        set_rng_state(state["rng"])
        return state
