"""One dataclass describes a SamMoE model; it is saved in every checkpoint.

`SamMoEConfig` is enough to rebuild the module tree (on the meta device if only
shapes are needed), so a checkpoint is self-describing. `PRESETS` is a small
registry in the style of segment-anything's `build_sam.py`.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Sequence

from .errors import SamoeError


def expert_offsets(groups: Sequence[int]) -> tuple[int, ...]:
    """Global index of each group's first expert, then the number of experts: (0, E_0, E_0 + E_1, ..., E)."""
    out = [0]
    for g in groups:
        out.append(out[-1] + g)
    return tuple(out)


@dataclass(frozen=True)
class MoEConfig:
    """How every MoE layer of the model is laid out and routed.

    Attributes:
        groups: experts per group, e.g. (16,) for a flat MoE or
            (16, 15, 15, 15, 14, 14, 14, 14) after growth. Groups may be ragged.
        core_groups: the leading groups that hold the source model's experts.
            They are always active and routed jointly (top_k over their union),
            exactly as the source's flat router did. 0 means every group is routed.
        top_k: experts chosen per token inside the core pool and inside each
            routed group.
        top_k_groups: routed (non-core) groups chosen per token by the group router.
        routed_top_k: experts chosen per token inside each routed group; 0 means top_k.
            1 keeps a grown model's cost per token near its source's (the new
            capacity is mostly parameters, not compute).
        replicas: every group is a copy of the source's expert pool (group 0 the source's
            own experts; `expand --replicate`) and there is no core pool. A token's chosen
            groups get their probabilities renormalised to sum to one, the sum held constant
            in the gradient, times `group_scale` (1 at growth): whichever groups a token
            takes, it computes what the source computed. Needs `core_groups = 0`.
    """

    groups: tuple[int, ...] = (16,)
    core_groups: int = 1
    top_k: int = 2
    top_k_groups: int = 1
    routed_top_k: int = 0
    replicas: bool = False

    @property
    def k_routed(self) -> int:
        """Experts per token inside a routed group."""
        return self.routed_top_k or self.top_k

    @property
    def num_routed_groups(self) -> int:
        return len(self.groups) - self.core_groups

    @property
    def experts_per_token(self) -> int:
        """Experts a token runs through in one layer with `top_k_groups` routed groups: its compute per token."""
        return ((self.top_k if self.core_groups else 0)
                + (self.top_k_groups * self.k_routed if self.num_routed_groups else 0))

    @property
    def source_groups(self) -> int:
        """The leading groups holding the source model's own experts: the core groups, or group 0 of replicas."""
        return self.core_groups or int(self.replicas)

    @property
    def num_experts(self) -> int:
        return sum(self.groups)

    @property
    def num_core_experts(self) -> int:
        return sum(self.groups[: self.core_groups])

    @property
    def offsets(self) -> tuple[int, ...]:
        """Global index of each group's first expert, then the number of experts."""
        return expert_offsets(self.groups)

    def validate(self) -> None:
        if not self.groups or any(g < 1 for g in self.groups):
            raise SamoeError(f"every expert group needs at least one expert, got groups={list(self.groups)}")
        if not 0 <= self.core_groups <= len(self.groups):
            raise SamoeError(f"core_groups={self.core_groups} must be between 0 and the number of groups ({len(self.groups)})")
        routed = self.num_routed_groups
        if self.top_k < 1:
            raise SamoeError(f"top_k={self.top_k} must be at least 1")
        if self.core_groups and self.top_k > self.num_core_experts:
            raise SamoeError(f"top_k={self.top_k} must be at most the core pool's {self.num_core_experts} experts")
        if self.routed_top_k < 0:
            raise SamoeError(f"routed_top_k={self.routed_top_k} must be 0 (the same as top_k) or more")
        if routed and not 1 <= self.k_routed <= min(self.groups[self.core_groups:]):
            raise SamoeError(f"top_k={self.k_routed} inside routed groups must be between 1 and the smallest routed group "
                             f"({min(self.groups[self.core_groups:])} experts)")
        if routed and not 1 <= self.top_k_groups <= routed:
            raise SamoeError(f"top_k_groups={self.top_k_groups} must be between 1 and the number of routed groups ({routed})")
        if self.replicas and self.core_groups:
            raise SamoeError("replicas have no core pool: every group is a copy of the source's experts (core_groups=0)")
        if self.replicas and len(set(self.groups)) != 1:
            raise SamoeError(f"replicas are copies of the source's expert pool, so every group has its size; got groups="
                             f"{list(self.groups)}: re-grow with --replicate")


