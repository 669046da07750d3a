"""Save and resume training state; the only code that writes a run's checkpoints.

RUN/checkpoints/step-N/
    model/                  a samoe checkpoint directory (safetensors + samoe.json)
    optimizer.safetensors   every optimizer's state tensors, keyed by parameter name
    trainer_state.json      step, epoch, data positions, RNG states, optimizer hyper-parameters
RUN/checkpoints/latest      the name of the newest complete step directory

A step directory is written under a temporary name and renamed into place, and
`latest` is replaced atomically after that, so a kill at any moment leaves the
previous checkpoint usable. Leftover temporaries of dead processes are removed
by the next run.
"""

from __future__ import annotations

import base64
import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from upscale.checkpoint import _fsync_path, atomic_write_text, clean_stale_temporaries, save_model
from upscale.errors import SamoeError

from .optim import Optimizers


def rng_state() -> dict[str, Any]:
    return {
        "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(),
        "numpy": _jsonable(np.random.get_state()),
        "python": _jsonable(random.getstate()),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["torch"])), dtype=torch.uint8))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, (tuple, list)):
        return [_jsonable(o) for o in obj]
    return obj


def optimizer_tensors(opts: Optimizers, names: dict[int, str]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Flatten optimizer states to `{optimizerK.<param name>.<key>: tensor}` plus JSON hyper-parameters."""
    tensors: dict[str, torch.Tensor] = {}
    hyper: dict[str, Any] = {}
    for oname, opt in opts.named().items():
        for p, state in opt.state.items():
            for key, value in state.items():
                if torch.is_tensor(value):
                    tensors[f"{oname}.{names[id(p)]}.{key}"] = value.detach().cpu().contiguous()
        hyper[oname] = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    return tensors, hyper


def load_optimizer_tensors(opts: Optimizers, params: dict[str, torch.nn.Parameter], tensors: dict[str, torch.Tensor],
                           hyper: dict[str, Any]) -> None:
    for oname, opt in opts.named().items():
        for group, saved in zip(opt.param_groups, hyper[oname]):
            group.update(saved)
        prefix = oname + "."
        for key, value in tensors.items():
            if not key.startswith(prefix):
                continue
            pname, _, skey = key[len(prefix):].rpartition(".")
            if pname not in params:
                raise SamoeError(f"optimizer state names parameter {pname} that the model lacks: the run directory belongs to another model; use a new --run-dir")
            opt.state[params[pname]][skey] = value.to(params[pname].device)


class Checkpointer:
    """Owns RUN/checkpoints: save a step, find the latest, resume, prune to `keep`."""

    def __init__(self, run_dir: Path, keep: int = 2) -> None:
        self.dir = run_dir / "checkpoints"
        self.keep = max(1, keep)

    def latest(self) -> Path | None:
        pointer = self.dir / "latest"
        if not pointer.exists():
            return None
        step_dir = self.dir / pointer.read_text().strip()
        if not (step_dir / "trainer_state.json").exists():
            raise SamoeError(f"{pointer} points to {step_dir.name}, which is incomplete: remove the run directory or pass --force to start over")
        return step_dir

    def save(self, step: int, model: torch.nn.Module, meta: dict[str, Any], opts: Optimizers,
             trainer_state: dict[str, Any]) -> Path:
        self.dir.mkdir(parents=True, exist_ok=True)
        final = self.dir / f"step-{step}"
        clean_stale_temporaries(final)
        tmp = self.dir / f".step-{step}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            save_model(model, tmp / "model", meta)
            names = {id(p): n for n, p in model.named_parameters()}
            tensors, hyper = optimizer_tensors(opts, names)
            save_file(tensors, str(tmp / "optimizer.safetensors"))
            _fsync_path(tmp / "optimizer.safetensors")
            state = dict(trainer_state, optimizers=hyper, rng=rng_state())
            atomic_write_text(tmp / "trainer_state.json", json.dumps(state, indent=1) + "\n")
            _fsync_path(tmp)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        atomic_write_text(self.dir / "latest", final.name + "\n")
        self._prune()
        return final

    def _prune(self) -> None:
        steps = sorted((int(p.name.split("-")[1]), p) for p in self.dir.glob("step-*") if p.name.split("-")[1].isdigit())
        for _, path in steps[: -self.keep]:
            shutil.rmtree(path, ignore_errors=True)

    def load(self, step_dir: Path, model: torch.nn.Module, opts: Optimizers) -> dict[str, Any]:
        """Restore model weights, optimizer states and RNG; return the trainer state."""
        from upscale.checkpoint import Checkpoint

        ckpt = Checkpoint.open(step_dir / "model")
        with torch.no_grad():
            params = dict(model.named_parameters())
            buffers = dict(model.named_buffers())
            for name, tensor in ckpt.iter_tensors():
                target = params.get(name, buffers.get(name))
                if target is None or target.shape != tensor.shape:
                    raise SamoeError(f"{step_dir} does not match the model being trained ({name}): use a new --run-dir or --force")
                target.copy_(tensor)
        state = json.loads((step_dir / "trainer_state.json").read_text())
        load_optimizer_tensors(opts, dict(model.named_parameters()), load_file(str(step_dir / "optimizer.safetensors")),
                               state["optimizers"])
        set_rng_state(state["rng"])
        return state
