"""`--compile`: torch.compile each transformer block in place, as torchtitan does.

Blocks are compiled one by one (`module.compile()`), so the model keeps its module tree and its state
dict's names: checkpoints written compiled and eager are interchangeable. Every shape in a block follows
from the batch size (upscale/moe.py dispatches without host reads), so routing that changes from step to
step never recompiles; each new batch size compiles once (`dynamic=False`: the same kernels for a shape
whatever ran before, which keeps resume bit-exact within a mode). Besides the blocks, the parts after
the decoder's transformer are compiled (task selector, gating model, output maps): their elementwise
work at input resolution is where fusion pays most on a CPU. `samoe predict` and any other caller use
`compile_model(model)`.
"""

from __future__ import annotations

from typing import Any, Callable

from torch import nn

# Block.forward is one code object for every block: windowed or global attention, dense or MoE, and each
# batch size, is a cache entry of it. Dynamo's default limit (8) would fall back to eager silently.
RECOMPILE_LIMIT = 64


def compiled_regions(model: nn.Module) -> list[nn.Module]:
    """The modules `compile_model` compiles (see the module docstring)."""
    return [*model.image_encoder.blocks, *model.mask_decoder.transformer.layers, model.selector, model.gating,
            model.output_maps]


def compile_model(model: nn.Module, backend: str | Callable = "inductor") -> nn.Module:
    """Compile `model`'s blocks and heads in place; returns the model. `backend`: torch.compile's (tests use a
    lighter one)."""
    _raise_recompile_limit()
    for module in compiled_regions(model):
        module.compile(dynamic=False, backend=backend)
    return model


def compile_fn(fn: Callable[..., Any], backend: str | Callable = "inductor") -> Callable[..., Any]:
    """`fn` compiled as `compile_model` compiles blocks (the loss sums, for one)."""
    import torch

    _raise_recompile_limit()
    return torch.compile(fn, dynamic=False, backend=backend)


def _raise_recompile_limit() -> None:
    import torch._dynamo

    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
