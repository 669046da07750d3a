"""Tests for stages/optim.py's KeptGrads: gradient buffers reused across steps change nothing.

Oracle: the same steps with `zero_grad(set_to_none=True)` (fresh gradients), compared bit for bit.
"""

from __future__ import annotations


import torch
from torch import nn

from stages.engine import apply_stage, train_step
from stages.expert_grads import keep_expert_grads
from stages.optim import KeptGrads, build_optimizers
from upscale import Checkpoint, load_model


def _toy_steps(kept: bool) -> tuple[nn.Module, list]:
    torch.manual_seed(0)
    model = nn.ModuleDict({"a": nn.Linear(8, 8), "b": nn.Linear(8, 8)})
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)
    k = KeptGrads(list(model.parameters()), min_numel=1) if kept else None
    grads_after = []
    x = torch.randn(4, 8)
    for uses_b in (True, False, True, False):
        if k is not None:
            k.zero_grad([opt])
        else:
            opt.zero_grad(set_to_none=True)
        y = model["a"](x)
        if uses_b:
            y = y + model["b"](x)
        y.square().mean().backward()
        if k is not None:
            k.after_backward()
        grads_after.append(model["b"].weight.grad is None)
        opt.step()
    return model, grads_after


def test_unused_parameters_get_none_and_training_is_bit_identical():
    ref, ref_none = _toy_steps(kept=False)
    got, got_none = _toy_steps(kept=True)
    assert ref_none == got_none == [False, True, False, True]  # unused -> None: momentum and weight decay skip it
    for (n, p), q in zip(ref.named_parameters(), got.parameters()):
        assert torch.equal(p, q), n


def test_kept_buffers_are_reused_not_reallocated():
    lin = nn.Linear(16, 16)
    opt = torch.optim.SGD(lin.parameters(), lr=0.1)
    k = KeptGrads(list(lin.parameters()), min_numel=1)
    ptrs = []
    for _ in range(3):
        k.zero_grad([opt])
        lin(torch.randn(2, 16)).sum().backward()
        k.after_backward()
        ptrs.append(lin.weight.grad.data_ptr())
        opt.step()
    assert ptrs[1] == ptrs[2] == ptrs[0]


def test_train_steps_with_kept_grads_match_fresh_grads_on_the_tiny_model(base, one_thread):
    """Three seed-004 steps (unsupervised + supervised) of the tiny model: identical parameters either way
    (kept: the expert GEMMs write into the kept buffers)."""
    ck = Checkpoint.open(base)
    models = []
    for kept in (False, True):
        model = load_model(base)
        apply_stage(model, ck.provenance, 3, 1)
        opts = build_optimizers(model, 1e-2)
        if kept:  # as `samoe train` in one eager process
            opts.kept = KeptGrads(list(model.parameters()), min_numel=1)
            keep_expert_grads(model)
        torch.manual_seed(0)
        s = model.config.img_size
        for step in range(3):
            batch = {"image": torch.randn(2, 3, s, s), "mask": torch.randint(0, 4, (2, s, s)),
                     "sdf": torch.rand(2, 4, s, s) * 2 - 1, "boundary": (torch.rand(2, 1, s, s) > 0.8).float()}
            train_step(model, opts, batch, {"image": torch.randn(2, 3, s, s)}, 0.5, 0.01, False, step)
        models.append(model)
    for (n, p), q in zip(models[0].named_parameters(), models[1].parameters()):
        assert torch.equal(p, q), n
        assert (p.grad is None) == (q.grad is None), n


