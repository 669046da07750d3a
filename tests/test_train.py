"""End-to-end tests of `samoe train` (three stages) and `samoe pseudo-label`.

Oracles: the stage table of stages/plan.py re-derived here from `samoe.json`
provenance (what must stay bit-identical, what must move), the tensors read
back from the checkpoints, optimizer-state keys, the exit-code contract of
cli.py (bad input: one line on stderr, exit 2; SIGTERM: checkpoint, resume
hint, 128 + 15), exact resume (a run killed with SIGKILL and re-run equals an
uninterrupted run bit for bit), and the ramp formulas of seed 004 worked by
hand. The CLI runs in-process (typer's runner: real exit codes and stderr)
except where a real process must be killed.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch.utils.data import default_collate
from typer.testing import CliRunner

import cli
from stages.data import LabelledFolder, read_confidence, read_mask
from stages.engine import apply_stage, train_step
from stages.optim import build_optimizers
from stages.semisup import sigmoid_rampup
from upscale import load_model
from upscale.checkpoint import Checkpoint
from upscale.expand import GrowthSpec, expand_checkpoint, resolve_groups
from conftest import one_error_line

SAMOE = Path(sys.executable).with_name("samoe")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "COLUMNS": "120"}
SEED004 = ("selector.", "gating.")


# --------------------------------------------------------------------------- helpers and fixtures


pytestmark = pytest.mark.usefixtures("one_thread")


def samoe(*args):
    """Run the CLI in-process; returns typer's Result (exit_code, stdout, stderr)."""
    return CliRunner().invoke(cli.app, [str(a) for a in args])


def train(*args):
    return samoe("train", "--set", "batch_size=4", *args)


def tensors(path: Path) -> dict[str, torch.Tensor]:
    return dict(Checkpoint.open(path).iter_tensors())


def param_names(path: Path) -> set[str]:
    return {n for n, _ in load_model(path).named_parameters()}


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def latest_step(run: Path) -> int:
    try:
        text = (run / "checkpoints" / "latest").read_text().strip()
    except OSError:
        return 0
    return int(text.split("-")[1]) if text.startswith("step-") else 0


def single_routed_group(cfg) -> bool:
    """With one routed group the group router's softmax is constantly 1: group_gate never gets gradient."""
    return len(cfg.moe.groups) - cfg.moe.core_groups == 1


@pytest.fixture(scope="module")
def grown(src: Path, tmp_path_factory) -> Path:
    spec = GrowthSpec(experts=8, groups=resolve_groups(4, 8, "2", 1), extra_blocks=1, noise_std=0.01)
    return expand_checkpoint(src, tmp_path_factory.mktemp("grown") / "g", spec, ["test"])


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="module")
def stage1(grown: Path, data: Path, runs: Path) -> Path:
    run = runs / "s1"
    res = train("--stage", 1, "--set", "lr=0.01", "--from", grown, "--run-dir", run, "--data", data / "A", "--set", "max_steps=3",
                "--set", "checkpoint_every=1")
    assert res.exit_code == 0, res.stderr
    return run


@pytest.fixture(scope="module")
def stage2(stage1: Path, data: Path, runs: Path) -> Path:
    run = runs / "s2"
    res = train("--stage", 2, "--set", "lr=0.01", "--from", stage1 / "final", "--run-dir", run, "--data", data / "A", "--set", "max_steps=3",
                "--set", "last_k=1")
    assert res.exit_code == 0, res.stderr
    return run


@pytest.fixture(scope="module")
def stage3(stage2: Path, data: Path, runs: Path) -> Path:
    run = runs / "s3"
    res = train("--stage", 3, "--set", "lr=0.01", "--from", stage2 / "final", "--run-dir", run, "--data", data / "A", "--set", "max_steps=3",
                "--set", "checkpoint_every=2")
    assert res.exit_code == 0, res.stderr
    return run


# --------------------------------------------------------------------------- stage 1


