"""Expert GEMMs whose backward writes the banks' weight gradients straight into kept gradient buffers (CPU).

Why: the model's expert op (upscale/moe.py `expert_linear`) returns fresh (E, out, in) gradients, which
AccumulateGrad then adds into the buffers `KeptGrads` (stages/optim.py) keeps: for 117 ViT-B experts that
is GBs of new pages per step to fault in and zero, and one more pass to add them. Here each expert's
gradient is `addmm_`-ed into `weight.grad` (a zeroed buffer: bit-identical to `mm`), and the Function
returns an expanded zero, so AccumulateGrad still runs (one cheap pass) and KeptGrads' hooks see the
parameter as used. Without a usable kept buffer (a fresh step, a cast weight under autocast, double
backward) it returns a new gradient, as the model's op would.

`keep_expert_grads(model)` installs this as each MoE layer's `run_experts` (eager, one process: compiled
code keeps the model's own op, which does not read counts on the host).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from upscale.moe import ExpertBank, MoEMLP, autocast_dtype, bank_rows, expert_linear, run_experts


def _writable(grad: Tensor | None, param: Tensor) -> bool:
    return (grad is not None and not torch.is_grad_enabled() and grad.dtype == param.dtype
            and grad.shape == param.shape and grad.is_contiguous())


class _KeptLinear(torch.autograd.Function):
    """`x_e @ weight[e].T + bias[e]` over rows sorted by expert, one bank; see the module docstring."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor, offs: Tensor, counts: list[int]) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(x, weight, offs)
        ctx.counts = counts
        ctx.bias = bias  # only its .grad is read
        return expert_linear(x, [weight], [bias], offs)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x, weight, offs = ctx.saved_tensors
        grad = grad.contiguous()
        grad_x = expert_linear(grad, [weight.transpose(-2, -1)], [], offs) if ctx.needs_input_grad[0] else None
        grads: list[Tensor | None] = [None, None]
        for i, (param, dim) in enumerate(((weight, 3), (ctx.bias, 2))):
            if not ctx.needs_input_grad[1 + i]:
                continue
            kept = param.grad if param.is_leaf else None
            direct = _writable(kept, param)
            out = kept if direct else torch.zeros_like(param, memory_format=torch.contiguous_format)
            for e, (ge, xe) in enumerate(zip(grad.split(ctx.counts), x.split(ctx.counts))):
                if xe.shape[0]:
                    out[e].addmm_(ge.t(), xe) if dim == 3 else out[e].add_(ge.sum(0))
            grads[i] = out.new_zeros(()).expand(out.shape) if direct else out
        return grad_x, grads[0], grads[1], None, None


def kept_run_experts(banks: list[ExpertBank], rows: Tensor, offs: Tensor) -> Tensor:
    """`upscale.moe.run_experts` with `_KeptLinear` per bank; the model's own op where no buffer can be written
    (banks in another dtype than the compute dtype, which casts them, or no gradient recorded)."""
    dtype = autocast_dtype(rows) or rows.dtype
    if not torch.is_grad_enabled() or any(p.dtype != dtype for b in banks for p in b.parameters()):
        return run_experts(banks, rows, offs)
    rows = rows.to(dtype)  # the banks are stored in autocast's dtype (stages/master.py): no cast, leaves kept
    spans = bank_rows(offs, [b.w1 for b in banks])
    parts = []  # one split, not a slice per bank: each slice's backward would zero-fill a gradient of all rows
    for bank, (_, _, counts), xs in zip(banks, spans, rows.split([hi - lo for lo, hi, _ in spans])):
        if not xs.shape[0]:  # no token chose this bank: it stays out of the graph (its gradients stay None)
            continue
        local = torch.tensor(counts, device=rows.device).cumsum(0, dtype=torch.int32)
        h = bank.act(_KeptLinear.apply(xs, bank.w1, bank.b1, local, counts))
        parts.append(_KeptLinear.apply(h, bank.w2, bank.b2, local, counts))
    if not parts:
        return rows.new_zeros(0, banks[0].w1.shape[2])
    return torch.cat(parts) if len(parts) != 1 else parts[0]


def keep_expert_grads(model: nn.Module) -> None:
    """Make every MoE layer of `model` run its experts with `kept_run_experts` (eager, one process)."""
    for m in model.modules():
        if isinstance(m, MoEMLP):
            m.run_experts = kept_run_experts
