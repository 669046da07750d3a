"""Oracle tests for upscale/moe.py.

The oracle is a naive per-token reference written here from the module
docstring of upscale/moe.py: for every token the routing is computed by hand
from the router weights and each chosen expert is applied as
`W2 @ act(W1 @ x + b1) + b2`. Outputs and the gradients of the input and of
every parameter are compared with MoEMLP's (sorted, grouped-GEMM dispatch).

Note: MoEMLP computes routing probabilities in float32 (`logits.float()`) even
for float64 inputs, so float64 comparisons carry ~1e-7 relative error from the
routing weights; RTOL64 allows for that and nothing more.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from segment_anything.modeling.common import MLPBlock
from torch import nn

import upscale.moe as moe_mod
from stages.optim import drop_idle_grads
from upscale.config import MoEConfig
from upscale.errors import SamoeError
from upscale.moe import MoEMLP, balance_losses, pool_balance, router_pools

D, H = 16, 32  # float32 rows of 64/128 bytes: valid strides for torch._grouped_mm
RTOL64, ATOL64 = 1e-6, 1e-6  # ATOL is relative to the tensor's largest magnitude (see _close)
RTOL32, ATOL32 = 1e-4, 1e-5


# --------------------------------------------------------------------------- reference


def _act(kind: str, v: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.gelu(v) if kind == "gelu" else torch.relu(v)


def _expert(m: MoEMLP, g: int, e: int, x: torch.Tensor, act: str) -> torch.Tensor:
    bank = m.experts[g]
    return bank.w2[e] @ _act(act, bank.w1[e] @ x + bank.b1[e]) + bank.b2[e]


def _locate(cfg: MoEConfig, global_e: int) -> tuple[int, int]:
    for g, n in enumerate(cfg.groups):
        if global_e < n:
            return g, global_e
        global_e -= n
    raise AssertionError("expert index out of range")


def reference(m: MoEMLP, x: torch.Tensor, act: str) -> tuple[torch.Tensor, list[int], list[list[int]]]:
    """Per-token loop. Returns (output, assignments per global expert, tokens per group router call)."""
    cfg = m.cfg
    r = m.router
    flat = x.reshape(-1, x.shape[-1])
    counts = [0] * cfg.num_experts
    offsets = cfg.offsets
    group_tokens: list[list[int]] = [[] for _ in cfg.groups]
    rows = []
    for t in range(flat.shape[0]):
        xt = flat[t]
        out = torch.zeros_like(xt)
        routed = len(cfg.groups) - cfg.core_groups
        chosen, pg, handed = [], None, 0.0
        if routed:
            pg = torch.softmax(r.group_gate.weight @ xt, dim=0)
            chosen = torch.topk(pg.detach(), cfg.top_k_groups).indices.tolist()
            if cfg.replicas:  # the chosen replicas share the token whole; the sum is a constant to autograd
                pg = pg / sum(pg[rr] for rr in chosen).detach()
            handed = sum(pg[rr] * r.group_scale[rr] for rr in chosen)  # weight handed to routed groups
        if cfg.core_groups:
            w = torch.cat([r.expert_gates[g].weight for g in range(cfg.core_groups)])  # (E_core, D)
            p = torch.softmax(w @ xt, dim=0)
            idx = torch.topk(p.detach(), cfg.top_k).indices.tolist()
            z = sum(p[i] for i in idx)
            for i in idx:
                g, e = _locate(cfg, i)
                out = out + (1 - handed) * (p[i] / z) * _expert(m, g, e, xt, act)
                counts[i] += 1
        for rr in chosen:
            g = cfg.core_groups + rr
            group_tokens[g].append(t)
            q = torch.softmax(r.expert_gates[g].weight @ xt, dim=0)
            idx = torch.topk(q.detach(), cfg.routed_top_k or cfg.top_k).indices.tolist()
            z = sum(q[i] for i in idx)
            for i in idx:
                out = out + pg[rr] * r.group_scale[rr] * (q[i] / z) * _expert(m, g, i, xt, act)
                counts[offsets[g] + i] += 1
        rows.append(out)
    return torch.stack(rows).reshape(x.shape), counts, group_tokens


# --------------------------------------------------------------------------- helpers


def _make(groups, core_groups, top_k, top_k_groups, act, dtype=torch.float64, seed=0, replicas=False) -> MoEMLP:
    """top_k: an int, or (top_k, routed_top_k) for a different k inside routed groups."""
    top_k, routed_top_k = top_k if isinstance(top_k, tuple) else (top_k, 0)
    cfg = MoEConfig(groups=groups, core_groups=core_groups, top_k=top_k, top_k_groups=top_k_groups, routed_top_k=routed_top_k,
                    replicas=replicas)
    cfg.validate()
    torch.manual_seed(seed)
    m = MoEMLP(D, H, cfg, nn.GELU if act == "gelu" else nn.ReLU)
    with torch.no_grad():
        for g in m.router.expert_gates:
            g.weight.normal_(0, 0.5)
        if hasattr(m.router, "group_gate"):
            m.router.group_gate.weight.normal_(0, 0.5)
            # distinct scales inside (0, 1) so routed groups and the hand-over both matter
            m.router.group_scale.copy_(torch.rand(m.router.group_scale.shape) * 0.8 + 0.1)
    return m.to(dtype)


def _params(m: nn.Module) -> list[tuple[str, torch.Tensor]]:
    return list(m.named_parameters())


def _grads(out: torch.Tensor, inputs: list[torch.Tensor], gout: torch.Tensor) -> list[torch.Tensor]:
    gs = torch.autograd.grad(out, inputs, gout, allow_unused=True)
    return [torch.zeros_like(i) if g is None else g for g, i in zip(gs, inputs)]


def _valid_cases():
    cases = []
    # k: top_k, or (top_k, routed_top_k) when routed groups pick a different number (GELU only: fewer cases)
    for (groups, core), tkg, k, act in itertools.product(
        [((3, 2, 4, 3), 1), ((2, 2, 3), 2), ((2, 2, 3), 0)], (1, 2), (1, 2, (2, 1), (1, 2)), ("gelu", "relu")
    ):
        top_k, routed_top_k = k if isinstance(k, tuple) else (k, 0)
        try:
            MoEConfig(groups=groups, core_groups=core, top_k=top_k, top_k_groups=tkg, routed_top_k=routed_top_k).validate()
        except SamoeError:
            continue
        if isinstance(k, tuple) and (act == "relu" or core == 0):
            continue
        name = f"k{k}" if not routed_top_k else f"k{top_k}-routed{routed_top_k}"
        cases.append(pytest.param(groups, core, tkg, k, act, id=f"g{'-'.join(map(str, groups))}-core{core}-tkg{tkg}-{name}-{act}"))
    return cases


CASES = _valid_cases()


@pytest.fixture
def loop_path(monkeypatch):
    monkeypatch.setattr(moe_mod, "_grouped_mm_ok", lambda *a, **k: False)


def float32_case(groups, core, tkg, k, act) -> tuple[MoEMLP, torch.Tensor, torch.Tensor, list[int]]:
    """A float32 layer, its input, and the float64 reference's output and expert counts for that case."""
    m64 = _make(groups, core, k, tkg, act)
    x64 = torch.randn(3, 7, D, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ref, counts, _ = reference(m64, x64, act)
    return _make(groups, core, k, tkg, act, dtype=torch.float32), x64.float(), ref, counts


def count_grouped_mm(monkeypatch) -> list[int]:
    """Record the number of experts of every torch._grouped_mm call with 3-d weights (the call still runs)."""
    calls: list[int] = []
    real_mm = torch._grouped_mm
    monkeypatch.setattr(torch, "_grouped_mm", lambda *a, **kw: (calls.append(a[1].shape[0]) if a[1].dim() == 3 else None)
                        or real_mm(*a, **kw))
    return calls


def _close(a, b, rtol, atol, msg=None):
    """allclose with atol scaled by max(1, max|b|): inputs and upstream gradients are O(1).

    The floor matters for top_k=1: the renormalised weight p/p == 1 has an exact zero
    gradient, which MoEMLP's float32 routing reproduces only up to ~1e-7.
    """
    scale = float(b.detach().abs().max()) if b.numel() else 1.0
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol * max(scale, 1.0), msg=msg)


