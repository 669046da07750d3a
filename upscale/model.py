"""SamMoE: SAM's image encoder with MoE MLPs, a prompt-free SAM mask decoder, three task heads.

Everything SAM-shaped is segment-anything's own code: `ImageEncoderViT`, `Block`,
`TwoWayTransformer`, the hypernetwork `MLP`, `PositionEmbeddingRandom`. We only
swap the MLP of chosen blocks (and of the decoder's two-way blocks) for an
`MoEMLP` of the same call signature, append optional extra blocks after the last
ViT block, and replace SAM's prompt encoder by learned tokens. So
`model.image_encoder(x)` is called exactly like SAM's, and a model upcycled from
a dense SAM checkpoint reproduces SAM's image-encoder output.

Outputs (`SamMoE.forward`), at input resolution:
    seg       (B, C, H, W)  class logits
    sdf       (B, C, H, W)  per-class signed distance, pre-tanh (target in [-1, 1])
    boundary  (B, 1, H, W)  class-boundary logit (learned logit + the segmentation's edge prior,
                            `config.boundary_prior`; checkpoints from before the prior have 0)
    gate_seg, gate_sdf, gate_boundary   the gating model's fused outputs (same shapes)
Each output channel has its own learned token and hypernetwork MLP, as SAM's
mask tokens do, so the decoder's MoE layers (which act on tokens) shape every
head. Each head reads its task's features from the multi-scale task selector
(seed 004, see upscale/heads.py); the gating model fuses the three task
features into the outputs used as pseudo-labels. The selector and gating model
live in the model so that checkpoints carry them; losses and gradient handling
are training's (stages/).
"""

from __future__ import annotations

from functools import partial
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import SamMoEConfig
from .heads import GatingModel, MultiScaleTaskSelector, resize_bilinear
from .moe import MoEMLP
from .sam import MLP, Block, ImageEncoderViT, LayerNorm2d, PositionEmbeddingRandom, TwoWayTransformer


def _sam_vit_args(cfg: SamMoEConfig) -> dict:
    """The block arguments segment-anything's `_build_sam` gives both the ViT and each of its blocks."""
    return dict(num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio, qkv_bias=True,
                norm_layer=partial(nn.LayerNorm, eps=1e-6), act_layer=nn.GELU, use_rel_pos=True, rel_pos_zero_init=True)


def _vit_block(cfg: SamMoEConfig, window_size: int) -> Block:
    """A block configured exactly like segment-anything's `_build_sam` does."""
    grid = cfg.img_size // cfg.patch_size
    return Block(dim=cfg.embed_dim, **_sam_vit_args(cfg), window_size=window_size, input_size=(grid, grid))


def build_image_encoder(cfg: SamMoEConfig) -> ImageEncoderViT:
    """SAM's ViT with MoE MLPs in `cfg.moe_blocks` and `cfg.extra_blocks` global-attention blocks appended."""
    encoder = ImageEncoderViT(
        **_sam_vit_args(cfg),
        img_size=cfg.img_size,
        patch_size=cfg.patch_size,
        in_chans=cfg.in_chans,
        embed_dim=cfg.embed_dim,
        depth=cfg.depth,
        out_chans=cfg.out_chans,
        use_abs_pos=True,
        window_size=cfg.window_size,
        global_attn_indexes=cfg.global_attn_indexes,
    )
    for _ in range(cfg.extra_blocks):
        encoder.blocks.append(_vit_block(cfg, window_size=0))
    for i, block in enumerate(encoder.blocks):
        if cfg.is_moe_block(i):
            block.mlp = MoEMLP(cfg.embed_dim, cfg.encoder_mlp_dim, cfg.moe, nn.GELU)
    return encoder


