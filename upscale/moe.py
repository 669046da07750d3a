"""Mixture-of-experts MLP with a hierarchical (group -> expert) router.

Layout of one MoE layer (it replaces a SAM `MLPBlock`, same input/output shape):

    router.expert_gates.{g}.weight  (E_g, D)   in-group router rows, one per expert
    router.group_gate.weight        (G_r, D)   group router over the routed groups
    router.group_scale              (G_r,)     learnable scale of each routed group
    router.group_context.weight     (G_r, 2D)  with `image_context`: the group router's weights on the
                                               mean and std of the layer input over the token's image
    experts.{g}.w1 / b1             (E_g, H, D) / (E_g, H)   = stacked `lin1` of SAM's MLP
    experts.{g}.w2 / b2             (E_g, D, H) / (E_g, D)   = stacked `lin2`

Routing. The first `core_groups` groups hold the source model's experts. They
are always active and routed jointly: softmax over the union of their experts,
top-k, weights renormalised to sum to one. That is exactly the flat top-k router
of the source model, so a model whose experts are all copies of a dense MLP
reproduces that MLP, and growth leaves the source's computation untouched.
The remaining ("routed") groups are chosen per token by the group router
(softmax over routed groups, top-k groups); inside a chosen group an in-group
router picks `routed_top_k` experts (renormalised; 0 means top-k). With 1, a
token of a grown model runs top-k + 1 experts instead of 2 x top-k: the new
capacity costs parameters more than compute per step.

Hand-over mixing. A token's routed groups receive the weight
`m_g = group_scale[g] * p_group` and the core experts the remaining `1 - sum_g m_g`:
the layer's output is a convex mixture of the core output and the new groups'
outputs (`group_scale` lives in [0, 1] and is projected back after each
optimizer step, `MoEMLP.constrain_`). Growth initialises `group_scale` to zero,
so the grown model computes exactly what the source computed, for any noise on
the new experts. `group_scale` is one number per group, so without more the
share a token hands over depends on the token only through `p_group`. With
`token_handover` (`expand --token-handover`) the core is one more option of the
group softmax, with its logit fixed at 0: `m_g = group_scale[g] * p_group *
(1 - p_core)`, `p_core = 1 / (1 + sum_g exp z_g)`. The router can then keep the
tokens the source already handles (an old region, an old sensor) on the source's
experts while others move to the new ones: inherit, then develop. With
`image_context` the group logits add `group_context @ [mean, std]` of the layer
input over the token's image (the leading dimension of the layer's input): a
region or sensor is a property of the whole image (its noise floor), which a
single token carries weakly, so routing by it needs the image's statistics.
`group_context` starts at zero, so growth stays exact. Because new experts start as (noisy) copies or interpolations
of the source's, moving weight from the core to them barely changes the
function, so routing weight can move without first hurting the loss (an
additive `core + scale * new` would double the MLP output instead, and the
loss holds the scales near zero: 1-3% of the weight after stage 1). What moves
it is the top-level balance loss: the Switch-Transformer loss over the
mixture (core, routed group 1..G), `handover_loss`, which counts the core as
one more group, so a grown model is pushed to use its new groups as a flat MoE
is pushed to use all its experts, against the task loss, which pulls weight
back wherever new experts are worse. It is kept apart from the expert-level
`aux_loss` so that training can weigh it on its own (`--handover-coef`). d loss / d group_scale = p_group *
<new output - core output, upstream gradient> + the balance term, non-zero from
the first step.

Residual new groups (`residual`, `expand --residual-experts`). The new groups add
to the core's output instead of taking a share of it: `core + sum_g m_g new_g`,
`m_g = group_scale[g] * p_group`. Growth starts their output layers (w2, b2) at
zero and `group_scale` at one, so the grown model is exact whatever their first
layers hold: they can start as fresh random features (`--reinit-ratio 1`), not
copies. Their output layers get gradient from the first step, their first
layers and the group gate (through p_group) from the second (the
zero-initialised residual branch of LoRA).
There is no hand-over, so `handover_loss` is zero; `new_weight` is the routing
weight on the new groups, not a share taken from the core.

Replicas (`replicas`, `expand --replicate`). Every group is an exact copy of the
source's experts (group 0 is the source's own), there is no core pool, and each
token goes to ONE group with weight `group_scale` (1 at growth): whichever group a
token takes, it computes what the source computed, at the source's cost per token.
(With several groups per token, as in the decoder, their probabilities are
renormalised to sum to one: still exact.)
The new capacity is parameters alone (Sparse Upcycling, Komatsuzaki et al. 2023,
one level up: copies of the whole expert pool, not of one dense MLP). The group
router learns through `p / stop_gradient(p)`, whose value is 1 and whose gradient
is that of log p; routing sends each replica its own tokens, so the copies drift
apart and specialise.

Dispatch. Tokens are sorted by expert; each group's experts run as one grouped
GEMM (`torch._grouped_mm`) over their contiguous slice, with a per-expert loop
as fallback where grouped GEMM is unavailable; results are weighted and
scattered back with `index_add`. Only the experts a token uses are computed, and
the in-group routers only see the tokens of their group.

Dispatch on CUDA (`static_dispatch`). The CPU path above reads the expert counts
on the host (`.tolist()`, one `nonzero` per routed group) to cut rows into
groups; on a GPU each such read waits for the queue to drain, once per layer.
On CUDA every shape is known without looking at the data instead: the in-group
routers score every token (one small GEMM over all routed experts, under 0.5%
of the layer's FLOPs at ViT width) and each token keeps only its chosen group's
scores; the group weights are cast and concatenated in one copy (the same copy
bf16 autocast makes anyway) so that the whole layer runs as ONE grouped GEMM
whose offsets stay on the device; balance statistics are per-group sums
(`index_add`; `torch.bincount` reads the largest index on the host, so counts are
scatter-adds). Banks that received no token get a zero gradient
there; `drop_idle_grads` turns it back into None after backward so that the
optimizer skips them as on the CPU path. torch's bf16 grouped GEMM (sm90+) is
sync-free; in fp32 torch itself falls back to a per-expert loop that reads the
offsets (use bf16 on GPUs, fp32 there is a reference mode).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Type

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import MoEConfig


def _grouped_mm_ok(x: Tensor, weight: Tensor) -> bool:
    """torch._grouped_mm runs on CPU (float32/bf16) and CUDA (bf16) with 16-byte aligned rows."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    dtypes = (torch.float32, torch.bfloat16) if x.device.type == "cpu" else (torch.bfloat16,)
    if x.device.type not in ("cpu", "cuda") or x.dtype not in dtypes or weight.dtype != x.dtype:
        return False
    return all(d * x.element_size() % 16 == 0 for d in weight.shape[1:])