@dataclass(frozen=True)
class SamMoEConfig:
    """The whole model: SAM image encoder + prompt-free mask decoder + MoE layout.

    Encoder fields mirror segment-anything's `ImageEncoderViT` arguments; decoder
    fields mirror its `TwoWayTransformer`. `moe_blocks` are indices of encoder
    blocks whose MLP becomes an MoE layer; `extra_blocks` are appended after the
    last ViT block (before the neck) with global attention.
    """

    # image encoder (segment_anything.modeling.ImageEncoderViT)
    img_size: int = 1024
    patch_size: int = 16
    in_chans: int = 3
    embed_dim: int = 1024
    depth: int = 24
    num_heads: int = 16
    mlp_ratio: float = 4.0
    window_size: int = 14
    global_attn_indexes: tuple[int, ...] = (5, 11, 17, 23)
    out_chans: int = 256
    # prompt-free mask decoder (segment_anything.modeling.TwoWayTransformer)
    decoder_depth: int = 2
    decoder_mlp_dim: int = 2048
    decoder_num_heads: int = 8
    num_classes: int = 4
    # mixture of experts
    moe_blocks: tuple[int, ...] = tuple(range(15, 24))
    decoder_moe: bool = True
    moe: MoEConfig = field(default_factory=MoEConfig)
    # The decoder's MoE layers mix every routed group (True) or route them per token as the encoder does (False).
    # Mixing gives every new group a gradient from the few decoder tokens, at the cost of all groups' FLOPs there.
    decoder_group_mixing: bool = True
    extra_blocks: int = 0
    extra_blocks_moe: bool = True
    # Boundary head: the edge map of the model's own segmentation (a max-pool window of this
    # size, odd; 0 = none) is added, as a logit, to the learned boundary logit: see upscale/model.py.
    boundary_prior: int = 7

    @property
    def encoder_mlp_dim(self) -> int:
        return int(self.embed_dim * self.mlp_ratio)

    @property
    def total_blocks(self) -> int:
        return self.depth + self.extra_blocks

    def decoder_moe_config(self) -> MoEConfig:
        """The decoder's MoE layers. They see only the 2C+1 output tokens of an image, so with sparse group
        routing most new groups would get few tokens; by default (`decoder_group_mixing`) they mix every routed
        group. With replicas (every group a copy of the source's experts) sparse routing keeps the step's cost
        at the source's, which a comparison at equal compute needs (benchmarks/capacity.py)."""
        routed = len(self.moe.groups) - self.moe.core_groups
        return replace(self.moe, top_k_groups=routed) if routed and self.decoder_group_mixing else self.moe

    def is_moe_block(self, index: int) -> bool:
        """Whether encoder block `index` (extra blocks included) has an MoE MLP."""
        if index >= self.depth:
            return self.extra_blocks_moe
        return index in self.moe_blocks

    def validate(self) -> "SamMoEConfig":
        self.moe.validate()
        for name, (lo, hi) in _RANGES.items():
            value = getattr(self, name)
            if not lo <= value <= hi:
                raise SamoeError(f"config field {name}={value!r} must be between {lo} and {hi}")
        if not 0 < self.mlp_ratio <= 64 or not 1 <= self.encoder_mlp_dim <= 65536:
            raise SamoeError(f"config field mlp_ratio={self.mlp_ratio!r} must be positive, with embed_dim*mlp_ratio between 1 and 65536")
        if self.embed_dim % self.num_heads:
            raise SamoeError(f"config field num_heads={self.num_heads} must divide embed_dim={self.embed_dim}")
        if (self.out_chans // 2) % self.decoder_num_heads or self.out_chans % 2:
            raise SamoeError(f"config field decoder_num_heads={self.decoder_num_heads} must divide out_chans/2 (out_chans={self.out_chans}, even)")
        if self.moe.num_experts > MAX_EXPERTS or len(self.moe.groups) > MAX_EXPERTS:
            raise SamoeError(f"config field moe.groups holds {self.moe.num_experts} experts, more than the {MAX_EXPERTS} samoe builds")
        bad = [b for b in self.global_attn_indexes if not 0 <= b < self.depth]
        if bad:
            raise SamoeError(f"config field global_attn_indexes {bad} lies outside the encoder's {self.depth} blocks")
        if self.img_size % self.patch_size:
            raise SamoeError(f"img_size={self.img_size} must be a multiple of patch_size={self.patch_size}")
        bad = [b for b in self.moe_blocks if not 0 <= b < self.depth]
        if bad:
            raise SamoeError(f"moe blocks {bad} are outside the encoder's {self.depth} blocks (0..{self.depth - 1})")
        if self.num_classes < 1:
            raise SamoeError(f"num_classes={self.num_classes} must be at least 1")
        if self.extra_blocks < 0:
            raise SamoeError(f"extra_blocks={self.extra_blocks} must be >= 0")
        if self.boundary_prior and self.boundary_prior % 2 == 0:
            raise SamoeError(f"config field boundary_prior={self.boundary_prior} must be 0 (none) or odd")
        return self

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "model config") -> "SamMoEConfig":
        """Build from JSON after checking every field's type, then its range (a hostile file names the field)."""
        if not isinstance(data, dict):
            raise SamoeError(f"{where}: config must be a table, got {type(data).__name__}: the checkpoint is damaged; re-create it")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise SamoeError(f"unknown model config keys {unknown}: the checkpoint was written by a newer samoe; upgrade samoe")
        kwargs = dict(data)
        kwargs.setdefault("boundary_prior", 0)  # written before the prior existed: keep that model's function
        moe = kwargs.pop("moe", {})
        if not isinstance(moe, dict):
            raise _type_error(where, "moe", moe, "a table")
        moe = _drop_removed(moe, where)
        unknown = sorted(set(moe) - {f.name for f in fields(MoEConfig)})
        if unknown:
            raise SamoeError(f"unknown model config keys moe.{unknown[0]}: the checkpoint was written by a newer samoe; upgrade samoe")
        for name, value in list(kwargs.items()) + [(f"moe.{k}", v) for k, v in moe.items()]:
            kind = _KINDS[name]
            if not _is_kind(value, kind):
                raise _type_error(where, name, value, _KIND_TEXT[kind])
        kwargs["moe"] = MoEConfig(**{k: tuple(v) if k == "groups" else v for k, v in moe.items()})
        for name in ("global_attn_indexes", "moe_blocks"):
            if name in kwargs:
                kwargs[name] = tuple(kwargs[name])
        try:
            return cls(**kwargs).validate()
        except SamoeError as e:
            raise SamoeError(f"{where}: {e}") from None

    def replace(self, **changes: Any) -> "SamMoEConfig":
        return replace(self, **changes)


