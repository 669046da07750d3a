"""Multi-process training: FSDP2 sharding, losses over the global batch, sharded checkpoints.

`samoe train` runs distributed when torchrun set WORLD_SIZE > 1 (or `samoe train
--nproc N` started torchrun itself). Each process then:

* joins the process group: NCCL with one GPU per process (cuda:LOCAL_RANK), gloo
  on CPU (no GPU, `--device cpu`, or SAMOE_DEVICE=cpu with `--device auto`);
* builds the model on the meta device, sets requires_grad per stage, applies
  `fully_shard` to every MoE layer, every encoder block, every decoder layer and
  the root, then reads only the rows of each tensor it owns from the safetensors
  checkpoint (one positioned read per tensor; no process reads or holds the whole model). FSDP2 shards parameter by
  parameter, so frozen and trainable parameters may share a group: frozen ones
  are all-gathered for compute, never reduce-scattered, and sit in no optimizer,
  so their shards stay bit-identical;
* trains on a contiguous slice of every global batch (the global batch is the
  one a single process with the same --batch-size would see).

Exact equivalence with one process. Seed 004's losses are not per-sample means:
soft Dice is a ratio of sums over the whole batch, the SDF loss a masked mean,
and the MoE load-balancing loss multiplies per-expert token fractions by mean
router probabilities. Each process therefore computes the *sums* behind every
loss on its slice (Dice intersections and denominators, SDF error and pixel
counts, and for every router pool of every MoE layer the probability sums,
assignment counts and token counts), all of them go through ONE differentiable
all_reduce (float64), and the losses are formed from the global sums: every
process computes the same loss value as one process would. Backward through the
all_reduce sums the (identical) upstream gradients of all N processes, and FSDP
averages the N reduce-scattered gradients, so each parameter gets exactly the
single-process gradient. Every expert bank and router is in every process's graph
(upscale/moe.py), so all processes reduce-scatter the same tensors; banks that no
process used get their gradient reset to None afterwards, as in one process (SGD
skips them).

Checkpoints. A distributed run saves RUN/checkpoints/step-N/ as
    dcp/                 torch.distributed.checkpoint: `model.<name>` (parameters
                         and buffers) and `optim.optimizerK.<param>.<key>`
    trainer_state.json   as in one process, plus "format": "dcp" and "world_size"
written under a temporary name and renamed by rank 0 after a barrier. DCP
reshards on load, so a run saved by N processes resumes on M (one plain process
included); a distributed run also resumes from a one-process safetensors step
checkpoint. RUN/final is the usual safetensors checkpoint, gathered on rank 0.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import warnings
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, NoReturn

import torch
import torch.distributed as dist
from torch import Tensor, nn

from upscale.config import MoEConfig
from upscale.errors import SamoeError
from upscale.moe import balance_losses, router_pools

from .semisup import losses_from_stats, task_stats

if TYPE_CHECKING:
    from upscale.checkpoint import Checkpoint

LAUNCH_COMMAND_ENV = "SAMOE_LAUNCH_COMMAND"


_closed = False  # this process tore its process group down (Distributed.close)


def closed_process_group() -> bool:
    """True once this process has torn its process group down: it must then end through `exit_worker`."""
    return _closed


def exit_worker(code: int | str | None) -> NoReturn:
    """End a torchrun worker whose process group is torn down, without interpreter finalization.

    A gloo worker thread may still hold the last reference to the tensors of the final collective when
    the main thread returns. It drops them during finalization, needs the GIL, and the process aborts
    ("terminate called without an active exception", SIGABRT) although its run had finished, so torchrun
    reports the run failed. gdb on such a core: ProcessGroupGloo::runLoop -> ~AsyncBarrierWork ->
    decref_pyobject -> take_gil -> pthread_exit. It happened in about 1 of 10-40 two-process runs on a
    loaded 2-core machine, the barrier in `close` notwithstanding. Every output is written and closed by
    then, so the process flushes its streams and leaves with the command's exit code.
    """
    if isinstance(code, str):  # SystemExit("message"): Python would print it and exit 1
        sys.stderr.write(code + "\n")
        code = 1
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0 if code is None else code)


TORCHRUN_ENV = ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")  # what torchrun sets in each worker


def world_size() -> int:
    """Processes in this run, from torchrun's environment (1 when not under torchrun).

    WORLD_SIZE > 1 outside torchrun (no RANK, MASTER_ADDR, ...) would fail deep inside torch.distributed;
    it is refused here, in one line, as the environment problem it is."""
    env = os.environ
    try:
        n = int(env.get("WORLD_SIZE", "1"))
        if n < 1:
            raise ValueError
    except ValueError:
        raise SamoeError(f"WORLD_SIZE={env['WORLD_SIZE']!r} is not a process count: unset it, or start distributed "
                         "runs with `samoe train --nproc N`") from None
    if n > 1:
        missing = next((k for k in TORCHRUN_ENV if not env.get(k)), None)
        if missing is not None:
            raise SamoeError(f"WORLD_SIZE={n} is set but {missing} is not: this is not a torchrun worker; unset "
                             "WORLD_SIZE, or start distributed runs with `samoe train --nproc N`")
        for key, top in (("RANK", n), ("LOCAL_RANK", n)):
            if not env[key].isdigit() or int(env[key]) >= top:
                raise SamoeError(f"{key}={env[key]!r} is not a process index below WORLD_SIZE={n}: start "
                                 "distributed runs with `samoe train --nproc N`")
    return n


def is_main_process() -> bool:
    return os.environ.get("RANK", "0") == "0"


def split_sizes(n: int, world: int) -> list[int]:
    """Contiguous split of n items over `world` ranks, the first n % world ranks one larger."""
    return [n // world + (1 if r < n % world else 0) for r in range(world)]


def rank_slice(items: list[int], rank: int, world: int) -> list[int]:
    """This rank's contiguous slice of one global batch."""
    sizes = split_sizes(len(items), world)
    start = sum(sizes[:rank])
    return items[start : start + sizes[rank]]


