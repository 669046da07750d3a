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
import re
import threading
from collections import OrderedDict, deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .checkpoint import DEFAULT_SHARD_BYTES, Checkpoint, CheckpointWriter, TensorSpec, build_meta, lineage_entry
from .config import MoEConfig, SamMoEConfig
from .errors import SamoeError
from .model import build_model
from .ownership import check_separate

INITS = ("copy-noise", "interpolate", "mixed")
_EXPERT_PARAMS = ("w1", "b1", "w2", "b2")


@dataclass(frozen=True)
class GrowthSpec:
    """Options of `samoe expand` / `samoe plan`, validated against the source."""

    experts: int
    groups: tuple[int, ...]
    core_groups: int = 1
    top_k_groups: int = 1
    routed_top_k: int = 0  # experts per token inside a routed group; 0: the source's top-k
    replicate: bool = False  # every group an exact copy of the source's pool, one group per token (MoEConfig.replicas)
    extra_blocks: int = 0
    extra_dense: bool = False
    init: str = "copy-noise"
    noise_std: float = 0.01
    interp_weight: float = 0.3
    seed: int = 0


def resolve_groups(source_experts: int, experts: int, groups: str, core_groups: int) -> tuple[int, ...]:
    """`--groups 8` or `--groups 16,15,...` -> explicit group sizes, core group(s) first.

    A count puts the source experts in `core_groups` core groups (split as evenly
    as possible) and spreads the new ones near-equally over the rest, larger
    groups first: 117 from 16 in 8 groups -> 16 + 15,15,15,14,14,14,14.
    """
    if experts < source_experts:
        raise SamoeError(f"--experts {experts} is fewer than the source's {source_experts} experts: growth only adds experts")
    if core_groups not in (1, 2):
        raise SamoeError(f"--core-groups {core_groups} must be 1 or 2")
    if core_groups > source_experts:
        raise SamoeError(f"--core-groups {core_groups} needs at least {core_groups} source experts")
    text = groups.strip()
    if "," not in text:
        try:
            count = int(text)
        except ValueError:
            raise SamoeError(f"--groups {groups!r} must be a number of groups or a comma-separated list of sizes") from None
        routed = count - core_groups
        new = experts - source_experts
        if routed < 1 or new < routed:
            raise SamoeError(
                f"--groups {count} with {core_groups} core group(s) leaves {routed} group(s) for {new} new experts: "
                "need at least one new group and one new expert per group"
            )
        core = [source_experts // core_groups + (1 if i < source_experts % core_groups else 0) for i in range(core_groups)]
        spread = [new // routed + (1 if i < new % routed else 0) for i in range(routed)]
        return tuple(core + spread)
    try:
        sizes = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise SamoeError(f"--groups {groups!r} must be a comma-separated list of integers, e.g. 16,15,15,15,14,14,14,14") from None
    if any(s < 1 for s in sizes):
        raise SamoeError(f"--groups {groups}: every group needs at least one expert")
    if sum(sizes) != experts:
        raise SamoeError(f"--groups {groups} sums to {sum(sizes)} experts, but --experts is {experts}: make them agree")
    if len(sizes) <= core_groups:
        raise SamoeError(f"--groups {groups}: need at least one group besides the {core_groups} core group(s)")
    core = sum(sizes[:core_groups])
    if core != source_experts:
        raise SamoeError(
            f"--groups {groups}: the core group(s) hold {core} experts but the source has {source_experts}; "
            f"the first {core_groups} group size(s) must add up to {source_experts}"
        )
    return sizes


def resolve_replicas(source_experts: int, experts: int, groups: str) -> tuple[int, ...]:
    """`--replicate --groups 4` (or 16,16,16,16) -> group sizes, each the source's expert count."""
    text = groups.strip()
    try:
        sizes = tuple(int(v) for v in text.split(",")) if "," in text else (source_experts,) * int(text)
    except ValueError:
        raise SamoeError(f"--groups {groups!r} must be a number of groups or a comma-separated list of sizes") from None
    if len(sizes) < 2 or any(s != source_experts for s in sizes):
        raise SamoeError(f"--replicate --groups {groups}: need 2 or more groups of the source's {source_experts} experts each")
    if experts != sum(sizes):
        raise SamoeError(f"--replicate with {len(sizes)} groups of {source_experts} makes {sum(sizes)} experts, but --experts "
                         f"is {experts}: pass --experts {sum(sizes)}")
    return sizes


def validate_spec(src: SamMoEConfig, spec: GrowthSpec) -> None:
    if len(src.moe.groups) != 1:
        raise SamoeError(f"the source already has {len(src.moe.groups)} expert groups: expand the flat (one-group) source checkpoint instead")
    if spec.init not in INITS:
        raise SamoeError(f"--init {spec.init!r} must be one of {', '.join(INITS)}")
    if not (spec.noise_std >= 0 and np.isfinite(spec.noise_std)):
        raise SamoeError(f"--noise-std {spec.noise_std} must be a finite number >= 0")
    if not 0.0 <= spec.interp_weight <= 1.0:
        raise SamoeError(f"--interp-weight {spec.interp_weight} must be in [0, 1]")
    if spec.init != "copy-noise" and src.moe.num_experts < 2:
        raise SamoeError("--init interpolate/mixed needs at least 2 source experts: use --init copy-noise")
    if spec.extra_blocks < 0:
        raise SamoeError(f"--extra-blocks {spec.extra_blocks} must be >= 0")
    if spec.replicate:
        if spec.init != "copy-noise" or spec.noise_std:
            raise SamoeError("--replicate copies the source's experts exactly (routing, not noise, sets the copies apart): "
                             "drop --init and --noise-std")
        if spec.routed_top_k not in (0, src.moe.top_k):
            raise SamoeError(f"--replicate keeps the source's top-{src.moe.top_k} inside each group: drop --routed-top-k")
        if spec.core_groups:
            raise SamoeError("--replicate has no core group: every group is a copy of the source's experts")
    routed = len(spec.groups) - spec.core_groups
    if not 1 <= spec.top_k_groups <= routed:
        raise SamoeError(f"--top-k-groups {spec.top_k_groups} must be between 1 and the {routed} new groups")
    k = spec.routed_top_k or src.moe.top_k
    if spec.routed_top_k < 0:
        raise SamoeError(f"--routed-top-k {spec.routed_top_k} must be 0 (the source's top-k) or more")
    if k > min(spec.groups[spec.core_groups:]):
        raise SamoeError(f"every new group needs at least top-k={k} experts; got groups {list(spec.groups)}")


def grown_config(src: SamMoEConfig, spec: GrowthSpec) -> SamMoEConfig:
    validate_spec(src, spec)
    moe = MoEConfig(
        groups=spec.groups, core_groups=spec.core_groups, top_k=src.moe.top_k,
        top_k_groups=spec.top_k_groups, routed_top_k=spec.routed_top_k, replicas=spec.replicate,
    )
    extra_moe = src.extra_blocks_moe if src.extra_blocks else not spec.extra_dense
    if src.extra_blocks and extra_moe == spec.extra_dense:
        raise SamoeError("the source's extra blocks and --extra-dense disagree: all extra blocks must be MoE or all dense")
    return replace(src, moe=moe, extra_blocks=src.extra_blocks + spec.extra_blocks, extra_blocks_moe=extra_moe).validate()


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
    """Deterministic Gaussian noise at the storage dtype: numpy SFC64 bits -> 16-bit indices -> quantile table.

    SFC64 (numpy's small fast chaotic generator, passes PractRand/BigCrush) gives
    64 random bits per step, i.e. four table indices; the table is scaled and cast
    to the output dtype first (65536 values), so the noise is born in the storage
    precision and `add(base, noise, out=...)` rounds once: add and cast fused.
    Work goes in chunks through reused scratch buffers: fresh multi-MB temporaries
    per row would cost more in page faults than the arithmetic.
    """

    CHUNK = 1 << 18  # elements per step (a multiple of 4: chunking does not change the stream)

    def __init__(self, seed: int) -> None:
        self.bits = np.random.SFC64(seed)
        self.idx = torch.empty(self.CHUNK, dtype=torch.int32)
        self.noise: torch.Tensor | None = None

    def indices(self, n: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """n uniform indices in [0, 65536) as int32 (what index_select takes)."""
        raw = torch.from_numpy(self.bits.random_raw((n + 3) // 4).view(np.int16)[:n])
        out = torch.empty(n, dtype=torch.int32) if out is None else out[:n]
        return out.copy_(raw).bitwise_and_(0xFFFF)

    def sample(self, n: int, std: float, dtype: torch.dtype) -> torch.Tensor:
        out = torch.empty(n, dtype=dtype)
        self.add_to(torch.zeros(n, dtype=dtype), std, out)
        return out

    def add_to(self, base: torch.Tensor, std: float, out: torch.Tensor) -> None:
        """out = base + N(0, std^2) noise, computed and rounded once in out's dtype."""
        table = (unit_gaussian_table() * std).to(out.dtype)
        if self.noise is None or self.noise.dtype != out.dtype:
            self.noise = torch.empty(self.CHUNK, dtype=out.dtype)
        src, dst = base.reshape(-1), out.view(-1)
        for lo in range(0, src.numel(), self.CHUNK):
            m = min(self.CHUNK, src.numel() - lo)
            noise = torch.index_select(table, 0, self.indices(m, self.idx), out=self.noise[:m])
            torch.add(src[lo:lo + m], noise, out=dst[lo:lo + m])


def make_new_bank(source: torch.Tensor, recipes: list[tuple[str, tuple[int, ...]]], spec: GrowthSpec, seed: int,
                  std_of: Callable[[int], float] | None = None,
                  empty: Callable[[tuple[int, ...], torch.dtype], torch.Tensor] = lambda shape, dtype: torch.empty(shape, dtype=dtype),
                  ) -> torch.Tensor:
    """Stack new experts (rows along dim 0) made from `source` (S, ...) by their recipes.

    copy-noise rows are one table lookup and one add straight into the output
    bank at the storage dtype (this is the CPU cost of a 10B expand); only
    interpolation goes through a float32 scratch row. `empty` allocates the
    output (expand passes a pool of recycled buffers; every row is overwritten).
    """
    noise = GaussianNoise(seed) if spec.noise_std > 0 else None
    out = empty((len(recipes),) + tuple(source.shape[1:]), source.dtype)
    row = None

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
            if row is None:
                row = torch.empty(source.shape[1:], dtype=torch.float32)
            row.copy_(source[src[0]])
            row.mul_(spec.interp_weight).add_(source[src[1]].to(torch.float32) * (1.0 - spec.interp_weight))
            out[i].copy_(row)
    return out


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


def _passthrough(src_name: str, index: slice | int | None = None) -> Callable[[Reader], torch.Tensor]:
    def make(read: Reader) -> torch.Tensor:
        t = read(src_name)  # cached and shared, but the writer only reads it: no copy
        return t[index] if index is not None else t
    return make


def _zeros(shape: tuple[int, ...], dtype: torch.dtype) -> Callable[[Reader], torch.Tensor]:
    return lambda read: torch.zeros(shape, dtype=dtype)


def _ones(shape: tuple[int, ...], dtype: torch.dtype) -> Callable[[Reader], torch.Tensor]:
    return lambda read: torch.ones(shape, dtype=dtype)


def _random_normal(shape: tuple[int, ...], dtype: torch.dtype, seed: int, std: float) -> Callable[[Reader], torch.Tensor]:
    return lambda read: (torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * std).to(dtype)


def _new_bank(src_name: str, recipes, spec: GrowthSpec, seed: int) -> Callable[[Reader], torch.Tensor]:
    def make(read: Reader) -> torch.Tensor:
        std_of = getattr(read, "row_std", None)
        kw = {"empty": read.empty} if hasattr(read, "empty") else {}
        return make_new_bank(read(src_name), recipes, spec, seed, std_of and (lambda i: std_of(src_name, i)), **kw)
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
                    plans.append(TensorPlan(out_name, shape, prov, (src_name,), _passthrough(src_name, slice(lo, hi))))
            else:
                rec = recipes[lo - s : hi - s]
                prov = [recipe_provenance(r, src_name, spec) for r in rec]
                plans.append(TensorPlan(out_name, shape, prov, (src_name,), _new_bank(src_name, rec, spec, tensor_seed(spec.seed, out_name))))
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
    return TensorPlan(out_name, shape, prov, (src_name,), _passthrough(src_name))


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
    out_state = build_model(cfg, device="meta").state_dict()
    shapes = {k: tuple(v.shape) for k, v in out_state.items()}
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
                layer = [TensorPlan(name, shapes[name], f"copy:{src_name}", (src_name,), _passthrough(src_name))]
        elif prefix is not None:
            layer = _moe_layer_plans(prefix, prefix, src_cfg, cfg, spec, dtype, shapes, new_block=False)
        else:
            if name not in src.tensors:
                raise SamoeError(f"the source checkpoint lacks tensor {name}: it does not match its own config; re-create it")
            layer = [TensorPlan(name, shapes[name], "source", (name,), _passthrough(name))]
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
            plans.append(TensorPlan(name, shapes[name], f"copy:{src_name}[0]", (src_name,), _passthrough(src_name, index)))
        else:
            src_name = f"{tpl}.mlp.{dense}"
            plans.append(TensorPlan(name, shapes[name], f"copy:{src_name}", (src_name,), _passthrough(src_name)))
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
            stds, finite = None, bool(torch.isfinite(tensor).all()) if tensor.is_floating_point() else True
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
        return _execute(src, plans, out, meta, dtype, read, window, layout, workers, shard_bytes, force, on_tensor)
    finally:
        torch.set_num_threads(threads)


def _execute(src, plans, out, meta, dtype, read, window, layout, workers, shard_bytes, force, on_tensor) -> Path:
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
                plan, fut = made.popleft()
                made_tensor = fut.result()
                tensor = made_tensor.to(dtype)
                if tensor is not made_tensor:
                    read.pool.give_back(made_tensor)
                written.append(io.submit(write, plan.name, tensor))
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
    src_path: Path, out: Path, spec: GrowthSpec, command: list[str], dtype: torch.dtype | None = None,
    workers: int = 2, shard_bytes: int = DEFAULT_SHARD_BYTES, force: bool = False,
    on_start: Callable[[int], None] | None = None, on_tensor: Callable[[int], None] | None = None,
) -> Path:
    """Plan and execute a growth; returns the new checkpoint directory."""
    src = Checkpoint.open(src_path)
    src.check_matches_config()
    check_separate(out, "--out", {"the source checkpoint": src.path})
    cfg, plans = plan_growth(src, spec, dtype)
    dtype = dtype or _source_dtype(src)
    total = sum(int(np.prod(p.shape)) for p in plans) * torch.empty((), dtype=dtype).element_size()
    if on_start:
        on_start(total)
    growth = {k: (list(v) if isinstance(v, tuple) else v) for k, v in spec.__dict__.items()}
    growth["stages_before"] = len(src.stages)  # stage checks look only at stages trained after this growth
    meta = build_meta(cfg, {}, src.lineage + [lineage_entry(command, spec.seed, src)], list(src.stages), dtype, growth=growth)
    return execute(src, plans, out, meta, dtype, workers=workers, shard_bytes=shard_bytes, force=force, on_tensor=on_tensor)


def planned_provenance(src_cfg: SamMoEConfig, cfg: SamMoEConfig, shapes: dict[str, tuple[int, ...]]) -> dict[str, Any]:
    """Coarse provenance for planning: source vs new, per tensor (expert banks per expert)."""
    prov: dict[str, Any] = {}
    for name, shape in shapes.items():
        m = re.match(r"image_encoder\.blocks\.(\d+)\.", name)
        if m and int(m.group(1)) >= src_cfg.total_blocks:
            prov[name] = "new"
        elif ".router.group_" in name:
            prov[name] = "new"
        else:
            g = re.search(r"\.(?:experts|expert_gates)\.(\d+)\.", name)
            prov[name] = "new" if g and int(g.group(1)) >= cfg.moe.source_groups else "source"
    return prov
