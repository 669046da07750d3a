"""Tests for stages/optim.py's KeptGrads: gradient buffers reused across steps change nothing.

Oracle: the same steps with `zero_grad(set_to_none=True)` (fresh gradients), compared bit for bit.
"""

from __future__ import annotations


import torch
from torch import nn

from stages.engine import apply_stage, train_step
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
    """Three seed-004 steps (unsupervised + supervised) of the tiny model: identical parameters either way."""
    ck = Checkpoint.open(base)
    models = []
    for kept in (False, True):
        model = load_model(base)
        apply_stage(model, ck.provenance, 3, 1)
        opts = build_optimizers(model, 1e-2)
        if kept:
            opts.kept = KeptGrads(list(model.parameters()), min_numel=1)
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
