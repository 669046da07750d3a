"""What is inside a checkpoint, from headers and `samoe.json` only (no tensor data read).

Used by `samoe inspect-checkpoint` and by `samoe plan` (which summarises a model
built on the meta device the same way), so both report identical numbers.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

from .checkpoint import Checkpoint, digest_of
from .config import SamMoEConfig
from .layout import numel
from .roles import param_role

COMPONENTS = ("encoder", "moe_experts", "routers", "extra_blocks", "decoder", "heads", "selector", "gating")
_BLOCK = re.compile(r"^image_encoder\.blocks\.(\d+)\.")


def component_of(name: str, cfg: SamMoEConfig) -> str:
    """Which part of the model a tensor belongs to (extra blocks counted whole, experts and routers apart)."""
    m = _BLOCK.match(name)
    if m and int(m.group(1)) >= cfg.depth:
        return "extra_blocks"
    role = param_role(name)
    return {"router": "routers", "expert": "moe_experts", "head": "heads"}.get(role, role)


def provenance_kind(entry: str) -> str:
    """`copy-noise:<src>:<std>` -> `copy-noise`; plain kinds stay as they are."""
    return entry.split(":", 1)[0]


def params_by_provenance(shapes: dict[str, tuple[int, ...]], provenance: dict[str, Any]) -> dict[str, int]:
    """Parameters per provenance kind; expert banks carry one entry per expert (dim 0)."""
    counts: Counter[str] = Counter()
    for name, shape in shapes.items():
        size = numel(shape)
        entry = provenance.get(name, "unknown")
        if isinstance(entry, list):
            for e in entry:
                counts[provenance_kind(e)] += size // max(len(entry), 1)
        else:
            counts[provenance_kind(entry)] += size
    return dict(sorted(counts.items()))


def moe_layout(cfg: SamMoEConfig) -> tuple[dict[str, int], dict[str, list[int]]]:
    """Experts and group sizes per MoE layer, by layer name."""
    layers = [f"image_encoder.blocks.{i}.mlp" for i in range(cfg.total_blocks) if cfg.is_moe_block(i)]
    if cfg.decoder_moe:
        layers += [f"mask_decoder.transformer.layers.{i}.mlp" for i in range(cfg.decoder_depth)]
    return ({name: cfg.moe.num_experts for name in layers}, {name: list(cfg.moe.groups) for name in layers})


def summarize(
    cfg: SamMoEConfig,
    shapes: dict[str, tuple[int, ...]],
    provenance: dict[str, Any],
    dtype: str,
    bytes_per_param: float,
) -> dict[str, Any]:
    """Parameter counts per component and provenance, MoE layout, blocks, bytes."""
    by_component: Counter[str] = Counter()
    for name, shape in shapes.items():
        by_component[component_of(name, cfg)] += numel(shape)
    experts, groups = moe_layout(cfg)
    total = sum(numel(s) for s in shapes.values())
    return {
        "total_params": total,
        "params_by_component": {c: by_component.get(c, 0) for c in COMPONENTS if by_component.get(c, 0)} | (
            {"other": by_component["other"]} if by_component.get("other") else {}),
        "params_by_provenance": params_by_provenance(shapes, provenance),
        "experts_per_layer": experts,
        "groups": groups,
        "core_groups": cfg.moe.core_groups,
        "top_k": cfg.moe.top_k,
        "top_k_groups": cfg.moe.top_k_groups,
        "routed_top_k": cfg.moe.k_routed,
        "replicas": cfg.moe.replicas,
        "num_moe_layers": len(experts),
        "num_blocks": cfg.total_blocks,
        "extra_blocks": cfg.extra_blocks,
        "dtype": dtype,
        "weight_bytes": int(total * bytes_per_param),
    }


def inspect_checkpoint(ckpt: Checkpoint) -> dict[str, Any]:
    shapes = {name: info.shape for name, info in ckpt.tensors.items()}
    dtypes = Counter(info.dtype for info in ckpt.tensors.values())
    report = summarize(ckpt.config, shapes, ckpt.provenance, ckpt.meta.get("dtype", "?"), 0)
    report["weight_bytes"] = sum(info.nbytes for info in ckpt.tensors.values())
    report.update(
        path=str(ckpt.path),
        digest=ckpt.digest,
        tensor_dtypes=dict(dtypes),
        shards=[{"file": f, "bytes": v["bytes"], **dict([digest_of(v)])} for f, v in sorted(ckpt.files.items())],
        lineage=ckpt.lineage,
        stages=ckpt.stages,
        config=ckpt.config.to_dict(),
    )
    return report
