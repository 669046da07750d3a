"""Recipes (upscale/recipe.py): every key of [growth] and [train] is resolved from the file, overridden by --set,
recorded in the lineage of the checkpoint a command writes, and a bad key or value is one line naming it.

Oracles: the value written in the recipe (or by --set) is the value the command runs with; every key of the two
settings dataclasses has a case here, so a new setting without a test fails `test_every_key_has_a_case`.
"""

from __future__ import annotations

import json
import tomllib
from dataclasses import fields
from pathlib import Path

import pytest
from typer.testing import CliRunner

import cli
from stages.engine import RECIPE_SKIP, TrainConfig
from upscale.errors import SamoeError
from upscale.growth import GrowthRecipe
from upscale.recipe import defaults, load_recipe

# key -> (value in the recipe file as TOML, the value it resolves to, a --set override, the value that resolves to)
TRAIN_CASES = {
    "input_scale": ('"db"', "db", "amplitude", "amplitude"),
    "dn_calibration": ("200.0", 200.0, "300", 300.0),
    "polarisations": ('"VV,VH"', "VV,VH", "HH", "HH"),
    "resize": ("true", True, "false", False),
    "val_every": ("7", 7, "9", 9),
    "epochs": ("12", 12, "13", 13),
    "max_steps": ("100", 100, "101", 101),
    "batch_size": ("8", 8, "2", 2),
    "seed": ("5", 5, "6", 6),
    "lr": ("0.02", 0.02, "3e-3", 0.003),
    "lr_scale": ("0.5", 0.5, "2", 2.0),
    "momentum": ("0.8", 0.8, "0.7", 0.7),
    "weight_decay": ("1e-4", 1e-4, "0", 0.0),
    "router_lr_mult": ("5.0", 5.0, "1", 1.0),
    "last_k": ("2", 2, "3", 3),
    "augment": ("true", True, "false", False),
    "selector_gating": ("true", True, "false", False),
    "timeline": ("100", 100, "50", 50),
    "warmup": ("4.0", 4.0, "2", 2.0),
    "alpha_rampup": ("10.0", 10.0, "5", 5.0),
    "unsup_rampup": ("40.0", 40.0, "30", 30.0),
    "unsup_weight": ("0.5", 0.5, "0.25", 0.25),
    "restart_ramps": ("true", True, "false", False),
    "aux_loss_coef": ("0.02", 0.02, "0.03", 0.03),
    "handover_coef": ("0.2", 0.2, "0", 0.0),
    "compile": ("true", True, "false", False),
    "checkpoint_every": ("25", 25, "10", 10),
    "keep": ("3", 3, "4", 4),
    "log_every": ("2", 2, "3", 3),
    "print_every": ("20", 20, "30", 30),
    "skip_nonfinite": ("true", True, "false", False),
    "workers": ("2", 2, "1", 1),
    "precision": ('"bf16"', "bf16", "fp32", "fp32"),
}

GROWTH_CASES = {
    "experts": ("117", 117, "120", 120),
    "groups": ("[16, 15, 15, 15, 14, 14, 14, 14]", [16, 15, 15, 15, 14, 14, 14, 14], "8", 8),
    "core_groups": ("2", 2, "1", 1),
    "top_k_groups": ("2", 2, "1", 1),
    "routed_top_k": ("1", 1, "2", 2),
    "replicate": ("true", True, "false", False),
    "decoder_group_mixing": ("false", False, "true", True),
    "extra_blocks": ("2", 2, "1", 1),
    "extra_dense": ("true", True, "false", False),
    "init": ('"mixed"', "mixed", "interpolate", "interpolate"),
    "noise_std": ("0.02", 0.02, "0", 0.0),
    "interp_weight": ("0.4", 0.4, "0.5", 0.5),
    "dtype": ('"bfloat16"', "bfloat16", "float32", "float32"),
    "shard_size_gib": ("1.5", 1.5, "4", 4.0),
    "threads": ("4", 4, "1", 1),
    "verify_images": ("4", 4, "2", 2),
    "verify_tol": ("1e-5", 1e-5, "1e-3", 1e-3),
}

TRAIN_GIVEN = dict(source="ck", run_dir="run", data=[Path("d")], unlabelled=None, val_data=None, device="cpu",
                   max_steps=None, seed=None)


