"""Mixture-of-experts MLP with a hierarchical (group -> expert) router.

Layout of one MoE layer (it replaces a SAM `MLPBlock`, same input/output shape):

    router.expert_gates.{g}.weight  (E_g, D)   in-group router rows, one per expert
    router.group_gate.weight        (G_r, D)   group router over the routed groups
    router.group_scale              (G_r,)     each routed group's share of a token, in [0, 1]
    experts.{g}.w1 / b1             (E_g, H, D) / (E_g, H)   = stacked `lin1` of SAM's MLP
    experts.{g}.w2 / b2             (E_g, D, H) / (E_g, D)   = stacked `lin2`

Routing. The first `core_groups` groups hold the source model's experts: always active and routed
jointly (softmax over their union, top-k, renormalised), which is the source's own flat router, so
growth leaves its computation untouched. Each token also picks `top_k_groups` of the other
(routed) groups with the group router, and `routed_top_k` experts inside each with that group's
router. A chosen group takes the share `m_g = group_scale[g] * p_group` of the token and the core
keeps `1 - sum_g m_g`: a convex mixture. Growth starts `group_scale` at 0 (the source's function,
exactly); the hand-over loss, a Switch balance loss over (core, routed groups), pushes weight to the
new groups against the task loss. With `replicas` every group is a copy of the source's pool and
there is no core: a token goes whole to its chosen group(s) (probabilities renormalised, the sum held
constant in the gradient).

Dispatch. Every shape depends on the token count alone and nothing is read on the host, so the
layer runs the same on every device and compiles to one graph: the in-group routers score every
token (a GEMM under 0.5% of the layer's FLOPs at ViT width), assignments are sorted by expert, and
each linear layer of all banks is one `samoe::expert_mm` call, an operator the compiler treats as
one node (torch._grouped_mm where it takes the dtype, a loop over experts otherwise). Every bank is
an input of that call: a bank no token chose gets a zero gradient (stages/ turns it into None).
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Type

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import MoEConfig

# --------------------------------------------------------------------------- expert GEMMs


def _grouped_mm_ok(x: Tensor, weight: Tensor) -> bool:
    """torch._grouped_mm runs on CPU (float32/bf16) and CUDA (bf16) with 16-byte aligned rows."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    dtypes = (torch.float32, torch.bfloat16) if x.device.type == "cpu" else (torch.bfloat16,)
    if x.device.type not in ("cpu", "cuda") or x.dtype not in dtypes or weight.dtype != x.dtype:
        return False
    return all(d * x.element_size() % 16 == 0 for d in weight.shape[1:])


def single_call(x: Tensor) -> bool:
    """Whether the expert GEMMs of all banks run as one grouped GEMM whose offsets stay on the device (on CUDA,
    where a host read waits for the queue to drain; tests switch it on for CPU tensors)."""
    return x.device.type == "cuda"


def bank_rows(offs: Tensor, banks: list[Tensor]) -> list[tuple[int, int, list[int]]]:
    """(first row, end row, rows per expert) of each bank, read on the host."""
    ends = [0] + offs.tolist()
    out, e = [], 0
    for w in banks:
        n = w.shape[0]
        out.append((ends[e], ends[e + n], [b - a for a, b in zip(ends[e : e + n], ends[e + 1 : e + n + 1])]))
        e += n
    return out


def _rows_of_experts(counts: Tensor, n: int) -> Tensor:
    """(n,) the expert of each row, rows sorted by expert with `counts` (E,) rows each."""
    return torch.repeat_interleave(torch.arange(counts.shape[0], device=counts.device), counts, output_size=n)


