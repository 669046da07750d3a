"""Tests for `samoe plan` and `samoe expand` through the installed console script.

Oracles: parameter counts and group sizes worked by hand from the growth rule,
`inspect-checkpoint` of a real expand against `plan` for the same options, the
source checkpoint's digest and lineage, and the CLI contract (bad input -> one
`error:` line on stderr, exit code 2, nothing written).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

import upscale
from upscale import Checkpoint
from upscale.config import PRESETS
from upscale.create import init_from_preset
from upscale.growth import GrowthRecipe
from upscale.recipe import defaults

SAMOE = str(Path(sys.executable).with_name("samoe"))
ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", COLUMNS="200")


def _run(args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([SAMOE, *args], capture_output=True, text=True, env=ENV, timeout=timeout)


def _parallel(chains: list[list[tuple[str, list[str]]]]) -> dict[str, subprocess.CompletedProcess]:
    """Each call spends seconds importing torch: run chains side by side (calls in a chain in order)."""
    def run_chain(chain):
        return [(key, _run(args)) for key, args in chain]

    with ThreadPoolExecutor(max_workers=2) as pool:
        return {key: proc for done in pool.map(run_chain, chains) for key, proc in done}


pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]  # real samoe processes (expand, plan, inspect and 15 bad options)


@pytest.fixture(scope="module")
def src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("source") / "tiny"
    return init_from_preset(PRESETS["tiny"], out, 0, torch.float32, ["samoe", "init", "--preset", "tiny"], False)


# --------------------------------------------------------------------------- 5, 8: plan, real expand, lineage


GROW = ["--experts", "13", "--groups", "4", "--extra-blocks", "1"]


@pytest.fixture(scope="module")
def runs(src: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Every CLI call of this file, in one pool: the good ones and the bad-option cases."""
    out = tmp_path_factory.mktemp("grown") / "g"
    expand_args = ["expand", str(src), "--out", str(out), *GROW, "--set", "noise_std=0", "--seed", "7", "--set", "threads=3", "--json"]
    chains = [
        [("expand", expand_args), ("inspect", ["inspect-checkpoint", str(out), "--json"])],
        [("plan-1.5b", ["plan", "--preset", "sam-moe-1.5b", "--experts", "117", "--groups", "8", "--extra-blocks", "1", "--json"])],
        [("plan-tiny", ["plan", str(src), *GROW, "--json"])],
    ]
    bad_outs = _bad_cases(src, tmp_path_factory.mktemp("bad"), chains)
    return dict(results=_parallel(chains), out=out, expand_args=expand_args, bad_outs=bad_outs)


def _json_ok(proc: subprocess.CompletedProcess) -> dict:
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_plan_sam_moe_1_5b_to_117_experts_is_about_10b(runs):
    report = _json_ok(runs["results"]["plan-1.5b"])
    assert 10.2e9 <= report["total_params"] <= 10.4e9, report["total_params"]
    layers = report["groups"]
    # 9 encoder MoE blocks (15..23) + 1 extra block + 2 decoder layers
    assert len(layers) == 12 and report["num_blocks"] == 25 and report["extra_blocks"] == 1
    assert all(g == [16, 15, 15, 15, 14, 14, 14, 14] for g in layers.values())
    assert set(report["experts_per_layer"].values()) == {117}
    assert 1.4e9 < report["source_params"] < 1.6e9


def test_plan_matches_a_real_expand(runs):
    plan = _json_ok(runs["results"]["plan-tiny"])
    inspected = _json_ok(runs["results"]["inspect"])
    expanded = _json_ok(runs["results"]["expand"])["checkpoint"]
    assert inspected["total_params"] == plan["total_params"] == expanded["total_params"]
    assert inspected["params_by_component"] == plan["params_by_component"]
    assert inspected["groups"] == plan["groups"] and set(map(tuple, plan["groups"].values())) == {(4, 3, 3, 3)}
    assert inspected["num_blocks"] == plan["num_blocks"] == 5


def test_expand_records_lineage(runs, src):
    assert runs["results"]["expand"].returncode == 0, runs["results"]["expand"].stderr
    meta = json.loads((runs["out"] / "samoe.json").read_text())
    parent = Checkpoint.open(src)
    assert meta["lineage"][:-1] == parent.lineage
    last = meta["lineage"][-1]
    assert last["parent_digest"] == parent.digest
    assert last["parent"] == str(src.resolve())
    assert last["command"] == " ".join(["samoe", *runs["expand_args"]])
    assert last["seed"] == 7
    assert last["version"] == upscale.__version__
    # the resolved [growth] settings: the options and --set given, the defaults for the rest
    assert last["recipe"] == {**defaults(GrowthRecipe), "experts": 13, "groups": "4", "extra_blocks": 1, "noise_std": 0.0,
                              "threads": 3}
    assert "Traceback" not in runs["results"]["expand"].stderr