def _autocast_dtype(x: Tensor) -> torch.dtype | None:
    """The dtype autocast computes matmuls in on x's device, None when autocast is off."""
    kind = x.device.type
    if kind in ("cpu", "cuda") and torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return None


def _compute_dtype(x: Tensor, *params: Tensor) -> tuple[Tensor, ...]:
    """x and params in autocast's dtype when autocast is on (torch._grouped_mm is not on autocast's lists)."""
    dtype = _autocast_dtype(x)
    if dtype is None:
        return (x, *params)
    return tuple(t.to(dtype) for t in (x, *params))


def grouped_linear(x: Tensor, weight: Tensor, bias: Tensor, counts: Tensor, counts_list: list[int]) -> Tensor:
    """Apply expert e's linear layer to its contiguous slice of rows.

    Args:
        x (Tensor): (n, in) rows sorted by expert.
        weight (Tensor): (E, out, in), nn.Linear layout per expert.
        bias (Tensor): (E, out).
        counts (Tensor): (E,) rows per expert, on x's device.
        counts_list (list[int]): the same counts on the host.
    Returns:
        Tensor: (n, out).
    """
    n = x.shape[0]
    x, weight, bias = _compute_dtype(x, weight, bias)
    if _grouped_mm_ok(x, weight):
        offs = torch.cumsum(counts, 0).to(torch.int32)
        if x.device.type == "cpu" and torch.is_grad_enabled() and weight.requires_grad:
            y = _ExpertGemm.apply(x, weight, offs, counts_list)
        else:
            y = torch._grouped_mm(x, weight.transpose(-2, -1), offs=offs)
    else:
        parts = [xe @ weight[e].t() for e, xe in enumerate(torch.split(x, counts_list)) if xe.shape[0]]
        y = torch.cat(parts) if parts else x.new_zeros(0, weight.shape[1])
    return y + torch.repeat_interleave(bias, counts, dim=0, output_size=n)