MAX_EXPERTS = 4096
# Caps keep a hostile samoe.json from making samoe build an absurd module tree; the real presets sit far inside.
_RANGES: dict[str, tuple[int, int]] = {
    "img_size": (1, 8192), "patch_size": (1, 1024), "in_chans": (1, 64), "embed_dim": (1, 16384), "depth": (1, 256),
    "num_heads": (1, 1024), "window_size": (0, 1024), "out_chans": (2, 16384), "decoder_depth": (1, 64),
    "decoder_mlp_dim": (1, 65536), "decoder_num_heads": (1, 1024), "num_classes": (1, 1024), "extra_blocks": (0, 64),
    "boundary_prior": (0, 63),
}
_KINDS: dict[str, str] = {
    **{name: "int" for name in _RANGES}, "mlp_ratio": "number", "global_attn_indexes": "ints", "moe_blocks": "ints",
    "decoder_moe": "bool", "decoder_group_mixing": "bool", "extra_blocks_moe": "bool", "moe.groups": "ints", "moe.core_groups": "int", "moe.top_k": "int",
    "moe.top_k_groups": "int", "moe.routed_top_k": "int", "moe.replicas": "bool",
}
# Growth variants that measured neutral or worse left samoe (docs/growth-experiments.md, "Removed variants"):
# a checkpoint that still names one at its neutral value loads, one that uses it is refused. `aux_loss_coef`
# became a training setting (TrainConfig): whatever value a checkpoint carries is ignored.
REMOVED_MOE_KEYS = ("token_handover", "image_context", "residual")