def check_split(n: int, batch_size: int, world: int, what: str) -> None:
    """Every global batch (the last, shorter one too) must give each rank at least one image."""
    sizes = {min(batch_size, n)} | ({n % batch_size} if n % batch_size else set())
    if min(sizes) < world:
        raise SamoeError(f"{what}: {n} images in batches of {batch_size} leave a batch of {min(sizes)} images for "
                         f"{world} processes; use a --batch-size that is at least {world} and leaves no last batch "
                         f"smaller than {world}")


def process_device_kind(device: str = "auto") -> str:
    """cpu or cuda for one process of a torchrun job: each process takes GPU LOCAL_RANK, so no index.

    `--device auto` honours SAMOE_DEVICE (cpu or cuda), then picks CUDA when a GPU is visible.
    """
    spec = (device or "auto").strip().lower()
    if spec == "auto":
        spec = os.environ.get("SAMOE_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
        if spec not in ("cpu", "cuda"):
            raise SamoeError(f"SAMOE_DEVICE={spec!r} must be cpu or cuda")
    if spec.startswith("cuda:"):
        raise SamoeError(f"--device {spec}: under torchrun/--nproc each process uses GPU LOCAL_RANK; pass --device cuda "
                         "(and CUDA_VISIBLE_DEVICES to choose the GPUs)")
    if spec not in ("cpu", "cuda"):
        raise SamoeError(f"--device {spec!r} is not one of auto, cpu, cuda")
    return spec


# --------------------------------------------------------------------------- launching


def launch(nproc: int, argv: list[str]) -> int:
    """Run `samoe <argv>` under torchrun with `nproc` processes on this node; return its exit code."""
    args, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            args.append(a)
    env = dict(os.environ)
    env.setdefault(LAUNCH_COMMAND_ENV, json.dumps(["samoe", *argv]))
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "-m", "cli", *args]
    proc = subprocess.Popen(cmd, env=env)
    got: list[int] = []

    def on_signal(signum: int, frame: Any) -> None:
        got.append(signum)
        if signum == signal.SIGTERM:  # Ctrl-C reaches torchrun and the workers directly (same process group)
            proc.send_signal(signum)

    # the workers save a checkpoint at the end of their step and stop; exit like one process would (128 + signal)
    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        rc = proc.wait()
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    return 128 + got[0] if got and rc != 0 else rc


