"""The role each parameter plays in the model, decided in one place.

Stage plans (what trains), optimizer groups (at which learning rate), summaries
and CLI tables all classify tensors by name; asking this module keeps them from
disagreeing about what a router, an expert or a seed-004 part is.

Roles: `selector`, `gating` (seed 004's model parts: upscale/heads.py),
`router` (any MoE router tensor, encoder, extra or decoder block), `expert`
(an FFN expert bank), `head` (the decoder's output tokens and hypernetworks),
`encoder`, `decoder` (the rest of SAM's image encoder and mask decoder) and
`other` (none of these).
"""

from __future__ import annotations

from typing import Any

SEED004_ROLES = ("selector", "gating")
HEAD_PREFIXES = ("mask_decoder.mask_tokens", "mask_decoder.output_hypernetworks_mlps")


def param_role(name: str) -> str:
    """The role of the tensor called `name` in a SamMoE state dict (see the module docstring)."""
    for role in SEED004_ROLES:
        if name.startswith(role + "."):
            return role
    if ".router." in name:
        return "router"
    if ".mlp.experts." in name:
        return "expert"
    if name.startswith(HEAD_PREFIXES):
        return "head"
    if name.startswith("image_encoder."):
        return "encoder"
    if name.startswith("mask_decoder."):
        return "decoder"
    return "other"


def in_decoder(name: str) -> bool:
    """Whether the tensor lives in the mask decoder (its routers and experts included)."""
    return name.startswith("mask_decoder.")


def is_source(entry: Any) -> bool:
    """Whether a provenance entry (one string, or one per expert of a bank) is all `source`."""
    if isinstance(entry, list):
        return all(is_source(e) for e in entry)
    return entry == "source"
