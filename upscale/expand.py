"""Growth: plan the grown model tensor by tensor, then stream it to shards.

Like mergekit, growth is planned declaratively and executed by small pure
functions. `plan_growth` turns (source checkpoint, `GrowthSpec`) into the grown
config and an ordered list of `TensorPlan`s; each plan names the source tensors
it reads and makes its output from them and a generator seeded by
(seed, output tensor name). `execute` runs the plans on a thread pool, writes
results in plan order, and so gives byte-identical shards for any worker count,
while only a bounded window of tensors is ever in memory.

What grows (strategy 1 of the growth plan):
- every MoE layer goes from S experts in one group to N experts in groups. The
  core group(s) hold the S source experts unchanged (with their router rows);
  new experts fill the other groups, each made by `copy-noise` (a source expert
  plus Gaussian noise scaled to that tensor's own std), `interpolate`
  (W*A + (1-W)*B of two distinct source experts) or `mixed` (alternating).
  In-group router rows follow their experts (same recipe). The group router is
  new (small random), and each routed group's `group_scale` starts at zero, so
  the grown model computes exactly what the source computed while the new parts
  receive gradient from the first step (see upscale/moe.py).
- or, with `replicate` (`expand --replicate`), every group is an exact copy of the
  source's experts and router rows (group 0 keeps provenance `source`), there is no
  core pool, each token takes one group whole (`group_scale` = 1) and the group
  router is new: whichever group a token takes it computes what the source did, at
  the source's cost per token (sparse upcycling one level up; upscale/moe.py). No
  noise: routing gives each copy its own tokens, which is what sets them apart.
- extra blocks are appended after the last block, copied from the last
  global-attention block (LLaMA-Pro style depth growth) with the attention
  output projection and the core experts' output layers zeroed (new groups are
  hidden by their zero group_scale; with replicas, every group's output layers):
  each starts as the identity.

New expert j (0-based over all routed groups, in group order) copies source
expert j mod S; interpolation pairs it with (a + 1 + (j // S) mod (S-1)) mod S,
a different expert, so sources are used evenly and deterministically.
"""

from __future__ import annotations

import functools
import hashlib
import math
import re
import threading
from collections import OrderedDict, deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .checkpoint import DEFAULT_SHARD_BYTES, Checkpoint, CheckpointWriter, TensorSpec, build_meta, lineage_entry
from .config import SamMoEConfig
from .errors import SamoeError
from .growth import GrowthSpec, grown_config, planned_provenance, resolve_groups, resolve_replicas  # noqa: F401 (re-exported)
from .layout import state_shapes
from .ownership import check_separate

_EXPERT_PARAMS = ("w1", "b1", "w2", "b2")


# --------------------------------------------------------------------------- per-tensor recipes


