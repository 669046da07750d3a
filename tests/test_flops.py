"""Forward FLOPs per image from a layout (upscale/flops.py), against FlopCounterMode over a real forward
(tiny layouts) and over the model on the meta device (every layout, the 1.5B and 10B ones included)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from upscale.config import PRESETS
from upscale.expand import GrowthSpec, grown_config, resolve_groups
from upscale.flops import forward_flops
from upscale.model import build_model

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = PRESETS["tiny"]
LAYOUTS = {
    "source": None,
    "hand-over + extra block": GrowthSpec(experts=16, groups=(4, 4, 4, 4), extra_blocks=1),
    "routed top-1, 2 groups per token": GrowthSpec(experts=16, groups=(4, 4, 4, 4), routed_top_k=1, top_k_groups=2),
    "replicas + extra block": GrowthSpec(experts=16, groups=(4, 4, 4, 4), core_groups=0, replicate=True, noise_std=0.0,
                                         extra_blocks=1),
    "8 replicas, decoder groups routed": GrowthSpec(experts=32, groups=(4,) * 8, core_groups=0, replicate=True,
                                                    noise_std=0.0, decoder_group_mixing=False),
}


def _measured(cfg) -> int:
    """FlopCounterMode over one real forward of a random image."""
    model = build_model(cfg).eval().requires_grad_(False)
    image = torch.randn(1, cfg.in_chans, cfg.img_size, cfg.img_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(image)
    return int(counter.get_total_flops())


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_counted_from_the_layout_equals_a_real_forward(layout: str):
    cfg = TINY if LAYOUTS[layout] is None else grown_config(TINY, LAYOUTS[layout])
    assert forward_flops(cfg) == _measured(cfg)


def _counted_on_meta(cfg) -> int:
    """FlopCounterMode over the model on the meta device (nothing allocated: every shape of the MoE dispatch
    follows from the token count)."""
    model = build_model(cfg, device="meta").requires_grad_(False)
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
    "2 core groups, 3 groups per token": grown_config(TINY, GrowthSpec(experts=16, groups=(2, 2, 4, 4, 4), core_groups=2,
                                                                       top_k_groups=3)),
}


@pytest.mark.parametrize("layout", list(META_LAYOUTS))
def test_counted_from_the_layout_equals_the_meta_model(layout: str):
    cfg = META_LAYOUTS[layout]
    assert forward_flops(cfg) == _counted_on_meta(cfg)


def test_what_a_routed_expert_costs_by_hand():
    """One expert per token in one new group: per MoE layer and token, one more expert MLP (2 matmuls of D x H),
    the group router over 3 groups, every new group's router (3 x 4 experts, padded to the largest group: all 4
    here), and four one-hot products over the chosen groups' (3 x 4) scores: picking them, their padding, and the
    routed pools' probability and assignment sums (the one-hot pick of each group's scale is a matrix-vector
    product, which FlopCounterMode does not count)."""
    spec = GrowthSpec(experts=16, groups=(4, 4, 4, 4), routed_top_k=1)
    grown = grown_config(TINY, spec)
    tokens = (TINY.img_size // TINY.patch_size) ** 2
    d, h = TINY.embed_dim, TINY.encoder_mlp_dim
    encoder = len(TINY.moe_blocks) * tokens * 2 * (2 * d * h + d * 3 + d * 12 + 4 * 12)
    # decoder MoE layers (the tokens' MLP of each two-way block): every routed group (3 per token), 1 expert each
    dd, dh, outputs = TINY.out_chans, TINY.decoder_mlp_dim, 2 * TINY.num_classes + 1
    decoder = TINY.decoder_depth * outputs * 2 * (3 * 2 * dd * dh + dd * 3 + dd * 12 + 4 * 3 * 12)
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


def test_routed_decoder_groups_keep_replicas_at_the_sources_cost():
    """The decoder mixes every routed group by default: 8 replica groups cost 8x the source's decoder expert FLOPs
    (in `small`, with 16 classes' 33 decoder tokens and a 256-wide decoder MLP, that doubles the model's). Routed like
    the encoder (one group per token) the grown forward costs the source's, plus its routers. The option is part of
    the config: a checkpoint without it mixes."""
    from upscale.config import SamMoEConfig

    small = PRESETS["small"]
    spec = LAYOUTS["8 replicas, decoder groups routed"]
    routed = grown_config(small, spec)
    mixed = grown_config(small, replace(spec, decoder_group_mixing=True))
    src = forward_flops(small)
    assert forward_flops(routed) <= 1.05 * src and forward_flops(mixed) > 1.5 * src
    layer = lambda cfg: build_model(cfg).mask_decoder.transformer.layers[0].mlp.cfg  # noqa: E731
    assert layer(routed).top_k_groups == 1 and layer(mixed).top_k_groups == 8
    assert SamMoEConfig.from_dict(routed.to_dict()) == routed
    old = mixed.to_dict()
    del old["decoder_group_mixing"]
    assert SamMoEConfig.from_dict(old) == mixed
    with pytest.raises(Exception, match="decoder_group_mixing"):
        SamMoEConfig.from_dict({**routed.to_dict(), "decoder_group_mixing": "no"})
