"""`--compile` (upscale/compile.py): the model compiles in fp32 and bf16, without graph breaks, without
recompiling as routing changes, and computes what the eager model computes.

Most tests compile with the `aot_eager` backend: Dynamo's tracing, the fake-tensor pass (where
`torch._grouped_mm` used to fail in fp32) and AOTAutograd's joint graph are all exercised, without the
minutes of C++ code generation that inductor takes on a CPU; one test runs inductor itself on an MoE layer.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

from stages.semisup import task_stats
from upscale.compile import compile_fn, compile_model, compiled_regions
from upscale.config import PRESETS, MoEConfig
from upscale.expand import GrowthSpec, grown_config
from upscale.model import build_model
from upscale.moe import MoEMLP

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]  # torch.compile: minutes on a CPU

# fp32: the same ops in another order (fused, or decomposed by AOTAutograd); bf16: two bf16 roundings apart
TOL = {torch.float32: dict(rtol=1e-4, atol=1e-5), torch.bfloat16: dict(rtol=5e-2, atol=5e-2)}


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _grown_tiny() -> torch.nn.Module:
    """The tiny preset grown to 13 experts in 4 groups and one extra MoE block, new groups switched on."""
    model = build_model(grown_config(PRESETS["tiny"], GrowthSpec(experts=13, groups=(4, 3, 3, 3), extra_blocks=1)), seed=1)
    with torch.no_grad():
        for _, layer in model.moe_layers():
            layer.router.group_scale.fill_(0.5)
    return model


def _fwd_bwd(model: torch.nn.Module, x: torch.Tensor, dtype: torch.dtype) -> tuple[dict, dict]:
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        out = model(x)
    out = {k: v.float() for k, v in out.items()}
    (sum(v.square().mean() for v in out.values()) + model.aux_loss() + model.handover_loss()).backward()
    return out, {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_the_model_compiles_and_matches_eager(dtype):
    eager = _grown_tiny()
    compiled = compile_model(copy.deepcopy(eager), backend="aot_eager")
    x = torch.randn(2, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    want, want_grads = _fwd_bwd(eager, x, dtype)
    got, got_grads = _fwd_bwd(compiled, x, dtype)
    for k in want:
        torch.testing.assert_close(got[k], want[k], **TOL[dtype], msg=k)
    for n, g in want_grads.items():
        assert (g is None) == (got_grads[n] is None), n
        if g is not None:
            scale = max(float(g.abs().max()), 1e-3)
            torch.testing.assert_close(got_grads[n] / scale, g / scale, **TOL[dtype], msg=n)
    assert compiled.state_dict().keys() == eager.state_dict().keys()  # in place: checkpoints are interchangeable
    assert all(getattr(m, "_compiled_call_impl", None) is not None for m in compiled_regions(compiled))


@pytest.mark.parametrize("index", [0, 1, 2], ids=["dense-windowed", "dense-global", "moe-windowed"])
def test_no_graph_break_in_a_block(index):
    model = _grown_tiny()
    block = model.image_encoder.blocks[index]
    x = torch.randn(2, 8, 8, 64, requires_grad=True)
    explained = torch._dynamo.explain(block)(x)
    assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]
    assert explained.graph_count == 1


def test_routing_that_changes_every_step_does_not_recompile():
    """Ten training steps whose routing changes every step (new inputs, routers perturbed): one compile of the
    MoE block, and the experts' counts really vary."""
    model = _grown_tiny()
    block = model.image_encoder.blocks[3]
    counter = CompileCounterWithBackend("aot_eager")
    block.compile(backend=counter, dynamic=False)
    gen = torch.Generator().manual_seed(2)
    seen = set()
    for _ in range(10):
        x = torch.randn(2, 8, 8, 64, generator=gen, requires_grad=True)
        block(x).square().mean().backward()
        seen.add(tuple(block.mlp.expert_counts.tolist()))
        with torch.no_grad():
            for gate in block.mlp.router.expert_gates:
                gate.weight.add_(torch.randn(gate.weight.shape, generator=gen))
    assert counter.frame_count <= 2 and len(seen) == 10


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_inductor_compiles_an_moe_layer(dtype):
    """The real backend on an MoE layer (the expert GEMMs are the custom op the compiler keeps as one node):
    outputs and gradients as in eager."""
    torch.manual_seed(3)
    layer = MoEMLP(16, 32, MoEConfig(groups=(3, 2, 3), core_groups=1, top_k=2, top_k_groups=1)).to(dtype)
    with torch.no_grad():
        layer.router.group_scale.fill_(0.5)
    compiled = copy.deepcopy(layer)
    compiled.compile(dynamic=False)
    x = torch.randn(4, 6, 16, dtype=dtype)
    grads = []
    for m in (layer, compiled):
        xi = x.clone().requires_grad_(True)
        y = m(xi)
        (y.float().square().sum() + m.aux_loss).backward()
        grads.append([y.detach(), xi.grad] + [p.grad for p in m.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(b.float(), a.float(), **TOL[dtype])


def test_compiled_task_stats_match_eager():
    """The loss sums compiled (one-hot class sums instead of index_add) against eager, both prefixes."""
    gen = torch.Generator().manual_seed(4)
    out = {f"{p}{k}": torch.randn(2, c, 32, 32, generator=gen) for p in ("", "gate_") for k, c in
           (("seg", 4), ("sdf", 4), ("boundary", 1))}
    batch = {"mask": torch.randint(0, 4, (2, 32, 32), generator=gen), "sdf": torch.rand(2, 4, 32, 32, generator=gen) * 2 - 1,
             "boundary": (torch.rand(2, 1, 32, 32, generator=gen) > 0.8).float()}
    batch["mask"][0, :3] = 255  # ignored pixels
    stats = compile_fn(task_stats, backend="aot_eager")
    for prefix in ("", "gate_"):
        torch.testing.assert_close(stats(out, batch, prefix), task_stats(out, batch, prefix), rtol=1e-5, atol=1e-4)


def test_predict_compile_gives_the_eager_maps(src, tmp_path, monkeypatch):
    """`samoe predict --compile` compiles the model (here with the light backend) and writes the eager run's mask."""
    import numpy as np
    from PIL import Image
    from typer.testing import CliRunner

    import cli
    import upscale.compile

    calls = []
    real = upscale.compile.compile_model
    monkeypatch.setattr(upscale.compile, "compile_model", lambda m: calls.append(m) or real(m, backend="aot_eager"))
    scenes = tmp_path / "scenes"
    scenes.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (90, 100), dtype=np.uint8)).save(scenes / "a.png")
    maps = []
    for flag in ([], ["--compile"]):
        out = tmp_path / f"pred{len(flag)}"
        res = CliRunner().invoke(cli.app, ["predict", str(src), "--images", str(scenes), "--out", str(out),
                                          "--input-scale", "display", *flag])
        assert res.exit_code == 0, res.output
        with Image.open(out / "masks" / "a.png") as im:
            maps.append(np.asarray(im))
    assert len(calls) == 1
    np.testing.assert_array_equal(maps[0], maps[1])