def test_every_key_has_a_case():
    assert set(TRAIN_CASES) == {f.name for f in fields(TrainConfig)} - set(RECIPE_SKIP)
    assert set(GROWTH_CASES) == {f.name for f in fields(GrowthRecipe)}


def _toml(text: str) -> str:
    """`text` as a TOML value: itself where it parses as one, else a quoted string (as --set reads a bare word)."""
    try:
        tomllib.loads(f"v = {text}")
        return text
    except tomllib.TOMLDecodeError:
        return json.dumps(text)


def _recipe(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "r.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("key", list(TRAIN_CASES))
def test_train_key_is_resolved_per_stage_and_overridden_by_set(key: str, tmp_path: Path):
    toml, value, override, overridden = TRAIN_CASES[key]
    default = defaults(TrainConfig)[key]
    path = _recipe(tmp_path, f"[train.stage2]\n{key} = {toml}\n")
    assert getattr(cli._train_config(2, path, [], TRAIN_GIVEN), key) == value
    assert getattr(cli._train_config(1, path, [], TRAIN_GIVEN), key) == (default if key != "epochs" else 200)  # another stage's table
    assert getattr(cli._train_config(2, path, [f"{key}={override}"], TRAIN_GIVEN), key) == overridden
    assert getattr(cli._train_config(2, path, [f"train.stage2.{key}={override}"], TRAIN_GIVEN), key) == overridden
    # [train] applies to every stage; a stage's table wins over it
    both = _recipe(tmp_path, f"[train]\n{key} = {toml}\n[train.stage3]\n{key} = {_toml(override)}\n")
    assert getattr(cli._train_config(1, both, [], TRAIN_GIVEN), key) == value
    assert getattr(cli._train_config(3, both, [], TRAIN_GIVEN), key) == overridden


@pytest.mark.parametrize("key", list(GROWTH_CASES))
def test_growth_key_is_resolved_and_overridden_by_set(key: str, tmp_path: Path):
    toml, value, override, overridden = GROWTH_CASES[key]
    path = _recipe(tmp_path, f"[growth]\n{key} = {toml}\n")
    assert getattr(cli._growth_settings(path, [])[0], key) == value
    assert getattr(cli._growth_settings(path, [f"{key}={override}"])[0], key) == overridden
    assert getattr(cli._growth_settings(path, [f"growth.{key}={override}"])[0], key) == overridden


def test_command_line_options_win_over_the_recipe(tmp_path: Path):
    path = _recipe(tmp_path, "[growth]\nexperts = 117\ngroups = 8\nextra_blocks = 2\n[train]\nmax_steps = 5\nseed = 3\n")
    settings, _ = cli._growth_settings(path, ["experts=100"], experts=13, groups="4", extra_blocks=None)
    assert (settings.experts, settings.groups, settings.extra_blocks) == (13, "4", 2)
    cfg = cli._train_config(1, path, [], dict(TRAIN_GIVEN, max_steps=9, seed=None))
    assert (cfg.max_steps, cfg.seed) == (9, 3)


BAD = {
    "unknown-key": ("[train]\nlearning_rate = 0.1\n", [], "unknown key train.learning_rate"),
    "unknown-table": ("[training]\nlr = 0.1\n", [], "unknown table [training]"),
    "unknown-stage": ("[train.stage4]\nlr = 0.1\n", [], "[train.stage4]"),
    "wrong-type": ("[train]\nbatch_size = 2.5\n", [], "batch_size"),
    "out-of-range": ("", ["momentum=1.5"], "momentum"),
    "not-finite": ("", ["warmup=nan"], "warmup"),
    "zero-lr": ("", ["lr=0"], "lr"),
    "path-key": ("[train]\ndata = \"x\"\n", [], "unknown key train.data"),
    "bad-precision": ("", ["precision=fp16"], "fp16"),
    "bad-set": ("", ["lr"], "--set 'lr'"),
    "not-toml": ("[train\n", [], "not valid TOML"),
    "set-into-value": ("", ["lr=1", "train.stage1.lr.x=2"], "not a section"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_recipe_is_one_line_naming_the_key(case: str, tmp_path: Path):
    text, overrides, words = BAD[case]
    path = _recipe(tmp_path, text)
    with pytest.raises(SamoeError, match=None) as e:
        cli._train_config(1, path, overrides, TRAIN_GIVEN)
    assert words in str(e.value) and "\n" not in str(e.value)


def test_growth_recipe_errors_name_the_key(tmp_path: Path):
    for overrides, words in ((["init=copy"], "init"), (["noise_std=-1"], "noise_std"), (["interp_weight=2"], "interp_weight"),
                             (["verify_images=0"], "verify_images"), (["groups=[4, 1.5]"], "groups")):
        with pytest.raises(SamoeError) as e:
            cli._growth_settings(None, ["experts=16", "groups=4", *overrides])[0].spec(4, 0)
        assert words in str(e.value), (overrides, e.value)


def test_a_huge_recipe_is_refused_before_parsing(tmp_path: Path):
    path = _recipe(tmp_path, "# " + "x" * (2**20) + "\n")
    with pytest.raises(SamoeError, match="more than the 1048576"):
        load_recipe(path, [], "train")


def test_a_fifo_or_missing_recipe_is_refused_without_blocking(tmp_path: Path):
    import os

    os.mkfifo(tmp_path / "fifo.toml")
    with pytest.raises(SamoeError, match="not a regular file"):
        load_recipe(tmp_path / "fifo.toml", [], "train")
    with pytest.raises(SamoeError, match="missing.toml is missing"):
        load_recipe(tmp_path / "missing.toml", [], "train")


def test_shipped_recipes_resolve(tmp_path: Path):
    root = Path(__file__).resolve().parents[1] / "recipes"
    for path in sorted(root.glob("*.toml")):
        for stage in (1, 2, 3):
            cli._train_config(stage, path, [], TRAIN_GIVEN)
        settings, _ = cli._growth_settings(path, [])
        if settings.experts:
            settings.spec(16 if path.name == "10b.toml" else 4, 0)
    ten = cli._growth_settings(root / "10b.toml", [])[0].spec(16, 0)
    assert (ten.experts, ten.groups, ten.extra_blocks) == (117, (16, 15, 15, 15, 14, 14, 14, 14), 1)


def test_train_records_the_resolved_recipe_in_the_lineage_and_inspect_shows_it(tmp_path: Path, tiny_trained_from_recipe):
    final, recipe_path = tiny_trained_from_recipe
    meta = json.loads((final / "samoe.json").read_text())
    recorded = meta["lineage"][-1]["recipe"]
    given = dict(TRAIN_GIVEN, max_steps=1, seed=4)
    assert recorded == cli._train_config(3, recipe_path, ["batch_size=2", "checkpoint_every=1"], given).recipe()
    assert (recorded["lr"], recorded["momentum"], recorded["weight_decay"], recorded["batch_size"]) == (0.01, 0.8, 1e-4, 2)
    assert set(recorded) == set(TRAIN_CASES)
    res = CliRunner().invoke(cli.app, ["inspect-checkpoint", str(final)])
    assert res.exit_code == 0, res.output
    assert "recipe: " in res.output and "momentum=0.8" in res.output


@pytest.fixture(scope="module")
def tiny_trained_from_recipe(tmp_path_factory: pytest.TempPathFactory):
    from stages.data import make_demo_data
    from upscale.config import PRESETS
    from upscale.create import init_from_preset
    import torch

    root = tmp_path_factory.mktemp("recipe")
    make_demo_data(root / "data", labelled=2, unlabelled=0, test=0, size=128, seed=0)
    src = init_from_preset(PRESETS["tiny"], root / "src", 0, torch.float32, ["samoe", "init"], False)
    recipe_path = root / "r.toml"
    recipe_path.write_text("[train]\nlr = 0.01\nmomentum = 0.8\n[train.stage3]\nweight_decay = 1e-4\n")
    res = CliRunner().invoke(cli.app, ["train", "--stage", "3", "--recipe", str(recipe_path), "--from", str(src),
                                       "--run-dir", str(root / "run"), "--data", str(root / "data" / "A"), "--set", "max_steps=1",
                                       "--seed", "4", "--set", "batch_size=2", "--set", "checkpoint_every=1", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    return root / "run" / "final", recipe_path