def _expert_linear(x: Tensor, banks: list[Tensor], biases: list[Tensor], offs: Tensor) -> Tensor:
    if single_call(x):
        w = banks[0] if len(banks) == 1 else torch.cat(banks)
        counts = torch.diff(offs, prepend=offs.new_zeros(1)).long()
        if _grouped_mm_ok(x, w):
            y = torch._grouped_mm(x, w.transpose(-2, -1), offs=offs)
        else:  # float64 or unaligned widths: a loop that reads the offsets
            ends = [0] + offs.tolist()
            y = torch.cat([x[a:b] @ w[e].t() for e, (a, b) in enumerate(zip(ends, ends[1:])) if b > a])
        if biases:
            y += torch.cat(biases).index_select(0, _rows_of_experts(counts, x.shape[0]))
        return y
    parts = []
    for g, (w, (lo, hi, counts)) in enumerate(zip(banks, bank_rows(offs, banks))):
        if hi == lo:
            continue
        if _grouped_mm_ok(x, w):
            local = torch.tensor(counts, device=x.device).cumsum(0, dtype=torch.int32)
            y = torch._grouped_mm(x[lo:hi], w.transpose(-2, -1), offs=local)
        else:  # float64 or unaligned widths
            y = torch.cat([xe @ w[e].t() for e, xe in enumerate(x[lo:hi].split(counts)) if xe.shape[0]])
        if biases:
            y += biases[g].repeat_interleave(torch.tensor(counts, device=x.device), 0, output_size=hi - lo)
        parts.append(y)
    return torch.cat(parts) if len(parts) != 1 else parts[0]


@torch.library.custom_op("samoe::expert_linear", mutates_args=())
def expert_linear(x: Tensor, banks: list[Tensor], biases: list[Tensor], offs: Tensor) -> Tensor:
    """`x[rows of e] @ W_e.T + b_e` for every expert e of every bank (nn.Linear layout, banks in order).

    Args:
        x (Tensor): (n, in) rows sorted by expert.
        banks (list[Tensor]): (E_g, out, in) weights of each bank.
        biases (list[Tensor]): (E_g, out) biases of each bank, or none.
        offs (Tensor): (E,) int32 end row of each expert (cumulative counts; the last is n).
    Returns:
        Tensor: (n, out).
    """
    if x.shape[0] == 0:
        return x.new_empty(0, banks[0].shape[1])
    return _expert_linear(x, banks, biases, offs)


@expert_linear.register_fake
def _(x: Tensor, banks: list[Tensor], biases: list[Tensor], offs: Tensor) -> Tensor:
    return x.new_empty(x.shape[0], banks[0].shape[1])


@torch.library.custom_op("samoe::expert_linear_grads", mutates_args=())
def expert_linear_grads(x: Tensor, grad: Tensor, offs: Tensor, banks: list[Tensor], needed: list[bool]) -> list[Tensor]:
    """The parameter gradients of `expert_linear`, per bank [dW_0, db_0, dW_1, db_1, ...]: `grad_e.T @ x_e` and
    the sum of `grad_e` over expert e's rows (zeros for an expert without rows; (0,) where not `needed`)."""
    n = x.shape[0]
    if single_call(x) and _grouped_mm_ok(x, banks[0]):
        counts = torch.diff(offs, prepend=offs.new_zeros(1)).long()
        gw = torch._grouped_mm(grad.t(), x, offs=offs)
        gb = grad.new_zeros(counts.shape[0], grad.shape[1]).index_add_(0, _rows_of_experts(counts, n), grad)
        if len(banks) == 1:
            return [gw, gb] if needed[0] else [gw.new_empty(0), gb.new_empty(0)]
        sizes = [w.shape[0] for w in banks]  # outputs may not share memory (run_experts passes one bank here)
        return [t.clone() for w, b, need in zip(gw.split(sizes), gb.split(sizes), needed)
                for t in ((w, b) if need else (w.new_empty(0), b.new_empty(0)))]
    out = []
    for w, need, (lo, hi, counts) in zip(banks, needed, bank_rows(offs, banks)):
        if not need:
            out += [w.new_empty(0), w.new_empty(0)]
            continue
        if hi == lo:
            out += [torch.zeros_like(w, memory_format=torch.contiguous_format), w.new_zeros(w.shape[:2])]
            continue
        g, xs = grad[lo:hi], x[lo:hi]
        if _grouped_mm_ok(xs, w):  # it writes every expert's block (zeros where an expert has no rows)
            gw = torch._grouped_mm(g.t(), xs, offs=torch.tensor(counts, device=x.device).cumsum(0, dtype=torch.int32))
        else:
            gw = torch.zeros_like(w, memory_format=torch.contiguous_format)
            for e, (ge, xe) in enumerate(zip(g.split(counts), xs.split(counts))):
                if xe.shape[0]:
                    gw[e] = ge.t() @ xe
        out += [gw, torch.stack([ge.sum(0) for ge in g.split(counts)])]  # segment sums: no scatter
    return out


