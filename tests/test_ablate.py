"""Switching off the new parts (upscale/ablate.py): checked against the source model itself.

Oracle: growth adds parts and leaves the source's tensors as they were, so a grown model whose new
parts have been given arbitrary values, once those parts are switched off, must compute exactly
what the source computes. A test that perturbs the new parts first cannot pass by accident: the
perturbed model differs from the source until they are switched off.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from stages.data import make_demo_data
from stages.evaluate import METRICS, evaluate
from upscale import expand, load_model, save_model
from upscale.ablate import new_parts, switch_off_new_parts_
from upscale.checkpoint import Checkpoint
from upscale.config import PRESETS
from upscale.flops import forward_flops
from upscale.create import init_from_preset

pytestmark = pytest.mark.usefixtures("one_thread")

LAYOUTS = {
    "hand-over + extra block": dict(experts=8, groups=(4, 2, 2), extra_blocks=1),
    "routed top-1, two groups per token": dict(experts=16, groups=(4, 4, 4, 4), routed_top_k=1, top_k_groups=2),
    "replicas + extra block": dict(experts=16, groups=(4, 4, 4, 4), core_groups=0, replicate=True, noise_std=0.0,
                               extra_blocks=1),
}


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    return init_from_preset(PRESETS["tiny"], tmp_path_factory.mktemp("abl") / "src", 0, torch.float32, ["test"], False)


def _new_tensor(name: str, cfg) -> bool:
    """Whether growth added this tensor (and it may take any value without touching the source's function)."""
    if name.startswith("image_encoder.blocks."):
        if int(name.split(".")[2]) >= cfg.depth:
            return True
    moe = cfg.moe
    for part in (".experts.", ".router.expert_gates."):
        if part in name:
            return int(name.split(part)[1].split(".")[0]) >= moe.source_groups
    return ".router.group_gate." in name


@torch.no_grad()
def _perturb_new_parts(model: torch.nn.Module) -> None:
    gen = torch.Generator().manual_seed(1)
    cfg = model.config
    for name, p in model.named_parameters():
        if _new_tensor(name, cfg):
            p.add_(torch.randn(p.shape, generator=gen) * (0.5 * p.std() if p.numel() > 1 and p.std() > 0 else 0.5))
        elif name.endswith(".router.group_scale"):
            first = 1 if cfg.moe.replicas else 0  # a replica layout's group 0 is the source's own pool
            p[first:] = torch.rand(p.shape[0] - first, generator=gen) * 0.6 + 0.4


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_switched_off_computes_what_the_source_computes(source: Path, tmp_path: Path, layout: str):
    spec = expand.GrowthSpec(**LAYOUTS[layout])
    grown = expand.expand_checkpoint(source, tmp_path / "g", spec, ["test"])
    src_model, model = load_model(source).eval(), load_model(grown).eval()
    x = torch.randn(2, src_model.config.in_chans, 128, 128, generator=torch.Generator().manual_seed(0))
    want = src_model(x)
    _perturb_new_parts(model)
    changed = model(x)
    assert (changed["seg"] - want["seg"]).abs().max() > 1e-3  # the new parts now matter
    switch_off_new_parts_(model)
    got = model(x)
    for k in ("seg", "sdf", "boundary"):
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-5)
    assert [n for n, _ in model.moe_layers()] == [n for n, _ in src_model.moe_layers()]


def test_new_parts_in_words():
    tiny = PRESETS["tiny"]
    assert new_parts(tiny) is None  # a source: nothing to switch off
    cfg = expand.grown_config(tiny, expand.GrowthSpec(experts=16, groups=(4, 5, 4, 3), extra_blocks=2))
    assert new_parts(cfg) == "3 routed groups (12 experts) per MoE layer and 2 extra blocks"
    cfg = expand.grown_config(tiny, expand.GrowthSpec(experts=8, groups=(4, 4), core_groups=0, replicate=True, noise_std=0.0))
    assert new_parts(cfg) == "1 replica groups (4 experts) per MoE layer"
    assert new_parts(dataclasses.replace(tiny, extra_blocks=1)) == "1 extra block"


