"""Forward FLOPs per image of a SamMoE layout, counted from its config alone (`samoe plan`, `samoe eval`).

Growth changes what a model costs per image: routed groups add experts per token, extra blocks add depth.
Whether growth pays is a question at equal compute (the grown model against its source trained for the
same FLOPs), so a user needs that ratio before training, and a report of a grown model needs it next to
its metrics. `benchmarks/growth.py` measures a real training step; this counts a layout.

A FLOP here is torch's FlopCounterMode's: 2 per multiply-add of every matmul and convolution (norms,
activations, softmax, pooling and interpolation are not counted); a training step costs about 3 forwards.
The count walks the modules the forward runs (segment_anything's ViT blocks with windowed attention and
decomposed relative positions, its two-way transformer, our heads), shape by shape, without torch: plan
starts in a fraction of torch's import time. An MoE layer costs, per token, the routers' logits (core pool,
group router, and every routed group's in-group router padded to the largest routed group: upscale/moe.py
scores all of them so that no shape depends on the routing), the one-hot products that pick the chosen
groups' scores and sum their pools, and `experts_per_token` expert MLPs. `tests/test_flops.py` holds this
equal to FlopCounterMode over a real forward (tiny layouts) and over the meta-device model (the 1.5B and
10B layouts).
"""

from __future__ import annotations

from .config import MoEConfig, SamMoEConfig
from .layout import GATING_HIDDEN, NUM_SCALES, TASKS, block_window


def _mm(m: int, k: int, n: int) -> int:
    """An (m, k) @ (k, n) product."""
    return 2 * m * k * n


def moe_flops(tokens: int, dim: int, hidden: int, moe: MoEConfig) -> int:
    """One MoE layer on `tokens` tokens (see the module docstring)."""
    routed = len(moe.groups) - moe.core_groups
    flops = _mm(tokens, dim, moe.num_core_experts + routed)  # core pool + group router logits
    if routed:
        emax = max(moe.groups[moe.core_groups:])
        flops += _mm(tokens, dim, routed * emax)  # every routed group's in-group router
        # one-hot products over the chosen groups: their scores, their padding, their pools' prob and pick sums
        flops += 4 * _mm(tokens * moe.top_k_groups, routed, emax)
    return flops + 2 * _mm(tokens * moe.experts_per_token, dim, hidden)


def _mlp(tokens: int, dim: int, hidden: int, moe: MoEConfig | None) -> int:
    return 2 * _mm(tokens, dim, hidden) if moe is None else moe_flops(tokens, dim, hidden, moe)


def _vit_block(cfg: SamMoEConfig, index: int) -> int:
    """segment_anything's Block: attention over (padded) windows with decomposed rel-pos, then the MLP."""
    d, grid = cfg.embed_dim, cfg.img_size // cfg.patch_size
    window = block_window(cfg, index)
    side = window or grid
    windows = (-(-grid // window)) ** 2 if window else 1  # the grid is padded to whole windows
    tokens = windows * side * side
    head = d // cfg.num_heads
    batch = windows * cfg.num_heads
    attn = _mm(tokens, d, 3 * d) + _mm(tokens, d, d)  # qkv, proj
    attn += 2 * batch * _mm(side * side, head, side * side)  # q @ k^T, attn @ v
    attn += 2 * side * _mm(batch * side, head, side)  # rel_h and rel_w (einsums, one batch per row / column)
    return attn + _mlp(grid * grid, d, cfg.encoder_mlp_dim, cfg.moe if cfg.is_moe_block(index) else None)


def _attention(queries: int, keys: int, dim: int, downsample: int) -> int:
    """segment_anything.modeling.transformer.Attention (heads split `inner`; their count does not matter)."""
    inner = dim // downsample
    return _mm(queries, dim, inner) + 2 * _mm(keys, dim, inner) + 2 * _mm(queries, inner, keys) + _mm(queries, inner, dim)


def _decoder(cfg: SamMoEConfig) -> int:
    """PromptFreeMaskDecoder: positional encoding, two-way transformer, upscaling, hypernetwork MLPs."""
    c, grid = cfg.out_chans, cfg.img_size // cfg.patch_size
    image, tokens = grid * grid, 2 * cfg.num_classes + 1
    flops = _mm(image, 2, c // 2)  # random-Fourier positional encoding
    for _ in range(cfg.decoder_depth):
        flops += _attention(tokens, tokens, c, 1)
        flops += _attention(tokens, image, c, 2)
        flops += _mlp(tokens, c, cfg.decoder_mlp_dim, cfg.decoder_moe_config() if cfg.decoder_moe else None)
        flops += _attention(image, tokens, c, 2)
    flops += _attention(tokens, image, c, 2)
    # two 2x2 stride-2 transposed convolutions (counted on their input grid)
    flops += _mm(image * 4, c, c // 4) + _mm(image * 16, c // 4, c // 8)
    return flops + tokens * (2 * _mm(1, c, c) + _mm(1, c, c // 8))


def _heads(cfg: SamMoEConfig) -> int:
    """Per-head products of hypernetwork vectors and features, the task selector, the gating model."""
    feat, side = cfg.out_chans // 8, 4 * (cfg.img_size // cfg.patch_size)
    pixels = side * side
    flops = _mm(2 * cfg.num_classes + 1, feat, pixels)
    levels = [side] + [max(1, side >> s) for s in range(1, NUM_SCALES)]
    flops += len(TASKS) * sum(_mm(h * h, 9, feat) for h in levels)  # depthwise 3x3 convolutions
    flops += _mm(1, len(TASKS) * feat, GATING_HIDDEN) + _mm(1, GATING_HIDDEN, len(TASKS) ** 2)
    return flops + _mm(pixels, feat, 2 * cfg.num_classes + 1)  # the gate's 1x1 heads


def forward_flops(cfg: SamMoEConfig) -> int:
    """FLOPs of one image's forward pass through a model of layout `cfg` (all heads, the selector and gating)."""
    grid = cfg.img_size // cfg.patch_size
    flops = _mm(grid * grid, cfg.in_chans * cfg.patch_size ** 2, cfg.embed_dim)  # patch embedding
    flops += sum(_vit_block(cfg, i) for i in range(cfg.total_blocks))
    flops += _mm(grid * grid, cfg.embed_dim, cfg.out_chans) + _mm(grid * grid, 9 * cfg.out_chans, cfg.out_chans)  # neck
    return flops + _decoder(cfg) + _heads(cfg)