def test_stage1_freezes_source_and_trains_new_parts(grown: Path, stage1: Path):
    """The growth plan's stage 1: every source tensor except routers is bit-identical, the selector and gating
    model included; every new tensor and router moves; the checkpoints hold no task-loss weights (training state)."""
    prov = Checkpoint.open(grown).provenance
    before, after = tensors(grown), tensors(stage1 / "final")
    params = param_names(grown)
    assert set(before) == set(after)
    frozen = [n for n in before if n in params and prov[n] == "source" and ".router." not in n]
    assert len(frozen) > 150
    assert any(n.startswith("selector.") for n in frozen) and any(n.startswith("gating.") for n in frozen)
    moved = [n for n in frozen if not torch.equal(before[n], after[n])]
    assert not moved, f"frozen source tensors changed in stage 1: {moved}"
    new = [n for n in before if n in params and (prov[n] != "source" or ".router." in n)]
    assert len(new) > 40
    unchanged = sorted(n for n in new if torch.equal(before[n], after[n]))
    assert not unchanged, unchanged
    assert not any(n.startswith("loss.") for n in after)


@pytest.mark.slow  # 5 s: a training run
def test_stage1_can_train_selector_and_gating_on_request(grown: Path, data: Path, runs: Path):
    run = runs / "s1-seed004"
    res = train("--stage", 1, "--set", "lr=0.01", "--from", grown, "--run-dir", run, "--data", data / "A", "--set", "max_steps=2",
                "--set", "selector_gating=true")
    assert res.exit_code == 0, res.stderr
    before, after = tensors(grown), tensors(run / "final")
    for prefix in SEED004:
        names = [n for n in before if n.startswith(prefix) and n in param_names(grown)]
        assert names and any(not torch.equal(before[n], after[n]) for n in names), prefix


def test_metrics_log_routing_engagement_every_step(grown: Path, stage1: Path):
    """metrics.csv carries each MoE layer's new-group weight share and group scales, every step."""
    rows = read_rows(stage1 / "metrics.csv")
    assert [int(r["step"]) for r in rows] == [1, 2, 3]
    model = load_model(grown)
    layers = [n for n, m in model.moe_layers()]
    routed = len(model.config.moe.groups) - model.config.moe.core_groups
    for name in layers:
        assert f"new_share:{name}" in rows[0]
        scales = [k for k in rows[0] if k.startswith(f"group_scale:{name}:")]
        assert len(scales) == routed >= 1
    last = rows[-1]
    # the logged scales are the checkpoint's (after the last step)
    final = tensors(stage1 / "final")
    for name in layers:
        want = final[f"{name}.router.group_scale"].tolist()
        got = [float(last[f"group_scale:{name}:{g}"]) for g in range(len(want))]
        assert got == pytest.approx(want, rel=1e-6, abs=1e-12)
        assert 0.0 <= float(last[f"new_share:{name}"]) <= 1.0
    assert any(float(last[f"new_share:{name}"]) > 0 for name in layers)
    tb = list((stage1 / "tb").rglob("events.out.tfevents.*"))
    assert tb


def test_stage1_optimizer_state_only_for_trainable(grown: Path, stage1: Path):
    steps = sorted(p.name for p in (stage1 / "checkpoints").glob("step-*"))
    assert steps == ["step-1", "step-2"]  # --keep 2; the last step is saved as final/, not as a step checkpoint
    assert (stage1 / "checkpoints" / "latest").read_text().strip() == "step-2"
    prov = Checkpoint.open(grown).provenance
    params = param_names(grown)
    trainable = {n for n in params if prov[n] != "source" or ".router." in n} | {"loss.log_vars"}
    keys = load_file(str(stage1 / "checkpoints" / "step-2" / "optimizer.safetensors")).keys()
    by_opt: dict[str, set[str]] = {}
    for k in keys:
        opt, rest = k.split(".", 1)
        by_opt.setdefault(opt, set()).add(rest.rpartition(".")[0])
    named = set().union(*by_opt.values())
    assert named == trainable
    assert by_opt["optimizer2"] == {"loss.log_vars"}
    assert "optimizer3" not in by_opt  # the gating model is a source part: frozen in stage 1
    assert not any(n.startswith(("gating.", "loss.", "selector.")) for n in by_opt["optimizer1"])
    state = json.loads((stage1 / "checkpoints" / "step-2" / "trainer_state.json").read_text())
    assert state["step"] == 2
    g = {x["name"]: x for x in state["optimizers"]["optimizer1"]}
    assert g["selector"]["lr"] == pytest.approx(5 * g["backbone"]["lr"])
    assert g["backbone"]["weight_decay"] == pytest.approx(5e-5)
    assert state["optimizers"]["optimizer2"][0]["lr"] == 0.05
    assert len(state["task_loss"]) == 3 and state["task_loss"] != [1.0, 1.0, 1.0]  # the sigmas train, saved as JSON
    # the step checkpoint is itself a loadable model
    load_model(stage1 / "checkpoints" / "step-2" / "model")