def _compare(m, x, act, rtol, atol):
    gen = torch.Generator().manual_seed(123)
    ref_x = x.detach().clone().requires_grad_(True)
    mod_x = x.detach().clone().requires_grad_(True)
    names, params = zip(*_params(m))
    ref, counts, _ = reference(m, ref_x, act)
    out = m(mod_x)
    assert out.shape == x.shape and out.dtype == x.dtype
    _close(out, ref, rtol, atol)
    gout = torch.randn(x.shape, generator=gen, dtype=torch.float64).to(x.dtype)
    g_ref = _grads(ref, [ref_x, *params], gout)
    g_mod = _grads(out, [mod_x, *params], gout)
    for name, a, b in zip(("input", *names), g_mod, g_ref):
        _close(a, b, rtol, atol, msg=lambda s, n=name: f"grad of {n}: {s}")
    # the reference really exercised the routed groups (non-trivial gradients)
    if m.cfg.core_groups < len(m.cfg.groups):
        assert g_ref[names.index("router.group_scale") + 1].abs().sum() > 0
        if len(m.cfg.groups) - m.cfg.core_groups > 1:  # softmax over one group is constant 1
            assert g_ref[names.index("router.group_gate.weight") + 1].abs().sum() > 0
    assert m.expert_counts.tolist() == counts
    return counts