class PromptFreeMaskDecoder(nn.Module):
    """SAM's mask decoder driven by learned tokens instead of prompts.

    Arguments:
        cfg (SamMoEConfig): uses out_chans (transformer width), decoder_depth,
            decoder_mlp_dim, decoder_num_heads, num_classes, decoder_moe, moe.
    """

    def __init__(self, cfg: SamMoEConfig) -> None:
        super().__init__()
        dim = cfg.out_chans
        self.num_classes = cfg.num_classes
        self.pe_layer = PositionEmbeddingRandom(dim // 2)
        self.no_mask_embed = nn.Embedding(1, dim)
        self.transformer = TwoWayTransformer(
            depth=cfg.decoder_depth, embedding_dim=dim, mlp_dim=cfg.decoder_mlp_dim, num_heads=cfg.decoder_num_heads
        )
        if cfg.decoder_moe:  # every routed group mixed (each still top-k inside): few tokens, negligible cost
            for layer in self.transformer.layers:
                layer.mlp = MoEMLP(dim, cfg.decoder_mlp_dim, cfg.decoder_moe_config(), nn.ReLU)
        num_outputs = 2 * cfg.num_classes + 1  # seg C, sdf C, boundary 1
        self.mask_tokens = nn.Embedding(num_outputs, dim)
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose2d(dim, dim // 4, kernel_size=2, stride=2),
            LayerNorm2d(dim // 4),
            nn.GELU(),
            nn.ConvTranspose2d(dim // 4, dim // 8, kernel_size=2, stride=2),
            nn.GELU(),
        )
        self.output_hypernetworks_mlps = nn.ModuleList(MLP(dim, dim, dim // 8, 3) for _ in range(num_outputs))

    def forward(self, image_embeddings: Tensor) -> tuple[Tensor, Tensor]:
        """(B, D, h, w) image embeddings -> hypernetwork vectors (B, 2C+1, D/8), features (B, D/8, 4h, 4w)."""
        b, d, h, w = image_embeddings.shape
        tokens = self.mask_tokens.weight.unsqueeze(0).expand(b, -1, -1)
        src = image_embeddings + self.no_mask_embed.weight.reshape(1, -1, 1, 1)
        pos = self.pe_layer((h, w)).unsqueeze(0).expand(b, -1, -1, -1).to(src.dtype)
        hs, src = self.transformer(src, pos, tokens)
        upscaled = self.output_upscaling(src.transpose(1, 2).reshape(b, d, h, w))
        hyper = torch.stack([mlp(hs[:, i]) for i, mlp in enumerate(self.output_hypernetworks_mlps)], dim=1)
        return hyper, upscaled

    def task_slices(self) -> dict[str, slice]:
        """Which hypernetwork outputs (mask tokens) belong to which head."""
        c = self.num_classes
        return {"seg": slice(0, c), "sdf": slice(c, 2 * c), "boundary": slice(2 * c, 2 * c + 1)}


class OutputMaps(nn.Module):
    """The heads' maps at input resolution: each task's hypernetwork vectors applied to its features, the
    gating model's outputs beside them, all resized bilinearly, and the boundary prior added (no parameters).

    Arguments:
        task_slices (dict[str, slice]): which hypernetwork vectors belong to which head.
        boundary_prior (int): the prior's window (0: none); see `seg_edge_logit`.
    """

    def __init__(self, task_slices: dict[str, slice], boundary_prior: int) -> None:
        super().__init__()
        self.task_slices = task_slices
        self.boundary_prior = boundary_prior

    def forward(self, hyper: Tensor, task_feats: dict[str, Tensor], gate: dict[str, Tensor],
                size: tuple[int, int]) -> dict[str, Tensor]:
        """hyper (B, 2C+1, D/8), task features {task: (B, D/8, h, w)}, gate {task: (B, *, h, w)} -> (B, *, *size) maps."""
        out = {}
        for task, sl in self.task_slices.items():
            f = task_feats[task]
            out[task] = (hyper[:, sl] @ f.flatten(2)).view(f.shape[0], -1, *f.shape[-2:])
        out.update({f"gate_{k}": v for k, v in gate.items()})
        out = {k: resize_bilinear(v, size) for k, v in out.items()}
        if self.boundary_prior:
            for prefix in ("", "gate_"):
                out[prefix + "boundary"] = out[prefix + "boundary"] + seg_edge_logit(out[prefix + "seg"], self.boundary_prior)
        return out


class SamMoE(nn.Module):
    """The segmentation model samoe grows and trains.

    Arguments:
        cfg (SamMoEConfig): the whole architecture (saved in every checkpoint).
    """

    def __init__(self, cfg: SamMoEConfig) -> None:
        super().__init__()
        self.config = cfg.validate()
        self.image_encoder = build_image_encoder(cfg)
        self.mask_decoder = PromptFreeMaskDecoder(cfg)
        feat = cfg.out_chans // 8
        self.selector = MultiScaleTaskSelector(feat)
        self.gating = GatingModel(feat, cfg.num_classes)
        self.output_maps = OutputMaps(self.mask_decoder.task_slices(), cfg.boundary_prior)
        self.reindex_moe_layers()

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        """(B, 3, S, S) normalised images, S = img_size -> dict of (B, *, S, S) outputs."""
        hyper, feats = self.mask_decoder(self.image_encoder(images))
        task_feats = self.selector(feats)
        gate = self.gating(task_feats)
        return self.output_maps(hyper, task_feats, gate, images.shape[-2:])

    def reindex_moe_layers(self) -> None:
        """Find the MoE layers again (after a block was replaced: `upscale.ablate`). The layout is fixed once
        built, and walking every module several times a step cost ~2% of a tiny model's step."""
        self._moe_layers = tuple((n, m) for n, m in self.named_modules() if isinstance(m, MoEMLP))

    def moe_layers(self) -> Iterator[tuple[str, MoEMLP]]:
        """(qualified name, layer) of every MoE layer, encoder first."""
        return iter(self._moe_layers)

    def constrain_(self) -> None:
        """Keep parameters in their valid range after an optimizer step (MoE group scales in [0, 1])."""
        for _, layer in self.moe_layers():
            layer.constrain_()

    def routing_keys(self) -> list[str]:
        """The keys of `routing_stats()`, without computing anything (no collectives)."""
        keys = []
        for name, layer in self.moe_layers():
            scale = getattr(layer.router, "group_scale", None)
            if scale is not None:
                keys += [f"new_share:{name}"] + [f"group_scale:{name}:{g}" for g in range(scale.shape[0])]
        return keys

    def routing_stats(self) -> dict[str, float]:
        """Per MoE layer of the last forward: new-group weight share and each routed group's scale.

        Keys `new_share:<layer>` and `group_scale:<layer>:<routed group>` (the metrics.csv columns)."""
        out: dict[str, float] = {}
        for name, layer in self.moe_layers():
            scale = getattr(layer.router, "group_scale", None)
            if scale is None:
                continue
            out[f"new_share:{name}"] = float(layer.new_weight) if layer.new_weight is not None else 0.0
            scale = scale.detach()
            if hasattr(scale, "full_tensor"):  # FSDP2-sharded (collective: every process calls this)
                scale = scale.full_tensor()
            for g, v in enumerate(scale.float().tolist()):
                out[f"group_scale:{name}:{g}"] = v
        return out

    def handover_loss(self) -> Tensor:
        """Mean top-level (core vs new groups) balance loss of the grown MoE layers in the last forward."""
        losses = [m.handover_loss for _, m in self.moe_layers()
                  if m.handover_loss is not None and m.cfg.core_groups and m.cfg.num_routed_groups]
        return torch.stack(losses).mean() if losses else torch.zeros(())

    def aux_loss(self) -> Tensor:
        """Mean load-balancing loss of the MoE layers in the last forward."""
        losses = [m.aux_loss for _, m in self.moe_layers() if m.aux_loss is not None]
        return torch.stack(losses).mean() if losses else torch.zeros(())


def seg_edge_logit(seg: Tensor, window: int, eps: float = 0.01) -> Tensor:
    """Logit of "this pixel's window holds more than one class" under the (detached) segmentation.

    For class probabilities p, e = sum_c maxpool_window(p_c) - 1 is 0 in a window of one
    sure class and 1 where two sure classes meet, so with hard predictions and a window of
    2r + 3 it marks exactly the band within r of a class change across a straight boundary
    (the training target, r = 2, window 7). The boundary head adds its logit to this prior:
    a D/8-channel linear readout alone cannot draw a thin band (it stayed near a constant
    prediction), while the segmentation already places the class changes. Detached, so the
    boundary loss never pulls the segmentation.
    """
    p = seg.detach().float().softmax(dim=1)
    e = window_max(p, window).sum(dim=1, keepdim=True) - 1
    return torch.logit(e.clamp(eps, 1 - eps)).to(seg.dtype)


def window_max(x: Tensor, window: int) -> Tensor:
    """`F.max_pool2d(x, window, stride=1, padding=window // 2)` for odd `window`, bit for bit.

    Max over a square is max over rows of max over columns, and each 1-d running max is the
    elementwise maximum of `window` shifted views of the input padded with -inf. On a CPU,
    max_pool2d's stride-1 kernel visits window^2 inputs per output (a fifth of a tiny model's
    training step with the seed's 7 x 7 window); this is 2 (window - 1) maxima of whole maps,
    which the compiler fuses into two passes.
    """
    r = window // 2
    for dim, pad in ((-2, (0, 0, r, r)), (-1, (r, r))):
        n, padded = x.shape[dim], F.pad(x, pad, value=float("-inf"))
        x = padded.narrow(dim, 0, n)
        for s in range(1, 2 * r + 1):
            x = torch.maximum(x, padded.narrow(dim, s, n))
    return x


def init_weights(model: SamMoE, seed: int) -> SamMoE:
    """All random initialisation in one place, reproducible from `seed` (on CPU).

    Modules keep their PyTorch/SAM defaults (built under the seed); on top of that
    the absolute position embedding gets a small truncated normal (SAM's own
    constructor leaves it at zero, which only a pretrained checkpoint fills), the
    routers a small normal so initial routing is near-uniform, and the learned
    tokens N(0, 1) like nn.Embedding.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("pos_embed"):
                p.copy_(torch.randn(p.shape, generator=gen).clamp_(-2, 2) * 0.02)
            elif ".router.expert_gates." in name or ".router.group_gate." in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    return model


def build_model(cfg: SamMoEConfig, seed: int = 0, device: str | torch.device = "cpu") -> SamMoE:
    """Build a randomly initialised SamMoE; on the meta device nothing is allocated (for counting)."""
    device = torch.device(device)
    if device.type == "meta":
        with device:
            return SamMoE(cfg)
    torch.manual_seed(seed)
    with device:
        model = SamMoE(cfg)
    return init_weights(model, seed)