def test_frozen_parameters_hold_no_gradient(base, one_thread):
    ck = Checkpoint.open(base)
    model = load_model(base)
    apply_stage(model, {**ck.provenance, **{n: "source" for n in ck.provenance if "image_encoder" in n}}, 1, 1)
    opts = build_optimizers(model, 1e-2)
    opts.kept = KeptGrads(list(model.parameters()), min_numel=1)
    s = model.config.img_size
    for step in range(2):
        batch = {"image": torch.randn(2, 3, s, s), "mask": torch.randint(0, 4, (2, s, s)),
                 "sdf": torch.rand(2, 4, s, s) * 2 - 1, "boundary": (torch.rand(2, 1, s, s) > 0.8).float()}
        train_step(model, opts, batch, {"image": torch.randn(2, 3, s, s)}, 0.5, 0.01, False, step)
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen and all(p.grad is None for p in model.parameters() if not p.requires_grad)


def _bank_steps(kept: bool, dtype: torch.dtype, monkeypatch) -> tuple[list[torch.Tensor], list[set[tuple[int, ...]]]]:
    """Three SGD steps of an MoE layer; with `kept`, as `samoe train` runs it (KeptGrads + keep_expert_grads).
    Returns its parameters and, per step, the shapes of the zeros_like / _grouped_mm outputs made (the expert
    GEMMs' fresh weight gradients)."""
    from stages.optim import drop_idle_grads
    from upscale.config import MoEConfig
    from upscale.moe import MoEMLP

    torch.manual_seed(0)
    m = MoEMLP(32, 64, MoEConfig(groups=(3, 2, 3), top_k=2), nn.GELU).to(dtype)
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    k = KeptGrads(list(m.parameters()), min_numel=1) if kept else None
    if kept:
        keep_expert_grads(m)
    made: list[set[tuple[int, ...]]] = []
    real_zeros, real_mm = torch.zeros_like, torch._grouped_mm
    monkeypatch.setattr(torch, "zeros_like", lambda t, **kw: made[-1].add(tuple(t.shape)) or real_zeros(t, **kw))

    def grouped_mm(a, b, **kw):
        out = real_mm(a, b, **kw)
        made[-1].add(tuple(out.shape))
        return out
    monkeypatch.setattr(torch, "_grouped_mm", grouped_mm)
    for step in range(3):
        made.append(set())
        k.zero_grad([opt]) if k is not None else opt.zero_grad(set_to_none=True)
        x = torch.randn(24, 32, generator=torch.Generator().manual_seed(step)).to(dtype)
        m(x).float().square().mean().backward()
        if k is not None:
            k.after_backward()
        drop_idle_grads([m])
        opt.step()
    return [p.detach().clone() for p in m.parameters()], made


def test_expert_weight_gradients_go_straight_into_kept_buffers(monkeypatch):
    """With kept buffers and keep_expert_grads the expert GEMMs' backward allocates no weight gradient after the
    first step (it accumulates into the kept one), and training stays bit-identical to the model's own op with
    fresh gradients, in fp32 and bf16."""
    banks = {(3, 64, 32), (3, 32, 64), (2, 64, 32), (2, 32, 64)}
    for dtype in (torch.float32, torch.bfloat16):
        ref, fresh_made = _bank_steps(False, dtype, monkeypatch)
        got, kept_made = _bank_steps(True, dtype, monkeypatch)
        for a, b in zip(ref, got):
            assert torch.equal(a, b)
        assert all(banks <= step for step in fresh_made)
        assert banks <= kept_made[0]  # the first step makes the buffers that are kept
        assert not banks & (kept_made[1] | kept_made[2])


def test_trainer_installs_kept_expert_gemms_only_in_eager_one_process_runs():
    from stages.expert_grads import kept_run_experts
    from upscale.config import MoEConfig
    from upscale.moe import MoEMLP, run_experts

    m = nn.Sequential(MoEMLP(16, 32, MoEConfig(groups=(2, 2), top_k=1)))
    assert m[0].run_experts is run_experts
    keep_expert_grads(m)
    assert m[0].run_experts is kept_run_experts
    with torch.no_grad():  # nothing to write: the model's own op, same output
        x = torch.randn(8, 16)
        y = m(x)
        m[0].run_experts = run_experts
        assert torch.equal(y, m(x))
