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
import math
import re
from dataclasses import replace

import pytest
import torch
from segment_anything.modeling.common import MLPBlock
from torch import nn

import upscale.moe as moe_mod
from upscale.config import MoEConfig
from upscale.errors import SamoeError
from upscale.moe import MoEMLP, image_context

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
    offsets = [0]
    for n in cfg.groups:
        offsets.append(offsets[-1] + n)
    group_tokens: list[list[int]] = [[] for _ in cfg.groups]
    rows = []
    per_image = flat.shape[0] // (x.shape[0] if x.dim() > 2 else 1)
    for t in range(flat.shape[0]):
        xt = flat[t]
        out = torch.zeros_like(xt)
        routed = len(cfg.groups) - cfg.core_groups
        chosen, pg, handed = [], None, 0.0
        if routed:
            logits = r.group_gate.weight @ xt
            if cfg.image_context:  # the token's image: its mean and (population) std, feature by feature
                img = flat[t // per_image * per_image : (t // per_image + 1) * per_image]
                mean = img.sum(0) / per_image
                std = ((img - mean) ** 2).sum(0).div(per_image).sqrt()
                logits = logits + r.group_context.weight @ torch.cat([mean, std])
            pg = torch.softmax(logits, dim=0)
            if cfg.token_handover:  # the core is one more option of the group softmax, with logit 0
                pg = torch.softmax(torch.cat([logits.new_zeros(1), logits]), dim=0)[1:]
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
                kept = 1 if cfg.residual else 1 - handed  # residual new groups add to the core, take nothing from it
                out = out + kept * (p[i] / z) * _expert(m, g, e, xt, act)
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


def _make(groups, core_groups, top_k, top_k_groups, act, dtype=torch.float64, seed=0, token_handover=False,
          image_context=False, replicas=False, residual=False) -> MoEMLP:
    """top_k: an int, or (top_k, routed_top_k) for a different k inside routed groups."""
    top_k, routed_top_k = top_k if isinstance(top_k, tuple) else (top_k, 0)
    cfg = MoEConfig(groups=groups, core_groups=core_groups, top_k=top_k, top_k_groups=top_k_groups, routed_top_k=routed_top_k,
                    token_handover=token_handover, image_context=image_context, replicas=replicas, residual=residual)
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
        if hasattr(m.router, "group_context"):
            m.router.group_context.weight.normal_(0, 0.5)
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
    """Record the number of experts of every torch._grouped_mm call (the call still runs)."""
    calls: list[int] = []
    real_mm = torch._grouped_mm
    monkeypatch.setattr(torch, "_grouped_mm", lambda *a, **kw: calls.append(a[1].shape[0]) or real_mm(*a, **kw))
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
    """Rows through the expert GEMMs == token-expert assignments; in-group routers see only their tokens."""
    m = _make(groups, core, k, tkg, act)
    x = torch.randn(5, 6, D, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    n = x.numel() // D
    _, counts, group_tokens = reference(m, x, act)

    rows = []
    real = moe_mod.grouped_linear

    def spy(xx, weight, bias, c, cl):
        rows.append((xx.shape[0], sum(cl), weight.shape[0]))
        return real(xx, weight, bias, c, cl)

    monkeypatch.setattr(moe_mod, "grouped_linear", spy)
    seen = {g: [] for g in range(len(groups))}
    hooks = [gate.register_forward_hook(lambda mod, inp, out, g=g: seen[g].append(inp[0].shape[0]))
             for g, gate in enumerate(m.router.expert_gates)]
    with torch.no_grad():
        m(x)
    for h in hooks:
        h.remove()

    k, kr = k if isinstance(k, tuple) else (k, k)
    per_token = (k if core else 0) + (tkg * kr if core < len(groups) else 0)
    assert m.cfg.experts_per_token == per_token
    assert int(m.expert_counts.sum()) == n * per_token
    assert m.expert_counts.tolist() == counts
    offs = [0]
    for e in groups:
        offs.append(offs[-1] + e)
    assert m.group_counts.tolist() == [sum(counts[a:b]) for a, b in zip(offs, offs[1:])]
    # two GEMMs per bank that has tokens, each over exactly its assigned rows
    assert all(r == s for r, s, _ in rows)
    assert sum(r for r, _, _ in rows) == 2 * n * per_token
    assert len(rows) == 2 * sum(1 for a, b in zip(offs, offs[1:]) if sum(counts[a:b]))
    for g in range(core, len(groups)):
        assert sum(seen[g]) == len(group_tokens[g]), f"in-group router {g} saw other tokens"
    for g in range(core):
        assert seen[g] == [n]


def test_unchosen_group_gets_no_gradient(loop_path):
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
        dead_param = name.startswith((f"experts.{g}.", f"router.expert_gates.{g}."))
        if dead_param:
            assert p.grad is None or not p.grad.any(), name
        elif ".w" in name or ".b" in name or "gate" in name:
            assert p.grad is not None and p.grad.any(), f"{name} should get gradient"
    assert m.router.group_scale.grad[dead] == 0
    assert m.router.group_scale.grad[[i for i in range(len(groups) - core) if i != dead]].ne(0).all()


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
    tok, w = route.token, route.weight
    sums = torch.zeros(6, dtype=torch.float64).index_add(0, tok, w.double())
    assert torch.allclose(sums, torch.ones(6, dtype=torch.float64), atol=1e-6)


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


TOKEN_HANDOVER = [((3, 2, 4, 3), 1, 1, 2, "gelu"), ((2, 2, 3), 1, 2, (2, 1), "relu"), ((2, 2, 3), 2, 1, 1, "gelu")]


@pytest.mark.parametrize("groups,core,tkg,k,act", TOKEN_HANDOVER)
@pytest.mark.parametrize("path", ["loop", "grouped"])
def test_token_handover_matches_reference(monkeypatch, path, groups, core, tkg, k, act):
    """With token_handover the reference takes the group softmax over [0 (the core), z]: outputs and every
    gradient match, the group gate's included."""
    if path == "loop":
        monkeypatch.setattr(moe_mod, "_grouped_mm_ok", lambda *a, **k: False)
    m = _make(groups, core, k, tkg, act, token_handover=True)
    x = torch.randn(2, 9, D, generator=torch.Generator().manual_seed(21), dtype=torch.float64)
    _compare(m, x, act, RTOL64, ATOL64)


def test_token_handover_keeps_a_token_on_the_core_by_hand(loop_path):
    """Scales at 1: a token whose group logits are all very negative stays on the source's experts, one with a
    large logit leaves them almost entirely. Without token_handover both hand over at least 1/G_r."""
    m = _make((2, 3, 3), 1, 1, 1, "relu", token_handover=True)
    with torch.no_grad():
        m.router.group_scale.fill_(1.0)
        m.router.group_gate.weight.zero_()
        m.router.group_gate.weight[:, 0] = torch.tensor([10.0, 5.0], dtype=torch.float64)
    x = torch.zeros(2, D, dtype=torch.float64)
    x[0, 0], x[1, 0] = -2.0, 2.0  # logits (-20, -10) and (20, 10)
    m(x)
    route = m.router(x)
    core = route.expert < 2
    stay = torch.zeros(2, dtype=torch.float64).index_add(0, route.token[core], route.weight[core].double())
    # by hand: core weight 1 - e^z1 / (1 + e^z1 + e^z2) for the chosen group 1
    want = torch.tensor([1 - math.exp(-10) / (1 + math.exp(-20) + math.exp(-10)),
                         1 - math.exp(20) / (1 + math.exp(20) + math.exp(10))], dtype=torch.float64)
    torch.testing.assert_close(stay, want, rtol=1e-5, atol=1e-7)
    assert stay[0] > 0.9999 and stay[1] < 0.0001
    m.cfg = m.router.cfg = replace(m.cfg, token_handover=False)
    route = m.router(x)
    core = route.expert < 2
    stay = torch.zeros(2, dtype=torch.float64).index_add(0, route.token[core], route.weight[core].double())
    assert (stay < 0.5).all()  # p_group of the chosen group >= 1/2: at least half leaves the core


@pytest.mark.parametrize("groups,core,tkg,k,act", TOKEN_HANDOVER)
@pytest.mark.parametrize("handover", [False, True])
def test_image_context_matches_reference(handover, groups, core, tkg, k, act):
    """With image_context the reference adds group_context @ [mean, std] of the token's image (worked out
    per image in the loop) to the group logits: outputs and every gradient match, group_context's included."""
    m = _make(groups, core, k, tkg, act, token_handover=handover, image_context=True)
    x = torch.randn(3, 2, 4, D, generator=torch.Generator().manual_seed(22), dtype=torch.float64)
    x[1] = x[1] * 3 + 1  # images that differ in their statistics
    _compare(m, x, act, RTOL64, ATOL64)
    params = dict(m.named_parameters())
    assert params["router.group_context.weight"].grad is None  # _compare takes gradients with autograd.grad
    m(x).sum().backward()
    if handover or len(groups) - core > 1:  # a softmax over one group without the core is constant 1
        assert params["router.group_context.weight"].grad.abs().sum() > 0


def test_image_context_routes_whole_images_by_hand(loop_path):
    """Token handover, scales at 1, a group gate of zero: only the image's mean of feature 0 sets the group
    logits (10 x mean). Every token of an image whose mean is -2 stays on the source's experts, every token of
    one whose mean is +2 leaves them, whatever the token itself holds."""
    m = _make((2, 3, 3), 1, 1, 1, "relu", token_handover=True, image_context=True)
    with torch.no_grad():
        m.router.group_scale.fill_(1.0)
        m.router.group_gate.weight.zero_()
        m.router.group_context.weight.zero_()
        m.router.group_context.weight[:, 0] = torch.tensor([10.0, 5.0], dtype=torch.float64)
    x = torch.zeros(2, 3, D, dtype=torch.float64)
    x[0, :, 0] = torch.tensor([-5.0, -2.0, 1.0])  # mean -2, one token positive
    x[1, :, 0] = torch.tensor([5.0, 2.0, -1.0])  # mean +2, one token negative
    m(x)
    route = m.router(x.reshape(-1, D), image_context(x))
    core = route.expert < 2
    stay = torch.zeros(6, dtype=torch.float64).index_add(0, route.token[core], route.weight[core].double())
    low, high = 1 - math.exp(-10) / (1 + math.exp(-20) + math.exp(-10)), 1 - math.exp(20) / (1 + math.exp(20) + math.exp(10))
    torch.testing.assert_close(stay, torch.tensor([low] * 3 + [high] * 3, dtype=torch.float64), rtol=1e-5, atol=1e-7)


def test_image_context_needs_new_groups():
    with pytest.raises(SamoeError, match="image_context needs new"):
        MoEConfig(groups=(4,), core_groups=1, image_context=True).validate()


def test_token_handover_needs_core_and_new_groups():
    with pytest.raises(SamoeError, match="token_handover needs a core pool and new"):
        MoEConfig(groups=(4,), core_groups=1, token_handover=True).validate()
    with pytest.raises(SamoeError, match="token_handover needs a core pool and new"):
        MoEConfig(groups=(2, 2), core_groups=0, top_k=1, token_handover=True).validate()


def test_constrain_projects_scales_into_unit_interval():
    m = _make((2, 3, 3), 1, 2, 1, "gelu")
    with torch.no_grad():
        m.router.group_scale.copy_(torch.tensor([-0.5, 1.7], dtype=m.router.group_scale.dtype))
    m.constrain_()
    assert m.router.group_scale.tolist() == [0.0, 1.0]


REPLICAS = [((3, 3, 3), 1, 2, "gelu", False), ((2, 2, 2, 2), 2, 1, "relu", False), ((3, 3, 3), 3, 2, "gelu", False),
            ((3, 3, 3), 1, 2, "gelu", True)]


@pytest.mark.parametrize("groups,tkg,k,act,context", REPLICAS)
@pytest.mark.parametrize("path", ["loop", "grouped"])
def test_replicas_match_reference(monkeypatch, path, groups, tkg, k, act, context):
    """replicas: the reference divides the chosen groups' probabilities by their (detached) sum: outputs and every
    gradient match; the group gate learns (through log p) even with one group per token, whose weight is 1."""
    if path == "loop":
        monkeypatch.setattr(moe_mod, "_grouped_mm_ok", lambda *a, **k: False)
    m = _make(groups, 0, k, tkg, act, replicas=True, image_context=context)
    x = torch.randn(2, 9, D, generator=torch.Generator().manual_seed(23), dtype=torch.float64)
    _compare(m, x, act, RTOL64, ATOL64)
    route = m.router(x.reshape(-1, D), image_context(x) if context else None)
    if tkg == 1:  # a token's weights add up to its one group's scale: no share of p is lost
        per_token = torch.zeros(18, dtype=torch.float64).index_add(0, route.token, route.weight.double())
        group_of = torch.empty(18, dtype=torch.long)
        group_of[route.token] = route.expert // groups[0]
        torch.testing.assert_close(per_token, m.router.group_scale.double()[group_of])
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
            torch.testing.assert_close(rep.group_weight, rep.group_counts.double() / rep.group_counts.sum(), rtol=1e-6, atol=0,
                                       check_dtype=False)


def test_replicas_need_no_core_pool():
    with pytest.raises(SamoeError, match="replicas have no core pool"):
        MoEConfig(groups=(4, 4), core_groups=1, replicas=True).validate()


def test_mixture_normalise_grads_divides_each_replica_by_its_share(loop_path):
    """--mixture-lr on replicas: each group's bank gradients are divided by the share of the tokens it took
    (its group_weight), floored at half a fair share, 1 / (2 G)."""
    from upscale.moe import mixture_normalise_grads

    m = _make((2, 2, 2), 0, 1, 1, "gelu", replicas=True)
    with torch.no_grad():
        m.router.group_scale.fill_(1.0)
        m.router.group_gate.weight.zero_()
        m.router.group_gate.weight[:, 0] = torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64) * 50
    x = torch.randn(40, D, dtype=torch.float64)
    x[:, 0] = torch.cat([torch.full((3,), -1.0), torch.full((37,), 1.0)])  # 3 tokens to group 0, 37 to group 2
    m(x).square().sum().backward()
    assert m.group_counts.tolist() == [3, 0, 37]
    before = {n: p.grad.clone() for n, p in m.experts.named_parameters() if p.grad is not None}
    mixture_normalise_grads([m])
    for n, p in m.experts.named_parameters():
        if n.startswith("1."):
            assert p.grad is None  # no token, no gradient, nothing to scale
            continue
        factor = 1 / max(3 / 40, 1 / 6) if n.startswith("0.") else 40 / 37
        torch.testing.assert_close(p.grad, before[n] * factor, rtol=1e-6, atol=0)  # shares are float32


@pytest.mark.parametrize("scale,new_factor", [(0.3, 1 / 0.3), (0.1, 4.0)], ids=["open", "floored"])
def test_mixture_normalise_grads_against_hand_computed_factors(scale: float, new_factor: float):
    """`--mixture-lr`: with one routed group its group probability is 1, so every token's new-group weight is
    `group_scale` = w exactly; core bank gradients are divided by 1 - w, new ones by max(w, 0.25)."""
    from upscale.moe import mixture_normalise_grads

    torch.manual_seed(0)
    grown = MoEMLP(8, 16, MoEConfig(groups=(3, 2), core_groups=1, top_k=2, routed_top_k=1), nn.GELU)
    flat = MoEMLP(8, 16, MoEConfig(groups=(3,), top_k=2), nn.GELU)
    with torch.no_grad():
        grown.router.group_scale.fill_(scale)
    for m in (grown, flat):
        m(torch.randn(2, 5, 8)).square().sum().backward()
    assert grown.new_weight.item() == pytest.approx(scale)
    before = {(id(m), n): p.grad.clone() for m in (grown, flat) for n, p in m.experts.named_parameters()}
    mixture_normalise_grads([grown, flat])
    for n, p in grown.experts.named_parameters():
        factor = 1 / (1 - scale) if n.startswith("0.") else new_factor
        torch.testing.assert_close(p.grad, before[(id(grown), n)] * factor, rtol=1e-6, atol=0)
    for n, p in flat.experts.named_parameters():  # a layer without new groups trains as before
        assert torch.equal(p.grad, before[(id(flat), n)])
    assert grown.router.group_gate.weight.grad is not None  # routers keep their gradients (not in the banks)


# --------------------------------------------------------------------------- residual new groups


RESIDUAL = [((3, 2, 4, 3), 1, 2, (2, 1), "gelu", False), ((2, 2, 3), 2, 1, 1, "relu", False),
            ((3, 3, 3), 1, 1, 2, "gelu", True)]


@pytest.mark.parametrize("groups,core,tkg,k,act,context", RESIDUAL)
@pytest.mark.parametrize("path", ["loop", "grouped"])
def test_residual_matches_reference(monkeypatch, path, groups, core, tkg, k, act, context):
    """residual: the reference keeps the core's weights whole (no 1 - handed) and adds the routed groups'
    weighted outputs: outputs and every gradient match; there is no hand-over pressure."""
    if path == "loop":
        monkeypatch.setattr(moe_mod, "_grouped_mm_ok", lambda *a, **k: False)
    m = _make(groups, core, k, tkg, act, residual=True, image_context=context)
    x = torch.randn(2, 9, D, generator=torch.Generator().manual_seed(29), dtype=torch.float64)
    _compare(m, x, act, RTOL64, ATOL64)
    m(x)
    assert m.handover_loss.item() == 0.0
    assert 0 < m.new_weight.item() < 1  # the routing weight on the new groups, as reported


def test_residual_groups_with_zero_output_layers_compute_the_core_by_hand(loop_path):
    """Growth's residual start: new groups with random first layers, zero output layers and scale 1 leave the
    layer computing exactly the flat layer's output; the first backward reaches their output layers only (their
    first layers and the group gate see a zero output), the second, after one step, the group gate too. Not
    vacuous: a non-zero output layer shows."""
    torch.manual_seed(5)
    flat = MoEMLP(D, H, MoEConfig(groups=(4,), top_k=2), nn.GELU).double()
    grown = MoEMLP(D, H, MoEConfig(groups=(4, 3, 3), core_groups=1, top_k=2, routed_top_k=1, residual=True), nn.GELU).double()
    with torch.no_grad():
        for name in ("w1", "b1", "w2", "b2"):
            getattr(grown.experts[0], name).copy_(getattr(flat.experts[0], name))
        grown.router.expert_gates[0].weight.copy_(flat.router.expert_gates[0].weight)
        for g in (1, 2):
            grown.experts[g].w2.zero_()
            grown.experts[g].b2.zero_()
        grown.router.group_gate.weight.normal_(0, 1.0)
        grown.router.group_scale.fill_(1.0)
    x = torch.randn(3, 5, D, dtype=torch.float64)
    torch.testing.assert_close(grown(x), flat(x), rtol=0, atol=0)
    grown(x).square().sum().backward()
    assert not grown.router.group_gate.weight.grad.any()
    for g in (1, 2):
        assert grown.experts[g].w2.grad.abs().sum() > 0
        assert not grown.experts[g].w1.grad.any()
    with torch.no_grad():
        for g in (1, 2):
            grown.experts[g].w2.sub_(0.1 * grown.experts[g].w2.grad)
    assert (grown(x) - flat(x)).abs().max() > 1e-3
    grown.zero_grad()
    grown(x).square().sum().backward()
    assert grown.router.group_gate.weight.grad.abs().sum() > 0 and grown.experts[1].w1.grad.abs().sum() > 0


@pytest.mark.parametrize(("options", "words"), [
    (dict(groups=(4,), core_groups=1), "residual needs a core pool and new (routed) groups"),
    (dict(groups=(2, 2), core_groups=0), "residual needs a core pool and new (routed) groups"),
    (dict(groups=(2, 2), core_groups=1, token_handover=True), "residual and token_handover exclude each other"),
])
def test_residual_rejects_layouts_it_cannot_mean(options, words):
    with pytest.raises(SamoeError, match=re.escape(words)):
        MoEConfig(residual=True, **options).validate()


def test_mixture_normalise_grads_leaves_a_residual_core_alone():
    """`--mixture-lr` with residual new groups: the core's output is not scaled down, so its bank gradients stay
    as they are; the new ones are divided by max(w, 0.25) as for a hand-over (one routed group: w = scale)."""
    from upscale.moe import mixture_normalise_grads

    torch.manual_seed(0)
    m = MoEMLP(8, 16, MoEConfig(groups=(3, 2), core_groups=1, top_k=2, routed_top_k=1, residual=True), nn.GELU)
    with torch.no_grad():
        m.router.group_scale.fill_(0.4)
    m(torch.randn(2, 5, 8)).square().sum().backward()
    assert m.new_weight.item() == pytest.approx(0.4)
    before = {n: p.grad.clone() for n, p in m.experts.named_parameters()}
    mixture_normalise_grads([m])
    for n, p in m.experts.named_parameters():
        factor = 1.0 if n.startswith("0.") else 1 / 0.4
        torch.testing.assert_close(p.grad, before[n] * factor, rtol=1e-6, atol=0)
