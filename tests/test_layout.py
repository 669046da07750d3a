"""The tensor layout computed from a config (upscale/layout.py) against the model itself.

The oracle is `build_model(cfg, device="meta").state_dict()`: names, their order (the order
of tensors in a checkpoint's shards) and shapes must be equal, and the buffers must be the
model's buffers, on every layout growth makes.
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from upscale.config import PRESETS
from upscale.growth import GrowthSpec, grown_config, resolve_groups
from upscale.layout import is_buffer, state_shapes
from upscale.model import build_model

TINY, L = PRESETS["tiny"], PRESETS["sam-moe-1.5b"]
LAYOUTS = {
    "tiny": TINY,
    "1.5b": L,
    "10b": grown_config(L, GrowthSpec(experts=117, groups=resolve_groups(16, 117, "8", 1), extra_blocks=1)),
    "2 core groups, 2 extra blocks": grown_config(
        TINY, GrowthSpec(experts=16, groups=(2, 2, 4, 4, 4), core_groups=2, extra_blocks=2)),
    "replicas, dense extra block": grown_config(
        TINY, GrowthSpec(experts=16, groups=(4, 4, 4, 4), core_groups=0, replicate=True, noise_std=0.0, extra_blocks=1,
                         extra_dense=True)),
    "dense decoder, padded windows, no global blocks": replace(TINY, decoder_moe=False, img_size=112, window_size=3,
                                                               global_attn_indexes=()),
    "window 0 (all global), 3 classes": replace(TINY, window_size=0, num_classes=3, mlp_ratio=2.5),
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_equals_the_meta_model(name: str):
    cfg = LAYOUTS[name]
    model = build_model(cfg, device="meta")
    expected = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    assert list(state_shapes(cfg).items()) == expected
    assert {k for k in state_shapes(cfg) if is_buffer(k)} == {k for k, _ in model.named_buffers()}


@pytest.mark.parametrize("source, spec", [
    ("1.5b", GrowthSpec(experts=117, groups=resolve_groups(16, 117, "8", 1), extra_blocks=1)),
    ("tiny", GrowthSpec(experts=16, groups=(4, 4, 4, 4), core_groups=0, replicate=True, noise_std=0.0, extra_blocks=2,
                        extra_dense=True)),
], ids=["10b", "tiny replicas"])
def test_plan_counts_equal_the_meta_models(source: str, spec: GrowthSpec):
    """`samoe plan`'s parameter counts and memory table, computed from the config, against the same quantities
    read off the meta-device models (what plan computed before it stopped importing torch)."""
    from stages.plan import plan_report, stage_memory
    from upscale.growth import planned_provenance

    src_cfg = LAYOUTS["tiny" if source == "tiny" else "1.5b"]
    report = plan_report(src_cfg, spec, "bfloat16", last_k=3)
    cfg = grown_config(src_cfg, spec)
    grown, src_model = build_model(cfg, device="meta"), build_model(src_cfg, device="meta")
    shapes = {k: tuple(v.shape) for k, v in grown.state_dict().items()}
    assert report["total_params"] == sum(t.numel() for t in grown.state_dict().values())
    assert report["source_params"] == sum(t.numel() for t in src_model.state_dict().values())
    memory = stage_memory(cfg, {k: tuple(v.shape) for k, v in grown.named_parameters()},
                          planned_provenance(src_cfg, cfg, shapes), 2, last_k=3)
    buffers = sum(b.numel() for b in grown.buffers()) * 2
    for stage, v in memory.items():
        assert report["memory_per_stage"][stage] == dict(v, weights_bytes=v["weights_bytes"] + buffers,
                                                         total_bytes=v["total_bytes"] + buffers)
