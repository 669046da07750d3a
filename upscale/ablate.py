"""Switch off what growth added, to measure what it does: `samoe eval`'s "new parts off" score.

A grown model can beat its source without its new capacity doing any work: stages 2-3 also train
the source's own experts and blocks further, and that alone buys accuracy. The growth plan asks for
a model that is really stronger, not a false prosperity (虚假繁荣). The direct test is an ablation:
score the grown model as it is, and again with its new parts switched off, on the same images. The
paired difference is what the new capacity contributes; the rest of its gain over the source is
what training the old parts further bought.

What is switched off, in place, for every layout `expand` makes:
- routed groups (`core_groups` >= 1): every routed group's `group_scale` is set to
  0, so each MoE layer computes its core experts' output alone, as the source's layer did;
- replicas (`expand --replicate`): every group becomes a copy of group 0 (the source's own pool,
  with its in-group router and its scale), so every token computes what group 0 computes;
- extra blocks (`expand --extra-blocks`): skipped (growth starts them as the identity).

Right after `expand` this is exact: the model with its new parts off computes what the source
computed, whatever the new parts hold (`tests/test_ablate.py`). "New" is measured against the
layout every source has (`expand` grows only flat sources): one pool of experts and SAM's depth.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import MoEConfig, SamMoEConfig


def _new_groups(moe: MoEConfig) -> int:
    """Groups growth added to an MoE layout: those after the source's own (none without a source pool)."""
    return len(moe.groups) - moe.source_groups if moe.source_groups else 0


def new_parts(cfg: SamMoEConfig) -> str | None:
    """What growth added to this layout, in words (None for a model with nothing to switch off)."""
    parts = []
    groups = _new_groups(cfg.moe)
    if groups:
        kind = "replica groups" if cfg.moe.replicas else "routed groups"
        parts.append(f"{groups} {kind} ({sum(cfg.moe.groups[cfg.moe.source_groups:])} experts) per MoE layer")
    if cfg.extra_blocks:
        parts.append(f"{cfg.extra_blocks} extra block{'s' if cfg.extra_blocks > 1 else ''}")
    return " and ".join(parts) or None


@torch.no_grad()
def switch_off_new_parts_(model: nn.Module) -> None:
    """Switch off, in place, every new group and extra block of a SamMoE (see the module docstring)."""
    cfg: SamMoEConfig = model.config
    for _, layer in model.moe_layers():
        router, moe = layer.router, layer.cfg
        if not _new_groups(moe):
            continue
        if moe.replicas:
            for g in range(1, len(moe.groups)):
                layer.experts[g].load_state_dict(layer.experts[0].state_dict())
                router.expert_gates[g].weight.copy_(router.expert_gates[0].weight)
            router.group_scale.fill_(float(router.group_scale[0]))
        else:
            router.group_scale.zero_()
    blocks = model.image_encoder.blocks
    for i in range(cfg.depth, len(blocks)):
        blocks[i] = nn.Identity()
    model.reindex_moe_layers()