def _stage1_grads(grown: Path, data: Path, steps: int = 2) -> tuple[dict[str, bool], object]:
    """Which trainable parameters had a non-zero gradient in the supervised phase of the last of `steps` steps."""
    model = load_model(grown)
    apply_stage(model, Checkpoint.open(grown).provenance, 1, 4)
    model.selector.set_alpha(sigmoid_rampup(0, 1.0))
    opts = build_optimizers(model, 1e-2)
    folder = LabelledFolder(data / "A", 4, size=128)
    for s in range(steps):
        batch = default_collate([folder[i] for i in range(4 * (s % 2), 4 * (s % 2) + 4)])
        train_step(model, opts, batch, None, 1.0, 0.01, False, s)
    nonzero = {n: p.grad is not None and bool(p.grad.abs().sum() > 0) for n, p in model.named_parameters() if p.requires_grad}
    return nonzero, model.config


def test_stage1_every_new_part_gets_gradient(grown: Path, data: Path):
    """moe.py: group_scale gets gradient from step 1; after that every router, new group and new expert does."""
    first, cfg = _stage1_grads(grown, data, steps=1)
    scales = [n for n in first if n.endswith(".router.group_scale")]
    assert len(scales) == 5  # encoder blocks 2, 3, extra block 4, decoder layers 0, 1
    assert all(first[n] for n in scales), [n for n in scales if not first[n]]
    nonzero, _ = _stage1_grads(grown, data, steps=2)
    missing = {n for n, ok in nonzero.items() if not ok}
    # With one routed group (8 experts as 4 + 4, one core group) the group router's softmax is constantly 1:
    # group_gate can never get gradient. Everything else must.
    assert single_routed_group(cfg)
    assert missing == {n for n in nonzero if n.endswith(".router.group_gate.weight")}
    # regression: the extra block's routed experts are not stuck at a zero saddle (w2 = 0 and group_scale = 0)
    assert nonzero["image_encoder.blocks.4.mlp.experts.1.w2"] and nonzero["image_encoder.blocks.4.mlp.router.group_scale"]


# --------------------------------------------------------------------------- stages 2 and 3


def test_stage2_unfreezes_last_k_block_mlp_only(grown: Path, stage1: Path, stage2: Path):
    prov = Checkpoint.open(grown).provenance
    before, after = tensors(stage1 / "final"), tensors(stage2 / "final")
    params = param_names(grown)
    last = [n for n in params if n.startswith("image_encoder.blocks.3.mlp.")]
    assert len(last) >= 10 and any(prov[n] == "source" and ".router." not in n for n in last)
    if single_routed_group(Checkpoint.open(grown).config):  # never gets gradient (see test above)
        last = [n for n in last if not n.endswith(".router.group_gate.weight")]
    still = [n for n in last if torch.equal(before[n], after[n])]
    assert not still, still
    frozen = [n for n in before if prov[n] == "source" and ".router." not in n and not n.startswith(SEED004)
              and not n.startswith("image_encoder.blocks.3.mlp.")]
    assert any(n.startswith("image_encoder.blocks.0.") for n in frozen)
    assert any(n.startswith("image_encoder.blocks.2.mlp.") for n in frozen)
    assert "image_encoder.blocks.3.attn.qkv.weight" in frozen
    moved = [n for n in frozen if not torch.equal(before[n], after[n])]
    assert not moved, moved
    hist = Checkpoint.open(stage2 / "final").stages
    assert [s["stage"] for s in hist] == [1, 2] and hist[1]["last_k"] == 1


