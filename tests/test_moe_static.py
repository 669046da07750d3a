"""The MoE layer's static (CUDA) dispatch, run on the CPU, against the same oracles as tests/test_moe.py.

`upscale.moe.static_dispatch` is what a CUDA tensor takes: device-side shapes, one grouped GEMM over
all banks, no host reads. Switched on here for CPU tensors, it must reproduce the per-token reference
and the CPU path (outputs, gradients, counts, losses, pool sums), read nothing on the host in the
forward, and a layer that receives no token must return zeros on both paths.
"""

from __future__ import annotations

import pytest
import torch

import upscale.moe as moe_mod
from test_moe import ATOL32, CASES, D, RTOL32, _close, _grads, _make, _params, count_grouped_mm, float32_case
from upscale.config import MoEConfig
from upscale.moe import MoEMLP, drop_idle_grads, router_pools


@pytest.fixture
def static(monkeypatch):
    monkeypatch.setattr(moe_mod, "static_dispatch", lambda x: True)


def _run(m: MoEMLP, x: torch.Tensor, gout: torch.Tensor):
    xi = x.clone().requires_grad_(True)
    out = m(xi)
    params = [p for _, p in _params(m)]
    grads = _grads(out, [xi, *params], gout)
    stats = (m.expert_counts.clone(), m.group_counts.clone(), m.aux_loss.detach().clone(), m.handover_loss.detach().clone(),
             [s.detach().clone() for s in m.pool_sums])
    return out.detach(), grads, stats


@pytest.mark.parametrize("groups,core,tkg,k,act", CASES)
def test_static_path_matches_reference_and_cpu_path(monkeypatch, groups, core, tkg, k, act):
    m, x, ref, counts = float32_case(groups, core, tkg, k, act)
    gout = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    cpu_out, cpu_grads, cpu_stats = _run(m, x, gout)

    calls = count_grouped_mm(monkeypatch)
    monkeypatch.setattr(moe_mod, "static_dispatch", lambda x: True)
    out, grads, stats = _run(m, x, gout)
    # one grouped GEMM per linear layer, over every expert of every group
    assert calls == [sum(groups), sum(groups)]
    _close(out.double(), ref, RTOL32, ATOL32)
    assert m.expert_counts.tolist() == counts
    torch.testing.assert_close(out, cpu_out, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads, cpu_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for a, b in zip(stats[:4], cpu_stats[:4]):
        torch.testing.assert_close(a.float(), b.float(), rtol=1e-5, atol=1e-6)
    assert len(stats[4]) == len(cpu_stats[4]) == len(router_pools(m.cfg))
    for a, b in zip(stats[4], cpu_stats[4]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("groups,core,tkg,k,act", CASES[:6])
def test_static_forward_reads_nothing_on_the_host(static, monkeypatch, groups, core, tkg, k, act):
    """No .tolist(), .item() or nonzero in the static forward (each is a device->host wait on CUDA)."""
    m = _make(groups, core, k, tkg, act, dtype=torch.float32)
    x = torch.randn(2, 5, D, generator=torch.Generator().manual_seed(4))
    m(x)  # build the per-device index cache first (a one-time copy)
    seen = []
    for name in ("tolist", "item", "nonzero"):
        real = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _n=name, _r=real, **kw: seen.append(_n) or _r(self, *a, **kw))
    real_nz = torch.nonzero
    monkeypatch.setattr(torch, "nonzero", lambda *a, **kw: seen.append("torch.nonzero") or real_nz(*a, **kw))
    m(x).sum().backward()
    assert seen == []


@pytest.mark.parametrize("path", ["cpu", "static"])
@pytest.mark.parametrize("groups,core", [((4,), 1), ((2, 3, 3), 1), ((2, 2, 3), 0)])
def test_layer_without_tokens_returns_zeros(monkeypatch, path, groups, core):
    if path == "static":
        monkeypatch.setattr(moe_mod, "static_dispatch", lambda x: True)
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


def test_drop_idle_grads_matches_cpu_path(monkeypatch):
    """A routed group nobody chose: zero gradient on the static path, turned into None as on the CPU path."""
    m = _make((3, 2, 4, 3), 1, 2, 1, "gelu", dtype=torch.float32)
    with torch.no_grad():
        m.router.group_gate.weight[1] = 0.0
        m.router.group_gate.weight[1, 0] = -100.0
    x = torch.randn(4, 8, D, generator=torch.Generator().manual_seed(5))
    x[..., 0] = x[..., 0].abs() + 1.0

    def grads() -> dict[str, torch.Tensor | None]:
        m.zero_grad(set_to_none=True)
        m(x).pow(2).mean().backward()
        drop_idle_grads([m])
        return {n: p.grad for n, p in m.named_parameters()}

    cpu = grads()
    assert cpu["experts.2.w1"] is None and cpu["router.expert_gates.2.weight"] is None
    monkeypatch.setattr(moe_mod, "static_dispatch", lambda x: True)
    static = grads()
    assert {n for n, g in static.items() if g is None} == {n for n, g in cpu.items() if g is None}
    for n, g in cpu.items():
        if g is not None:
            torch.testing.assert_close(static[n], g, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("static_path", [False, True])
def test_cpu_bf16_autocast(monkeypatch, static_path):
    """Under CPU bf16 autocast the experts compute in bf16 (grouped GEMM) and stay close to fp32."""
    if static_path:
        monkeypatch.setattr(moe_mod, "static_dispatch", lambda x: True)
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


@pytest.mark.parametrize("groups,core,tkg,k,act,routing", [
    ((3, 2, 4, 3), 1, 2, (2, 1), "gelu", "token_handover"), ((2, 2, 3), 2, 1, 1, "relu", "token_handover"),
    ((3, 3, 3), 0, 1, 2, "gelu", "replicas"), ((3, 3, 3), 0, 3, 2, "relu", "replicas"),
    ((3, 2, 4, 3), 1, 2, (2, 1), "gelu", "residual")])
@pytest.mark.parametrize("image_context", [False, True])
def test_static_path_matches_cpu_path_with_token_handover(monkeypatch, groups, core, tkg, k, act, routing, image_context):
    m = _make(groups, core, k, tkg, act, dtype=torch.float32, image_context=image_context, **{routing: True})
    x = torch.randn(3, 7, D, generator=torch.Generator().manual_seed(1))
    gout = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    cpu_out, cpu_grads, cpu_stats = _run(m, x, gout)
    monkeypatch.setattr(moe_mod, "static_dispatch", lambda x: True)
    out, grads, stats = _run(m, x, gout)
    torch.testing.assert_close(out, cpu_out, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads, cpu_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for a, b in zip(stats[:4], cpu_stats[:4]):
        torch.testing.assert_close(a.float(), b.float(), rtol=1e-5, atol=1e-6)
