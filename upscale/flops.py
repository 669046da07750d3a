"""Forward FLOPs per image of a SamMoE layout, counted without weights or data (`samoe plan`, `samoe eval`).

Growth changes what a model costs per image: routed groups add experts per token, extra blocks add depth.
Whether growth pays is a question at equal compute (the grown model against its source trained for the
same FLOPs), so a user needs that ratio before training, and a report of a grown model needs it next to
its metrics. `benchmarks/growth.py` measures a real training step; this counts a layout.

torch's FlopCounterMode counts matmuls and convolutions from shapes alone, so the model runs on the meta
device, where nothing is allocated or computed. Every shape of an MoE layer follows from the token count
(upscale/moe.py), and its expert GEMMs (`samoe::expert_mm`) count as the dense GEMM over the rows they get,
so the count is the real forward's. A FLOP here is FlopCounterMode's: 2 per multiply-add; a training step
costs about 3 forwards.
"""

from __future__ import annotations

import torch

from .config import SamMoEConfig


def forward_flops(cfg: SamMoEConfig) -> int:
    """FLOPs of one image's forward pass through a model of layout `cfg` (all heads, the selector and gating)."""
    from torch.utils.flop_counter import FlopCounterMode

    from .model import build_model

    model = build_model(cfg, device="meta").requires_grad_(False)
    image = torch.empty(1, cfg.in_chans, cfg.img_size, cfg.img_size, device="meta")
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(image)
    return int(counter.get_total_flops())