@pytest.fixture(scope="module")
def evaluated(source: Path, tmp_path_factory) -> dict:
    """eval of source, a fresh grown model, and the grown model with perturbed new parts."""
    tmp = tmp_path_factory.mktemp("ablate-eval")
    make_demo_data(tmp / "d", labelled=0, unlabelled=0, test=4, size=128, seed=0)
    grown = expand.expand_checkpoint(source, tmp / "g", expand.GrowthSpec(**LAYOUTS["hand-over + extra block"]), ["test"])
    model = load_model(grown)
    _perturb_new_parts(model)
    moved = save_model(model, tmp / "moved", dict(Checkpoint.open(grown).meta))
    starts = []
    rep = evaluate([source, grown, moved], tmp / "d" / "A-test", bootstrap=50, on_start=starts.append)
    return {"rep": rep, "starts": starts, "paths": (source, grown, moved), "data": tmp / "d" / "A-test"}


def test_eval_scores_grown_checkpoints_with_new_parts_off(evaluated):
    rep = evaluated["rep"]
    assert evaluated["starts"] == [4 * 5]  # 3 checkpoints, two of them grown and scored twice
    src, fresh, moved = rep["checkpoints"]
    assert "new_parts_off" not in src
    for ck, path in zip(rep["checkpoints"], evaluated["paths"]):  # what each costs per image, from its layout
        assert ck["forward_flops"] == forward_flops(Checkpoint.open(path).config)
    assert fresh["forward_flops"] > src["forward_flops"]
    for ck in (fresh, moved):
        off = ck["new_parts_off"]
        assert off["parts"] == "2 routed groups (4 experts) per MoE layer and 1 extra block"
        for m in METRICS:  # switched off = the source
            assert off["metrics"][m] == pytest.approx(src["metrics"][m], abs=1e-6), m
        assert set(off["diff"]) == set(METRICS)
    for d in fresh["new_parts_off"]["diff"].values():  # growth is exact: the new parts add nothing yet
        assert d == {"diff": 0.0, "ci_low": 0.0, "ci_high": 0.0}
    # perturbed: what the new parts add is exactly moved - source, the comparison eval already makes
    for m in METRICS:
        assert moved["new_parts_off"]["diff"][m]["diff"] == pytest.approx(rep["comparisons"][1]["diff"][m]["diff"], abs=1e-6)
    assert moved["new_parts_off"]["diff"]["miou"]["diff"] != 0.0


def test_eval_without_ablation(evaluated):
    source, grown, _ = evaluated["paths"]
    starts = []
    rep = evaluate([source, grown], evaluated["data"], bootstrap=5, on_start=starts.append, ablate_new=False)
    assert starts == [8] and all("new_parts_off" not in ck for ck in rep["checkpoints"])


@pytest.mark.slow  # 5 s: eval with bootstrap intervals
def test_cli_eval_prints_and_reports_what_new_parts_add(evaluated, tmp_path: Path):
    import cli

    source, grown, moved = evaluated["paths"]
    args = ["eval", str(source), str(moved), "--data", str(evaluated["data"]), "--bootstrap", "20"]
    result = CliRunner().invoke(cli.app, args + ["--report", str(tmp_path / "r")])
    assert result.exit_code == 0, result.output
    assert "what the new parts of [1] add" in result.stdout
    assert "[1] with its 2 routed groups (4 experts) per MoE layer and 1 extra block switched off" in result.stdout
    text = (tmp_path / "r" / "report.md").read_text()
    assert "## What the new parts add" in text and "| metric | as trained | new parts off | what they add (95% CI) |" in text
    result = CliRunner().invoke(cli.app, args + ["--json", "--no-ablate-new"])
    assert result.exit_code == 0, result.output
    assert "new_parts_off" not in json.loads(result.stdout)["checkpoints"][1]
    fresh = CliRunner().invoke(cli.app, ["eval", str(grown), "--data", str(evaluated["data"]), "--bootstrap", "20"])
    assert fresh.exit_code == 0, fresh.output
    assert "includes 0: no measurable work from the new capacity" in " ".join(fresh.stdout.split())


def test_replicas_of_unequal_sizes_are_refused():
    """A checkpoint may be hostile: replicas whose groups differ in size are not copies of one pool, and switching
    their new groups off (copying group 0 over them) would fail with a shape error instead of one line."""
    from upscale.errors import SamoeError

    moe = dataclasses.replace(PRESETS["tiny"].moe, groups=(4, 3), core_groups=0, replicas=True)
    with pytest.raises(SamoeError, match=r"every group has its size; got groups=\[4, 3\]"):
        dataclasses.replace(PRESETS["tiny"], moe=moe).validate()