def test_stage3_trains_everything(grown: Path, stage2: Path, stage3: Path):
    before, after = tensors(stage2 / "final"), tensors(stage3 / "final")
    params = param_names(grown)
    changed = [n for n in params if not torch.equal(before[n], after[n])]
    assert len(changed) / len(params) > 0.8, sorted(set(params) - set(changed))
    for n in ("image_encoder.patch_embed.proj.weight", "image_encoder.blocks.0.attn.qkv.weight",
              "image_encoder.blocks.0.mlp.lin1.weight", "image_encoder.blocks.2.mlp.experts.0.w1",
              "mask_decoder.output_upscaling.0.weight", "image_encoder.neck.0.weight"):
        assert n in changed, n
    # every parameter is in an optimizer and has state (nothing frozen)
    keys = load_file(str(stage3 / "checkpoints" / "step-2" / "optimizer.safetensors")).keys()
    named = {k.split(".", 1)[1].rpartition(".")[0] for k in keys}
    assert named == params | {"loss.log_vars"}


def test_inspect_shows_stage_history(stage3: Path):
    res = samoe("inspect-checkpoint", stage3 / "final", "--json")
    assert res.exit_code == 0, res.stderr
    report = json.loads(res.stdout)
    assert [s["stage"] for s in report["stages"]] == [1, 2, 3]
    assert [s["steps"] for s in report["stages"]] == [3, 3, 3]


# --------------------------------------------------------------------------- stage input checks


def test_stage_input_checks(src: Path, grown: Path, stage1: Path, data: Path, runs: Path):
    r = runs / "bad2"
    one_error_line(train("--stage", 2, "--set", "lr=0.01", "--from", grown, "--run-dir", r, "--data", data / "A", "--set", "max_steps=1"),
                   "stage 1", "--skip-stage-check")
    assert not r.exists()  # a refused run writes nothing
    r1 = runs / "bad1"
    one_error_line(train("--stage", 1, "--set", "lr=0.01", "--from", src, "--run-dir", r1, "--data", data / "A", "--set", "max_steps=1"),
                   "never grown", "--skip-stage-check")
    assert not r1.exists()
    one_error_line(train("--stage", 3, "--set", "lr=0.01", "--from", stage1 / "final", "--run-dir", runs / "bad3", "--data", data / "A",
                         "--set", "max_steps=1"), "stage 2")
    # --force only starts a run again: it does not skip the check
    one_error_line(train("--stage", 2, "--set", "lr=0.01", "--from", grown, "--run-dir", r, "--data", data / "A", "--set", "max_steps=1",
                         "--force"), "stage 1")
    res = train("--stage", 2, "--set", "lr=0.01", "--from", grown, "--run-dir", r, "--data", data / "A", "--set", "max_steps=1",
                "--skip-stage-check")
    assert res.exit_code == 0, res.stderr
    assert (r / "final" / "samoe.json").exists()
    res = train("--stage", 1, "--set", "lr=0.01", "--from", src, "--run-dir", r1, "--data", data / "A", "--set", "max_steps=1",
                "--skip-stage-check")
    assert res.exit_code == 0, res.stderr