class _ExpertGemm(torch.autograd.Function):
    """`x_e @ weight[e].T` over rows sorted by expert (CPU), whose backward writes the weight's gradient
    straight into its kept gradient buffer when it has one.

    Why: torch._grouped_mm's backward returns a fresh (E, out, in) weight gradient, 70 MB for a bank of
    15 ViT-B experts in bf16, which AccumulateGrad then adds into the buffer `KeptGrads` kept
    (stages/optim.py). The kernel faults in and zeroes those fresh pages every step, which made the
    weight-gradient GEMMs take about twice as long as the others. Here each expert's gradient is
    `addmm_`-ed into `weight.grad` (into a zeroed buffer that is bit-identical to `mm`), and the Function
    returns an expanded zero, so AccumulateGrad still runs (one cheap pass) and its hooks see the
    parameter as used. Without a kept buffer (a fresh step, a cast weight under autocast, double
    backward) it returns a new gradient as torch._grouped_mm would.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, offs: Tensor, counts_list: list[int]) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(x, weight, offs)
        ctx.counts = counts_list
        return torch._grouped_mm(x, weight.transpose(-2, -1), offs=offs)

    @staticmethod
    def backward(ctx, grad_y: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x, weight, offs = ctx.saved_tensors
        grad_x = torch._grouped_mm(grad_y.contiguous(), weight, offs=offs) if ctx.needs_input_grad[0] else None
        if not ctx.needs_input_grad[1]:
            return grad_x, None, None, None
        kept = weight.grad if weight.is_leaf else None
        direct = (kept is not None and not torch.is_grad_enabled() and kept.dtype == weight.dtype
                  and kept.shape == weight.shape and kept.is_contiguous())
        out = kept if direct else torch.zeros_like(weight, memory_format=torch.contiguous_format)
        for e, (gy, xe) in enumerate(zip(grad_y.split(ctx.counts), x.split(ctx.counts))):
            if xe.shape[0]:
                out[e].addmm_(gy.t(), xe)
        return grad_x, (out.new_zeros(()).expand(out.shape) if direct else out), None, None


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

    def forward(self, x: Tensor, counts: Tensor, counts_list: list[int]) -> Tensor:
        """x: (n, D) rows sorted by expert, counts (E,) -> (n, D)."""
        h = self.act(grouped_linear(x, self.w1, self.b1, counts, counts_list))
        return grouped_linear(h, self.w2, self.b2, counts, counts_list)


@dataclass
class Routing:
    """Which experts each token uses, as flat assignment lists of equal length A."""

    token: Tensor  # (A,) token index
    expert: Tensor  # (A,) global expert index (groups laid out in order)
    weight: Tensor  # (A,) mixing weight
    aux_loss: Tensor  # scalar load-balancing loss
    entropy: Tensor  # mean entropy of the top-level routing distribution (nats)
    # Switch balance loss of the top-level mixture (core, routed groups); 0 without both
    handover_loss: Tensor
    # mean over tokens of the routing weight on routed (new) groups; each token's weights sum to one
    new_weight: Tensor
    # for EVERY pool of `router_pools(cfg)`, in that order: (prob sums (num,), assignment counts (num,),
    # [tokens, assignments]) -- the sums a global balance loss is formed from (zeros for an unused group)
    pool_sums: list[Tensor] = field(default_factory=list)


def _topk_renormalised(logits: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    probs = logits.float().softmax(dim=-1)
    top_p, top_i = probs.topk(k, dim=-1)
    return probs, top_i, top_p / top_p.sum(dim=-1, keepdim=True)


def _balance_loss(probs: Tensor, chosen: Tensor, num: int) -> Tensor:
    """Switch-Transformer load-balancing loss: num * sum_e f_e * mean_p_e (1.0 when uniform)."""
    if probs.shape[0] == 0:
        return probs.new_zeros(())
    frac = _bincount(chosen.flatten(), num).float() / chosen.numel()
    return num * (frac * probs.mean(dim=0)).sum()


def _bincount(index: Tensor, n: int) -> Tensor:
    """torch.bincount(index, minlength=n) for indices < n, without its host read of index.max() on CUDA."""
    if index.device.type != "cuda":
        return torch.bincount(index, minlength=n)
    return torch.zeros(n, dtype=torch.long, device=index.device).index_add_(0, index, torch.ones_like(index))


def _pool_sums(probs: Tensor, chosen: Tensor, num: int) -> Tensor:
    """(prob sums (num,), assignment counts (num,), [tokens, assignments]) of one router pool, float32."""
    counts = _bincount(chosen.flatten(), num).float()
    rows = counts.new_full((1,), float(probs.shape[0]))  # a fill, not a host-to-device copy
    return torch.cat([probs.float().sum(dim=0), counts, rows, counts.sum()[None]])


def router_pools(cfg: MoEConfig) -> list[tuple[str, int, int]]:
    """(kind, group, experts) of each router pool, in the order of `Routing.pool_sums`."""
    pools = []
    if cfg.core_groups:
        pools.append(("core", -1, cfg.num_core_experts))
    routed = len(cfg.groups) - cfg.core_groups
    if routed:
        pools.append(("group", -1, routed))
        if cfg.core_groups:
            pools.append(("top", -1, routed + 1))  # (core, routed groups) mixture
        pools += [("routed", cfg.core_groups + r, cfg.groups[cfg.core_groups + r]) for r in range(routed)]
    return pools


def static_dispatch(x: Tensor) -> bool:
    """Whether MoE layers dispatch with device-side shapes only (always on CUDA; tests switch it on for CPU)."""
    return x.device.type == "cuda"


def _top_mixture(cfg: MoEConfig, mix: Tensor, g_i: Tensor, routed: int) -> tuple[Tensor, Tensor]:
    """Pool sums and Switch balance loss of the top level: (core, routed groups) as one mixture per token.

    Balanced like experts but kept apart from aux_loss: it has its own coefficient (the hand-over pressure).
    `residual` new groups add to the core and take nothing from it: the statistics stay, the loss is zero.
    """
    top = torch.cat([1 - mix.sum(-1, keepdim=True), mix.new_zeros(mix.shape[0], routed).scatter_add(1, g_i, mix)], dim=-1)
    top_chosen = top.argmax(dim=-1, keepdim=True)
    loss = _balance_loss(top, top_chosen, routed + 1)
    return _pool_sums(top, top_chosen, routed + 1), torch.zeros_like(loss) if cfg.residual else loss


def _core_weights(cfg: MoEConfig, top_w: Tensor, mix: Tensor, routed: int) -> Tensor:
    """The core experts' weights (N, k): their top-k weights times what the routed groups leave of the token,
    `1 - sum_g m_g`, or whole where the new groups are `residual` (or there are none)."""
    return top_w * (1 - mix.sum(-1, keepdim=True)) if routed and not cfg.residual else top_w


def _new_weight(cfg: MoEConfig, mix: Tensor, g_i: Tensor) -> Tensor:
    """Mean routing weight of the layer's tokens on new experts (detached): the routed groups' weight, or with
    `replicas` (group 0 holds the source's own experts) the weight on groups other than group 0."""
    new = mix * (g_i > 0) if cfg.replicas else mix
    return new.sum(-1).mean().detach()


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
        routed = len(cfg.groups) - cfg.core_groups
        if routed:
            self.group_gate = nn.Linear(dim, routed, bias=False)
            self.group_scale = nn.Parameter(torch.ones(routed))
            if cfg.image_context:
                self.group_context = nn.Linear(2 * dim, routed, bias=False)
        offsets = [0]
        for e in cfg.groups:
            offsets.append(offsets[-1] + e)
        self.offsets = offsets

    def _group_mix(self, x: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """Group router: probabilities over the routed groups (N, G_r), the chosen groups (N, k_groups) and
        their mixing weights m (N, k_groups), in float32. `context` (N, 2D): each token's image statistics
        (`image_context()`), required when the config has `image_context`.

        With `token_handover` the core is one more option of the group softmax, with logit 0, so m is scaled by
        each token's probability of leaving the core, 1 - 1 / (1 + sum_g exp z_g) = sigmoid(logsumexp z): the
        same selection and balance statistics over the routed groups, but the router can keep a token on the
        source's experts by lowering all of its group logits.
        """
        logits = self.group_gate(x).float()
        if self.cfg.image_context:
            if context is None:
                raise ValueError("this router has image_context: call it with each token's image statistics")
            logits = logits + self.group_context(context).float()
        g_probs = logits.softmax(dim=-1)
        g_p, g_i = g_probs.topk(self.cfg.top_k_groups, dim=-1)
        if self.cfg.replicas:  # chosen replicas share the token whole; the router learns through the numerator
            g_p = g_p / g_p.sum(-1, keepdim=True).detach()
        mix = g_p * self.group_scale.float()[g_i]
        if self.cfg.token_handover:
            mix = mix * torch.sigmoid(torch.logsumexp(logits, dim=-1, keepdim=True))
        return g_probs, g_i, mix

    def forward(self, x: Tensor, context: Tensor | None = None) -> Routing:
        """x: (N, D) -> Routing over the N tokens; `context` (N, 2D): see `_group_mix`."""
        if static_dispatch(x):
            return self._forward_static(x, context)
        cfg = self.cfg
        n = x.shape[0]
        tokens, experts, weights, aux, entropy = [], [], [], [], []
        mix = x.new_zeros(n, 0, dtype=torch.float32)
        handover = x.new_zeros((), dtype=torch.float32)
        sums: list[Tensor] = []

        def balance(probs: Tensor, chosen: Tensor, num: int) -> None:
            sums.append(_pool_sums(probs, chosen, num))
            aux.append(_balance_loss(probs, chosen, num))
        ar = torch.arange(n, device=x.device)
        routed = len(cfg.groups) - cfg.core_groups
        if routed:
            g_probs, g_i, mix = self._group_mix(x, context)
        if cfg.core_groups:
            logits = torch.cat([self.expert_gates[g](x) for g in range(cfg.core_groups)], dim=-1)
            probs, top_i, top_w = _topk_renormalised(logits, cfg.top_k)
            core_w = _core_weights(cfg, top_w, mix, routed)
            tokens.append(ar.repeat_interleave(cfg.top_k))
            experts.append(top_i.flatten())
            weights.append(core_w.flatten())
            balance(probs, top_i, cfg.num_core_experts)
            entropy.append(_entropy(probs))
        if routed:
            balance(g_probs, g_i, routed)
            entropy.append(_entropy(g_probs))
            if cfg.core_groups:
                top_sums, handover = _top_mixture(cfg, mix, g_i, routed)
                sums.append(top_sums)
            for r in range(routed):
                g = cfg.core_groups + r
                tok, slot = (g_i == r).nonzero(as_tuple=True)
                if tok.numel() == 0:
                    sums.append(x.new_zeros(2 * cfg.groups[g] + 2, dtype=torch.float32))
                    continue
                probs, top_i, top_w = _topk_renormalised(self.expert_gates[g](x[tok]), cfg.k_routed)
                tokens.append(tok.repeat_interleave(cfg.k_routed))
                experts.append((top_i + self.offsets[g]).flatten())
                weights.append((top_w * mix[tok, slot][:, None]).flatten())
                balance(probs, top_i, cfg.groups[g])
        empty = x.new_zeros(0, dtype=torch.long)
        return Routing(
            token=torch.cat(tokens) if tokens else empty,
            expert=torch.cat(experts) if experts else empty,
            weight=torch.cat(weights) if weights else x.new_zeros(0, dtype=torch.float32),
            aux_loss=torch.stack(aux).mean() if aux else x.new_zeros(()),
            entropy=torch.stack(entropy).mean().detach() if entropy else x.new_zeros(()),
            handover_loss=handover,
            new_weight=_new_weight(cfg, mix, g_i) if routed and n else x.new_zeros((), dtype=torch.float32),
            pool_sums=sums,
        )

    def _static_index(self, device: torch.device) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Constant index tensors of the static path, made once per device (no copy per forward).

        col (G_r, emax): column of expert j of routed group r among all routed experts (padding repeats
        the last); pad (G_r, emax): padding positions; starts (G_r,): global index of each routed group's
        first expert; num (G_r,): experts per routed group (float).
        """
        cache = self.__dict__.setdefault("_index_cache", {})
        if device not in cache:
            cfg = self.cfg
            sizes = cfg.groups[cfg.core_groups:]
            emax = max(sizes)
            col = [[sum(sizes[:r]) + min(j, s - 1) for j in range(emax)] for r, s in enumerate(sizes)]
            cache[device] = (torch.tensor(col, device=device),
                             torch.tensor([[j >= s for j in range(emax)] for s in sizes], device=device),
                             torch.tensor(self.offsets[cfg.core_groups : len(cfg.groups)], device=device),
                             torch.tensor(sizes, device=device, dtype=torch.float32))
        return cache[device]

    def _forward_static(self, x: Tensor, context: Tensor | None = None) -> Routing:
        """The same routing as `forward` with shapes fixed by N alone: no host reads (see module docstring)."""
        cfg = self.cfg
        n, k = x.shape[0], cfg.top_k
        c, routed = cfg.core_groups, len(cfg.groups) - cfg.core_groups
        ar = torch.arange(n, device=x.device)
        tokens, experts, weights, aux, entropy, sums = [], [], [], [], [], []
        aux_count = x.new_zeros((), dtype=torch.float32)
        mix = x.new_zeros(n, 0, dtype=torch.float32)
        handover = x.new_zeros((), dtype=torch.float32)
        if routed:
            g_probs, g_i, mix = self._group_mix(x, context)
        if c:
            logits = torch.cat([self.expert_gates[g](x) for g in range(c)], dim=-1)
            probs, top_i, top_w = _topk_renormalised(logits, k)
            tokens.append(ar[:, None].expand(n, k).flatten())
            experts.append(top_i.flatten())
            weights.append(_core_weights(cfg, top_w, mix, routed).flatten())
            aux.append(_balance_loss(probs, top_i, cfg.num_core_experts))
            sums.append(_pool_sums(probs, top_i, cfg.num_core_experts))
            entropy.append(_entropy(probs))
        if routed:
            aux.append(_balance_loss(g_probs, g_i, routed))
            sums.append(_pool_sums(g_probs, g_i, routed))
            entropy.append(_entropy(g_probs))
            if c:
                top_sums, handover = _top_mixture(cfg, mix, g_i, routed)
                sums.append(top_sums)
            sizes = cfg.groups[c:]
            emax = max(sizes)
            col, pad, starts, num = self._static_index(x.device)
            # every routed expert's score for every token, laid out (N, routed groups, emax), padding at -inf
            scores = F.linear(x, torch.cat([self.expert_gates[c + r].weight for r in range(routed)])).float()
            padded = scores[:, col].masked_fill(pad, float("-inf"))
            own = padded.gather(1, g_i[:, :, None].expand(-1, -1, emax))  # (N, k_groups, emax): the chosen groups' scores
            probs = own.softmax(dim=-1)
            kr = cfg.k_routed
            top_p, top_i = probs.topk(kr, dim=-1)
            tokens.append(ar[:, None, None].expand(n, cfg.top_k_groups, kr).flatten())
            experts.append((top_i + starts[g_i][:, :, None]).flatten())
            weights.append((top_p / top_p.sum(-1, keepdim=True) * mix[:, :, None]).flatten())
            # balance of each routed group over its own tokens (Switch loss from sums), present groups only
            flat_g = g_i.flatten()
            group_tokens = _bincount(flat_g, routed).float()
            psum = probs.new_zeros(routed, emax).index_add(0, flat_g, probs.reshape(-1, emax))
            local = (g_i[:, :, None] * emax + top_i).flatten()
            chosen = _bincount(local, routed * emax).float().reshape(routed, emax)
            present = group_tokens > 0
            per_group = num * ((chosen / (group_tokens * kr).clamp_min(1)[:, None]) * (psum / group_tokens.clamp_min(1)[:, None])).sum(-1)
            aux_count = present.sum().float()
            aux.append((per_group * present).sum())
            for r, s in enumerate(sizes):
                sums.append(torch.cat([psum[r, :s], chosen[r, :s], torch.stack([group_tokens[r], group_tokens[r] * kr])]))
        # mean over the pools that had tokens: core and group router always (when N > 0), routed groups when chosen
        always = len(aux) - (1 if routed else 0)
        aux_loss = (torch.stack(aux).sum() / (always + aux_count)) if aux else x.new_zeros(())
        return Routing(
            token=torch.cat(tokens),
            expert=torch.cat(experts),
            weight=torch.cat(weights),
            aux_loss=aux_loss,
            entropy=torch.stack(entropy).mean().detach() if entropy else x.new_zeros(()),
            handover_loss=handover,
            new_weight=_new_weight(cfg, mix, g_i) if routed and n else x.new_zeros((), dtype=torch.float32),
            pool_sums=sums,
        )


def image_stats(x: Tensor) -> Tensor:
    """(..., D) -> (images, 2D): the mean and (population) standard deviation of `x` over each image's tokens.
    The leading dimension indexes images (B, H, W, D in an encoder block, B, T, D in the decoder); a 2-D input
    is one image."""
    per_image = x.reshape(x.shape[0] if x.dim() > 2 else 1, -1, x.shape[-1])
    std, mean = torch.std_mean(per_image, dim=1, correction=0)
    return torch.cat([mean, std], dim=-1)


def image_context(x: Tensor) -> Tensor:
    """(..., D) -> (N, 2D): `image_stats` of each of the N tokens' image, what the group router sees."""
    stats = image_stats(x)
    tokens = x[0].numel() // x.shape[-1] if x.dim() > 2 else x.shape[0]
    return stats[:, None, :].expand(-1, tokens, -1).reshape(-1, stats.shape[-1])


class MoEMLP(nn.Module):
    """Drop-in replacement for SAM's `MLPBlock`: same call, any leading dims.

    Arguments:
        dim (int): token width D.
        hidden (int): expert hidden width H (SAM's mlp_dim).
        cfg (MoEConfig): expert groups and routing.
        act (Type[nn.Module]): expert activation.

    After each forward, `aux_loss` holds the load-balancing loss,
    `expert_counts` / `group_counts` the token-expert assignments of each
    expert / group and `entropy` the mean top-level router entropy (detached
    statistics for routing reports), `pool_sums` the router's balance-loss sums
    (what N processes all-reduce); with `record = True`, `assignments` keeps
    (token, expert, weight) of every assignment.
    """

    def __init__(self, dim: int, hidden: int, cfg: MoEConfig, act: Type[nn.Module] = nn.GELU) -> None:
        super().__init__()
        self.cfg = cfg
        self.router = HierarchicalRouter(dim, cfg)
        self.experts = nn.ModuleList(ExpertBank(e, dim, hidden, act) for e in cfg.groups)
        self.aux_loss: Tensor | None = None
        self.expert_counts: Tensor | None = None
        self.group_counts: Tensor | None = None
        self.entropy: Tensor | None = None
        self.pool_sums: list[Tensor] = []
        self.new_weight: Tensor | None = None
        self.handover_loss: Tensor | None = None
        self.group_weight: Tensor | None = None
        # When True, forward keeps (token, expert) of every assignment for routing reports.
        self.record = False
        self.assignments: tuple[Tensor, Tensor, Tensor] | None = None

    @torch.no_grad()
    def constrain_(self) -> None:
        """Project the group scales back into [0, 1] (after an optimizer step): the mixture stays convex."""
        scale = getattr(self.router, "group_scale", None)
        if scale is not None:
            scale.clamp_(0.0, 1.0)

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        context = image_context(x) if self.cfg.image_context else None
        x = x.reshape(-1, shape[-1])
        route = self.router(x, context)
        order = torch.argsort(route.expert, stable=True)
        token = route.token[order]
        counts = _bincount(route.expert, self.cfg.num_experts)
        rows = x[token]
        if static_dispatch(x):
            y = self._experts_static(rows, route.expert[order], counts)
        else:
            counts_list = counts.tolist()
            bounds = list(zip(self.router.offsets, self.router.offsets[1:]))
            # one split, not a slice per bank: each slice's backward zero-fills a gradient the size of all rows
            parts = rows.split([sum(counts_list[lo:hi]) for lo, hi in bounds])
            outs = [bank(part, counts[lo:hi], counts_list[lo:hi])
                    for bank, part, (lo, hi) in zip(self.experts, parts, bounds) if part.shape[0]]
            y = torch.cat(outs) if outs else x.new_zeros(0, shape[-1])  # a layer that got no token returns zeros
        y = y * route.weight[order].to(y.dtype)[:, None]
        out = torch.zeros_like(x).index_add(0, token, y.to(x.dtype))
        self.aux_loss = route.aux_loss
        self.pool_sums = route.pool_sums
        self.expert_counts = counts.detach()
        self.entropy = route.entropy
        self.new_weight = route.new_weight
        self.handover_loss = route.handover_loss
        if self.record:
            self.assignments = (route.token.detach(), route.expert.detach(), route.weight.detach())
        bounds = list(zip(self.router.offsets, self.router.offsets[1:]))
        self.group_counts = torch.stack([counts[lo:hi].sum() for lo, hi in bounds])
        if self.cfg.replicas:  # each replica's share of the tokens' routing weight, for mixture_normalise_grads
            weight = route.weight.detach().float()
            per_expert = torch.zeros(self.cfg.num_experts, device=x.device).index_add(0, route.expert, weight)
            self.group_weight = torch.stack([per_expert[lo:hi].sum() for lo, hi in bounds]) / max(x.shape[0], 1)
        return out.reshape(shape)

    def _experts_static(self, rows: Tensor, expert: Tensor, counts: Tensor) -> Tensor:
        """All banks as one grouped GEMM over rows sorted by expert; offsets stay on the device."""
        banks = list(self.experts)
        dtype = _autocast_dtype(rows) or rows.dtype
        w1, b1, w2, b2 = (_cat_experts([getattr(b, name) for b in banks], dtype) for name in ("w1", "b1", "w2", "b2"))
        rows = rows.to(dtype)
        if not _grouped_mm_ok(rows, w1):  # float64 or unaligned widths: the loop, which reads counts on the host
            counts_list = counts.tolist()
            h = banks[0].act(grouped_linear(rows, w1, b1, counts, counts_list))
            return grouped_linear(h, w2, b2, counts, counts_list)
        offs = torch.cumsum(counts, 0).to(torch.int32)
        h = banks[0].act(torch._grouped_mm(rows, w1.transpose(-2, -1), offs=offs) + b1[expert])
        return torch._grouped_mm(h, w2.transpose(-2, -1), offs=offs) + b2[expert]


class _CatExperts(torch.autograd.Function):
    """Cast and concatenate expert banks along dim 0 in one copy; backward hands each bank its slice."""

    @staticmethod
    def forward(ctx, dtype: torch.dtype, *banks: Tensor) -> Tensor:  # type: ignore[override]
        ctx.sizes = [b.shape[0] for b in banks]
        ctx.dtypes = [b.dtype for b in banks]
        out = banks[0].new_empty((sum(ctx.sizes), *banks[0].shape[1:]), dtype=dtype)
        for part, b in zip(out.split(ctx.sizes), banks):
            part.copy_(b)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        return (None, *(g.to(d) for g, d in zip(grad.split(ctx.sizes), ctx.dtypes)))


def _cat_experts(banks: list[Tensor], dtype: torch.dtype) -> Tensor:
    if len(banks) == 1:
        return banks[0].to(dtype)
    return _CatExperts.apply(dtype, *banks)


@torch.no_grad()
def drop_idle_grads(layers: list[MoEMLP]) -> None:
    """After backward: banks (and in-group routers) that got no token in the last forward get grad None.

    The CPU path never puts an idle bank in the graph; the static (CUDA) path gives it a zero gradient.
    With None the optimizer skips it on both paths (no weight decay, no momentum step). One host read
    for all layers, after backward: nothing waits inside the forward.
    """
    layers = [m for m in layers if m.group_counts is not None]
    if not layers:
        return
    counts = torch.cat([m.group_counts for m in layers]).tolist()
    pos = 0
    for m in layers:
        for g, bank in enumerate(m.experts):
            if counts[pos + g] == 0:
                for p in bank.parameters():
                    p.grad = None
                if g >= m.cfg.core_groups:
                    m.router.expert_gates[g].weight.grad = None
        pos += len(m.experts)


@torch.no_grad()
def mixture_normalise_grads(layers: list[MoEMLP], floor: float = 0.25) -> None:
    """After backward: divide each grown layer's expert gradients by their pool's share of the routing weight.

    Why: a grown layer's output is `(1 - w) core + w new`, with w the tokens' mean weight on the
    new groups (`new_weight`). Under SGD each pool's gradient is scaled by its weight, and so is its
    effect on the output: at w = 0.5 the layer's MLPs change the function half as fast per step as
    the source's did, and a grown model falls behind its source trained further at equal compute.
    Dividing the core banks' gradients by 1 - w and the new banks' by w (each at least `floor`)
    restores the source's per-step rate. With `replicas` each group's share is its mean weight over
    the layer's tokens (`group_weight`; the fraction of tokens it took, with one group per token): a
    replica that took a quarter of the tokens gets four times its gradient, so in expectation over
    routing each replica moves as the source's experts would have on the whole batch (floor: half a
    fair share, 1 / (2 G)). A layer without new groups is left alone, so the source trains as
    before. With `residual` new groups the core's output keeps weight 1: only the new banks are divided.
    One host read for all layers.
    """
    layers = [m for m in layers if m.new_weight is not None and m.cfg.core_groups < len(m.cfg.groups)]
    if not layers:
        return
    rows, floors = [], []
    for m in layers:
        groups = len(m.experts)
        if m.cfg.replicas:
            rows.append(m.group_weight.float())
            floors += [0.5 / groups] * groups
        else:
            w = m.new_weight.float().reshape(1)
            core = torch.ones_like(w) if m.cfg.residual else 1 - w  # residual: the core's output is not scaled down
            rows.append(torch.cat([core.expand(m.cfg.core_groups), w.expand(groups - m.cfg.core_groups)]))
            floors += [floor] * groups
    shares = torch.cat(rows).tolist()
    pos = 0
    for m in layers:
        for bank in m.experts:
            scale = 1.0 / max(shares[pos], floors[pos])
            pos += 1
            for p in bank.parameters():
                if p.grad is not None:
                    p.grad.mul_(scale)
