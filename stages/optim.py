"""Seed 004's three optimizers and their learning-rate schedule.

optimizer1 = SGD over param groups backbone (lr), decoder (lr), selector (lr x 5),
             momentum, weight_decay (5e-5 by default); plus a `router` group
             (lr x router_lr_mult, default 10) holding every MoE router tensor
optimizer2 = Adam(multi-task loss sigmas, lr 0.05, same weight decay): the sigmas are the
             objective's, not the model's (stages/semisup.py `MultiTaskLoss`); `Optimizers.loss` holds them
optimizer3 = SGD(gating model, lr, momentum, same weight decay)

Why a router group: growth hides the new groups behind `group_scale = 0`
(function preserved). Plain SGD moves a zero-initialised gate in proportion to
its gradient, which is small for a bounded (Dice) loss, so at the backbone's
lr the new groups would open over thousands of steps; a larger router lr lets
stage 1 actually teach the routers to use the new experts. Frozen parameters
(stages 1-2) are simply absent. Warm-up (linear, 10 seed
epochs, scaled to the run) applies to optimizers 1 and 3 only; after it, a
polynomial decay (power 0.9) as in Semi-MoE's scripts.

`drop_idle_grads` gives the MoE banks that no token chose no gradient (None) after
backward, so that momentum and weight decay skip them (upscale/moe.py hands them zeros).
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, ContextManager

import torch
from torch import nn

from upscale.roles import SEED004_ROLES, in_decoder, param_role

from .semisup import MultiTaskLoss, poly_factor, warmup_factor

if TYPE_CHECKING:
    from upscale.moe import MoEMLP

    from .master import BankMasters


@dataclass
class Optimizers:
    opt1: torch.optim.SGD
    opt2: torch.optim.Adam
    opt3: torch.optim.SGD
    loss: MultiTaskLoss  # the task-loss weights optimizer2 trains
    kept: "KeptGrads | None" = None  # gradient buffers reused across steps (one process only)
    masters: "BankMasters | None" = None  # bf16 expert banks with fp32 masters (one process, --precision bf16)

    def zero_grad(self, optimizers: list[torch.optim.Optimizer]) -> None:
        """Clear the gradients of `optimizers`' parameters (set to None, or kept buffers zeroed: see KeptGrads)."""
        if self.kept is not None:
            self.kept.zero_grad(optimizers)
        else:
            for opt in optimizers:
                opt.zero_grad(set_to_none=True)

    def after_backward(self) -> None:
        if self.kept is not None:
            self.kept.after_backward()

    def step(self, optimizers: list[torch.optim.Optimizer]) -> None:
        """Step `optimizers`; the expert banks' fp32 masters are what they update (stages/master.py)."""
        with self.full_precision(grads=True):
            for opt in optimizers:
                opt.step()

    def full_precision(self, grads: bool = False) -> ContextManager:
        """Inside, every parameter holds fp32 values: for optimizer steps and checkpoint saves."""
        if self.masters is None:
            return nullcontext()
        return self.masters.full_precision(grads)

    def named(self) -> dict[str, torch.optim.Optimizer]:
        return {"optimizer1": self.opt1, "optimizer2": self.opt2, "optimizer3": self.opt3}

    def named_parameters(self, model: nn.Module) -> dict[str, nn.Parameter]:
        """Every parameter the optimizers may hold, by name: the model's and the task-loss weights (`loss.*`)."""
        return {**dict(model.named_parameters()), **{f"loss.{n}": p for n, p in self.loss.named_parameters()}}


def param_group(name: str) -> str:
    """The optimizer group of a parameter: its role (upscale/roles.py) for the seed-004 parts and routers,
    else backbone or decoder by where it lives (experts train with their block)."""
    role = param_role(name)
    if role in SEED004_ROLES or role == "router":
        return role
    return "decoder" if in_decoder(name) else "backbone"


def build_optimizers(model: nn.Module, lr: float, momentum: float = 0.9, weight_decay: float = 5e-5,
                     loss_lr: float = 0.05, selector_lr_mult: float = 5.0, router_lr_mult: float = 10.0,
                     loss: MultiTaskLoss | None = None, fused: bool = True) -> Optimizers:
    """The three optimizers over the model's trainable parameters (requires_grad) and the task-loss weights
    (a fresh `MultiTaskLoss` on the model's device unless `loss` is given).

    `fused`: SGD's one-kernel step (on a CPU, a tiny model's SGD steps take a fifth of the time of the
    per-parameter loop; the numbers differ from it in rounding only). FSDP's sharded parameters take the loop.
    """
    if loss is None:
        loss = MultiTaskLoss().to(next(model.parameters()).device)
    roles: dict[str, list[nn.Parameter]] = {r: [] for r in ("backbone", "decoder", "selector", "router", "gating")}
    for name, p in model.named_parameters():
        if p.requires_grad:
            roles[param_group(name)].append(p)
    roles["loss"] = list(loss.parameters())
    groups = [
        {"params": roles["backbone"], "lr": lr, "name": "backbone", "base_lr": lr},
        {"params": roles["decoder"], "lr": lr, "name": "decoder", "base_lr": lr},
        {"params": roles["selector"], "lr": lr * selector_lr_mult, "name": "selector", "base_lr": lr * selector_lr_mult},
        {"params": roles["router"], "lr": lr * router_lr_mult, "name": "router", "base_lr": lr * router_lr_mult},
    ]
    opt1 = torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay, fused=fused or None)
    opt2 = torch.optim.Adam(roles["loss"], lr=loss_lr, weight_decay=weight_decay)
    opt3 = torch.optim.SGD([{"params": roles["gating"], "lr": lr, "name": "gating", "base_lr": lr}],
                           lr=lr, momentum=momentum, weight_decay=weight_decay, fused=fused or None)
    return Optimizers(opt1, opt2, opt3, loss)


