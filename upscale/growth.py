"""What a growth makes: its options (`GrowthSpec`), the grown layout, and which tensors are new.

`samoe plan` and `samoe expand` share these; they need no torch (plan answers at once),
while upscale/expand.py makes the tensors.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from typing import Any

from .config import MoEConfig, SamMoEConfig
from .errors import SamoeError

INITS = ("copy-noise", "interpolate", "mixed")


@dataclass(frozen=True)
class GrowthSpec:
    """Options of `samoe expand` / `samoe plan`, validated against the source."""

    experts: int
    groups: tuple[int, ...]
    core_groups: int = 1
    top_k_groups: int = 1
    routed_top_k: int = 0  # experts per token inside a routed group; 0: the source's top-k
    replicate: bool = False  # every group an exact copy of the source's pool, one group per token (MoEConfig.replicas)
    decoder_group_mixing: bool = True  # the decoder's MoE mixes every routed group (SamMoEConfig.decoder_group_mixing)
    extra_blocks: int = 0
    extra_dense: bool = False
    init: str = "copy-noise"
    noise_std: float = 0.01
    interp_weight: float = 0.3
    seed: int = 0


@dataclass(frozen=True)
class GrowthRecipe:
    """The [growth] table of a recipe (and `samoe expand`'s options): the grown layout and how it starts."""

    experts: int = 0  # experts per MoE layer after growth (required: in the recipe or --experts)
    groups: int | list[int] | str = 8  # a count, or sizes with the core group(s) first
    core_groups: int = 1  # groups holding the source's experts, always active
    top_k_groups: int = 1  # new groups the group router picks per token
    routed_top_k: int = 0  # experts per token inside a picked group; 0: the source's top-k
    replicate: bool = False  # every group an exact copy of the source's experts, one group per token
    decoder_group_mixing: bool = True  # the decoder's MoE layers mix every routed group; false: routed per token
    extra_blocks: int = 0  # blocks appended after the last ViT block, starting as the identity
    extra_dense: bool = False  # extra blocks with a dense MLP instead of MoE
    init: str = "copy-noise"  # copy-noise | interpolate | mixed
    noise_std: float | None = None  # relative to each tensor's std (copy-noise); None: 0.01, 0 with replicate
    interp_weight: float = 0.3  # W in W*A + (1-W)*B (interpolate)
    dtype: str | None = None  # output dtype; None: the source's
    shard_size_gib: float = 2.0
    threads: int = 2  # threads making tensors (the output is identical for any count)
    verify_images: int = 8  # images `expand --verify` compares on
    verify_tol: float | None = None  # `expand --verify` exits 3 when a head's relative deviation exceeds it

    def spec(self, source_experts: int, seed: int) -> GrowthSpec:
        """The validated GrowthSpec of these settings for a source with `source_experts` experts per layer."""
        if self.experts < 1:
            raise SamoeError("the grown layout needs a number of experts: pass --experts N or set experts in [growth]")
        if self.init not in INITS:
            raise SamoeError(f"init {self.init!r} is not one of {', '.join(INITS)}: fix [growth] init or --set init=...")
        for name in ("noise_std", "interp_weight", "shard_size_gib", "verify_tol"):
            value = getattr(self, name)
            if value is not None and (not math.isfinite(value) or value < 0 or name == "shard_size_gib" and value == 0):
                raise SamoeError(f"{name} = {value} must be a finite number >= 0 (> 0 for shard_size_gib)")
        if self.interp_weight > 1:
            raise SamoeError(f"interp_weight = {self.interp_weight} must lie in [0, 1]")
        if self.threads < 1 or self.verify_images < 1 or self.core_groups < 1 or self.top_k_groups < 1 or self.routed_top_k < 0 or self.extra_blocks < 0:
            raise SamoeError("threads, verify_images, core_groups and top_k_groups must be >= 1, routed_top_k and "
                             "extra_blocks >= 0: fix the recipe's [growth] table")
        groups = ",".join(map(str, self.groups)) if isinstance(self.groups, list) else str(self.groups)
        if self.replicate and self.core_groups != 1:
            raise SamoeError("replicate has no core group (every group is a copy of the source's experts): drop core_groups")
        sizes = (resolve_replicas(source_experts, self.experts, groups) if self.replicate
                 else resolve_groups(source_experts, self.experts, groups, self.core_groups))
        noise = self.noise_std if self.noise_std is not None else 0.0 if self.replicate else 0.01
        return GrowthSpec(experts=self.experts, groups=sizes, core_groups=0 if self.replicate else self.core_groups,
                          top_k_groups=self.top_k_groups, routed_top_k=self.routed_top_k, replicate=self.replicate,
                          decoder_group_mixing=self.decoder_group_mixing, extra_blocks=self.extra_blocks, extra_dense=self.extra_dense, init=self.init,
                          noise_std=noise, interp_weight=self.interp_weight, seed=seed)


def resolve_groups(source_experts: int, experts: int, groups: str, core_groups: int) -> tuple[int, ...]:
    """`--groups 8` or `--groups 16,15,...` -> explicit group sizes, core group(s) first.

    A count puts the source experts in `core_groups` core groups (split as evenly
    as possible) and spreads the new ones near-equally over the rest, larger
    groups first: 117 from 16 in 8 groups -> 16 + 15,15,15,14,14,14,14.
    """
    if experts < source_experts:
        raise SamoeError(f"--experts {experts} is fewer than the source's {source_experts} experts: growth only adds experts")
    if core_groups not in (1, 2):
        raise SamoeError(f"core_groups = {core_groups} must be 1 or 2")
    if core_groups > source_experts:
        raise SamoeError(f"core_groups = {core_groups} needs at least {core_groups} source experts")
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
        raise SamoeError(f"replicate with --groups {groups}: need 2 or more groups of the source's {source_experts} experts each")
    if experts != sum(sizes):
        raise SamoeError(f"replicate with {len(sizes)} groups of {source_experts} makes {sum(sizes)} experts, but --experts "
                         f"is {experts}: pass --experts {sum(sizes)}")
    return sizes


def validate_spec(src: SamMoEConfig, spec: GrowthSpec) -> None:
    if len(src.moe.groups) != 1:
        raise SamoeError(f"the source already has {len(src.moe.groups)} expert groups: expand the flat (one-group) source checkpoint instead")
    if spec.init not in INITS:
        raise SamoeError(f"init {spec.init!r} must be one of {', '.join(INITS)}")
    if not (spec.noise_std >= 0 and math.isfinite(spec.noise_std)):
        raise SamoeError(f"noise_std = {spec.noise_std} must be a finite number >= 0")
    if not 0.0 <= spec.interp_weight <= 1.0:
        raise SamoeError(f"interp_weight = {spec.interp_weight} must be in [0, 1]")
    if spec.init != "copy-noise" and src.moe.num_experts < 2:
        raise SamoeError("init interpolate/mixed needs at least 2 source experts: set init = \"copy-noise\"")
    if spec.extra_blocks < 0:
        raise SamoeError(f"--extra-blocks {spec.extra_blocks} must be >= 0")
    if spec.replicate:
        if spec.init != "copy-noise" or spec.noise_std:
            raise SamoeError("replicate copies the source's experts exactly (routing, not noise, sets the copies apart): "
                             "drop init and noise_std from the recipe")
        if spec.routed_top_k not in (0, src.moe.top_k):
            raise SamoeError(f"replicate keeps the source's top-{src.moe.top_k} inside each group: drop routed_top_k")
        if spec.core_groups:
            raise SamoeError("replicate has no core group: every group is a copy of the source's experts")
    routed = len(spec.groups) - spec.core_groups
    if not 1 <= spec.top_k_groups <= routed:
        raise SamoeError(f"top_k_groups = {spec.top_k_groups} must be between 1 and the {routed} new groups")
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
    return replace(src, moe=moe, extra_blocks=src.extra_blocks + spec.extra_blocks, extra_blocks_moe=extra_moe,
                   decoder_group_mixing=spec.decoder_group_mixing).validate()


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
