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
    "image context, 2 core groups, 2 extra blocks": grown_config(
        TINY, GrowthSpec(experts=16, groups=(2, 2, 4, 4, 4), core_groups=2, image_context=True, extra_blocks=2)),
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