def lr_factor(step: int, steps_per_epoch: int, total_steps: int, warmup_epochs: float) -> float:
    """Multiplier for optimizers 1 and 3 at (0-based) `step`: warm-up, then poly decay."""
    epochs_done = (step + 1) / steps_per_epoch
    if epochs_done < warmup_epochs:
        return warmup_factor(epochs_done, warmup_epochs)
    warm_steps = warmup_epochs * steps_per_epoch
    return poly_factor(max(0.0, step - warm_steps) / max(total_steps - warm_steps, 1))


def apply_lr(opts: Optimizers, factor: float) -> None:
    """Set optimizers 1 and 3 to base_lr * factor; optimizer2 keeps its lr (no warm-up)."""
    for opt in (opts.opt1, opts.opt3):
        for group in opt.param_groups:
            group["lr"] = group["base_lr"] * factor


class KeptGrads:
    """Gradient memory of large trainable parameters kept across steps, with `set_to_none` semantics.

    With `zero_grad(set_to_none=True)` every step hands autograd fresh
    gradient tensors; for a bank of 117 experts that is GBs of new pages per
    step for the kernel to fault in and zero. Here a parameter's gradient from
    its last step is zeroed and put back before the backward, so autograd
    accumulates into memory that is already mapped. A parameter that then gets
    no gradient (an expert group no token chose) is reset to None, exactly as
    `set_to_none=True` leaves it, so SGD momentum and weight decay skip it as
    before (a zero gradient would not: training would change). Values are the
    same: 0 + g == g. Only for one process: FSDP manages its own gradients.
    """

    def __init__(self, params: list[nn.Parameter], min_numel: int = 1 << 16) -> None:
        self.large = {id(p): p for p in params if p.requires_grad and p.numel() >= min_numel}
        self.kept: dict[int, torch.Tensor] = {}
        self.used: set[int] = set()
        self.armed: list[nn.Parameter] = []
        for p in self.large.values():
            p.register_post_accumulate_grad_hook(lambda q: self.used.add(id(q)))

    def zero_grad(self, optimizers: list[torch.optim.Optimizer]) -> None:
        """`opt.zero_grad(set_to_none=True)` for each, then hand the large parameters their kept buffers, zeroed."""
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        self.used.clear()
        self.armed = []
        for opt in optimizers:
            for group in opt.param_groups:
                for p in group["params"]:
                    buf = self.kept.get(id(p))
                    if buf is not None:
                        p.grad = buf.zero_()
                        self.armed.append(p)

    def after_backward(self) -> None:
        """Keep this step's gradient buffers; parameters that received none go back to None."""
        for p in self.armed:
            if id(p) not in self.used:
                p.grad = None
        for i in self.used:
            p = self.large.get(i)
            if p is not None and p.grad is not None:
                self.kept[i] = p.grad
        self.armed = []


@torch.no_grad()
def drop_idle_grads(layers: "list[MoEMLP]", group_counts: list[list[int]] | None = None) -> None:
    """After backward: the banks (and routed in-group routers) of groups that got no token get grad None.

    `group_counts`: assignments per group of each layer, summed over all processes in a sharded run; by
    default each layer's own counts of its last forward, read on the host once for all layers.
    """
    if group_counts is None:
        layers = [m for m in layers if m.group_counts is not None]
        if not layers:
            return
        flat = torch.cat([m.group_counts for m in layers]).tolist()
        sizes = [len(m.experts) for m in layers]
        group_counts = [flat[sum(sizes[:i]) : sum(sizes[: i + 1])] for i in range(len(layers))]
    for m, counts in zip(layers, group_counts):
        for g, n in enumerate(counts):
            if n == 0:
                for p in m.experts[g].parameters():
                    p.grad = None
                if g >= m.cfg.core_groups:  # core routers share one softmax: they always get gradient
                    m.router.expert_gates[g].weight.grad = None