@expert_linear_grads.register_fake
def _(x: Tensor, grad: Tensor, offs: Tensor, banks: list[Tensor], needed: list[bool]) -> list[Tensor]:
    out = []
    for w, need in zip(banks, needed):
        out += [w.new_empty(w.shape), w.new_empty(w.shape[:2])] if need else [w.new_empty(0), w.new_empty(0)]
    return out


def _expert_linear_setup(ctx, inputs, output) -> None:
    x, banks, biases, offs = inputs
    ctx.needed = [w.requires_grad or (bool(biases) and biases[g].requires_grad) for g, w in enumerate(banks)]
    ctx.with_bias = bool(biases)
    ctx.save_for_backward(x, offs, *banks)


def _expert_linear_backward(ctx, grad: Tensor):
    x, offs, *banks = ctx.saved_tensors
    grad = grad.contiguous()
    grad_x = expert_linear(grad, [w.transpose(-2, -1) for w in banks], [], offs) if ctx.needs_input_grad[0] else None
    if not any(ctx.needed):
        return grad_x, [None] * len(banks), [None] * len(banks) if ctx.with_bias else [], None
    grads = expert_linear_grads(x, grad, offs, banks, ctx.needed)
    grad_w = [g if need else None for g, need in zip(grads[0::2], ctx.needed)]
    grad_b = [g if need else None for g, need in zip(grads[1::2], ctx.needed)] if ctx.with_bias else []
    return grad_x, grad_w, grad_b, None


expert_linear.register_autograd(_expert_linear_backward, setup_context=_expert_linear_setup)


def _register_flops() -> None:
    """FlopCounterMode counts the expert GEMMs as the dense GEMM over their rows: what they compute."""
    from torch.utils.flop_counter import register_flop_formula

    @register_flop_formula(torch.ops.samoe.expert_linear)
    def _(x_shape, banks_shapes, *args, **kwargs) -> int:
        return 2 * x_shape[0] * x_shape[1] * banks_shapes[0][1]

    @register_flop_formula(torch.ops.samoe.expert_linear_grads)
    def _(x_shape, grad_shape, *args, **kwargs) -> int:
        return 2 * x_shape[0] * x_shape[1] * grad_shape[1]


_register_flops()


class _Permute(torch.autograd.Function):
    """`x[perm]` for a permutation, whose backward gathers by the inverse permutation.

    Why: autograd's backward of a row gather is a scatter-add, which compiled code under deterministic
    algorithms runs as a sorting scatter; a permutation's is a gather.
    """

    @staticmethod
    def forward(ctx, x: Tensor, perm: Tensor, inverse: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(inverse)
        return x.index_select(0, perm)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:  # type: ignore[override]
        (inverse,) = ctx.saved_tensors
        return grad.index_select(0, inverse), None, None


def autocast_dtype(x: Tensor) -> torch.dtype | None:
    """The dtype autocast computes matmuls in on x's device, None when autocast is off."""
    kind = x.device.type
    if kind in ("cpu", "cuda") and torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return None


class ExpertBank(nn.Module):
    """`num_experts` MLPs of SAM's `MLPBlock` shape, stacked for grouped GEMM.

    Arguments:
        num_experts (int): experts in this bank (one group).
        dim (int): token width D.
        hidden (int): MLP hidden width H.
        act (Type[nn.Module]): activation (GELU in the encoder, ReLU in the decoder).
    """

    def __init__(self, num_experts: int, dim: int, hidden: int, act: Type[nn.Module]) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(num_experts, hidden, dim))
        self.b1 = nn.Parameter(torch.empty(num_experts, hidden))
        self.w2 = nn.Parameter(torch.empty(num_experts, dim, hidden))
        self.b2 = nn.Parameter(torch.empty(num_experts, dim))
        self.act = act()
        self.reset_parameters()

    @property
    def num_experts(self) -> int:
        return self.w1.shape[0]

    def reset_parameters(self) -> None:
        """nn.Linear's default init, expert by expert."""
        for w, b in ((self.w1, self.b1), (self.w2, self.b2)):
            bound = 1.0 / w.shape[-1] ** 0.5
            if w.device.type != "meta":
                with torch.no_grad():
                    for e in range(w.shape[0]):
                        nn.init.kaiming_uniform_(w[e], a=5**0.5)
                    nn.init.uniform_(b, -bound, bound)