# --------------------------------------------------------------------------- MoE router statistics

# The router returns, for every pool of `upscale.moe.router_pools`, the sums its balance loss is
# formed from (`MoEMLP.pool_sums`); the global losses are `upscale.moe.balance_losses` of their
# sums over ranks.


def group_counts_from_sums(cfg: MoEConfig, sums: list[Tensor]) -> list[int]:
    """Assignments per expert group from a layer's pool sums (those of all processes: who used what)."""
    counts = [0] * len(cfg.groups)
    for (kind, g, num), s in zip(router_pools(cfg), sums):
        used = s[num : 2 * num].tolist()
        if kind == "core":
            offsets = cfg.offsets
            for i in range(cfg.core_groups):
                counts[i] = round(sum(used[offsets[i] : offsets[i + 1]]))
        elif kind == "routed":
            counts[g] = round(sum(used))
    return counts


class _AllReduceSum(torch.autograd.Function):
    """Differentiable sum over ranks; backward sums the upstream gradients of all ranks."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad


# --------------------------------------------------------------------------- the distributed context


class Distributed:
    """One process of a torchrun job: process group, device, FSDP2 sharding, global losses."""

    def __init__(self, precision: str = "fp32", device: str = "auto") -> None:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy

        self.rank = int(os.environ["RANK"])
        self.world = int(os.environ["WORLD_SIZE"])
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        kind = process_device_kind(device)
        if kind == "cuda":
            if not torch.cuda.is_available() or self.local_rank >= torch.cuda.device_count():
                raise SamoeError(f"process {self.rank} needs GPU {self.local_rank} but {torch.cuda.device_count()} are visible: "
                                 f"start at most one process per GPU, or use --device cpu")
            torch.cuda.set_device(self.local_rank)
            self.device = torch.device("cuda", self.local_rank)
        else:
            self.device = torch.device("cpu")
        if not dist.is_initialized():
            dist.init_process_group("nccl" if kind == "cuda" else "gloo",
                                    device_id=self.device if kind == "cuda" else None)
        self.mesh = init_device_mesh(kind, (self.world,))
        self.precision = precision
        # MoEMLP returns `out.reshape(...)`, a view; SAM's blocks only add it out of place (x = x + mlp(x)).
        warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(FSDPMoEMLP\) returned a view tensor")
        self.mp_policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
                          if precision == "bf16" else MixedPrecisionPolicy())
        self.moe: dict[str, nn.Module] = {}
        self._stats: dict[str, Tensor] = {}
        self._group_counts: dict[str, list[int]] = {}

    @classmethod
    def from_env(cls, precision: str = "fp32", device: str = "auto") -> "Distributed | None":
        """The context when torchrun started several processes, else None (plain single-process training)."""
        if world_size() <= 1:
            return None
        return cls(precision, device)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        dist.barrier()

    def close(self, finished: bool = False) -> None:
        """Tear the process group down; after a finished run, only once every rank is done with it.

        Without the barrier a rank that finished first tore gloo down while another still used it,
        and that one aborted at exit ("terminate called without an active exception") although its
        run had finished. After a failure there is no barrier: the failed rank would never reach it.
        """
        global _closed
        if dist.is_initialized():
            if finished:
                dist.barrier()
            dist.destroy_process_group()
            _closed = True

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's value of `obj` on every rank."""
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def any(self, flag: bool) -> bool:
        """True on every rank when it is True on some rank (signals arrive at different moments)."""
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def to_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        return {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}

    # ----------------------------------------------------------------------- model

    def build_model(self, path: "str | Path | Checkpoint", prepare: Callable[[nn.Module], Any]) -> tuple[nn.Module, Any]:
        """Meta-device model -> `prepare` (requires_grad per stage) -> fully_shard -> this rank's shards from disk."""
        from upscale.checkpoint import Checkpoint, parse_dtype
        from upscale.model import build_model

        ckpt = path if isinstance(path, Checkpoint) else Checkpoint.open(path)
        ckpt.check_matches_config()
        model = build_model(ckpt.config, device="meta").to(parse_dtype(ckpt.meta.get("dtype", "float32")))
        result = prepare(model)
        self.shard(model)
        model.to_empty(device=self.device)
        self.load_own_rows(model, ckpt, str(ckpt.path))
        return model, result

    def shard(self, model: nn.Module) -> None:
        """fully_shard each MoE layer, encoder block, decoder layer, then the root; hook the MoE layers."""
        from torch.distributed.fsdp import fully_shard

        kw = dict(mesh=self.mesh, mp_policy=self.mp_policy)
        for name, layer in model.moe_layers():
            self.shard_moe(name, layer)
        for block in model.image_encoder.blocks:
            fully_shard(block, **kw)
        for layer in model.mask_decoder.transformer.layers:
            fully_shard(layer, **kw)
        fully_shard(model, **kw)

    def shard_moe(self, name: str, layer: nn.Module) -> None:
        """fully_shard one MoE layer (router and all expert banks in one group) and hook it."""
        from torch.distributed.fsdp import fully_shard

        fully_shard(layer, mesh=self.mesh, mp_policy=self.mp_policy)
        self.moe[name] = layer
        # runs before FSDP's post-forward hook, while the layer's parameters are unsharded
        layer.register_forward_hook(partial(self._after_moe, name), prepend=True)

    def load_own_rows(self, model: nn.Module, ckpt: Any, where: str) -> int:
        """Copy checkpoint tensors into the (sharded) model, each rank reading only the rows it owns.

        FSDP2 shards every parameter on dim 0 (torch.chunk layout), so a rank's shard is one contiguous
        byte range of the tensor in its safetensors file: one positioned read at the offset the strictly
        checked header gave (Checkpoint.open), straight into the shard. Replicated tensors and layouts this
        code does not know are read whole. Returns the bytes read (the tests check each rank reads ~1/N).
        """
        targets: dict[str, Tensor] = dict(model.named_parameters())
        targets.update(model.named_buffers())
        wrong = sorted(n for n, t in targets.items() if n in ckpt.tensors and tuple(ckpt.tensors[n].shape) != tuple(t.shape))
        wrong += sorted(set(ckpt.tensors) - set(targets))
        if wrong:
            raise SamoeError(f"{where} does not match the model being trained ({wrong[0]}): use a new --run-dir or --force")
        missing = sorted(set(targets) - set(ckpt.tensors))
        if missing:
            raise SamoeError(f"{where} lacks {len(missing)} tensors of the model, e.g. {missing[0]}: re-create it")
        done = 0
        by_file: dict[str, list[str]] = {}
        for name, info in sorted(ckpt.tensors.items(), key=lambda kv: (kv[1].file, kv[1].offset)):
            by_file.setdefault(info.file, []).append(name)
        with torch.no_grad():
            for fname, names in by_file.items():
                with ckpt.shard_file(fname) as f:
                    for name in names:
                        target, info = targets[name], ckpt.tensors[name]
                        local = _local(target)
                        rows = self._own_rows(target, tuple(info.shape))
                        if rows is not None and rows[1] - rows[0] == local.shape[0]:
                            part = _read_rows(f, info, *rows, where)
                            local.copy_(part.to(local.device, local.dtype))
                        else:
                            part = _read_rows(f, info, 0, info.shape[0] if info.shape else 0, where)
                            local.copy_(self.local_shard(part, target))
                        done += part.numel() * part.element_size()
        return done

    def _own_rows(self, like: Tensor, shape: tuple[int, ...]) -> tuple[int, int] | None:
        """[lo, hi) of dim 0 that this rank holds of a Shard(0) DTensor (torch.chunk layout), else None."""
        from torch.distributed.tensor import DTensor, Shard

        if not isinstance(like, DTensor) or not shape or tuple(like.placements) != (Shard(0),):
            return None
        chunk = -(-shape[0] // self.world)
        lo = min(self.rank * chunk, shape[0])
        return lo, min(lo + chunk, shape[0])

    def local_shard(self, full: Tensor, like: Tensor) -> Tensor:
        """This rank's part of `full`, laid out like the (possibly sharded) tensor `like`, on its device."""
        from torch.distributed.tensor import DTensor, Shard

        if not isinstance(like, DTensor):
            return full.to(like.device, like.dtype)
        (placement,) = like.placements
        if isinstance(placement, Shard):
            chunks = torch.chunk(full, self.world, dim=placement.dim)
            part = chunks[self.rank] if self.rank < len(chunks) else full.narrow(placement.dim, 0, 0)
        else:
            part = full
        local = like.to_local()
        if part.shape != local.shape:  # a layout this code does not know: let DTensor cut it
            from torch.distributed.tensor import distribute_tensor

            part = distribute_tensor(full.to(like.device), like.device_mesh, like.placements, src_data_rank=None).to_local()
        return part.to(local.device, local.dtype)

    def shard_like(self, full: Tensor, like: Tensor) -> Tensor:
        """A new tensor holding `full`, sharded like parameter `like` when shapes match (optimizer state)."""
        from torch.distributed.tensor import DTensor

        if isinstance(like, DTensor) and tuple(full.shape) == tuple(like.shape):
            return DTensor.from_local(self.local_shard(full, like).to(full.dtype), like.device_mesh, like.placements,
                                      run_check=False, shape=like.shape, stride=like.stride())
        return full.to(like.device) if full.dim() else full

    def full_state_dict(self, model: nn.Module) -> dict[str, Tensor]:
        """The whole state dict on rank 0's CPU ({} on other ranks)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def full_tensor(self, t: Tensor) -> Tensor:
        from torch.distributed.tensor import DTensor

        return t.full_tensor() if isinstance(t, DTensor) else t

    # ----------------------------------------------------------------------- MoE hooks

    def _after_moe(self, name: str, module: nn.Module, inputs: Any, output: Tensor) -> Tensor:
        """Keep the router's pool sums for the global losses."""
        sums, pools = module.pool_sums, router_pools(module.router.cfg)
        if len(sums) != len(pools) or any(s.numel() != 2 * num + 2 for s, (_, _, num) in zip(sums, pools)):
            raise SamoeError(f"internal error: {name} returned {len(sums)} router pool sums, expected {len(pools)} "
                             "(upscale/moe.py's router pools changed; update upscale.moe.router_pools)")
        self._stats[name] = torch.cat(sums)
        return output

    # ----------------------------------------------------------------------- losses

    def global_losses(self, out: dict[str, Tensor], targets: list[tuple[str, dict[str, Tensor]]],
                      num_classes: int, stats: Callable[..., Tensor] = task_stats) -> tuple[list[dict[str, Tensor]], Tensor, Tensor]:
        """Per-task losses for each (prefix, targets), the MoE aux loss and the hand-over loss, over the global batch
        (`stats`: `task_stats` or its compiled form)."""
        sums, aux, handover = self.reduce_with_aux([stats(out, batch, prefix) for prefix, batch in targets])
        return [losses_from_stats(s, num_classes) for s in sums], aux, handover

    def reduce_with_aux(self, pieces: list[Tensor]) -> tuple[list[Tensor], Tensor, Tensor]:
        """Sum `pieces` (1-d, differentiable) over all processes together with the router statistics of
        the last forward, in one all_reduce; return the global pieces, the global MoE aux loss and the
        global hand-over (top-level balance) loss, as upscale/moe.py defines them."""
        names = list(self.moe)
        missing = [n for n in names if n not in self._stats]
        if missing:
            raise SamoeError(f"internal error: no router statistics from {missing[0]} in the last forward")
        own = len(pieces)
        pieces = list(pieces) + [self._stats.pop(n) for n in names]
        sizes = [p.numel() for p in pieces]
        total = _AllReduceSum.apply(torch.cat(pieces).double()).float()
        parts = list(total.split(sizes))
        sums, parts = parts[:own], parts[own:]
        layer_aux, layer_handover = [], []
        self._group_counts = {}
        for name, stats in zip(names, parts):
            cfg = self.moe[name].router.cfg
            pool = list(stats.split([2 * num + 2 for _, _, num in router_pools(cfg)]))
            aux, handover = balance_losses(cfg, pool)
            layer_aux.append(aux)
            if cfg.core_groups and cfg.num_routed_groups:
                layer_handover.append(handover)
            self._group_counts[name] = group_counts_from_sums(cfg, [p.detach().cpu() for p in pool])
        aux = torch.stack(layer_aux).mean() if layer_aux else total.new_zeros(())
        handover = torch.stack(layer_handover).mean() if layer_handover else total.new_zeros(())
        return sums, aux, handover

    def after_backward(self) -> None:
        """Parts no process used get no gradient (None), exactly as in one process."""
        from .optim import drop_idle_grads

        names = list(self._group_counts)
        drop_idle_grads([self.moe[n] for n in names], [self._group_counts[n] for n in names])

    def selector_stats(self, model: nn.Module) -> dict[str, float]:
        """Seed 004's pooled selector statistics over the global batch of the last forward."""
        maps = [s.last_weight.flatten().double() for s in model.selector.selectors.values() if s.last_weight is not None]
        x = torch.cat(maps) if maps else torch.zeros(0, dtype=torch.float64, device=self.device)
        sums = torch.stack([x.sum(), (x * x).sum(), x.new_tensor(float(x.numel()))])
        lo = x.min() if x.numel() else x.new_tensor(float("inf"))
        hi = x.max() if x.numel() else x.new_tensor(float("-inf"))
        dist.all_reduce(sums)
        dist.all_reduce(lo, op=dist.ReduceOp.MIN)
        dist.all_reduce(hi, op=dist.ReduceOp.MAX)
        s, q, n = (float(v) for v in sums)
        if n == 0:
            return {"mean": 0.0, "std": 0.0, "min": 0.0, "max": 0.0}
        var = max(0.0, (q - s * s / n) / (n - 1)) if n > 1 else 0.0
        return {"mean": s / n, "std": var**0.5, "min": float(lo), "max": float(hi)}


def _read_rows(f: Any, info: Any, lo: int, hi: int, where: str) -> Tensor:
    """Rows [lo, hi) of one tensor (dim 0) from its open shard file: one read of exactly their bytes.

    A 0-d tensor is read whole. `info` is the header entry Checkpoint.open checked (offset and size
    inside the file), so nothing here trusts the file beyond what was validated.
    """
    from upscale.checkpoint import st_dtype

    shape = tuple(info.shape)
    if not shape:
        lo, hi, row, out_shape = 0, 1, info.nbytes, ()
    else:
        row = info.nbytes // shape[0] if shape[0] else 0
        out_shape = (hi - lo, *shape[1:])
    buf = torch.empty((hi - lo) * row, dtype=torch.uint8)
    f.seek(info.offset + lo * row)
    if buf.numel() and f.readinto(memoryview(buf.numpy())) != buf.numel():
        raise SamoeError(f"{where}: tensor data in {info.file} is cut short: the shard is truncated; re-create the checkpoint")
    return buf.view(st_dtype(info.dtype)).reshape(out_shape)


def _local(t: Tensor) -> Tensor:
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t
