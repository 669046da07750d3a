"""`samoe plan --last-k K` plans the stage 2 that `samoe train --stage 2 --last-k K` runs.

Oracle: the trainable parameters of stage 2 counted on the really grown model by the
engine's own `apply_stage`, for several K; the printed table changes with K.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import cli
from stages.engine import apply_stage
from upscale import load_model
from upscale.checkpoint import Checkpoint
from upscale.config import PRESETS
from upscale.create import init_from_preset
from upscale.expand import GrowthSpec, expand_checkpoint, resolve_groups


@pytest.fixture(scope="module")
def grown(tmp_path_factory) -> tuple[Path, Path]:
    src = init_from_preset(PRESETS["tiny"], tmp_path_factory.mktemp("src") / "tiny", 0, torch.float32, ["test"], False)
    spec = GrowthSpec(experts=8, groups=resolve_groups(4, 8, "2", 1), extra_blocks=1, noise_std=0.01)
    return src, expand_checkpoint(src, tmp_path_factory.mktemp("grown") / "g", spec, ["test"])


def _plan(src: Path, *extra: str) -> CliRunner:
    return CliRunner().invoke(cli.app, ["plan", str(src), "--experts", "8", "--groups", "2", "--extra-blocks", "1",
                                        "--dtype", "float32", *extra])


def test_last_k_changes_stage2_memory(grown):
    src, out = grown
    model = load_model(out)
    prov = Checkpoint.open(out).provenance
    seen = set()
    for k in (0, 1, 2, 4):
        res = _plan(src, "--last-k", str(k), "--json")
        assert res.exit_code == 0, res.stderr
        stage2 = json.loads(res.stdout)["memory_per_stage"]["stage2"]
        counts = apply_stage(model, prov, 2, k)
        assert stage2["trainable_params"] == sum(c[0] for c in counts.values()), k
        seen.add(stage2["total_bytes"])
    assert len(seen) == 4
    tables = {k: _plan(src, "--last-k", str(k)).stdout for k in (0, 2)}
    assert tables[0] != tables[2]


def test_plan_reads_last_k_from_the_recipe_and_the_option_wins(grown, tmp_path):
    """plan sizes stage 2 as `train --stage 2 --recipe R` will run it: [train.stage2] over [train], --last-k over both."""
    src, _ = grown
    recipe = tmp_path / "r.toml"
    recipe.write_text("[train]\nlast_k = 0\n[train.stage2]\nlast_k = 2\n")

    def trainable(*extra: str) -> int:
        res = _plan(src, "--json", *extra)
        assert res.exit_code == 0, res.stderr
        return json.loads(res.stdout)["memory_per_stage"]["stage2"]["trainable_params"]

    assert trainable("--recipe", str(recipe)) == trainable("--last-k", "2") != trainable("--last-k", "0")
    assert trainable("--recipe", str(recipe), "--last-k", "0") == trainable("--last-k", "0")
    assert trainable("--set", "train.last_k=0") == trainable("--last-k", "0")