def run_experts(banks: list[ExpertBank], rows: Tensor, offs: Tensor) -> Tensor:
    """Each row through its expert's MLP: rows (n, D) sorted by expert, offs (E,) each expert's end row."""
    dtype = autocast_dtype(rows) or rows.dtype  # expert_linear is no autocast op: cast here, as autocast would
    w1, b1, w2, b2 = ([getattr(b, name).to(dtype) for b in banks] for name in ("w1", "b1", "w2", "b2"))
    if single_call(rows) and len(banks) > 1:  # one bank of all experts (the copy bf16 autocast makes anyway)
        w1, b1, w2, b2 = ([torch.cat(t)] for t in (w1, b1, w2, b2))
    return expert_linear(banks[0].act(expert_linear(rows.to(dtype), w1, b1, offs)), w2, b2, offs)


# --------------------------------------------------------------------------- routing


class Routing(NamedTuple):
    """Every token's K assignments (K = `MoEConfig.experts_per_token`) and the router's statistics."""

    expert: Tensor  # (N, K) global expert index (groups laid out in order)
    weight: Tensor  # (N, K) mixing weight, float32; a token's weights sum to one
    pool_sums: list[Tensor]  # per pool of `router_pools(cfg)`: see `pool_sums`
    entropy: Tensor  # mean entropy of the top-level routing distributions (nats), detached
    new_weight: Tensor  # mean weight of the tokens on new experts, detached


def count(index: Tensor, num: int) -> Tensor:
    """How often each of 0..num-1 occurs in `index`, float32 (a compare and a sum: no scatter, no host read)."""
    return (index.reshape(-1, 1) == torch.arange(num, device=index.device)).sum(0).float()


def pool_sums(probs: Tensor, chosen: Tensor, num: int) -> Tensor:
    """(prob sums (num,), assignment counts (num,), [tokens, assignments]) of one router pool, float32:
    what its balance loss is made of, and what N processes sum to form the global one."""
    probs = probs.float()
    rows = probs.new_full((1,), probs.shape[0])  # a fill, not a host-to-device copy
    return torch.cat([probs.sum(dim=0), count(chosen, num), rows, rows * chosen.shape[-1]])


def pool_balance(sums: Tensor, num: int) -> Tensor:
    """Switch-Transformer balance loss of one pool from its sums: num * sum_e f_e * mean p_e (1 when uniform,
    0 without tokens)."""
    probs, counts, tokens, assignments = sums[:num], sums[num : 2 * num], sums[2 * num], sums[2 * num + 1]
    return num * ((counts / assignments.clamp_min(1)) * (probs / tokens.clamp_min(1))).sum()


def router_pools(cfg: MoEConfig) -> list[tuple[str, int, int]]:
    """(kind, group, experts) of each router pool, in the order of `Routing.pool_sums`."""
    pools = []
    if cfg.core_groups:
        pools.append(("core", -1, cfg.num_core_experts))
    routed = cfg.num_routed_groups
    if routed:
        pools.append(("group", -1, routed))
        if cfg.core_groups:
            pools.append(("top", -1, routed + 1))  # (core, routed groups) mixture
        pools += [("routed", cfg.core_groups + r, cfg.groups[cfg.core_groups + r]) for r in range(routed)]
    return pools


def balance_losses(cfg: MoEConfig, sums: list[Tensor]) -> tuple[Tensor, Tensor]:
    """(aux, hand-over) losses of one layer from its pool sums, those of one process or summed over all.

    aux: mean balance loss over the pools that had tokens (core and group router always, a routed group
    when some token chose it); hand-over: the balance loss of the top level (core vs routed groups).
    """
    aux, present = [], []
    handover = sums[0].new_zeros(()) if sums else torch.zeros(())
    for (kind, _, num), s in zip(router_pools(cfg), sums):
        loss = pool_balance(s, num)
        if kind == "top":
            handover = loss
        else:
            aux.append(loss)
            present.append((s[2 * num] > 0).to(s.dtype) if kind == "routed" else s.new_ones(()))
    if not aux:
        return handover.new_zeros(()), handover
    present_t = torch.stack(present)
    return (torch.stack(aux) * present_t).sum() / present_t.sum().clamp_min(1), handover


