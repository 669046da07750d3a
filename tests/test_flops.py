"""Forward FLOPs per image from a layout (upscale/flops.py), against FlopCounterMode over a real forward
(tiny layouts) and over the model on the meta device (every layout, the 1.5B and 10B ones included)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from upscale.config import PRESETS
from upscale.expand import GrowthSpec, grown_config, resolve_groups
from upscale.flops import forward_flops, per_expert_matmuls
from upscale.model import build_model
from upscale.moe import MoEMLP

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = PRESETS["tiny"]
LAYOUTS = {
    "source": None,
    "hand-over + extra block": GrowthSpec(experts=16, groups=(4, 4, 4, 4), extra_blocks=1),
    "token hand-over, image context, 2 groups per token": GrowthSpec(experts=16, groups=(4, 4, 4, 4), token_handover=True,
                                                                      image_context=True, top_k_groups=2),
    "residual, routed top-1": GrowthSpec(experts=16, groups=(4, 4, 4, 4), routed_top_k=1, residual=True),
    "replicas + extra block": GrowthSpec(experts=16, groups=(4, 4, 4, 4), core_groups=0, replicate=True, noise_std=0.0,
                                         extra_blocks=1),
}


def _measured(cfg) -> int:
    """FlopCounterMode over one real forward of a random image, experts as per-expert matmuls."""
    model = build_model(cfg).eval().requires_grad_(False)
    image = torch.randn(1, cfg.in_chans, cfg.img_size, cfg.img_size, generator=torch.Generator().manual_seed(0))
    with per_expert_matmuls(), torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(image)
    return int(counter.get_total_flops())


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_counted_from_the_layout_equals_a_real_forward(layout: str):
    cfg = TINY if LAYOUTS[layout] is None else grown_config(TINY, LAYOUTS[layout])
    assert forward_flops(cfg) == _measured(cfg)


class _MoEStandIn(nn.Module):
    """The matmuls one MoE layer makes per token, on the meta device, where its dispatch (which reads expert
    counts on the host) cannot run: the routers' logits, the chosen groups' in-group routers at the largest
    routed group's width, and `experts_per_token` expert MLPs."""

    def __init__(self, layer: MoEMLP) -> None:
        super().__init__()
        cfg = layer.cfg
        hidden, dim = layer.experts[0].w1.shape[1:]
        routed = len(cfg.groups) - cfg.core_groups
        self.experts_per_token = cfg.experts_per_token
        self.routed_copies = cfg.top_k_groups
        self.router = nn.Linear(dim, cfg.num_core_experts + routed, bias=False)
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


def _counted_on_meta(cfg) -> int:
    """FlopCounterMode over the model on the meta device (nothing allocated), MoE layers as stand-ins."""
    with torch.device("meta"):
        model = build_model(cfg, device="meta")
        for module in list(model.modules()):
            for name, child in list(module.named_children()):
                if isinstance(child, MoEMLP):
                    setattr(module, name, _MoEStandIn(child))
    model.requires_grad_(False)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.empty(1, cfg.in_chans, cfg.img_size, cfg.img_size, device="meta"))
    return int(counter.get_total_flops())


L = PRESETS["sam-moe-1.5b"]
META_LAYOUTS = {
    "1.5b": L,
    "10b": grown_config(L, GrowthSpec(experts=117, groups=resolve_groups(16, 117, "8", 1), extra_blocks=1)),
    "10b, routed top-1, 2 groups per token": grown_config(L, GrowthSpec(experts=117, groups=resolve_groups(16, 117, "8", 1),
                                                                         routed_top_k=1, top_k_groups=2)),
    "replicas, dense extra blocks": grown_config(TINY, GrowthSpec(
        experts=16, groups=(4, 4, 4, 4), core_groups=0, replicate=True, noise_std=0.0, extra_blocks=2, extra_dense=True)),
    "dense decoder, padded windows": replace(TINY, decoder_moe=False, img_size=112, window_size=3),
    "image context, 2 core groups": grown_config(TINY, GrowthSpec(experts=16, groups=(2, 2, 4, 4, 4), core_groups=2,
                                                                  image_context=True, top_k_groups=3)),
}


@pytest.mark.parametrize("layout", list(META_LAYOUTS))
def test_counted_from_the_layout_equals_the_meta_model(layout: str):
    cfg = META_LAYOUTS[layout]
    assert forward_flops(cfg) == _counted_on_meta(cfg)


def test_what_a_routed_expert_costs_by_hand():
    """Residual growth with one expert per token in one new group: per MoE layer and token, one more expert MLP
    (2 matmuls of D x H), the group router over 3 groups and the chosen group's router over its 4 experts."""
    grown = grown_config(TINY, LAYOUTS["residual, routed top-1"])
    tokens = (TINY.img_size // TINY.patch_size) ** 2
    d, h = TINY.embed_dim, TINY.encoder_mlp_dim
    encoder = len(TINY.moe_blocks) * tokens * 2 * (2 * d * h + d * 3 + d * 4)
    # decoder MoE layers (token -> image and image MLPs of each two-way block): every routed group, 1 expert each
    dd, dh, outputs = TINY.out_chans, TINY.decoder_mlp_dim, 2 * TINY.num_classes + 1
    decoder = TINY.decoder_depth * outputs * 2 * (3 * 2 * dd * dh + dd * 3 + 3 * dd * 4)
    assert forward_flops(grown) - forward_flops(TINY) == encoder + decoder


def test_plan_prints_the_cost_of_a_grown_image():
    import json

    from typer.testing import CliRunner

    import cli

    args = ["plan", "--preset", "tiny", "--experts", "16", "--groups", "4", "--extra-blocks", "1"]
    result = CliRunner().invoke(cli.app, args + ["--json"])
    assert result.exit_code == 0, result.output
    grown = forward_flops(grown_config(TINY, LAYOUTS["hand-over + extra block"]))
    assert json.loads(result.stdout)["forward_flops"] == {"source": forward_flops(TINY), "grown": grown}
    result = CliRunner().invoke(cli.app, args)
    assert result.exit_code == 0, result.output
    text = " ".join(result.stdout.split())
    assert f"forward pass per image: {grown / 1e9:,.1f} GFLOP" in text and f"(x{grown / forward_flops(TINY):.2f})" in text