def test_expanded_checkpoint_preserves_source_function(runs, src):
    x = torch.randn(2, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = upscale.load_model(src).eval()(x)
        b = upscale.load_model(runs["out"]).eval()(x)
    for h in ("seg", "sdf", "boundary"):
        assert float((a[h] - b[h]).norm() / a[h].norm()) <= 1e-5


# --------------------------------------------------------------------------- 7: bad options


# (extra args, words the message must contain); source and --out are added per case. Each call costs
# seconds of torch import, so only the CLI contract is checked here: the validation rules themselves are
# covered case by case in tests/test_expand.py (test_resolve_groups_rejects).
VALID = ["--experts", "13", "--groups", "4"]
BAD = {
    "fewer-experts": (["--experts", "3"], "fewer"),
    "groups-sum": (["--experts", "13", "--groups", "4,3,3,2"], "sums to 12"),
    "core-too-small": (["--experts", "13", "--groups", "3,5,5"], "core group"),
    "core-too-large": (["--experts", "13", "--groups", "5,4,4"], "core group"),
    "negative-noise": ([*VALID, "--set", "noise_std=-0.1"], "noise_std"),
    "interp-weight": ([*VALID, "--set", "init=interpolate", "--set", "interp_weight=1.5"], "interp_weight"),
    "unknown-key": ([*VALID, "--set", "reinit_ratio=0.5"], "unknown key growth.reinit_ratio"),
    "core-groups-3": ([*VALID, "--set", "core_groups=3"], "core_groups"),
    "replicate-experts": (["--experts", "13", "--groups", "4", "--set", "replicate=true"], "pass --experts 16"),
    "replicate-noise": (["--experts", "16", "--groups", "4", "--set", "replicate=true", "--set", "noise_std=0.1"], "drop init and noise_std"),
    "replicate-core-groups": (["--experts", "16", "--groups", "4", "--set", "replicate=true", "--set", "core_groups=2"], "no core group"),
    "bad-recipe-value": ([*VALID, "--set", "extra_blocks=one"], "extra_blocks"),
    "existing-out": (VALID, "already exists"),
    "source-empty-dir": (VALID, "not a samoe checkpoint"),
    "source-file": (VALID, "is a file"),
}


def _bad_cases(src: Path, root: Path, chains: list) -> dict[str, tuple[Path, Path]]:
    """Set up each bad case in its own folder; append its call to `chains`; return (parent, out) per case."""
    outs = {}
    for case, (extra, _) in BAD.items():
        parent = root / case
        parent.mkdir()
        out = parent / "grown"
        source = src
        if case == "existing-out":
            out.mkdir()
            (out / "keep.txt").write_text("mine")
        elif case == "source-empty-dir":
            source = parent / "empty"
            source.mkdir()
        elif case == "source-file":
            source = parent / "model.safetensors"
            source.write_bytes(b"not a checkpoint")
        outs[case] = (parent, out)
        chains.append([(case, ["expand", str(source), "--out", str(out), *extra])])
    return outs


@pytest.mark.parametrize("case", list(BAD))
def test_bad_option_is_one_error_line_and_writes_nothing(case, runs):
    proc = runs["results"][case]
    parent, out = runs["bad_outs"][case]
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
    assert BAD[case][1] in lines[0], lines[0]
    assert "Traceback" not in proc.stderr + proc.stdout
    if case == "existing-out":
        assert sorted(p.name for p in out.iterdir()) == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
    else:
        assert not out.exists()
    assert not list(parent.glob(".grown.tmp-*")) and not list(parent.glob(".grown.*"))


def test_routing_summary_names_the_new_groups_options_only_where_there_are_new_groups():
    from cli import _routing_summary

    report = {"core_groups": 1, "top_k": 2, "top_k_groups": 1, "routed_top_k": 1}
    assert _routing_summary(report, routed=True) == "core groups 1, top-k 2, top-k groups 1, top-k in a new group 1"
    assert _routing_summary(report, routed=False) == "core groups 1, top-k 2, top-k groups 1"
    replicas = {"core_groups": 0, "top_k": 2, "top_k_groups": 1, "routed_top_k": 2, "replicas": True}
    assert _routing_summary(replicas, routed=True) == ("core groups 0, top-k 2, top-k groups 1, top-k in a new group 2, "
                                                       "groups are replicas of the source's experts")
