"""The names and shapes of a SamMoE's tensors, from its config alone (no torch, nothing allocated).

`samoe plan`, `inspect-checkpoint --verify`, the shape checks of `load_model` and the growth
planner of `expand` all need what `build_model(cfg).state_dict()` would hold, but not the model:
building one, even on the meta device, costs torch's and segment_anything's imports (~3 s).
This walks the same module tree in the same registration order (state-dict order is the
order of tensors in a checkpoint's shards). `tests/test_layout.py` holds it equal to the
meta-device model, name for name and shape for shape, on every layout growth makes.
"""

from __future__ import annotations

from .config import MoEConfig, SamMoEConfig

# seed 004's model parts (upscale/heads.py builds them from these)
TASKS = ("seg", "sdf", "boundary")
NUM_SCALES = 5
GATING_HIDDEN = 64

Shapes = dict[str, tuple[int, ...]]


def _linear(out: Shapes, prefix: str, d_in: int, d_out: int, bias: bool = True) -> None:
    out[f"{prefix}.weight"] = (d_out, d_in)
    if bias:
        out[f"{prefix}.bias"] = (d_out,)


def _norm(out: Shapes, prefix: str, dim: int) -> None:
    out[f"{prefix}.weight"] = (dim,)
    out[f"{prefix}.bias"] = (dim,)


def _moe(out: Shapes, prefix: str, dim: int, hidden: int, moe: MoEConfig) -> None:
    """upscale.moe.MoEMLP: the router (its own group_scale first, then its gates), then one bank per group."""
    routed = len(moe.groups) - moe.core_groups
    if routed:
        out[f"{prefix}.router.group_scale"] = (routed,)
    for g, e in enumerate(moe.groups):
        _linear(out, f"{prefix}.router.expert_gates.{g}", dim, e, bias=False)
    if routed:
        _linear(out, f"{prefix}.router.group_gate", dim, routed, bias=False)
    for g, e in enumerate(moe.groups):
        bank = f"{prefix}.experts.{g}"
        out.update({f"{bank}.w1": (e, hidden, dim), f"{bank}.b1": (e, hidden), f"{bank}.w2": (e, dim, hidden),
                    f"{bank}.b2": (e, dim)})


def _mlp(out: Shapes, prefix: str, dim: int, hidden: int, moe: MoEConfig | None) -> None:
    """segment_anything's MLPBlock (lin1, lin2), or the MoE layer that replaces it."""
    if moe is None:
        _linear(out, f"{prefix}.lin1", dim, hidden)
        _linear(out, f"{prefix}.lin2", hidden, dim)
    else:
        _moe(out, prefix, dim, hidden, moe)


def block_window(cfg: SamMoEConfig, index: int) -> int:
    """The attention window of encoder block `index`: 0 (global) for global and extra blocks."""
    return 0 if index >= cfg.depth or index in cfg.global_attn_indexes else cfg.window_size


