"""What each training stage trains, at which learning rate (strategy 2 of the growth plan).

| stage | trains                                              | lr (default)          |
|-------|-----------------------------------------------------|-----------------------|
| 1     | tensors whose provenance is not `source`, routers,  | 1 x the source's peak |
|       | task-loss weights (source frozen, selector and      |                       |
|       | gating included, unless `selector_gating`)          |                       |
| 2     | stage 1 + FFN/MoE of the last K ViT blocks          | 0.3 x                 |
| 3     | everything                                          | 0.1 x                 |

Learning rates are relative to the source's own peak rate (`reference_lr`: the lr of the last stage it
was trained in before it grew, recorded in its stage history), because a good rate depends on the
model, the data and the batch, not on the stage alone; each stage warms up again from zero. `lr` (recipe key)
sets an absolute rate instead.

Provenance comes from `samoe.json`; expert banks carry one entry per expert and
are trainable when any of their experts is new (banks are per group, and a
group is either all source or all new). `plan_report` is `samoe plan`: a grown
model's parameter counts and this memory model, before anything is written,
computed from the config alone (no torch: `samoe plan` answers at once).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from upscale.checkpoint import DTYPE_BYTES, check_dtype
from upscale.config import SamMoEConfig
from upscale.errors import SamoeError
from upscale.flops import forward_flops
from upscale.growth import GrowthSpec, grown_config, planned_provenance
from upscale.layout import is_buffer, numel, state_shapes
from upscale.roles import is_source, param_role
from upscale.summary import summarize


@dataclass(frozen=True)
class StagePlan:
    """Declarative description of one stage."""

    stage: int
    name: str
    lr_scale: float  # default base lr = lr_scale x reference_lr(source)
    description: str


STAGES: dict[int, StagePlan] = {
    1: StagePlan(1, "integration", 1.0, "new experts, new blocks, all routers; source frozen"),
    2: StagePlan(2, "collaboration", 0.3, "stage 1 + FFN/MoE of the last K ViT blocks"),
    3: StagePlan(3, "full", 0.1, "everything"),
}


def reference_lr(stages: list[dict[str, Any]], growth: dict[str, Any] | None) -> float | None:
    """The source's own peak learning rate: the `lr` of the last stage in its history before it grew (of the last
    stage, for a model that never grew); None when no stage recorded one (a fresh `init`, an upcycled SAM)."""
    before = stages[: growth.get("stages_before", len(stages))] if growth else stages
    for entry in reversed(before):
        lr = entry.get("lr")
        if type(lr) in (int, float) and math.isfinite(lr) and lr > 0:
            return float(lr)
    return None


def stage_lr(stage: int, lr: float | None, lr_scale: float | None, stages: list[dict[str, Any]],
             growth: dict[str, Any] | None, source: str) -> tuple[float, float | None]:
    """(base lr of this stage, the reference it is relative to): `lr` when given, else `lr_scale` (default: the
    stage's) times the source's recorded peak rate."""
    ref = reference_lr(stages, growth)
    if lr is not None:
        return lr, ref
    if ref is None:
        raise SamoeError(f"{source} records no learning rate it was trained at (a fresh or upcycled model): give the "
                         "stage's rate with --set lr=... or the recipe's lr")
    return (STAGES[stage].lr_scale if lr_scale is None else lr_scale) * ref, ref


_BLOCK_MLP = re.compile(r"^image_encoder\.blocks\.(\d+)\.mlp\.")


def is_trainable(name: str, provenance: Any, stage: int, cfg: SamMoEConfig, last_k: int = 4,
                 selector_gating: bool = False) -> bool:
    """Whether tensor `name` trains in `stage` (see the module table)."""
    if stage >= 3:
        return True
    # The selector and gating model are source parts: the growth plan freezes every source
    # parameter in stage 1, seed 004 never freezes the selector. Stage 1 follows the growth
    # plan unless asked (`selector_gating=True`); stages 2 and 3 train them. (The task-loss
    # sigmas are the objective's, not the model's: they train in every stage, stages/optim.py.)
    role = param_role(name)
    if role == "router" or not is_source(provenance):
        return True
    if role in ("selector", "gating"):
        return stage >= 2 or selector_gating
    if stage == 2:
        m = _BLOCK_MLP.match(name)
        return bool(m) and cfg.depth - last_k <= int(m.group(1)) < cfg.depth
    return False


def stage_memory(cfg: SamMoEConfig, shapes: dict[str, tuple[int, ...]], provenance: dict[str, Any], esize: int,
                 last_k: int = 4, selector_gating: bool = False) -> dict[str, dict[str, int]]:
    """Bytes of weights, gradients and optimizer state per stage (activations excluded).

    Gradients and SGD-momentum buffers (seed 004's optimizer1) exist only for
    trainable tensors and have the parameter dtype.
    """
    out = {}
    sizes = {n: numel(s) for n, s in shapes.items()}
    total = sum(sizes.values())
    for stage in STAGES:
        trainable = sum(sizes[n] for n in shapes if is_trainable(n, provenance.get(n, "source"), stage, cfg, last_k,
                                                                  selector_gating))
        out[f"stage{stage}"] = {
            "trainable_params": trainable,
            "weights_bytes": total * esize,
            "grad_bytes": trainable * esize,
            "optimizer_bytes": trainable * esize,
            "total_bytes": (total + 2 * trainable) * esize,
        }
    return out


def plan_report(src_cfg: SamMoEConfig, spec: GrowthSpec, dtype: str, last_k: int = 4) -> dict[str, Any]:
    """`samoe plan`: grown parameter counts per component, per-stage memory and forward FLOPs per image (grown
    and source) of weights stored as `dtype` (a checkpoint dtype name); stage 2 unfreezes the FFN/MoE of the
    last `last_k` ViT blocks, as `samoe train --last-k`."""
    cfg = grown_config(src_cfg, spec)
    esize = DTYPE_BYTES[check_dtype(dtype)]
    shapes = state_shapes(cfg)
    provenance = planned_provenance(src_cfg, cfg, shapes)
    report = summarize(cfg, shapes, provenance, dtype, esize)
    report["source_params"] = sum(numel(s) for s in state_shapes(src_cfg).values())
    # gradients and optimizer state exist for trainable parameters only, never for buffers (e.g. selector alphas)
    params = {k: s for k, s in shapes.items() if not is_buffer(k)}
    buffer_bytes = sum(numel(s) for k, s in shapes.items() if is_buffer(k)) * esize
    report["memory_per_stage"] = stage_memory(cfg, params, provenance, esize, last_k=last_k)
    for stage in report["memory_per_stage"].values():
        stage["weights_bytes"] += buffer_bytes
        stage["total_bytes"] += buffer_bytes
    report["forward_flops"] = {"source": forward_flops(src_cfg), "grown": forward_flops(cfg)}
    report["config"] = cfg.to_dict()
    return report