def _topk_renormalised(logits: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    probs = logits.float().softmax(dim=-1)
    top_p, top_i = probs.topk(k, dim=-1)
    return probs, top_i, top_p / top_p.sum(dim=-1, keepdim=True)


def _entropy(probs: Tensor) -> Tensor:
    return -(probs * probs.clamp_min(1e-12).log()).sum(-1).mean() if probs.shape[0] else probs.new_zeros(())


class HierarchicalRouter(nn.Module):
    """Group router -> top-k groups, in-group routers -> top-k experts (see module docstring).

    Arguments:
        dim (int): token width D.
        cfg (MoEConfig): groups, core groups and top-k values.
    """

    def __init__(self, dim: int, cfg: MoEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.expert_gates = nn.ModuleList(nn.Linear(dim, e, bias=False) for e in cfg.groups)
        if cfg.num_routed_groups:
            self.group_gate = nn.Linear(dim, cfg.num_routed_groups, bias=False)
            self.group_scale = nn.Parameter(torch.ones(cfg.num_routed_groups))
        self._index_cache: dict[torch.device, tuple[Tensor, Tensor]] = {}

    def _routed_index(self, device: torch.device) -> tuple[Tensor, Tensor]:
        """Constants of the routed groups, made once per device: pad (G_r, emax) 1.0 where group r has no
        expert j, starts (G_r,) the global index of each routed group's first expert."""
        if device not in self._index_cache:
            cfg = self.cfg
            sizes = cfg.groups[cfg.core_groups:]
            self._index_cache[device] = (torch.tensor([[float(j >= s) for j in range(max(sizes))] for s in sizes], device=device),
                                         torch.tensor(cfg.offsets[cfg.core_groups:-1], device=device))
        return self._index_cache[device]

    def forward(self, x: Tensor) -> Routing:
        """x: (N, D) -> Routing over the N tokens.

        Chosen groups are picked with one-hot products rather than indexing: their backward is a matmul,
        where an index's is a scatter (which compiled code under deterministic algorithms sorts)."""
        cfg = self.cfg
        n, core, routed = x.shape[0], cfg.core_groups, cfg.num_routed_groups
        experts, weights, sums, entropy = [], [], [], []
        if routed:
            g_probs = self.group_gate(x).float().softmax(dim=-1)
            g_p, g_i = g_probs.topk(cfg.top_k_groups, dim=-1)
            chosen = F.one_hot(g_i, routed).float()  # (N, k_groups, G_r)
            if cfg.replicas:  # the chosen replicas share the token whole; the router learns through the numerator
                g_p = g_p / g_p.sum(-1, keepdim=True).detach()
            mix = g_p * (chosen @ self.group_scale.float())  # (N, k_groups): each chosen group's share of the token
        if core:
            logits = F.linear(x, torch.cat([self.expert_gates[g].weight for g in range(core)]))
            probs, top_i, top_w = _topk_renormalised(logits, cfg.top_k)
            experts.append(top_i)
            weights.append(top_w * (1 - mix.sum(-1, keepdim=True)) if routed else top_w)
            sums.append(pool_sums(probs, top_i, cfg.num_core_experts))
            entropy.append(_entropy(probs))
        if routed:
            sums.append(pool_sums(g_probs, g_i, routed))
            entropy.append(_entropy(g_probs))
            if core:  # the top level: (core, routed groups) as one mixture per token
                top = torch.cat([1 - mix.sum(-1, keepdim=True), (chosen * mix[:, :, None]).sum(1)], dim=-1)
                sums.append(pool_sums(top, top.argmax(dim=-1, keepdim=True), routed + 1))
            pad, starts = self._routed_index(x.device)
            emax, kr = pad.shape[1], cfg.k_routed
            # every routed expert's score for every token, (N, G_r, emax) (group weights padded to emax rows),
            # then the chosen groups' (N, k_groups, emax), padding at -inf
            gates = [self.expert_gates[core + r].weight for r in range(routed)]
            scores = F.linear(x, torch.cat([F.pad(w, (0, 0, 0, emax - w.shape[0])) for w in gates])).float()
            own = (chosen @ scores.view(n, routed, emax)).masked_fill(chosen @ pad > 0.5, float("-inf"))
            probs = own.softmax(dim=-1)
            top_p, top_i = probs.topk(kr, dim=-1)
            experts.append((top_i + starts[g_i][:, :, None]).flatten(1))
            weights.append((top_p / top_p.sum(-1, keepdim=True) * mix[:, :, None]).flatten(1))
            # each routed group's pool over its own tokens: prob sums, assignments, tokens
            flat = chosen.reshape(-1, routed)
            psum = flat.t() @ probs.reshape(-1, emax)
            picks = flat.t() @ F.one_hot(top_i, emax).sum(2).reshape(-1, emax).float()
            group_tokens = flat.sum(0)
            for r, s in enumerate(cfg.groups[core:]):
                sums.append(torch.cat([psum[r, :s], picks[r, :s], torch.stack([group_tokens[r], group_tokens[r] * kr])]))
            new = mix * (g_i > 0) if cfg.replicas else mix  # replicas: group 0 holds the source's own experts
            new_weight = new.sum(-1).mean().detach() if n else mix.new_zeros(())
        else:
            new_weight = x.new_zeros((), dtype=torch.float32)
        return Routing(torch.cat(experts, dim=1), torch.cat(weights, dim=1), sums,
                       torch.stack(entropy).mean().detach(), new_weight)


# --------------------------------------------------------------------------- the layer


class MoEMLP(nn.Module):
    """Drop-in replacement for SAM's `MLPBlock`: same call, any leading dims.

    Arguments:
        dim (int): token width D.
        hidden (int): expert hidden width H (SAM's mlp_dim).
        cfg (MoEConfig): expert groups and routing.
        act (Type[nn.Module]): expert activation.

    After each forward: `aux_loss` and `handover_loss` (see `balance_losses`), `pool_sums` (what they are
    made of, for a loss over N processes), and detached statistics for reports: `expert_counts` /
    `group_counts` (assignments per expert / group), `entropy`, `new_weight`. With `record = True` the
    forward also keeps (token, expert, weight) of every assignment in `assignments`.
    """

    def __init__(self, dim: int, hidden: int, cfg: MoEConfig, act: Type[nn.Module] = nn.GELU) -> None:
        super().__init__()
        self.cfg = cfg
        self.router = HierarchicalRouter(dim, cfg)
        self.experts = nn.ModuleList(ExpertBank(e, dim, hidden, act) for e in cfg.groups)
        self.aux_loss: Tensor | None = None
        self.handover_loss: Tensor | None = None
        self.pool_sums: list[Tensor] = []
        self.expert_counts: Tensor | None = None
        self.group_counts: Tensor | None = None
        self.entropy: Tensor | None = None
        self.new_weight: Tensor | None = None
        self.record = False
        self.assignments: tuple[Tensor, Tensor, Tensor] | None = None
        # rows (sorted by expert) through the banks: `run_experts`, or a substitute with the same result that a
        # trainer installs (stages/expert_grads.py writes the banks' gradients into kept buffers)
        self.run_experts: Callable[[list[ExpertBank], Tensor, Tensor], Tensor] = run_experts

    @torch.no_grad()
    def constrain_(self) -> None:
        """Project the group scales back into [0, 1] (after an optimizer step): the mixture stays convex."""
        scale = getattr(self.router, "group_scale", None)
        if scale is not None:
            scale.clamp_(0.0, 1.0)

    def forward(self, x: Tensor) -> Tensor:
        shape, num = x.shape, self.cfg.num_experts
        x = x.reshape(-1, shape[-1])
        route = self.router(x)
        n, k = route.expert.shape
        expert = route.expert.flatten()  # token-major: assignment i belongs to token i // K
        order = torch.argsort(expert, stable=True)
        inverse = torch.argsort(order)
        ends = torch.searchsorted(expert[order], torch.arange(1, num + 1, device=x.device))  # each expert's end row
        rows = _Permute.apply(x[:, None, :].expand(n, k, shape[-1]).reshape(n * k, shape[-1]), order, inverse)
        y = self.run_experts(list(self.experts), rows, ends.to(torch.int32))
        y = _Permute.apply(y, inverse, order).view(n, k, y.shape[-1])  # back to assignment order
        out = (y * route.weight.to(y.dtype)[:, :, None]).sum(1).to(x.dtype)
        self.pool_sums = route.pool_sums
        self.aux_loss, self.handover_loss = balance_losses(self.cfg, route.pool_sums)
        self.expert_counts = counts = torch.diff(ends, prepend=ends.new_zeros(1))
        offsets = self.cfg.offsets
        self.group_counts = torch.stack([counts[lo:hi].sum() for lo, hi in zip(offsets, offsets[1:])])
        self.entropy, self.new_weight = route.entropy, route.new_weight
        if self.record:
            tokens = torch.arange(n, device=x.device).repeat_interleave(k)
            self.assignments = (tokens, expert.detach(), route.weight.flatten().detach())
        return out.reshape(shape)