# --------------------------------------------------------------------------- tests


@pytest.mark.parametrize("groups,core,tkg,k,act", CASES)
def test_matches_reference_float64(loop_path, groups, core, tkg, k, act):
    m = _make(groups, core, k, tkg, act)
    x = torch.randn(3, 7, D, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    _compare(m, x, act, RTOL64, ATOL64)


@pytest.mark.parametrize("groups,core,tkg,k,act", CASES)
def test_grouped_gemm_path_matches_reference_float32(monkeypatch, groups, core, tkg, k, act):
    """The default (torch._grouped_mm) path, float32, against the float64 reference."""
    m32, x, ref, counts = float32_case(groups, core, tkg, k, act)
    calls = count_grouped_mm(monkeypatch)
    out = m32(x)
    assert calls, "grouped GEMM path was not taken"
    _close(out.double(), ref, RTOL32, ATOL32)
    assert m32.expert_counts.tolist() == counts


@pytest.mark.parametrize("groups,core,tkg,k,act", CASES)
def test_grouped_gemm_equals_loop_fallback(monkeypatch, groups, core, tkg, k, act):
    m = _make(groups, core, k, tkg, act, dtype=torch.float32)
    x = torch.randn(4, 9, D, generator=torch.Generator().manual_seed(2))
    gout = torch.randn(4, 9, D, generator=torch.Generator().manual_seed(3))
    params = [p for _, p in _params(m)]

    def run():
        xi = x.clone().requires_grad_(True)
        out = m(xi)
        return out.detach(), _grads(out, [xi, *params], gout), m.expert_counts.clone()

    calls = count_grouped_mm(monkeypatch)
    out_g, grads_g, counts_g = run()
    assert calls, "grouped GEMM path was not taken"
    calls.clear()
    monkeypatch.setattr(moe_mod, "_grouped_mm_ok", lambda *a, **k: False)
    out_l, grads_l, counts_l = run()
    assert not calls, "fallback loop was not taken"
    assert torch.equal(counts_g, counts_l)
    torch.testing.assert_close(out_g, out_l, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads_g, grads_l):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("groups,core,tkg,k,act", CASES)
def test_only_used_experts_are_computed(monkeypatch, loop_path, groups, core, tkg, k, act):
    """Rows through the expert GEMMs == token-expert assignments, each bank's its own experts' rows."""
    m = _make(groups, core, k, tkg, act)
    x = torch.randn(5, 6, D, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    n = x.numel() // D
    _, counts, _ = reference(m, x, act)
    rows = []
    real = moe_mod._expert_linear
    monkeypatch.setattr(moe_mod, "_expert_linear", lambda xx, banks, biases, offs: rows.append(
        (xx.shape[0], [int(v) for v in offs])) or real(xx, banks, biases, offs))
    with torch.no_grad():
        m(x)
    k, kr = k if isinstance(k, tuple) else (k, k)
    per_token = (k if core else 0) + (tkg * kr if core < len(groups) else 0)
    assert m.cfg.experts_per_token == per_token
    assert int(m.expert_counts.sum()) == n * per_token
    assert m.expert_counts.tolist() == counts
    offs = m.cfg.offsets
    assert m.group_counts.tolist() == [sum(counts[a:b]) for a, b in zip(offs, offs[1:])]
    ends = list(itertools.accumulate(counts))
    assert rows == [(n * per_token, ends), (n * per_token, ends)]  # two linear layers, every assignment once


def test_unchosen_group_gets_zero_gradient_and_the_trainer_none(loop_path):
    """A routed group no token chose: its bank and in-group router get a zero gradient from the layer (every
    bank is an input of its GEMMs), and `drop_idle_grads` makes it None so that the optimizer skips it."""
    groups, core = (3, 2, 4, 3), 1
    m = _make(groups, core, 2, 1, "gelu")
    dead = 1  # routed group index -> global group 2
    x = torch.randn(4, 8, D, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    x[..., 0] = x[..., 0].abs() + 1.0
    with torch.no_grad():
        m.router.group_gate.weight[dead] = 0.0
        m.router.group_gate.weight[dead, 0] = -100.0  # logit <= -100 for every token
    _, counts, group_tokens = reference(m, x, "gelu")
    assert group_tokens[core + dead] == []
    assert all(group_tokens[g] for g in range(core, len(groups)) if g != core + dead), "test setup: other groups unused"
    out = m(x)
    (out * torch.randn_like(out)).sum().backward()
    g = core + dead
    assert m.group_counts[g] == 0
    for name, p in m.named_parameters():
        if name.startswith((f"experts.{g}.", f"router.expert_gates.{g}.")):
            assert p.grad is not None and not p.grad.any(), name
        else:
            assert p.grad is not None and p.grad.any(), f"{name} should get gradient"
    assert m.router.group_scale.grad[dead] == 0
    drop_idle_grads([m])
    idle = {n for n, p in m.named_parameters() if p.grad is None}
    assert idle == {f"experts.{g}.{p}" for p in ("w1", "b1", "w2", "b2")} | {f"router.expert_gates.{g}.weight"}


def test_drop_idle_grads_with_counts_of_all_processes():
    """Given the groups' counts (summed over processes), the groups with none lose their gradients; an idle
    core group keeps its router's (the core's routers share one softmax)."""
    m = _make((2, 2, 3), 2, 1, 1, "gelu")
    m(torch.randn(3, D, dtype=torch.float64)).sum().backward()
    drop_idle_grads([m], [[0, 5, 0]])
    none = {n for n, p in m.named_parameters() if p.grad is None}
    banks = {f"experts.{g}.{p}" for g in (0, 2) for p in ("w1", "b1", "w2", "b2")}
    assert none == banks | {"router.expert_gates.2.weight"}


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_flat_moe_of_copies_equals_dense_mlp(monkeypatch, k, dtype):
    torch.manual_seed(6)
    dense = MLPBlock(D, H, nn.GELU).to(dtype)
    m = MoEMLP(D, H, MoEConfig(groups=(5,), core_groups=1, top_k=k), nn.GELU).to(dtype)
    with torch.no_grad():
        m.router.expert_gates[0].weight.normal_(0, 1.0)
        m.experts[0].w1.copy_(dense.lin1.weight.expand_as(m.experts[0].w1))
        m.experts[0].b1.copy_(dense.lin1.bias.expand_as(m.experts[0].b1))
        m.experts[0].w2.copy_(dense.lin2.weight.expand_as(m.experts[0].w2))
        m.experts[0].b2.copy_(dense.lin2.bias.expand_as(m.experts[0].b2))
    x = torch.randn(2, 4, 4, D, generator=torch.Generator().manual_seed(7)).to(dtype)
    with torch.no_grad():
        y, ref = m(x), dense(x)
    assert (m.expert_counts > 0).sum() > 1, "routing should spread over several experts"
    rel = ((y - ref).abs().max() / ref.abs().max()).item()
    assert rel < (1e-6 if dtype == torch.float32 else 3e-7), rel


def test_routed_weight_not_renormalised_over_groups(loop_path):
    """With one chosen group, its output is weighted by p_group * scale (p_group < 1, not renormalised)
    and the core expert by the rest, 1 - p_group * scale (hand check)."""
    m = _make((2, 3, 3), 1, 1, 1, "relu")
    x = torch.randn(1, D, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    with torch.no_grad():
        y = m(x)[0]
        r = m.router
        core_e = int((r.expert_gates[0].weight @ x[0]).argmax())
        pg = torch.softmax(r.group_gate.weight @ x[0], 0)
        rr = int(pg.argmax())
        e = int((r.expert_gates[1 + rr].weight @ x[0]).argmax())
        handed = pg[rr] * r.group_scale[rr]
        want = (1 - handed) * _expert(m, 0, core_e, x[0], "relu") + handed * _expert(m, 1 + rr, e, x[0], "relu")
    assert pg[rr] < 0.999
    _close(y, want, RTOL64, ATOL64)


@pytest.mark.parametrize("dtype,dim", [(torch.float64, 16), (torch.float32, 10), (torch.bfloat16, 12)],
                         ids=["float64", "float32-dim10", "bfloat16-dim12"])
def test_float64_and_unaligned_dims(dtype, dim):
    """MoEMLP is a drop-in for MLPBlock: .double() or an odd width must work (via the loop fallback).

    Regression: torch._grouped_mm rejects float64 and rows whose stride is not a multiple of 16 bytes.
    """
    torch.manual_seed(9)
    dense = MLPBlock(dim, 2 * dim, nn.GELU).to(dtype)
    m = MoEMLP(dim, 2 * dim, MoEConfig(groups=(3,), top_k=2), nn.GELU).to(dtype)
    with torch.no_grad():
        for n, p in (("w1", dense.lin1.weight), ("b1", dense.lin1.bias), ("w2", dense.lin2.weight), ("b2", dense.lin2.bias)):
            getattr(m.experts[0], n).copy_(p.expand_as(getattr(m.experts[0], n)))
        x = torch.randn(6, dim).to(dtype)
        torch.testing.assert_close(m(x).float(), dense(x).float(), rtol=2e-2, atol=2e-2)


# --------------------------------------------------------------------------- hand-over to new groups


def test_handover_loss_and_new_weight_by_hand(loop_path):
    """Top level: per token the core gets 1 - sum(scale * p_group) and each chosen group scale * p_group;
    handover_loss is the Switch loss of that mixture, new_weight its mean new part."""
    m = _make((2, 3, 3), 1, 2, 1, "gelu")
    x = torch.randn(6, D, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    with torch.no_grad():
        m(x)
        r = m.router
        pg = torch.softmax(x @ r.group_gate.weight.t(), dim=-1)  # (N, 2)
        chosen = pg.argmax(-1)
        q = torch.zeros(6, 3, dtype=torch.float64)
        for t in range(6):
            g = int(chosen[t])
            q[t, 1 + g] = pg[t, g] * r.group_scale[g]
            q[t, 0] = 1 - q[t, 1 + g]
        frac = torch.bincount(q.argmax(-1), minlength=3).double() / 6
        want = 3 * (frac * q.mean(0)).sum()
    assert float(m.handover_loss) == pytest.approx(float(want), rel=1e-6)
    assert float(m.new_weight) == pytest.approx(float(q[:, 1:].sum(-1).mean()), rel=1e-6)
    # routing weights of each token still sum to one (a convex mixture)
    route = m.router(x)
    assert torch.allclose(route.weight.double().sum(1), torch.ones(6, dtype=torch.float64), atol=1e-6)


def test_handover_loss_pushes_weight_to_new_groups_at_zero_scale(loop_path):
    """At growth (scales 0) the model is the source, yet the hand-over loss has a negative gradient on every scale."""
    m = _make((2, 3, 3), 1, 2, 1, "gelu")
    with torch.no_grad():
        m.router.group_scale.zero_()
    x = torch.randn(16, D, generator=torch.Generator().manual_seed(12), dtype=torch.float64)
    m(x)
    assert float(m.new_weight) == 0.0 and float(m.handover_loss.detach()) == pytest.approx(3.0)  # all weight on the core
    m.handover_loss.backward()
    assert (m.router.group_scale.grad < 0).all()


def test_constrain_projects_scales_into_unit_interval():
    m = _make((2, 3, 3), 1, 2, 1, "gelu")
    with torch.no_grad():
        m.router.group_scale.copy_(torch.tensor([-0.5, 1.7], dtype=m.router.group_scale.dtype))
    m.constrain_()
    assert m.router.group_scale.tolist() == [0.0, 1.0]


REPLICAS = [((3, 3, 3), 1, 2, "gelu"), ((2, 2, 2, 2), 2, 1, "relu"), ((3, 3, 3), 3, 2, "gelu")]


@pytest.mark.parametrize("groups,tkg,k,act", REPLICAS)
@pytest.mark.parametrize("path", ["loop", "grouped"])
def test_replicas_match_reference(monkeypatch, path, groups, tkg, k, act):
    """replicas: the reference divides the chosen groups' probabilities by their (detached) sum: outputs and every
    gradient match; the group gate learns (through log p) even with one group per token, whose weight is 1."""
    if path == "loop":
        monkeypatch.setattr(moe_mod, "_grouped_mm_ok", lambda *a, **k: False)
    m = _make(groups, 0, k, tkg, act, replicas=True)
    x = torch.randn(2, 9, D, generator=torch.Generator().manual_seed(23), dtype=torch.float64)
    _compare(m, x, act, RTOL64, ATOL64)
    route = m.router(x.reshape(-1, D))
    if tkg == 1:  # a token's weights add up to its one group's scale: no share of p is lost
        group_of = route.expert[:, 0] // groups[0]
        torch.testing.assert_close(route.weight.double().sum(1), m.router.group_scale.double()[group_of])
    m(x).square().sum().backward()
    assert m.router.group_gate.weight.grad.abs().sum() > 0


def test_replicas_of_one_pool_compute_the_source_by_hand(loop_path):
    """Every group a copy of a flat layer's experts and router rows, scales at 1: whichever group a token takes
    (one, or all of them mixed), the layer computes the flat layer's output; new_weight is the share of tokens
    that left group 0."""
    torch.manual_seed(3)
    flat = MoEMLP(D, H, MoEConfig(groups=(4,), top_k=2), nn.GELU).double()
    x = torch.randn(5, 6, D, dtype=torch.float64)
    for tkg in (1, 3):
        rep = MoEMLP(D, H, MoEConfig(groups=(4, 4, 4), core_groups=0, top_k=2, top_k_groups=tkg, replicas=True), nn.GELU).double()
        with torch.no_grad():
            for g in range(3):
                for name in ("w1", "b1", "w2", "b2"):
                    getattr(rep.experts[g], name).copy_(getattr(flat.experts[0], name))
                rep.router.expert_gates[g].weight.copy_(flat.router.expert_gates[0].weight)
            rep.router.group_gate.weight.normal_(0, 1.0)
            rep.router.group_scale.fill_(1.0)
        # one group: the same float32 weights as the flat router's; mixing three: their float32 sum is 1 to ~1e-7
        tol = 1e-12 if tkg == 1 else 1e-6
        torch.testing.assert_close(rep(x), flat(x), rtol=tol, atol=tol)
        assert rep.group_counts.tolist() != [60, 0, 0] and min(rep.group_counts.tolist()) > 0  # not vacuous
        if tkg == 1:
            left = 1 - rep.group_counts[0].item() / rep.group_counts.sum().item()
            assert rep.new_weight.item() == pytest.approx(left)


def test_replicas_need_no_core_pool():
    with pytest.raises(SamoeError, match="replicas have no core pool"):
        MoEConfig(groups=(4, 4), core_groups=1, replicas=True).validate()


# --------------------------------------------------------------------------- balance losses from sums


@pytest.mark.parametrize("groups,core,tkg,k,act", CASES[::3])
def test_balance_losses_by_hand(groups, core, tkg, k, act):
    """aux_loss is the mean Switch loss num * sum_e f_e * mean p_e over the pools that had tokens (core and group
    router always, a routed group when chosen), worked out here from the reference routing; the pool sums of two
    halves of a batch add up to the sums of the whole (what N processes all-reduce)."""
    m = _make(groups, core, k, tkg, act)
    x = torch.randn(12, D, generator=torch.Generator().manual_seed(31), dtype=torch.float64)
    cfg, r = m.cfg, m.router
    with torch.no_grad():
        m(x)
        losses = []
        if core:
            p = torch.softmax(x @ torch.cat([r.expert_gates[g].weight for g in range(core)]).t(), -1)
            top = p.topk(cfg.top_k, -1).indices
            frac = torch.bincount(top.flatten(), minlength=cfg.num_core_experts).double() / top.numel()
            losses.append(cfg.num_core_experts * (frac * p.mean(0)).sum())
        if cfg.num_routed_groups:
            pg = torch.softmax(x @ r.group_gate.weight.t(), -1)
            gi = pg.topk(cfg.top_k_groups, -1).indices
            frac = torch.bincount(gi.flatten(), minlength=cfg.num_routed_groups).double() / gi.numel()
            losses.append(cfg.num_routed_groups * (frac * pg.mean(0)).sum())
            for rr in range(cfg.num_routed_groups):
                tok = (gi == rr).any(-1)
                if not tok.any():
                    continue
                q = torch.softmax(x[tok] @ r.expert_gates[core + rr].weight.t(), -1)
                top = q.topk(cfg.k_routed, -1).indices
                frac = torch.bincount(top.flatten(), minlength=q.shape[1]).double() / top.numel()
                losses.append(q.shape[1] * (frac * q.mean(0)).sum())
    assert float(m.aux_loss) == pytest.approx(float(torch.stack(losses).mean()), rel=1e-5)
    halves = []
    for part in (x[:5], x[5:]):
        m(part)
        halves.append(m.pool_sums)
    summed = [a + b for a, b in zip(*halves)]
    m(x)
    for a, b in zip(summed, m.pool_sums):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    aux, handover = balance_losses(cfg, summed)
    assert float(aux.detach()) == pytest.approx(float(m.aux_loss.detach()), rel=1e-5)
    assert float(handover.detach()) == pytest.approx(float(m.handover_loss.detach()), rel=1e-5)
    assert len(summed) == len(router_pools(cfg))


def test_pool_balance_is_one_when_uniform_and_zero_without_tokens():
    num = 4
    uniform = torch.cat([torch.full((num,), 8 / num), torch.full((num,), 16 / num), torch.tensor([8.0, 16.0])])
    assert float(pool_balance(uniform, num)) == pytest.approx(1.0)
    assert float(pool_balance(torch.zeros(2 * num + 2), num)) == 0.0


# --------------------------------------------------------------------------- the single-call (CUDA) dispatch


@pytest.fixture
def single(monkeypatch):
    """What a CUDA tensor takes: every bank in one grouped GEMM whose offsets stay on the device."""
    monkeypatch.setattr(moe_mod, "single_call", lambda x: True)


def _run(m: MoEMLP, x: torch.Tensor, gout: torch.Tensor):
    xi = x.clone().requires_grad_(True)
    out = m(xi)
    grads = _grads(out, [xi, *[p for _, p in _params(m)]], gout)
    stats = [m.expert_counts.clone(), m.group_counts.clone(), m.aux_loss.detach().clone(), m.handover_loss.detach().clone()]
    return out.detach(), grads, stats + [s.detach().clone() for s in m.pool_sums]


@pytest.mark.parametrize("groups,core,tkg,k,act", CASES)
def test_single_call_matches_the_bank_by_bank_path(monkeypatch, groups, core, tkg, k, act):
    m, x, ref, counts = float32_case(groups, core, tkg, k, act)
    gout = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    banked = _run(m, x, gout)
    calls = count_grouped_mm(monkeypatch)
    monkeypatch.setattr(moe_mod, "single_call", lambda x: True)
    out, grads, stats = _run(m, x, gout)
    assert calls == [sum(groups)] * 4  # one per linear layer over every expert, and one for its input gradient
    _close(out.double(), ref, RTOL32, ATOL32)
    assert m.expert_counts.tolist() == counts
    torch.testing.assert_close(out, banked[0], rtol=1e-5, atol=1e-6)
    for a, b in zip(grads, banked[1]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for a, b in zip(stats, banked[2]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("groups,core,tkg,k,act", CASES[:6])
def test_single_call_reads_nothing_on_the_host(single, monkeypatch, groups, core, tkg, k, act):
    """No .tolist(), .item() or nonzero in forward or backward (each is a device->host wait on CUDA)."""
    m = _make(groups, core, k, tkg, act, dtype=torch.float32)
    x = torch.randn(2, 5, D, generator=torch.Generator().manual_seed(4))
    m(x)  # build the per-device constants first (a one-time copy)
    seen = []
    for name in ("tolist", "item", "nonzero"):
        real = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _n=name, _r=real, **kw: seen.append(_n) or _r(self, *a, **kw))
    real_nz = torch.nonzero
    monkeypatch.setattr(torch, "nonzero", lambda *a, **kw: seen.append("torch.nonzero") or real_nz(*a, **kw))
    m(x).sum().backward()
    assert seen == []


@pytest.mark.parametrize("path", ["banks", "single"])
@pytest.mark.parametrize("groups,core", [((4,), 1), ((2, 3, 3), 1), ((2, 2, 3), 0)])
def test_layer_without_tokens_returns_zeros(monkeypatch, path, groups, core):
    if path == "single":
        monkeypatch.setattr(moe_mod, "single_call", lambda x: True)
    cfg = MoEConfig(groups=groups, core_groups=core, top_k=1, top_k_groups=1)
    cfg.validate()
    m = MoEMLP(D, 2 * D, cfg)
    for shape in ((0, D), (2, 0, D)):
        x = torch.randn(shape, requires_grad=True)
        y = m(x)
        assert y.shape == x.shape and y.dtype == x.dtype
        assert float(m.aux_loss.detach()) == 0.0
        (x.sum() + y.sum() + m.aux_loss).backward()  # inside a residual block it trains through
        assert int(m.expert_counts.sum()) == 0


@pytest.mark.parametrize("path", ["banks", "single"])
def test_cpu_bf16_autocast(monkeypatch, path):
    """Under CPU bf16 autocast the experts compute in bf16 (grouped GEMM) and stay close to fp32."""
    if path == "single":
        monkeypatch.setattr(moe_mod, "single_call", lambda x: True)
    m = _make((2, 3, 3), 1, 2, 1, "gelu", dtype=torch.float32)
    x = torch.randn(4, 8, D, generator=torch.Generator().manual_seed(6))
    want = m(x)
    seen = []
    real_mm = torch._grouped_mm
    monkeypatch.setattr(torch, "_grouped_mm", lambda a, b, **kw: seen.append((a.dtype, b.dtype)) or real_mm(a, b, **kw))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = m(x)
    assert seen and all(d == (torch.bfloat16, torch.bfloat16) for d in seen)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=5e-2, atol=5e-2)