def _encoder(out: Shapes, cfg: SamMoEConfig) -> None:
    """segment_anything's ImageEncoderViT (abs and rel pos, qkv bias), extra blocks appended."""
    d, grid = cfg.embed_dim, cfg.img_size // cfg.patch_size
    p = "image_encoder"
    out[f"{p}.pos_embed"] = (1, grid, grid, d)
    out[f"{p}.patch_embed.proj.weight"] = (d, cfg.in_chans, cfg.patch_size, cfg.patch_size)
    out[f"{p}.patch_embed.proj.bias"] = (d,)
    for i in range(cfg.total_blocks):
        b = f"{p}.blocks.{i}"
        side = block_window(cfg, i) or grid
        _norm(out, f"{b}.norm1", d)
        out[f"{b}.attn.rel_pos_h"] = (2 * side - 1, d // cfg.num_heads)
        out[f"{b}.attn.rel_pos_w"] = (2 * side - 1, d // cfg.num_heads)
        _linear(out, f"{b}.attn.qkv", d, 3 * d)
        _linear(out, f"{b}.attn.proj", d, d)
        _norm(out, f"{b}.norm2", d)
        _mlp(out, f"{b}.mlp", d, cfg.encoder_mlp_dim, cfg.moe if cfg.is_moe_block(i) else None)
    out[f"{p}.neck.0.weight"] = (cfg.out_chans, d, 1, 1)
    _norm(out, f"{p}.neck.1", cfg.out_chans)
    out[f"{p}.neck.2.weight"] = (cfg.out_chans, cfg.out_chans, 3, 3)
    _norm(out, f"{p}.neck.3", cfg.out_chans)


def _attention(out: Shapes, prefix: str, dim: int, downsample: int) -> None:
    """segment_anything.modeling.transformer.Attention."""
    inner = dim // downsample
    for proj in ("q_proj", "k_proj", "v_proj"):
        _linear(out, f"{prefix}.{proj}", dim, inner)
    _linear(out, f"{prefix}.out_proj", inner, dim)


def _decoder(out: Shapes, cfg: SamMoEConfig) -> None:
    """upscale.model.PromptFreeMaskDecoder around segment_anything's TwoWayTransformer."""
    c, p = cfg.out_chans, "mask_decoder"
    out[f"{p}.pe_layer.positional_encoding_gaussian_matrix"] = (2, c // 2)
    out[f"{p}.no_mask_embed.weight"] = (1, c)
    for i in range(cfg.decoder_depth):
        layer = f"{p}.transformer.layers.{i}"
        _attention(out, f"{layer}.self_attn", c, 1)
        _norm(out, f"{layer}.norm1", c)
        _attention(out, f"{layer}.cross_attn_token_to_image", c, 2)
        _norm(out, f"{layer}.norm2", c)
        _mlp(out, f"{layer}.mlp", c, cfg.decoder_mlp_dim, cfg.moe if cfg.decoder_moe else None)
        _norm(out, f"{layer}.norm3", c)
        _norm(out, f"{layer}.norm4", c)
        _attention(out, f"{layer}.cross_attn_image_to_token", c, 2)
    _attention(out, f"{p}.transformer.final_attn_token_to_image", c, 2)
    _norm(out, f"{p}.transformer.norm_final_attn", c)
    outputs = 2 * cfg.num_classes + 1
    out[f"{p}.mask_tokens.weight"] = (outputs, c)
    out[f"{p}.output_upscaling.0.weight"] = (c, c // 4, 2, 2)
    out[f"{p}.output_upscaling.0.bias"] = (c // 4,)
    _norm(out, f"{p}.output_upscaling.1", c // 4)
    out[f"{p}.output_upscaling.3.weight"] = (c // 4, c // 8, 2, 2)
    out[f"{p}.output_upscaling.3.bias"] = (c // 8,)
    for k in range(outputs):
        mlp = f"{p}.output_hypernetworks_mlps.{k}.layers"
        _linear(out, f"{mlp}.0", c, c)
        _linear(out, f"{mlp}.1", c, c)
        _linear(out, f"{mlp}.2", c, c // 8)


def _seed004(out: Shapes, cfg: SamMoEConfig) -> None:
    """upscale.heads: the multi-scale task selector and the gating model."""
    feat = cfg.out_chans // 8
    for task in TASKS:
        for s in range(NUM_SCALES):
            sel = f"selector.selectors.{task}_scale{s + 1}"
            out[f"{sel}.alpha"] = ()
            out[f"{sel}.conv.weight"] = (feat, 1, 3, 3)
            out[f"{sel}.conv.bias"] = (feat,)
    n = len(TASKS)
    _linear(out, "gating.mlp.0", n * feat, GATING_HIDDEN)
    _linear(out, "gating.mlp.2", GATING_HIDDEN, n * n)
    for task, channels in (("seg", cfg.num_classes), ("sdf", cfg.num_classes), ("boundary", 1)):
        out[f"gating.heads.{task}.weight"] = (channels, feat, 1, 1)
        out[f"gating.heads.{task}.bias"] = (channels,)


BUFFER_SUFFIXES = (".alpha", "positional_encoding_gaussian_matrix")


def is_buffer(name: str) -> bool:
    """Whether a state-dict entry is a buffer (no gradient, no optimizer state), not a parameter."""
    return name.endswith(BUFFER_SUFFIXES)


def state_shapes(cfg: SamMoEConfig) -> Shapes:
    """name -> shape of every entry of `build_model(cfg).state_dict()`, in its order."""
    out: Shapes = {}
    _encoder(out, cfg)
    _decoder(out, cfg)
    _seed004(out, cfg)
    return out


def numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