def test_stage_learning_rates_follow_the_sources_recorded_rate(src: Path, data: Path, runs: Path):
    """With no lr each stage's rate is its scale (1, 0.3, 0.1 by default; lr_scale) times the peak rate the
    source was trained at, read from the source's stage history -- not from stages trained after growth."""
    source = runs / "lr-src"
    res = train("--stage", 3, "--set", "lr=0.05", "--from", src, "--run-dir", source, "--data", data / "A", "--set", "max_steps=1")
    assert res.exit_code == 0, res.stderr
    g = expand_checkpoint(source / "final", runs / "lr-grown", GrowthSpec(experts=8, groups=resolve_groups(4, 8, "2", 1)),
                          ["test"])
    lrs = []
    previous = g
    for stage in (1, 2, 3):
        run = runs / f"lr-s{stage}"
        res = train("--stage", stage, "--from", previous, "--run-dir", run, "--data", data / "A", "--set", "max_steps=1")
        assert res.exit_code == 0, res.stderr
        entry = Checkpoint.open(run / "final").stages[-1]
        lrs.append(entry["lr"])
        assert entry["reference_lr"] == 0.05
        previous = run / "final"
    assert lrs == pytest.approx([0.05, 0.015, 0.005])
    res = train("--stage", 1, "--set", "lr_scale=2", "--from", g, "--run-dir", runs / "lr-scaled", "--data", data / "A",
                "--set", "max_steps=1")
    assert res.exit_code == 0, res.stderr
    assert Checkpoint.open(runs / "lr-scaled" / "final").stages[-1]["lr"] == pytest.approx(0.1)
    # a source that records no rate (a fresh init) needs --lr, and nothing is written
    one_error_line(train("--stage", 3, "--from", src, "--run-dir", runs / "lr-none", "--data", data / "A",
                         "--set", "max_steps=1"), "records no learning rate", "lr=")
    assert not (runs / "lr-none").exists()


# --------------------------------------------------------------------------- resume


def _resume_args(grown: Path, data: Path, run: Path) -> list[str]:
    return ["train", "--stage", "1", "--set", "lr=0.01", "--from", str(grown), "--run-dir", str(run), "--data", str(data / "A"),
            "--unlabelled", str(data / "B"), "--set", "max_steps=8", "--set", "checkpoint_every=3", "--set", "batch_size=4"]