def _drop_removed(moe: dict[str, Any], where: str) -> dict[str, Any]:
    """The moe table without the keys of removed variants (at their neutral value) and `aux_loss_coef`."""
    used = [k for k in REMOVED_MOE_KEYS if moe.get(k, False) is not False]
    if used:
        raise SamoeError(f"{where}: this checkpoint uses moe.{used[0]}, a growth variant samoe no longer builds "
                         "(docs/growth-experiments.md); re-grow its source with `samoe expand` without it")
    return {k: v for k, v in moe.items() if k not in REMOVED_MOE_KEYS and k != "aux_loss_coef"}


_KIND_TEXT = {"int": "an integer", "number": "a finite number", "ints": "a list of integers", "bool": "true or false"}


def _is_kind(value: Any, kind: str) -> bool:
    if kind == "int":
        return type(value) is int
    if kind == "number":
        return type(value) in (int, float) and math.isfinite(value)
    if kind == "ints":
        return isinstance(value, (list, tuple)) and len(value) <= MAX_EXPERTS and all(type(v) is int for v in value)
    return type(value) is bool


def _type_error(where: str, name: str, value: Any, expect: str) -> SamoeError:
    shown = json.dumps(value)[:40] if not isinstance(value, (dict, list, tuple)) else type(value).__name__
    return SamoeError(f"{where}: config field {name} must be {expect}, got {shown}: the checkpoint is damaged; re-create it")


def _vit(embed_dim: int, depth: int, num_heads: int, global_attn_indexes: tuple[int, ...]) -> dict[str, Any]:
    return dict(embed_dim=embed_dim, depth=depth, num_heads=num_heads, global_attn_indexes=global_attn_indexes)


def check_sam_file(path: Path) -> None:
    """Refuse a --from-sam path that is not a file (torch-free, so `init` answers before its slow imports)."""
    if not path.is_file():
        raise SamoeError(f"SAM checkpoint {path} does not exist: check --from-sam")


# Encoder shapes of segment-anything's registry (build_sam.py).
SAM_VITS: dict[str, dict[str, Any]] = {
    "vit_b": _vit(768, 12, 12, (2, 5, 8, 11)),
    "vit_l": _vit(1024, 24, 16, (5, 11, 17, 23)),
    "vit_h": _vit(1280, 32, 16, (7, 15, 23, 31)),
}

PRESETS: dict[str, SamMoEConfig] = {
    # A miniature of the real shape; runs the whole pipeline on a CPU in seconds.
    "tiny": SamMoEConfig(
        img_size=128, patch_size=16, embed_dim=64, depth=4, num_heads=4, window_size=4,
        global_attn_indexes=(1, 3), out_chans=32, decoder_depth=2, decoder_mlp_dim=64,
        decoder_num_heads=4, num_classes=4, moe_blocks=(2, 3),
        moe=MoEConfig(groups=(4,), core_groups=1, top_k=2),
    ),
    # tiny with SAM's ratio of decoder width to classes: out_chans 128 gives 16 feature channels per pixel, as
    # SAM's 256 gives 32. tiny's 4 channels cannot tell 16 classes apart (its segmentation loss stays at chance
    # on the 16-class codebook set), so the capacity benchmarks use this one.
    "small": SamMoEConfig(
        img_size=128, patch_size=16, embed_dim=64, depth=4, num_heads=4, window_size=4,
        global_attn_indexes=(1, 3), out_chans=128, decoder_depth=2, decoder_mlp_dim=256,
        decoder_num_heads=4, num_classes=16, moe_blocks=(2, 3),
        moe=MoEConfig(groups=(4,), core_groups=1, top_k=2),
    ),
    # ViT-L with 16 experts (top-2) in the last 9 encoder blocks and the decoder MLPs.
    "sam-moe-1.5b": SamMoEConfig(
        **SAM_VITS["vit_l"], moe_blocks=tuple(range(15, 24)),
        moe=MoEConfig(groups=(16,), core_groups=1, top_k=2),
    ),
}


def get_preset(name: str) -> SamMoEConfig:
    if name not in PRESETS:
        raise SamoeError(f"unknown preset {name!r}: choose one of {', '.join(PRESETS)}")
    return PRESETS[name]
