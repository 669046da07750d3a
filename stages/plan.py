"""What each training stage trains, at which learning rate (strategy 2 of the growth plan).

| stage | trains                                              | lr (default) |
|-------|-----------------------------------------------------|--------------|
| 1     | tensors whose provenance is not `source`, routers,  | 1e-2 (large) |
|       | task-loss weights (source frozen, selector and      |              |
|       | gating included, unless `selector_gating`)          |              |
| 2     | stage 1 + FFN/MoE of the last K ViT blocks          | 1e-3         |
| 3     | everything                                          | 1e-4 (tiny)  |

Provenance comes from `samoe.json`; expert banks carry one entry per expert and
are trainable when any of their experts is new (banks are per group, and a
group is either all source or all new). `plan_report` is `samoe plan`: a grown
model's parameter counts and this memory model, before anything is written.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch

from upscale.checkpoint import dtype_name
from upscale.config import SamMoEConfig
from upscale.expand import GrowthSpec, grown_config, planned_provenance
from upscale.flops import forward_flops
from upscale.model import build_model
from upscale.roles import is_source, param_role
from upscale.summary import summarize


@dataclass(frozen=True)
class StagePlan:
    """Declarative description of one stage."""

    stage: int
    name: str
    lr: float
    description: str


STAGES: dict[int, StagePlan] = {
    1: StagePlan(1, "integration", 1e-2, "new experts, new blocks, all routers; source frozen"),
    2: StagePlan(2, "collaboration", 1e-3, "stage 1 + FFN/MoE of the last K ViT blocks"),
    3: StagePlan(3, "full", 1e-4, "everything"),
}

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
    numel = {n: _numel(s) for n, s in shapes.items()}
    total = sum(numel.values())
    for stage in STAGES:
        trainable = sum(numel[n] for n in shapes if is_trainable(n, provenance.get(n, "source"), stage, cfg, last_k,
                                                                  selector_gating))
        out[f"stage{stage}"] = {
            "trainable_params": trainable,
            "weights_bytes": total * esize,
            "grad_bytes": trainable * esize,
            "optimizer_bytes": trainable * esize,
            "total_bytes": (total + 2 * trainable) * esize,
        }
    return out


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def plan_report(src_cfg: SamMoEConfig, spec: GrowthSpec, dtype: torch.dtype, last_k: int = 4) -> dict[str, Any]:
    """`samoe plan`: grown parameter counts per component, per-stage memory and forward FLOPs per image (grown
    and source), from the meta device (stage 2 unfreezes the FFN/MoE of the last `last_k` ViT blocks, as
    `samoe train --last-k`)."""
    cfg = grown_config(src_cfg, spec)
    state = build_model(cfg, device="meta").state_dict()
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    provenance = planned_provenance(src_cfg, cfg, shapes)
    esize = torch.empty((), dtype=dtype).element_size()
    report = summarize(cfg, shapes, provenance, dtype_name(dtype), esize)
    report["source_params"] = sum(t.numel() for t in build_model(src_cfg, device="meta").state_dict().values())
    # gradients and optimizer state exist for trainable parameters only, never for buffers (e.g. selector alphas)
    model = build_model(cfg, device="meta")
    params = {k: tuple(v.shape) for k, v in model.named_parameters()}
    buffer_bytes = sum(b.numel() for b in model.buffers()) * esize
    report["memory_per_stage"] = stage_memory(cfg, params, provenance, esize, last_k=last_k)
    for stage in report["memory_per_stage"].values():
        stage["weights_bytes"] += buffer_bytes
        stage["total_bytes"] += buffer_bytes
    report["forward_flops"] = {"source": forward_flops(src_cfg), "grown": forward_flops(cfg)}
    report["config"] = cfg.to_dict()
    return report
