"""bf16 expert banks with fp32 master weights: `--precision bf16` in one process.

Under autocast every forward casts each expert bank's fp32 weights to bf16 and
every backward casts their bf16 gradients back to fp32. With 117 experts per
layer that is GBs of casts per step, more than the expert GEMMs themselves cost
on a CPU (benchmarks/moe_layer.py --targets). Here the banks are *stored* in
bf16 for the forward and backward, and their fp32 values (the masters) are what
the optimizer updates and what checkpoints hold.

The numbers are the same as autocast's: the forward used bf16(master) either
way, and the gradient is the same bf16 tensor made fp32; the optimizer steps
the fp32 master with that fp32 gradient, then the bf16 copy is refreshed. So a
run gives bit-identical weights with or without this (tested).

How: each bank parameter keeps its identity (optimizers, KeptGrads and the
checkpoint's names refer to it) and swaps its storage. Inside `full_precision()`
the parameter holds its fp32 master (and, with `grads=True`, an fp32 copy of
its gradient); on leaving, the masters that may have changed are cast back
into the bf16 storage. Optimizer steps and checkpoint saves run inside; the
masters are made after a resume has loaded fp32 values into the fp32 parameters.
FSDP2 (torchrun) has its own mixed-precision policy and does not use this.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn


class BankMasters:
    """fp32 masters of `params` (stored from now on in `dtype`); see the module docstring."""

    def __init__(self, params: list[nn.Parameter], dtype: torch.dtype = torch.bfloat16) -> None:
        self.params = [p for p in params if p.dtype == torch.float32]
        self.master = [p.detach() for p in self.params]  # the fp32 storage itself, no copy
        self.low = [m.to(dtype) for m in self.master]
        self.grad32: list[torch.Tensor | None] = [None] * len(self.params)  # fp32 gradient buffers, kept across steps
        for p, low in zip(self.params, self.low):
            p.data = low

    @contextmanager
    def full_precision(self, grads: bool = False) -> Iterator[None]:
        """Inside, every parameter holds its fp32 master; with `grads`, its gradient in fp32 too (for an
        optimizer step, which may change the masters that have one). On leaving, those are cast into the
        bf16 storage; every parameter gets its bf16 storage and gradient back."""
        saved = [p.grad for p in self.params]
        for i, (p, m, g) in enumerate(zip(self.params, self.master, saved)):
            p.grad = None  # a gradient must match its parameter's dtype: detach it before the swap
            p.data = m
            if grads and g is not None:
                buf = self.grad32[i]
                if buf is None:
                    buf = self.grad32[i] = torch.empty_like(m)
                p.grad = buf.copy_(g)
        try:
            yield
        finally:
            for p, m, low, g in zip(self.params, self.master, self.low, saved):
                if grads and g is not None:
                    low.copy_(m)
                p.grad = None
                p.data = low
                p.grad = g


def expert_bank_params(model: nn.Module) -> list[nn.Parameter]:
    """Every parameter of every expert bank (trainable or frozen: all are cast in each forward)."""
    from upscale.moe import ExpertBank

    return [p for m in model.modules() if isinstance(m, ExpertBank) for p in m.parameters()]
