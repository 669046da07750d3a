"""Forward FLOPs per image of a SamMoE layout, counted without weights or data (`samoe plan`, `samoe eval`).

Growth changes what a model costs per image: routed groups add experts per token, extra blocks add depth.
Whether growth pays is a question at equal compute (the grown model against its source trained for the
same FLOPs), so a user needs that ratio before training, and a report of a grown model needs it next to
its metrics. `benchmarks/growth.py` measures a real training step; this counts a layout.

torch's FlopCounterMode counts matmuls and convolutions from shapes alone, so it runs on the meta device,
where nothing is allocated or computed, except in the MoE layers: they read expert counts on the host to
dispatch tokens, which meta tensors do not have. There each layer is replaced by `_MoEStandIn`, which
makes the same matmuls per token: the routers' logits (core pool, group router, its image-context
weights, the chosen groups' in-group routers) and `experts_per_token` expert MLPs. The count equals
FlopCounterMode's over a real forward with per-expert matmuls, for every layout `expand` makes
(`tests/test_flops.py`); where routed groups differ in size, the in-group router is counted at the
largest group's width (the real count depends on which groups tokens chose; a few multiply-adds per
token). A FLOP here is FlopCounterMode's: 2 per multiply-add; a training step costs about 3 forwards.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import Tensor, nn

from .config import SamMoEConfig


class _MoEStandIn(nn.Module):
    """The matmuls one MoE layer makes per token, on the meta device (see the module docstring)."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        cfg = layer.cfg
        hidden, dim = layer.experts[0].w1.shape[1:]
        routed = len(cfg.groups) - cfg.core_groups
        self.experts_per_token = cfg.experts_per_token
        self.routed_copies = cfg.top_k_groups  # tokens each in-group router sees, per token
        self.router = nn.Linear(dim, cfg.num_core_experts + routed, bias=False)  # core pool + group router
        self.in_group = nn.Linear(dim, max(cfg.groups[cfg.core_groups:]), bias=False) if routed else None
        self.context = nn.Linear(2 * dim, routed, bias=False) if cfg.image_context and routed else None
        self.lin1 = nn.Linear(dim, hidden)
        self.lin2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        self.router(x)
        if self.in_group is not None:
            self.in_group(x.repeat(self.routed_copies, 1))
        if self.context is not None:
            self.context(x.repeat(1, 2))
        self.lin2(self.lin1(x.repeat(self.experts_per_token, 1)))
        return x.reshape(shape)


def forward_flops(cfg: SamMoEConfig) -> int:
    """FLOPs of one image's forward pass through a model of layout `cfg` (all heads, the selector and gating)."""
    from torch.utils.flop_counter import FlopCounterMode

    from .model import build_model
    from .moe import MoEMLP

    with torch.device("meta"):
        model = build_model(cfg, device="meta")
        for module in list(model.modules()):
            for name, child in list(module.named_children()):
                if isinstance(child, MoEMLP):
                    setattr(module, name, _MoEStandIn(child))
    model.requires_grad_(False)
    image = torch.empty(1, cfg.in_chans, cfg.img_size, cfg.img_size, device="meta")
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(image)
    return int(counter.get_total_flops())


@contextlib.contextmanager
def per_expert_matmuls() -> Iterator[None]:
    """Run MoE experts as one matmul each, which FlopCounterMode counts (it does not know grouped GEMMs)."""
    from . import moe

    grouped = moe._grouped_mm_ok
    moe._grouped_mm_ok = lambda *a: False
    try:
        yield
    finally:
        moe._grouped_mm_ok = grouped