@pytest.fixture(scope="module")
def resumed(grown: Path, data: Path, runs: Path) -> tuple[Path, Path, int | None]:
    """Run B is SIGKILLed after a mid-epoch checkpoint and re-run; run A is the same command uninterrupted."""
    run_a, run_b = runs / "resume-a", runs / "resume-b"
    proc = subprocess.Popen([str(SAMOE), *_resume_args(grown, data, run_b)], env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        res = samoe(*_resume_args(grown, data, run_a))  # meanwhile, the reference run (in-process)
        assert res.exit_code == 0, res.stderr
        killed_at = None
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline:
            if latest_step(run_b) >= 3:  # step 3 is mid-epoch (2 steps per epoch)
                proc.send_signal(signal.SIGKILL)
                killed_at = latest_step(run_b)
                break
            time.sleep(0.005)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    err = proc.stderr.read().decode()
    proc.stderr.close()
    if killed_at is not None:
        assert proc.returncode == -signal.SIGKILL
        assert not (run_b / "final").exists()
        res = samoe(*_resume_args(grown, data, run_b))  # the identical command resumes
        assert res.exit_code == 0, res.stderr
        assert "resuming from" in res.stdout
    else:  # finished before we could kill it: still compare
        assert proc.returncode == 0, err
    return run_a, run_b, killed_at


@pytest.mark.slow  # 13 s: a real samoe process killed and resumed
def test_exact_resume_after_sigkill(resumed):
    run_a, run_b, killed_at = resumed
    a, b = tensors(run_a / "final"), tensors(run_b / "final")
    assert set(a) == set(b)
    diff = [n for n in a if not torch.equal(a[n], b[n])]
    assert not diff, f"resume (killed after step {killed_at}) differs: {diff[:5]}"
    rows_a, rows_b = read_rows(run_a / "metrics.csv"), read_rows(run_b / "metrics.csv")
    assert [r["step"] for r in rows_a] == [str(i) for i in range(1, 9)]
    assert rows_a == rows_b
    assert float(rows_a[-1]["loss_unsup"]) != 0.0  # the unlabelled stream was used
    # the selector log's data rows agree (its header: see test_resumed_selector_log_keeps_header)
    lines_a = (run_a / "selector_log.csv").read_text().splitlines()
    lines_b = (run_b / "selector_log.csv").read_text().splitlines()
    assert lines_a[0].startswith("epoch,") and len(lines_a) == 2  # epoch 4 is the last: logged once
    assert [ln for ln in lines_b if not ln.startswith("epoch,")] == lines_a[1:]


@pytest.mark.slow  # its fixture kills and resumes a real samoe process
def test_resumed_selector_log_keeps_header(resumed, tmp_path: Path):
    from stages.engine import SELECTOR_FIELDS, CsvLog
    from upscale.dirfd import Dir
    from upscale.ownership import Owned

    run = Owned.start(Dir.open(tmp_path, "test"), "train")
    log = CsvLog(run, "log.csv", SELECTOR_FIELDS)  # as a process killed before its first row leaves it
    try:
        assert (tmp_path / "log.csv").read_text().splitlines() == [",".join(SELECTOR_FIELDS)]
    finally:
        log.close()
    run_a, run_b, killed_at = resumed
    if killed_at is None:
        pytest.skip("run B finished before it could be killed")
    assert (run_b / "selector_log.csv").read_text() == (run_a / "selector_log.csv").read_text()


@pytest.mark.slow  # 10 s: a real samoe process interrupted
def test_sigterm_saves_and_prints_resume_command(grown: Path, data: Path, runs: Path):
    run = runs / "term"
    args = ["train", "--stage", "1", "--set", "lr=0.01", "--from", str(grown), "--run-dir", str(run), "--data", str(data / "A"),
            "--set", "max_steps=6", "--set", "checkpoint_every=100", "--set", "batch_size=4"]
    proc = subprocess.Popen([str(SAMOE), *args], env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    sent = False
    while proc.poll() is None and time.monotonic() < deadline:
        p = run / "metrics.csv"
        if p.exists() and len(p.read_text().splitlines()) >= 2:  # inside the loop: handlers are installed
            proc.send_signal(signal.SIGTERM)
            sent = True
            break
        time.sleep(0.01)
    _, err = proc.communicate(timeout=120)
    assert sent, f"run ended before SIGTERM could be sent: rc {proc.returncode} {err}"
    assert proc.returncode == 128 + signal.SIGTERM, err
    m = re.search(r"saved (\S+); resume with: (.+)$", err.strip().splitlines()[-1])
    assert m, err
    step_dir, command = Path(m.group(1)), shlex.split(m.group(2))
    assert step_dir.parent == run / "checkpoints" and step_dir.name.startswith("step-")
    steps_done = int(step_dir.name.split("-")[1])
    assert 1 <= steps_done < 6
    assert (run / "checkpoints" / "latest").read_text().strip() == step_dir.name
    model = load_model(step_dir / "model")
    assert sum(p.numel() for p in model.parameters()) > 0
    assert not (run / "final").exists()
    assert command[0] == "samoe" and command[1:] == args
    res = samoe(*command[1:])
    assert res.exit_code == 0, res.stderr
    assert (run / "final" / "samoe.json").exists()
    rows = read_rows(run / "metrics.csv")
    assert [int(r["step"]) for r in rows] == list(range(1, 7))
    assert Checkpoint.open(run / "final").stages[-1]["steps"] == 6


# --------------------------------------------------------------------------- selector log and ramps


def test_selector_log_every_5_epochs(grown: Path, data: Path, runs: Path):
    small = runs / "four"
    for sub in ("images", "masks"):
        (small / sub).mkdir(parents=True)
        for f in sorted((data / "A" / sub).iterdir())[:4]:
            shutil.copy(f, small / sub / f.name)
    run = runs / "sel"
    # --timeline 20 makes both ramps non-trivial at epochs 5 and 10: T_alpha = 20*10/20 = 10, T_unsup = 80*10/20 = 40
    res = train("--stage", 1, "--set", "lr=0.01", "--from", grown, "--run-dir", run, "--data", small, "--set", "epochs=10", "--set", "log_every=5",
                "--set", "timeline=20")
    assert res.exit_code == 0, res.stderr
    rows = read_rows(run / "selector_log.csv")
    assert list(rows[0].keys()) == ["epoch", "alpha", "unsup_weight", "selector_mean", "selector_std"]
    assert [int(r["epoch"]) for r in rows] == [5, 10]
    for r in rows:
        e = int(r["epoch"]) - 1  # the 0-based epoch the logged values were used in
        assert float(r["alpha"]) == pytest.approx(sigmoid_rampup(e, 10.0), rel=1e-7)
        assert float(r["unsup_weight"]) == pytest.approx(sigmoid_rampup(e, 40.0), rel=1e-7)
        assert 0.0 < float(r["selector_mean"]) < 1.0 and float(r["selector_std"]) > 0.0
    assert float(rows[0]["alpha"]) == pytest.approx(math.exp(-1.8))
    assert float(rows[1]["unsup_weight"]) == pytest.approx(math.exp(-5 * (31 / 40) ** 2))
    metrics = read_rows(run / "metrics.csv")
    assert [int(m["epoch"]) for m in metrics] == list(range(10))  # 1 step per epoch
    for m in metrics:
        assert float(m["alpha"]) == pytest.approx(sigmoid_rampup(int(m["epoch"]), 10.0), rel=1e-7)
    assert "epoch 5: alpha" in res.stdout and "epoch 10: alpha" in res.stdout
    # the final checkpoint carries the selector's alpha at the end of the ramp
    assert float(tensors(run / "final")["selector.selectors.seg_scale1.alpha"]) == pytest.approx(1.0)


def test_continued_run_keeps_the_sources_alpha(stage1: Path, stage2: Path, data: Path, runs: Path):
    """A stage that starts from a ramped model keeps alpha at 1: ramping from 0 again would change its function."""
    assert float(tensors(stage1 / "final")["selector.selectors.seg_scale1.alpha"]) == 1.0
    assert {float(m["alpha"]) for m in read_rows(stage2 / "metrics.csv")} == {1.0}
    run = runs / "restarted"
    res = train("--stage", 2, "--set", "lr=0.01", "--from", stage1 / "final", "--run-dir", run, "--data", data / "A", "--set", "max_steps=2",
                "--set", "last_k=1", "--set", "restart_ramps=true")
    assert res.exit_code == 0, res.stderr
    assert [float(m["alpha"]) for m in read_rows(run / "metrics.csv")] == pytest.approx([math.exp(-5)] * 2)


# --------------------------------------------------------------------------- pseudo-labels


@pytest.mark.slow  # 4 s: pseudo-labelling then a training run
def test_pseudo_label_then_stage1(src: Path, grown: Path, data: Path, runs: Path):
    out = runs / "pl"
    res = samoe("pseudo-label", src, "--images", data / "B", "--out", out, "--json")
    assert res.exit_code == 0, res.stderr
    summary = json.loads(res.stdout[res.stdout.index("{"):])
    assert summary["images"] == 8 and summary["labelled"] == 8 and summary["skipped"] == 0
    stems = sorted(p.stem for p in (data / "B" / "images").iterdir())
    assert sorted(p.stem for p in (out / "masks").glob("*.png")) == stems
    assert sorted(p.stem for p in (out / "confidence").glob("*.tif")) == stems
    assert sorted(p.stem for p in (out / "images").iterdir()) == stems
    assert not (out / ".partial").exists()
    for s in stems[:2]:
        mask, conf = read_mask(out / "masks" / f"{s}.png"), read_confidence(out / "confidence" / f"{s}.tif")
        assert mask.shape == conf.shape == (128, 128)
        assert mask.max() < 4
        assert conf.min() >= 0.25 - 1e-6 and conf.max() <= 1.0  # max of 4 probabilities
    res = samoe("pseudo-label", src, "--images", data / "B", "--out", out, "--json")
    assert res.exit_code == 0, res.stderr
    again = json.loads(res.stdout[res.stdout.index("{"):])
    assert again["skipped"] == 8 and again["labelled"] == 0
    res = train("--stage", 1, "--set", "lr=0.01", "--from", grown, "--run-dir", runs / "pl-train", "--data", out, "--set", "max_steps=2")
    assert res.exit_code == 0, res.stderr
    assert (runs / "pl-train" / "final" / "samoe.json").exists()
    # labelled data mixed into the pseudo-labels, with the student's inputs augmented (Noisy Student)
    res = train("--stage", 1, "--set", "lr=0.01", "--from", grown, "--run-dir", runs / "pl-mix", "--data", out, "--data",
                data / "A", "--set", "augment=true", "--set", "max_steps=2")
    assert res.exit_code == 0, res.stderr
    entry = Checkpoint.open(runs / "pl-mix" / "final").stages[-1]
    assert entry["data"] == [str(out), str(data / "A")]
    identity = json.loads((runs / "pl-mix" / "run.json").read_text())["identity"]
    assert identity["augment"] is True and identity["data"] == entry["data"]
    # --tta: the teacher averaged over the 8 symmetries (a symmetric image gives the same labels)
    res = samoe("pseudo-label", src, "--images", data / "B", "--out", runs / "pl-tta", "--tta", "--json")
    assert res.exit_code == 0, res.stderr
    assert len(list((runs / "pl-tta" / "masks").glob("*.png"))) == 8


def test_pseudo_label_threshold_marks_ignore(src: Path, data: Path, runs: Path):
    out = runs / "pl-thr"
    res = samoe("pseudo-label", src, "--images", data / "B", "--out", out, "--threshold", 0.5, "--json")
    assert res.exit_code == 0, res.stderr
    summary = json.loads(res.stdout[res.stdout.index("{"):])
    total = 0
    for p in sorted((out / "masks").glob("*.png")):
        mask, conf = read_mask(p), read_confidence(out / "confidence" / f"{p.stem}.tif")
        assert np.array_equal(mask == 255, conf < 0.5)
        total += int((mask == 255).sum())
    assert summary["ignored_pixels"] == total
    one_error_line(samoe("pseudo-label", src, "--images", data / "B", "--out", runs / "pl-x", "--threshold", 1.5))
    assert summary["kept_fraction"] == pytest.approx(1 - total / (8 * 128 * 128))
    assert "kept" in samoe("pseudo-label", src, "--images", data / "B", "--out", runs / "pl-thr2", "--threshold", 0.5).stdout


def test_all_ignored_pseudo_labels_refused(src: Path, grown: Path, data: Path, runs: Path):
    """A weak teacher with a high threshold can ignore every pixel: stage 1 must refuse, not train on zero losses."""
    out = runs / "pl-all-ignored"
    res = samoe("pseudo-label", src, "--images", data / "B", "--out", out, "--threshold", 1.0, "--json")
    assert res.exit_code == 0, res.stderr
    assert json.loads(res.stdout[res.stdout.index("{"):])["kept_fraction"] == 0.0
    run = runs / "s1-all-ignored"
    res = train("--stage", 1, "--set", "lr=0.01", "--from", grown, "--run-dir", run, "--data", out, "--set", "max_steps=2")
    one_error_line(res, str(out), "--threshold")
    assert not (run / "final").exists()


# --------------------------------------------------------------------------- non-finite loss


def test_nonfinite_loss_stops_with_exit_2(grown: Path, data: Path, runs: Path):
    run = runs / "nan"
    base = ["--stage", 1, "--from", grown, "--data", data / "A", "--set", "max_steps=6", "--set", "lr=1e30", "--set", "checkpoint_every=1"]
    res = train(*base, "--run-dir", run)
    one_error_line(res, "non-finite")
    assert not (run / "final").exists()
    last = latest_step(run)
    if last:
        model = load_model(run / "checkpoints" / f"step-{last}" / "model")
        assert all(torch.isfinite(p).all() for p in model.parameters())
    res = train(*base, "--run-dir", runs / "nan-skip", "--set", "skip_nonfinite=true")
    assert res.exit_code == 0, res.stderr
    assert (runs / "nan-skip" / "final" / "samoe.json").exists()
    rows = read_rows(runs / "nan-skip" / "metrics.csv")
    assert len(rows) == 6 and any(not math.isfinite(float(r["loss"])) for r in rows)
