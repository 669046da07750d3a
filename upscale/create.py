"""`samoe init`: a new SamMoE checkpoint from a preset or upcycled from a dense SAM .pth.

Upcycling copies every SAM tensor to the same key of our model; each MoE layer's
experts all start as copies of the dense MLP they replace (`lin1` -> `w1[e]`,
`lin2` -> `w2[e]`), so with top-k weights renormalised to one the upcycled
encoder computes exactly what SAM's encoder computes. The prompt encoder's
random Fourier matrix and no-mask embedding move into the prompt-free decoder;
the task tokens and their hypernetworks are new (random).

Provenance recorded per tensor: `sam:<key>` (copied from the dense checkpoint),
`upcycle:<key>` (expert bank made of copies of that dense MLP tensor), `random`.
"""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from .checkpoint import build_meta, lineage_entry, save_model
from .config import SAM_VITS, MoEConfig, SamMoEConfig, check_sam_file
from .errors import SamoeError
from .model import build_model
from .roles import SEED004_ROLES, param_role

_EXPERT = re.compile(r"(?P<prefix>.*\.mlp)\.experts\.(?P<group>\d+)\.(?P<param>w1|b1|w2|b2)$")
_DENSE = {"w1": "lin1.weight", "b1": "lin1.bias", "w2": "lin2.weight", "b2": "lin2.bias"}
_DECODER_MOVES = {
    "mask_decoder.pe_layer.positional_encoding_gaussian_matrix": "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix",
    "mask_decoder.no_mask_embed.weight": "prompt_encoder.no_mask_embed.weight",
}


def init_from_preset(cfg: SamMoEConfig, out: Path, seed: int, dtype: torch.dtype, command: list[str], force: bool) -> Path:
    model = build_model(cfg, seed=seed)
    provenance = {name: "random" for name in model.state_dict()}
    meta = build_meta(cfg, provenance, [lineage_entry(command, seed, None)], [], dtype)
    return save_model(model, out, meta, dtype=dtype, force=force)


def load_sam_state(path: Path) -> dict[str, torch.Tensor]:
    """Load a SAM .pth safely (weights_only: no code from the file runs) and check it is SAM."""
    check_sam_file(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # torch raises many types for foreign/truncated files
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SamoeError(f"{path} is not a loadable PyTorch weights file ({first[:120]}): pass a SAM .pth such as sam_vit_b_01ec64.pth") from None
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    if not isinstance(state, dict) or "image_encoder.patch_embed.proj.weight" not in state:
        raise SamoeError(f"{path} is not a SAM checkpoint (no image_encoder.patch_embed.proj.weight): pass a segment-anything vit_b/l/h .pth")
    odd = next((k for k, v in state.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)), None)
    if odd is not None:
        raise SamoeError(f"{path} is not a SAM checkpoint (entry {str(odd)[:80]!r} is not a named tensor): pass a segment-anything vit_b/l/h .pth")
    if state["image_encoder.patch_embed.proj.weight"].dim() != 4:
        raise SamoeError(f"{path} is not a SAM checkpoint (image_encoder.patch_embed.proj.weight is not a 4-d kernel): pass a segment-anything vit_b/l/h .pth")
    return state


def detect_vit(state: dict[str, torch.Tensor]) -> str:
    """vit_b / vit_l / vit_h from the embedding width and block count."""
    dim = state["image_encoder.patch_embed.proj.weight"].shape[0]
    depth = len({k.split(".")[2] for k in state if k.startswith("image_encoder.blocks.")})
    for name, vit in SAM_VITS.items():
        if vit["embed_dim"] == dim and vit["depth"] == depth:
            return name
    raise SamoeError(f"unrecognised SAM encoder (width {dim}, {depth} blocks): expected vit_b, vit_l or vit_h")


def sam_config(state: dict[str, torch.Tensor], experts: int, moe_blocks: tuple[int, ...], top_k: int,
               num_classes: int, decoder_moe: bool) -> SamMoEConfig:
    vit = detect_vit(state)
    depth = SAM_VITS[vit]["depth"]
    bad = [b for b in moe_blocks if not 0 <= b < depth]
    if bad:
        raise SamoeError(f"--moe-blocks {bad} outside {vit}'s {depth} blocks (0..{depth - 1})")
    if experts < 1 or not 1 <= top_k <= experts:
        raise SamoeError(f"--experts {experts} / --top-k {top_k}: need experts >= 1 and 1 <= top-k <= experts")
    return replace(
        SamMoEConfig(**SAM_VITS[vit]),
        moe_blocks=tuple(sorted(set(moe_blocks))),
        moe=MoEConfig(groups=(experts,), core_groups=1, top_k=top_k),
        num_classes=num_classes,
        decoder_moe=decoder_moe,
    ).validate()


def _expected_from_sam(name: str) -> bool:
    """Tensors every SAM checkpoint provides (the rest are new: routers, task tokens, heads, seed-004 parts)."""
    if param_role(name) in (*SEED004_ROLES, "router", "head"):
        return False
    return name.startswith(("image_encoder.", "mask_decoder."))


def upcycle_state(model_state: dict[str, torch.Tensor], sam: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Fill our state dict from SAM's; return (state, provenance)."""
    state, provenance = {}, {}
    for name, ours in model_state.items():
        src_key, value = name, None
        m = _EXPERT.match(name)
        if m:
            src_key = f"{m['prefix']}.{_DENSE[m['param']]}"
            if src_key in sam:
                value = sam[src_key].unsqueeze(0).expand(ours.shape[0], *sam[src_key].shape)
                provenance[name] = f"upcycle:{src_key}"
        else:
            src_key = _DECODER_MOVES.get(name, name)
            if src_key in sam and param_role(name) not in ("router", "head"):
                value = sam[src_key]
                provenance[name] = f"sam:{src_key}"
        if value is None:
            if _expected_from_sam(name):
                raise SamoeError(f"the SAM checkpoint lacks {src_key} (needed for {name}): the .pth is incomplete or not a standard SAM model")
            state[name], provenance[name] = ours, "random"
            continue
        if tuple(value.shape) != tuple(ours.shape):
            raise SamoeError(f"SAM tensor {src_key} has shape {list(value.shape)}, expected {list(ours.shape)}: the .pth does not match a standard SAM model")
        state[name] = value.to(ours.dtype).clone()
    return state, provenance


def init_from_sam(path: Path, out: Path, experts: int, moe_blocks: tuple[int, ...], top_k: int, num_classes: int,
                  decoder_moe: bool, seed: int, dtype: torch.dtype, command: list[str], force: bool,
                  sam: dict[str, torch.Tensor] | None = None) -> Path:
    """Upcycle the SAM .pth at `path` (`sam`: its state, when the caller already loaded it) into `out`."""
    sam = load_sam_state(path) if sam is None else sam
    cfg = sam_config(sam, experts, moe_blocks, top_k, num_classes, decoder_moe)
    model = build_model(cfg, seed=seed)
    state, provenance = upcycle_state(model.state_dict(), sam)
    model.load_state_dict(state, strict=True)
    meta = build_meta(cfg, provenance, [lineage_entry(command, seed, None)], [], dtype, sam_source=str(path))
    return save_model(model, out, meta, dtype=dtype, force=force)