def tensor_seed(seed: int, name: str) -> int:
    """A 63-bit seed from (seed, tensor name): independent of write order and parallelism."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{name}".encode()).digest()[:8], "little") & (2**63 - 1)


def new_expert_recipe(spec: GrowthSpec, j: int, s: int) -> tuple[str, tuple[int, ...]]:
    """How new expert j (0-based over the routed groups) is made from the S source experts."""
    kind = spec.init if spec.init != "mixed" else ("copy-noise" if j % 2 == 0 else "interpolate")
    a = j % s
    if kind == "copy-noise":
        return kind, (a,)
    return kind, (a, (a + 1 + (j // s) % (s - 1)) % s)


def _std(x: torch.Tensor) -> float:
    """Deterministic std of a tensor (numpy, float64 accumulation, independent of thread count)."""
    return float(np.std(x.to(torch.float32).numpy(), dtype=np.float64))


def all_finite(tensor: torch.Tensor) -> bool:
    """Whether a tensor holds no NaN or Inf. A NaN or Inf makes the sum NaN or Inf, so a finite sum (one
    vectorised pass, where `isfinite(...).all()` makes several and full-size masks) proves it; only a
    sum that overflowed (or a real NaN/Inf) takes the exact check."""
    if not tensor.is_floating_point() or math.isfinite(float(tensor.sum(dtype=torch.float32))):
        return True
    return bool(torch.isfinite(tensor).all())


@functools.lru_cache(maxsize=None)
def _bit_pattern_values(dtype: torch.dtype) -> tuple[np.ndarray, np.ndarray]:
    """Every 16-bit pattern of a 2-byte float dtype as float64, and which of them are finite."""
    values = torch.arange(65536, dtype=torch.int32).to(torch.int16).view(dtype).double().numpy()
    return values, np.isfinite(values)


def row_stats(bank: torch.Tensor) -> tuple[list[float], bool]:
    """(std of each row along dim 0, all values finite) in one pass over the bank.

    For 2-byte floats (bf16/fp16, how large checkpoints are stored) this is one
    `bincount` of (row, bit pattern) pairs: every row's std is then exact in
    float64 from at most 65536 distinct values, deterministic, and ~7x cheaper
    than converting to float and calling np.std; finiteness falls out of the same
    histogram. Other dtypes take np.std per row and isfinite.
    """
    rows = bank.shape[0] if bank.dim() else 1
    flat = bank.reshape(rows, -1)
    if bank.element_size() != 2 or not bank.is_floating_point() or flat.shape[1] == 0:
        finite = bool(torch.isfinite(flat).all()) if bank.is_floating_point() else True
        return ([_std(r) for r in flat] if finite else [float("nan")] * rows), finite
    counts = np.zeros((rows, 65536))
    chunk = 1 << 20
    keys = torch.empty(min(chunk, flat.shape[1]), dtype=torch.int32)  # reused: no fresh pages per row
    for r in range(rows):
        bits = flat[r].view(torch.int16)
        for lo in range(0, bits.numel(), chunk):
            k = keys[: min(chunk, bits.numel() - lo)].copy_(bits[lo:lo + chunk]).bitwise_and_(0xFFFF)
            counts[r] += torch.bincount(k, minlength=65536).numpy()
    values, finite_mask = _bit_pattern_values(bank.dtype)
    if counts[:, ~finite_mask].any():
        return [float("nan")] * rows, False
    c, v = counts[:, finite_mask], values[finite_mask]
    n = c.sum(axis=1)
    mean = np.einsum("ij,j->i", c, v) / n  # not `c @ v`: BLAS threads would spin on the cores the workers need
    var = (c * (v[None, :] - mean[:, None]) ** 2).sum(axis=1) / n
    return [float(x) for x in np.sqrt(var)], True


@functools.lru_cache(maxsize=None)
def unit_gaussian_table() -> torch.Tensor:
    """65536 standard-normal quantiles at (i + 0.5) / 65536, rescaled to variance exactly 1 (float64).

    Indexed by uniform 16-bit integers this is N(0, 1) sampled to 16-bit
    resolution: mean exactly 0 (the table is symmetric), tails to +-4.33 sigma
    (beyond that lie 1.5e-5 of a true Gaussian's mass), and ~3x cheaper per value
    than torch's `normal_` because the table lookup needs no transcendental math.
    """
    q = torch.special.ndtri((torch.arange(65536, dtype=torch.float64) + 0.5) / 65536)
    return q / q.pow(2).mean().sqrt()


class GaussianNoise:
    """Deterministic Gaussian noise at the source's dtype: numpy SFC64 bits -> 16-bit indices -> quantile table.

    SFC64 (numpy's small fast chaotic generator, passes PractRand/BigCrush) gives
    64 random bits per step, i.e. four table indices; the table is scaled and cast
    to the base's dtype first (65536 values), so the noise is born in the source's
    precision and `add(base, noise, out=...)` rounds once into the output's dtype:
    add and cast fused (an fp32 source grown into bf16 gives exactly the fp32 sum
    rounded to bf16). Work goes in chunks through reused scratch buffers: fresh
    multi-MB temporaries per row would cost more in page faults than the arithmetic.
    """

    CHUNK = 1 << 18  # elements per step (a multiple of 4: chunking does not change the stream)

    def __init__(self, seed: int) -> None:
        self.bits = np.random.SFC64(seed)
        self.idx = torch.empty(self.CHUNK, dtype=torch.int32)
        self.noise: torch.Tensor | None = None

    def indices(self, n: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """n uniform indices in [0, 65536) as int32 (what index_select takes)."""
        raw = torch.from_numpy(self.bits.random_raw((n + 3) // 4).view(np.uint16)[:n])
        out = torch.empty(n, dtype=torch.int32) if out is None else out[:n]
        return out.copy_(raw)  # zero-extends

    def sample(self, n: int, std: float, dtype: torch.dtype) -> torch.Tensor:
        out = torch.empty(n, dtype=dtype)
        self.add_to(torch.zeros(n, dtype=dtype), std, out)
        return out

    def add_to(self, base: torch.Tensor, std: float, out: torch.Tensor) -> None:
        """out = base + N(0, std^2) noise, noise and sum in base's dtype, stored as out's dtype (rounded once
        where out is narrower: the fused add and cast)."""
        table = (unit_gaussian_table() * std).to(base.dtype)
        if self.noise is None or self.noise.dtype != base.dtype:
            self.noise = torch.empty(self.CHUNK, dtype=base.dtype)
        src, dst = base.reshape(-1), out.view(-1)
        for lo in range(0, src.numel(), self.CHUNK):
            m = min(self.CHUNK, src.numel() - lo)
            noise = torch.index_select(table, 0, self.indices(m, self.idx), out=self.noise[:m])
            torch.add(src[lo:lo + m], noise, out=dst[lo:lo + m])


def _empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype)


def make_new_bank(source: torch.Tensor, recipes: list[tuple[str, tuple[int, ...]]], spec: GrowthSpec, seed: int,
                  std_of: Callable[[int], float] | None = None,
                  empty: Callable[[tuple[int, ...], torch.dtype], torch.Tensor] = _empty,
                  dtype: torch.dtype | None = None,
                  ) -> torch.Tensor:
    """Stack new experts (rows along dim 0) made from `source` (S, ...) by their recipes, stored as `dtype`
    (default: the source's).

    Every row is computed in the source's dtype and rounded once into `dtype`,
    as it is written: copy-noise rows are one table lookup and one add straight
    into the output bank (this is the CPU cost of a 10B expand); interpolation
    goes through float32 scratch rows. The result equals making the bank in the
    source's dtype and converting it, without the second pass over a whole bank.
    `empty` allocates the output (expand passes a pool of recycled buffers;
    every row is overwritten).
    """
    noise = GaussianNoise(seed) if spec.noise_std > 0 else None
    out = empty((len(recipes),) + tuple(source.shape[1:]), dtype or source.dtype)
    scratch = None

    def std(i: int) -> float:
        return std_of(i) if std_of is not None else _std(source[i])

    for i, (kind, src) in enumerate(recipes):
        if kind == "copy-noise":
            scale = spec.noise_std * std(src[0]) if noise is not None else 0.0
            if scale > 0:
                noise.add_to(source[src[0]], scale, out[i])
            else:
                out[i].copy_(source[src[0]])
        else:
            if scratch is None:
                scratch = torch.empty(2, INTERP_CHUNK, dtype=torch.float32)
            interpolate_into(out[i], source[src[0]], source[src[1]], spec.interp_weight, scratch)
    return out


INTERP_CHUNK = 1 << 17  # elements per step of `interpolate_into`: its float32 scratch stays in cache


def interpolate_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, w: float, scratch: torch.Tensor) -> None:
    """out = w * a + (1 - w) * b, each product and the sum in float32, stored as the sources' dtype would
    store it (then widened, where out is wider), rounded once into a narrower out.

    Chunk by chunk through `scratch` (2, INTERP_CHUNK): three passes over cache-resident
    pieces instead of six over whole rows (copy, scale and add of two float32 copies)."""
    a, b, dst = a.reshape(-1), b.reshape(-1), out.view(-1)
    widen = dst.dtype.itemsize > a.dtype.itemsize
    for lo in range(0, dst.numel(), INTERP_CHUNK):
        m = min(INTERP_CHUNK, dst.numel() - lo)
        x, y = scratch[0, :m], scratch[1, :m]
        for part, src, weight in ((x, a, w), (y, b, 1.0 - w)):
            if src.dtype == torch.float32:
                torch.mul(src[lo:lo + m], weight, out=part)
            else:  # widen first: a bf16 product would be rounded to bf16
                part.copy_(src[lo:lo + m]).mul_(weight)
        if widen:
            dst[lo:lo + m].copy_(torch.add(x, y).to(a.dtype))
        else:
            torch.add(x, y, out=dst[lo:lo + m])


def recipe_provenance(recipe: tuple[str, tuple[int, ...]], src_name: str, spec: GrowthSpec) -> str:
    kind, src = recipe
    if kind == "copy-noise":
        return f"copy-noise:{src_name}[{src[0]}]:{spec.noise_std:g}"
    return f"interpolate:{src_name}[{src[0]}]:{src_name}[{src[1]}]:{spec.interp_weight:g}"


# --------------------------------------------------------------------------- plan


Reader = Callable[[str], torch.Tensor]


@dataclass
class TensorPlan:
    """One output tensor: its name, shape, provenance, and a pure function of the source tensors."""

    name: str
    shape: tuple[int, ...]
    provenance: Any
    sources: tuple[str, ...]
    make: Callable[[Reader], torch.Tensor]


def _passthrough(src_name: str, dtype: torch.dtype, index: slice | int | None = None) -> Callable[[Reader], torch.Tensor]:
    """A source tensor (or a part of it) as it is, converted to `dtype` in the worker where the dtypes differ."""
    def make(read: Reader) -> torch.Tensor:
        t = read(src_name)  # cached and shared, but the writer only reads it: no copy
        t = t[index] if index is not None else t
        if t.dtype == dtype:
            return t
        return getattr(read, "empty", _empty)(tuple(t.shape), dtype).copy_(t)
    return make


def _zeros(shape: tuple[int, ...], dtype: torch.dtype) -> Callable[[Reader], torch.Tensor]:
    return lambda read: torch.zeros(shape, dtype=dtype)


def _ones(shape: tuple[int, ...], dtype: torch.dtype) -> Callable[[Reader], torch.Tensor]:
    return lambda read: torch.ones(shape, dtype=dtype)


def _random_normal(shape: tuple[int, ...], dtype: torch.dtype, seed: int, std: float) -> Callable[[Reader], torch.Tensor]:
    return lambda read: (torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * std).to(dtype)


def _new_bank(src_name: str, recipes, spec: GrowthSpec, seed: int, dtype: torch.dtype) -> Callable[[Reader], torch.Tensor]:
    def make(read: Reader) -> torch.Tensor:
        std_of = getattr(read, "row_std", None)
        return make_new_bank(read(src_name), recipes, spec, seed, std_of and (lambda i: std_of(src_name, i)),
                             dtype=dtype, empty=getattr(read, "empty", _empty))
    return make


def _moe_layer_plans(
    src_prefix: str, out_prefix: str, src_cfg: SamMoEConfig, cfg: SamMoEConfig, spec: GrowthSpec,
    dtype: torch.dtype, shapes: dict[str, tuple[int, ...]], new_block: bool,
) -> list[TensorPlan]:
    """Plans for one grown MoE layer: core groups from the source, new groups by recipe.

    For a new (extra) block, nothing is `source`: the core experts are copies of
    the template layer's experts and every expert's output layer is zero.
    """
    s = src_cfg.moe.num_experts
    groups = cfg.moe.groups
    core = cfg.moe.core_groups
    plans: list[TensorPlan] = []
    offsets = cfg.moe.offsets
    recipes = [new_expert_recipe(spec, j, s) for j in range(cfg.moe.num_experts - s)]
    for g, size in enumerate(groups):
        lo, hi = offsets[g], offsets[g + 1]
        names = [(f"{out_prefix}.experts.{g}.{p}", f"{src_prefix}.experts.0.{p}") for p in _EXPERT_PARAMS]
        names.append((f"{out_prefix}.router.expert_gates.{g}.weight", f"{src_prefix}.router.expert_gates.0.weight"))
        if cfg.moe.replicas:
            plans += [_replica_plan(out_name, src_name, shapes[out_name], dtype, g, s, new_block) for out_name, src_name in names]
            continue
        for out_name, src_name in names:
            shape = shapes[out_name]
            # In a new block only the core experts' output layers are zeroed: the new
            # groups are already hidden by group_scale = 0, and zeroing them too would
            # leave group_scale and their w2 without gradient (a saddle at zero).
            zero = new_block and g < core and out_name.endswith((".w2", ".b2"))
            if g < core:
                if zero:
                    plans.append(TensorPlan(out_name, shape, "identity-new", (), _zeros(shape, dtype)))
                else:
                    prov = "source" if not new_block else [f"copy:{src_name}[{e}]" for e in range(lo, hi)]
                    plans.append(TensorPlan(out_name, shape, prov, (src_name,), _passthrough(src_name, dtype, slice(lo, hi))))
            else:
                rec = recipes[lo - s : hi - s]
                prov = [recipe_provenance(r, src_name, spec) for r in rec]
                make = _new_bank(src_name, rec, spec, tensor_seed(spec.seed, out_name), dtype)
                plans.append(TensorPlan(out_name, shape, prov, (src_name,), make))
    gate = f"{out_prefix}.router.group_gate.weight"
    plans.append(TensorPlan(gate, shapes[gate], "random", (), _random_normal(shapes[gate], dtype, tensor_seed(spec.seed, gate), 0.02)))
    scale = f"{out_prefix}.router.group_scale"
    # replicas take a token whole (scale 1: each computes the source's function); new groups enter at 0
    start = _ones if cfg.moe.replicas else _zeros
    plans.append(TensorPlan(scale, shapes[scale], "identity-new", (), start(shapes[scale], dtype)))
    return plans


def _replica_plan(out_name: str, src_name: str, shape: tuple[int, ...], dtype: torch.dtype, g: int, s: int,
                  new_block: bool) -> TensorPlan:
    """One tensor of replica group g: the source's own (g = 0) or an exact copy of it. In a new block every
    replica's output layer is zero (each token takes one replica whole): the block starts as the identity."""
    if new_block and out_name.endswith((".w2", ".b2")):
        return TensorPlan(out_name, shape, "identity-new", (), _zeros(shape, dtype))
    prov = "source" if g == 0 and not new_block else [f"copy:{src_name}[{e}]" for e in range(s)]
    return TensorPlan(out_name, shape, prov, (src_name,), _passthrough(src_name, dtype))


def _template_block(src: SamMoEConfig) -> int:
    """The last global-attention block: extra blocks copy it (their rel-pos tables have its shape)."""
    for i in reversed(range(src.total_blocks)):
        if i >= src.depth or i in src.global_attn_indexes:
            return i
    raise SamoeError("the source has no global-attention block to copy extra blocks from: use --extra-blocks 0")


def plan_growth(src: Checkpoint, spec: GrowthSpec, dtype: torch.dtype | None = None) -> tuple[SamMoEConfig, list[TensorPlan]]:
    """The grown config and the ordered list of output tensors (nothing is read yet)."""
    src_cfg = src.config
    cfg = grown_config(src_cfg, spec)
    shapes = state_shapes(cfg)
    dtype = dtype or _source_dtype(src)
    plans: list[TensorPlan] = []
    moe_prefixes = {p for p in (re.sub(r"\.router\..*|\.experts\..*", "", n) for n in shapes) if p.endswith(".mlp") and f"{p}.router.expert_gates.0.weight" in shapes}
    done: set[str] = set()
    template = _template_block(src_cfg)
    first_new = src_cfg.total_blocks
    for name in shapes:
        if name in done:
            continue
        m = re.match(r"image_encoder\.blocks\.(\d+)\.(.*)$", name)
        block = int(m.group(1)) if m else -1
        prefix = next((p for p in moe_prefixes if name.startswith(p + ".")), None)
        if block >= first_new:  # a new extra block
            rest = m.group(2)
            tpl = f"image_encoder.blocks.{template}"
            if prefix is not None:
                if not src_cfg.is_moe_block(template):
                    raise SamoeError(f"extra MoE blocks copy block {template}'s experts, but it is dense: pass --extra-dense")
                layer = _moe_layer_plans(f"{tpl}.mlp", prefix, src_cfg, cfg, spec, dtype, shapes, new_block=True)
            elif rest.startswith("mlp."):
                layer = _dense_extra_mlp(tpl, f"image_encoder.blocks.{block}", src_cfg, template, shapes, dtype)
            elif rest.startswith("attn.proj."):
                layer = [TensorPlan(name, shapes[name], "identity-new", (), _zeros(shapes[name], dtype))]
            else:
                src_name = f"{tpl}.{rest}"
                layer = [TensorPlan(name, shapes[name], f"copy:{src_name}", (src_name,), _passthrough(src_name, dtype))]
        elif prefix is not None:
            layer = _moe_layer_plans(prefix, prefix, src_cfg, cfg, spec, dtype, shapes, new_block=False)
        else:
            if name not in src.tensors:
                raise SamoeError(f"the source checkpoint lacks tensor {name}: it does not match its own config; re-create it")
            layer = [TensorPlan(name, shapes[name], "source", (name,), _passthrough(name, dtype))]
        for p in layer:
            done.add(p.name)
            plans.append(p)
    order = {n: i for i, n in enumerate(shapes)}
    plans.sort(key=lambda p: order[p.name])
    return cfg, plans


def _dense_extra_mlp(tpl: str, out: str, src_cfg: SamMoEConfig, template: int, shapes, dtype) -> list[TensorPlan]:
    """A dense extra MLP: lin1 from the template (its dense lin1 or its first expert), lin2 zero."""
    plans = []
    for p, dense in (("w1", "lin1.weight"), ("b1", "lin1.bias")):
        name = f"{out}.mlp.{dense}"
        if src_cfg.is_moe_block(template):
            src_name, index = f"{tpl}.mlp.experts.0.{p}", 0
            plans.append(TensorPlan(name, shapes[name], f"copy:{src_name}[0]", (src_name,), _passthrough(src_name, dtype, index)))
        else:
            src_name = f"{tpl}.mlp.{dense}"
            plans.append(TensorPlan(name, shapes[name], f"copy:{src_name}", (src_name,), _passthrough(src_name, dtype)))
    for dense in ("lin2.weight", "lin2.bias"):
        name = f"{out}.mlp.{dense}"
        plans.append(TensorPlan(name, shapes[name], "identity-new", (), _zeros(shapes[name], dtype)))
    return plans


def _source_dtype(src: Checkpoint) -> torch.dtype:
    from .checkpoint import parse_dtype

    return parse_dtype(src.meta.get("dtype", "float32"))


# --------------------------------------------------------------------------- execute


class BufferPool:
    """Recycled output buffers: a new bank is written into the memory of one already on disk.

    Fresh multi-MB allocations come from mmap as new pages, which the kernel must
    fault in and zero (about 1 s of system CPU per 2 GB on this kind of VM);
    banks of a grown model come in a handful of sizes, so reuse is near total.
    Only buffers that `empty` handed out are taken back (the pool holds a
    reference to each, so no other tensor can ever share its address); at most
    `keep` wait.
    """

    def __init__(self, keep: int) -> None:
        self.keep = keep
        self.free: dict[int, list[torch.Tensor]] = {}
        self.owned: dict[int, torch.Tensor] = {}
        self.lock = threading.Lock()

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        nbytes = int(np.prod(shape)) * torch.empty((), dtype=dtype).element_size()
        with self.lock:
            free = self.free.get(nbytes)
            buf = free.pop() if free else None
        if buf is None:
            buf = torch.empty(nbytes, dtype=torch.uint8)
            with self.lock:
                self.owned[buf.data_ptr()] = buf
        return buf.view(dtype).view(shape)

    def give_back(self, tensor: torch.Tensor) -> None:
        """Return a tensor's memory once nothing reads it any more (it has been written)."""
        ptr = tensor.data_ptr()
        with self.lock:
            buf = self.owned.get(ptr)
            if buf is None or tensor.numel() * tensor.element_size() != buf.numel():
                return
            if sum(len(v) for v in self.free.values()) >= self.keep:
                del self.owned[ptr]
                return
            self.free.setdefault(buf.numel(), []).append(buf)


class SourceCache:
    """Thread-safe lazy reader of source tensors that keeps the few most recent ones.

    A source expert bank feeds every group of its layer, so it is read once per
    layer, not once per output tensor; the byte budget bounds memory. Reads are
    single-flight: workers that want a tensor another worker is reading wait for
    that read instead of reading (and checking) the same bytes again.
    """

    def __init__(self, ckpt: Checkpoint, budget_bytes: int) -> None:
        self.ckpt = ckpt
        self.budget = budget_bytes
        self.cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.reading: dict[str, Future] = {}
        self.stds: dict[str, dict[int, float]] = {}
        self.lock = threading.Lock()
        self.pool = BufferPool(keep=8)
        self.empty = self.pool.empty  # make functions allocate their outputs here

    def row_std(self, name: str, index: int) -> float:
        """Std of source expert `index` of tensor `name`, computed once (every copy of it reuses it).

        2-byte banks got all their row stds with the finiteness check when read;
        others (float32) are computed here, row by row, on first use."""
        tensor = self(name)  # reads it (and fills its row stds) unless cached
        stds = self.stds.setdefault(name, {})
        if index not in stds:
            stds[index] = _std(tensor[index])
        return stds[index]

    def __call__(self, name: str) -> torch.Tensor:
        with self.lock:
            if name in self.cache:
                self.cache.move_to_end(name)
                return self.cache[name]
            flight = self.reading.get(name)
            if flight is None:
                flight = self.reading[name] = Future()
                mine = True
            else:
                mine = False
        if not mine:
            return flight.result()  # the reader's tensor, or its error raised here too
        try:
            tensor = self._read(name)
        except BaseException as e:
            flight.set_exception(e)
            raise
        finally:
            with self.lock:
                del self.reading[name]
        flight.set_result(tensor)
        return tensor

    def _read(self, name: str) -> torch.Tensor:
        """Read and check one tensor, and cache it (evicting the oldest beyond the budget)."""
        tensor = self.ckpt.get(name)
        if ".experts." in name and tensor.dim() >= 1 and tensor.is_floating_point() and tensor.element_size() == 2:
            stds, finite = row_stats(tensor)  # an expert bank: row stds and finiteness in one pass
        else:
            stds, finite = None, all_finite(tensor)
        if not finite:
            raise SamoeError(f"source tensor {name} contains NaN or Inf: the source checkpoint is damaged; fix or re-create it")
        with self.lock:
            if stds is not None:
                self.stds[name] = dict(enumerate(stds))
            self.cache[name] = tensor
            size = sum(t.numel() * t.element_size() for t in self.cache.values())
            while size > self.budget and len(self.cache) > 1:
                _, old = self.cache.popitem(last=False)
                size -= old.numel() * old.element_size()
        return tensor


def execute(
    src: Checkpoint,
    plans: list[TensorPlan],
    out: Path,
    meta: dict[str, Any],
    dtype: torch.dtype,
    workers: int = 2,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    force: bool = False,
    on_tensor: Callable[[int], None] | None = None,
) -> Path:
    """Make every planned tensor (in parallel) and write them in plan order; atomic commit."""
    largest = max((src.tensors[n].nbytes for p in plans for n in p.sources), default=0)
    # A layer's source bank (w1, w2 and the small tensors) feeds every group of that layer: keep it whole.
    read = SourceCache(src, budget_bytes=max(3 * largest, 256 * 1024**2))
    window = max(2, 2 * workers)
    layout = [TensorSpec(p.name, dtype, p.shape) for p in plans]
    # Parallelism comes from our own threads; torch's intra-op (OpenMP) pool on top of them
    # oversubscribes the cores and its spinning threads slowed a 1-worker expand ~8x.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _execute(plans, out, meta, read, window, layout, workers, shard_bytes, force, on_tensor)
    finally:
        torch.set_num_threads(threads)


def _execute(plans, out, meta, read, window, layout, workers, shard_bytes, force, on_tensor) -> Path:
    with CheckpointWriter(out, layout, shard_bytes=shard_bytes, force=force) as writer:
        # Workers make tensors; one I/O thread writes (and hashes) them in plan order, so
        # generation, writing and hashing overlap. At most `window` made and 2 queued tensors.
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool, ThreadPoolExecutor(max_workers=1) as io:
            made: deque = deque()
            written: deque = deque()

            def finish_write() -> None:
                nbytes = written.popleft().result()
                if on_tensor:
                    on_tensor(nbytes)

            def write(name: str, tensor: torch.Tensor) -> int:
                writer.add(name, tensor)
                read.pool.give_back(tensor)  # its bytes are in the writer's staging buffer now
                return tensor.numel() * tensor.element_size()

            def hand_over() -> None:
                plan, fut = made.popleft()  # made in the output dtype by the worker (the writer checks it)
                written.append(io.submit(write, plan.name, fut.result()))
                while len(written) > 2:
                    finish_write()

            try:
                for plan in plans:
                    made.append((plan, pool.submit(plan.make, read)))
                    while len(made) >= window:
                        hand_over()
                while made:
                    hand_over()
                while written:
                    finish_write()
            except BaseException:
                for _, fut in made:
                    fut.cancel()
                for fut in written:
                    fut.cancel()
                raise
        provenance = {p.name: p.provenance for p in plans}
        meta = dict(meta, provenance=provenance)
        return writer.commit(meta)


def expand_checkpoint(
    src_path: Path | Checkpoint, out: Path, spec: GrowthSpec, command: list[str], dtype: torch.dtype | None = None,
    workers: int = 2, shard_bytes: int = DEFAULT_SHARD_BYTES, force: bool = False,
    on_start: Callable[[int], None] | None = None, on_tensor: Callable[[int], None] | None = None,
    recipe: dict[str, Any] | None = None,
) -> Path:
    """Plan and execute a growth; returns the new checkpoint directory. Given an open `Checkpoint`, its
    files are the ones read (the digest recorded in the lineage is theirs). `recipe`: the resolved [growth]
    settings, recorded in the lineage."""
    src = src_path if isinstance(src_path, Checkpoint) else Checkpoint.open(src_path)
    src.check_matches_config()
    check_separate(out, "--out", {"the source checkpoint": src.path})
    cfg, plans = plan_growth(src, spec, dtype)
    dtype = dtype or _source_dtype(src)
    total = sum(int(np.prod(p.shape)) for p in plans) * torch.empty((), dtype=dtype).element_size()
    if on_start:
        on_start(total)
    growth = {k: (list(v) if isinstance(v, tuple) else v) for k, v in spec.__dict__.items()}
    growth["stages_before"] = len(src.stages)  # stage checks look only at stages trained after this growth
    growth["source"] = str(src.path.resolve())  # where eval looks for the source's training log (stages/regime.py)
    carried = {k: src.meta[k] for k in ("data",) if k in src.meta}  # what the source was trained on (stages/dataspec.py)
    meta = build_meta(cfg, {}, src.lineage + [lineage_entry(command, spec.seed, src, recipe)], list(src.stages), dtype, growth=growth,
                      **carried)
    return execute(src, plans, out, meta, dtype, workers=workers, shard_bytes=shard_bytes, force=force, on_tensor=on_tensor)
