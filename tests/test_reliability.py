"""Reliability: no path followed out of a directory, ownership by manifest, every command bounded and interruptible.

Each test names the attack it covers (from a hostile review of 2026-12-07); each fails on the code before the fix. Oracles: a snapshot of
a user's folder (kinds, link targets, contents, taken without following links) that must not change, the exit
code contract (bad input: exit 2 and exactly one `error:` line on stderr), CPU time and peak memory bounds,
and the weights an undisturbed run loads. The CLI runs in-process except where a fresh process is the point.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import signal
import stat
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import cli
from stages.data import make_demo_data
from upscale.checkpoint import Checkpoint
from upscale.config import PRESETS
from upscale.create import init_from_preset
from upscale.expand import GrowthSpec, expand_checkpoint, resolve_groups
from upscale.ownership import OWNER_FILE
from conftest import one_error_line

pytestmark = pytest.mark.usefixtures("one_thread")
SAMOE = str(Path(sys.executable).parent / "samoe")


def samoe(*args, env: dict | None = None):
    return CliRunner().invoke(cli.app, [str(a) for a in args], env=env)


def snapshot(root: Path) -> dict[str, tuple]:
    """Every entry under `root`, links not followed: its kind and its content digest or link target."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = os.lstat(p)
            if stat.S_ISLNK(st.st_mode):
                out[str(p.relative_to(root))] = ("link", os.readlink(p))
            elif stat.S_ISREG(st.st_mode):
                out[str(p.relative_to(root))] = ("file", hashlib.sha256(p.read_bytes()).hexdigest())
            else:
                out[str(p.relative_to(root))] = ("dir" if stat.S_ISDIR(st.st_mode) else "other",)
    return out


class Hung(BaseException):
    """Raised by `time_limit`: a BaseException, so no command's error handling can mistake it for bad input."""


@contextmanager
def time_limit(seconds: int):
    """Fail instead of hanging (a FIFO opened for reading blocks until a writer comes)."""
    def alarm(signum, frame):
        raise Hung(f"still running after {seconds} s")

    old = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def cpu_seconds() -> float:
    return time.process_time()


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("reliability")


@pytest.fixture(scope="module")
def data(work: Path) -> Path:
    make_demo_data(work / "data", labelled=4, unlabelled=2, test=0, size=128, seed=0)
    return work / "data"


@pytest.fixture(scope="module")
def src(work: Path) -> Path:
    return init_from_preset(PRESETS["tiny"], work / "src", 0, torch.float32, ["test"], False)


@pytest.fixture(scope="module")
def grown(src: Path, work: Path) -> Path:
    spec = GrowthSpec(experts=6, groups=resolve_groups(4, 6, "2", 1), extra_blocks=0, noise_std=0.01)
    return expand_checkpoint(src, work / "grown", spec, ["test"])


def train_args(grown: Path, data: Path, run: Path) -> list:
    return ["train", "--stage", 1, "--from", grown, "--data", data / "A", "--run-dir", run, "--set", "batch_size=4",
            "--set", "max_steps=2", "--set", "checkpoint_every=1", "--set", "lr=0.01"]


@pytest.fixture(scope="module")
def finished(grown: Path, data: Path, work: Path) -> Path:
    run = work / "finished"
    res = samoe(*train_args(grown, data, run))
    assert res.exit_code == 0, res.stderr
    return run


@pytest.fixture
def stopped(finished: Path, tmp_path: Path) -> Path:
    """A run killed right after its step-1 checkpoint: a copy of the finished run without final/."""
    run = Path(shutil.copytree(finished, tmp_path / "run", symlinks=True))
    shutil.rmtree(run / "final")
    return run


# --------------------------------------------------------------------------- 1. no path followed out of a directory


def test_checkpoints_folder_linked_to_a_users_folder_is_never_written_or_pruned(grown, data, stopped, tmp_path):
    """Case 1: RUN/checkpoints as a symlink to a user's folder; train wrote there and deleted its step-1/."""
    mine = tmp_path / "mine"
    (mine / "step-1").mkdir(parents=True)
    (mine / "step-1" / "thesis.tex").write_text("years of work")
    shutil.rmtree(stopped / "checkpoints")
    (stopped / "checkpoints").symlink_to(mine)
    before = snapshot(mine)
    one_error_line(samoe(*train_args(grown, data, stopped)), "checkpoints")
    assert snapshot(mine) == before


def test_masks_folder_linked_to_a_users_masks_is_never_written(src, data, tmp_path):
    """Case 1: OUT/masks as a symlink; resuming pseudo-label overwrote the user's masks where it pointed."""
    out = tmp_path / "pl"
    assert samoe("pseudo-label", src, "--images", data / "B", "--out", out).exit_code == 0
    mine = Path(shutil.copytree(out / "masks", tmp_path / "mine"))
    next(mine.iterdir()).unlink()  # the rerun has an image to label again
    shutil.rmtree(out / "masks")
    (out / "masks").symlink_to(mine)
    before = snapshot(mine)
    one_error_line(samoe("pseudo-label", src, "--images", data / "B", "--out", out), "masks")
    assert snapshot(mine) == before


def test_latest_as_a_fifo_is_refused_at_once(grown, data, stopped):
    """Case 1: checkpoints/latest as a FIFO; train hung forever holding the run lock."""
    latest = stopped / "checkpoints" / "latest"
    latest.unlink()
    os.mkfifo(latest)
    with time_limit(60):
        one_error_line(samoe(*train_args(grown, data, stopped)), "latest")


# --------------------------------------------------------------------------- 2. ownership by manifest


def test_a_forged_marker_does_not_let_force_delete_a_users_files(tmp_path):
    """Case 2: any .samoe-owner.json with a "command" string counted; demo-data --force deleted a user's files."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    (mine / OWNER_FILE).write_text('{"command": "demo-data"}')
    before = snapshot(mine)
    one_error_line(samoe("demo-data", "--out", mine, "--labelled-scenes", 1, "--unlabelled-scenes", 0, "--test-scenes", 0, "--size", 16,
                         "--force"), str(mine))
    assert snapshot(mine) == before


def test_force_refuses_a_samoe_folder_holding_an_unrecorded_file_and_names_it(tmp_path):
    """Case 2: --force removes exactly what samoe recorded; a folder holding anything else is refused."""
    out = tmp_path / "demo"
    args = ("demo-data", "--out", out, "--labelled-scenes", 1, "--unlabelled-scenes", 0, "--test-scenes", 0, "--size", 16)
    assert samoe(*args).exit_code == 0
    (out / "A" / "notes.txt").write_text("mine")
    before = snapshot(out)
    one_error_line(samoe(*args, "--force"), "A/notes.txt", "did not write")
    assert snapshot(out) == before
    (out / "A" / "notes.txt").unlink()
    assert samoe(*args, "--force").exit_code == 0  # exactly samoe's own: replaced


def test_another_tools_run_json_is_not_a_samoe_run(tmp_path):
    """Case 2: another tool's run.json with an "identity" key counted as a samoe run; init --force deleted it."""
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "run.json").write_text('{"identity": {"tool": "other"}, "source_digest": "x"}')
    (theirs / "results.csv").write_text("a,b\n1,2\n")
    before = snapshot(theirs)
    one_error_line(samoe("init", "--preset", "tiny", "--out", theirs, "--force"), str(theirs))
    assert snapshot(theirs) == before


def test_a_started_run_without_run_json_is_refused_never_restarted(grown, data, finished, tmp_path):
    """Case 2: a finished run whose run.json is missing read as "never started"; train deleted final/ and checkpoints."""
    run = Path(shutil.copytree(finished, tmp_path / "run"))
    (run / "run.json").unlink()
    before = snapshot(run)
    one_error_line(samoe(*train_args(grown, data, run)), "run.json", "--force")
    assert snapshot(run) == before


def test_init_from_sam_never_deletes_its_own_input(tmp_path, monkeypatch):
    """Case 2: `init --from-sam CK/sam.pth --out CK --force` deleted its own input."""
    import upscale.create

    ck = init_from_preset(PRESETS["tiny"], tmp_path / "CK", 0, torch.float32, ["test"], False)
    pth = ck / "sam.pth"
    pth.write_bytes(b"the only copy of the weights")
    # stand-ins for a real SAM .pth (hundreds of MB): what matters is what --force does to --out
    monkeypatch.setattr(upscale.create, "load_sam_state", lambda path: {})
    monkeypatch.setattr(upscale.create, "init_from_sam", lambda path, out, *a, sam=None: init_from_preset(
        PRESETS["tiny"], out, 1, torch.float32, ["test"], a[-1]))
    one_error_line(samoe("init", "--from-sam", pth, "--out", ck, "--moe-blocks", "0", "--force"), "--from-sam")
    assert pth.read_bytes() == b"the only copy of the weights"


def _dead_pid() -> int:
    for pid in range(4_000_000, 3_000_000, -7):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return pid
        except PermissionError:
            continue
    pytest.skip("no free pid found")


def test_stale_temporaries_are_recognised_by_a_recorded_token_not_by_name(tmp_path):
    """Case 2: the clean-up of stale temporaries deleted by name pattern (`.NAME.tmp-PID` of a dead PID)."""
    from upscale.dirfd import Dir
    from upscale.ownership import NewOutput

    pid = _dead_pid()
    for name in (f".ck.tmp-{pid}", f".ck.old-{pid}", ".ck.tmp-0123456789abcdef"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "notes.txt").write_text("mine")
    before = snapshot(tmp_path)
    # a real leftover: a writer killed before it renamed its temporary into place (its token is in its manifest)
    with Dir.open(tmp_path, "test") as parent:
        killed = NewOutput(tmp_path / "ck", "checkpoint", False, parent=parent)
        killed.owned.record("model.safetensors")
        with killed.dir.create("model.safetensors") as f:
            f.write(b"half a shard")
        leftover = killed.tmp_name
    assert (tmp_path / leftover).is_dir()
    assert samoe("init", "--preset", "tiny", "--out", tmp_path / "ck").exit_code == 0
    assert not (tmp_path / leftover).exists()
    after = snapshot(tmp_path)
    assert {k: v for k, v in after.items() if k in before} == before


# --------------------------------------------------------------------------- 3. samoe plot


def test_plot_cost_is_linear_in_rows(tmp_path):
    """Case 3: logs of 100k-150k rows, each under 1 MB, took 31-76 s (quadratic loops)."""
    run = tmp_path / "run"
    run.mkdir()
    n = 80_000
    (run / "metrics.csv").write_text("step,epoch\n" + "".join(f"{i},{i}\n" for i in range(1, n + 1)))
    (run / "selector_log.csv").write_text("epoch,selector_mean\n" + "".join(f"{i},0\n" for i in range(1, n + 1)))
    assert all((run / f).stat().st_size < 1024**2 for f in ("metrics.csv", "selector_log.csv"))
    t, rss = cpu_seconds(), peak_rss()
    res = samoe("plot", run, "--out", tmp_path / "plots")
    assert res.exit_code == 0, res.stderr
    assert cpu_seconds() - t < 10, f"plot took {cpu_seconds() - t:.1f} s of CPU"
    assert peak_rss() - rss < 2 * 1024**3


def test_plot_draws_a_bounded_number_of_lines(tmp_path):
    """Case 3: one artist per column; a log with thousands of routing columns drew thousands of lines."""
    from stages import curves

    run = tmp_path / "run"
    run.mkdir()
    layers = [f"image_encoder.blocks.{i}.mlp" for i in range(3000)]
    header = ["step", "epoch"] + [f"new_share:{n}" for n in layers]
    (run / "metrics.csv").write_text(",".join(header) + "\n" + "".join(",".join([str(s), "0"] + ["0.5"] * len(layers)) + "\n"
                                                                        for s in (1, 2, 3)))
    fig = curves.routing_figure(curves.Timeline.of([curves.load_run(run)]))
    lines = sum(len(ax.get_lines()) for ax in fig.axes)
    assert 0 < lines <= curves.MAX_LINES
    assert f"first {curves.MAX_LINES} of 3000" in fig.get_suptitle()


@pytest.mark.parametrize("text, words", [
    ("step,loss\n1,1e999\n", ["loss=inf", "range"]),
    ("step,loss\n1,-1e35\n", ["loss=-1e+35", "range"]),
    ("step,loss\n1e20,1\n", ["step", "whole number"]),
    ("step,loss\n0.5,1\n", ["step", "whole number"]),
    ("step,loss,loss\n1,2,3\n", ["twice"]),
    ("step,loss\n1,\"" + "x" * 200_000 + "\"\n", ["not a CSV"]),
])
def test_plot_checks_columns_and_values(tmp_path, text, words):
    """Case 3: plot did not check for missing or repeated columns or overflowing values."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.csv").write_text(text)
    out = tmp_path / "plots"
    one_error_line(samoe("plot", run, "--out", out), "metrics.csv", *words)
    assert not out.exists()


# --------------------------------------------------------------------------- interrupted: plot, eval, expand, pseudo-label, demo-data


@pytest.fixture
def sigterm_is_ctrl_c():
    """The console script turns SIGTERM into a clean-up like Ctrl-C's (cli.main); do the same in-process."""
    old = signal.signal(signal.SIGTERM, cli.on_sigterm)
    yield
    signal.signal(signal.SIGTERM, old)


def sigterm_on_call(monkeypatch, module, name: str, n: int) -> list:
    """Replace module.name by a wrapper that sends this process SIGTERM on its n-th call."""
    real = getattr(module, name)
    calls = []

    def wrapper(*a, **kw):
        calls.append(1)
        if len(calls) == n:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*a, **kw)

    monkeypatch.setattr(module, name, wrapper)
    return calls


def leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


@pytest.mark.usefixtures("sigterm_is_ctrl_c")
def test_sigterm_in_demo_data_leaves_nothing(tmp_path, monkeypatch):
    import stages.data

    out = tmp_path / "demo"
    args = ("demo-data", "--out", out, "--labelled-scenes", 3, "--unlabelled-scenes", 0, "--test-scenes", 0, "--size", 16)
    sigterm_on_call(monkeypatch, stages.data, "write_image", 2)
    one_error_line(samoe(*args), "terminated", code=143)
    assert not out.exists() and leftovers(out) == []
    monkeypatch.undo()
    assert samoe(*args).exit_code == 0


@pytest.mark.usefixtures("sigterm_is_ctrl_c")
def test_sigterm_in_expand_leaves_nothing(src, tmp_path, monkeypatch):
    import upscale.checkpoint

    out = tmp_path / "grown"
    args = ("expand", src, "--out", out, "--experts", 8, "--groups", 2, "--set", "shard_size_gib=0.0005")
    sigterm_on_call(monkeypatch, upscale.checkpoint.CheckpointWriter, "_write", 5)
    one_error_line(samoe(*args), "terminated", code=143)
    assert not out.exists() and leftovers(out) == []
    monkeypatch.undo()
    assert samoe(*args).exit_code == 0


@pytest.mark.usefixtures("sigterm_is_ctrl_c")
def test_sigterm_in_pseudo_label_leaves_a_folder_the_rerun_finishes(src, data, tmp_path, monkeypatch):
    import stages.pseudo

    out = tmp_path / "pl"
    args = ("pseudo-label", src, "--images", data / "B", "--out", out, "--batch-size", 1)
    sigterm_on_call(monkeypatch, stages.pseudo, "write_mask", 2)
    one_error_line(samoe(*args), "terminated", "1 new mask", code=143)
    monkeypatch.undo()
    res = samoe(*args, "--json")
    assert res.exit_code == 0 and json.loads(res.stdout)["labelled"] == 1, res.stderr
    names = {p.name for p in out.rglob("*")}
    assert not [n for n in names if ".tmp-" in n]


@pytest.mark.slow  # 5 s: plots interrupted by signals
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
@pytest.mark.usefixtures("sigterm_is_ctrl_c")
def test_interrupted_plot_leaves_a_folder_plot_force_replaces(finished, tmp_path, monkeypatch, signum):
    """Case 3: an interrupted plot left a folder samoe then refused to replace (its marker was written last)."""
    import stages.curves

    out = tmp_path / "plots"
    real, calls = stages.curves.save_figure, []

    def save_figure(*a, **kw):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signum)
        return real(*a, **kw)

    monkeypatch.setattr(stages.curves, "save_figure", save_figure)
    one_error_line(samoe("plot", finished, "--out", out), "interrupted" if signum == signal.SIGINT else "terminated",
                   code=128 + signum)
    monkeypatch.undo()
    assert out.is_dir() and (out / OWNER_FILE).is_file()  # the marker came first
    res = samoe("plot", finished, "--out", out, "--force")
    assert res.exit_code == 0, res.stderr
    assert sorted(p.name for p in out.iterdir()) == sorted([OWNER_FILE, "losses.png", "routing.png", "schedules.png"])


@pytest.mark.usefixtures("sigterm_is_ctrl_c")
def test_interrupted_eval_plots_and_report_leave_folders_eval_force_replaces(src, data, tmp_path, monkeypatch):
    """Case 3: the same for `eval --plots/--report`."""
    import stages.figures

    plots, report = tmp_path / "plots", tmp_path / "report"
    args = ("eval", src, "--data", data / "A", "--plots", plots, "--report", report, "--bootstrap", 10)
    sigterm_on_call(monkeypatch, stages.figures, "save_figure", 2)
    one_error_line(samoe(*args), "terminated", code=143)
    monkeypatch.undo()
    assert (plots / OWNER_FILE).is_file()
    res = samoe(*args, "--force")
    assert res.exit_code == 0, res.stderr
    assert (report / "report.md").is_file() and (plots / "class-metrics.png").is_file()


# --------------------------------------------------------------------------- 4. inputs read once, cost bounded by the input


def test_eval_reports_the_digest_of_the_weights_it_loaded(src, data, tmp_path):
    """Case 4: a concurrent `expand --force` replacing eval's input made eval report A's digest for B's weights."""
    from stages.evaluate import evaluate

    ck = Path(shutil.copytree(src, tmp_path / "ck"))
    alone = evaluate([ck], data / "A", bootstrap=10, ablate_new=False)["checkpoints"][0]

    def replace_it(n):  # between opening the checkpoint and loading its weights, another job replaces it
        init_from_preset(PRESETS["tiny"], ck, 7, torch.float32, ["other"], True)

    raced = evaluate([ck], data / "A", bootstrap=10, ablate_new=False, on_start=replace_it)["checkpoints"][0]
    assert Checkpoint.open(ck).digest != alone["digest"]  # it really was replaced
    assert raced["digest"] == alone["digest"]
    assert raced["metrics"] == alone["metrics"]  # ... and the weights evaluated are the ones that digest names


def test_train_lineage_names_the_checkpoint_it_trained_from(grown, data, tmp_path, monkeypatch):
    """Case 4: train opened its --from twice, so its lineage could name another checkpoint than the weights."""
    import stages.engine

    a = Path(shutil.copytree(grown, tmp_path / "a"))
    assert samoe(*train_args(a, data, tmp_path / "alone"), "--set", "max_steps=1").exit_code == 0
    real = stages.engine.check_stage_input

    def replace_source(ckpt, stage):  # runs after the source was opened, before its weights are read
        spec = GrowthSpec(experts=6, groups=resolve_groups(4, 6, "2", 1), extra_blocks=0, noise_std=0.5, seed=9)
        expand_checkpoint(init_from_preset(PRESETS["tiny"], tmp_path / "other", 3, torch.float32, ["x"], False),
                          a, spec, ["x"], force=True)
        return real(ckpt, stage)

    monkeypatch.setattr(stages.engine, "check_stage_input", replace_source)
    assert samoe(*train_args(a, data, tmp_path / "raced"), "--set", "max_steps=1").exit_code == 0
    alone, raced = Checkpoint.open(tmp_path / "alone" / "final"), Checkpoint.open(tmp_path / "raced" / "final")
    assert raced.lineage[-1]["parent_digest"] == alone.lineage[-1]["parent_digest"]
    assert raced.digest == alone.digest  # bit-identical: trained from the weights its lineage names


def test_verify_hashes_only_shards_and_checks_sizes_first(src, tmp_path):
    """Case 4: --verify hashed a 20 GB sparse non-shard file listed in a 2.2 MB checkpoint (39-50 s, 14-15 GB)."""
    ck = Path(shutil.copytree(src, tmp_path / "ck"))
    with open(ck / "extra.bin", "wb") as f:
        f.truncate(20 * 1024**3)  # sparse: costs no disk
    meta = json.loads((ck / "samoe.json").read_text())
    meta["files"]["extra.bin"] = {"blake3": "0" * 64, "bytes": 20 * 1024**3}
    (ck / "samoe.json").write_text(json.dumps(meta))
    t, rss = time.perf_counter(), peak_rss()
    one_error_line(samoe("inspect-checkpoint", ck, "--verify"), "extra.bin", "not one of its")
    assert time.perf_counter() - t < 10 and peak_rss() - rss < 512 * 1024**2


def test_world_size_without_torchrun_is_one_line(grown, data, tmp_path):
    """Case 4: `WORLD_SIZE=2` without torchrun exited 1."""
    res = samoe(*train_args(grown, data, tmp_path / "run"), env={"WORLD_SIZE": "2"})
    one_error_line(res, "WORLD_SIZE", "torchrun")
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------- exit codes: environment and names


def test_bad_samoe_variable_is_one_line():
    """Exit codes: a bad SAMOE_* value was exit 1 (read at import or deep inside a command)."""
    proc = subprocess.run([SAMOE, "demo-data", "--out", "/nonexistent/never"], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "SAMOE_MAX_IMAGE_PIXELS": "lots"})
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "SAMOE_MAX_IMAGE_PIXELS" in proc.stderr, proc.stderr
    res = samoe("train", "--stage", 1, "--from", "x", "--run-dir", "r", "--data", "d",
                env={"SAMOE_LAUNCH_COMMAND": "not json"})
    one_error_line(res, "SAMOE_LAUNCH_COMMAND")


def test_markup_characters_in_paths_are_printed_as_they_are(tmp_path):
    """Exit codes: rich markup in a path broke the command's output (exit 1) after it had written."""
    out = tmp_path / "a[/bold]b[red]"
    res = samoe("demo-data", "--out", out, "--labelled-scenes", 1, "--unlabelled-scenes", 0, "--test-scenes", 0, "--size", 16)
    assert res.exit_code == 0, res.stderr
    assert str(out) in res.stdout.replace("\n", "")


def test_a_newline_in_a_file_name_is_one_line(tmp_path):
    """Exit codes: a newline in a name made a two-line error, or an output no one-line message can name."""
    out = tmp_path / "two\nlines"
    one_error_line(samoe("demo-data", "--out", out, "--labelled-scenes", 1, "--unlabelled-scenes", 0, "--test-scenes", 0, "--size", 16),
                   "--out", "newline")
    assert not out.exists()
    one_error_line(samoe("inspect-checkpoint", tmp_path / "no\nsuch"), "no\\nsuch")


def test_warnings_third_party_readers_log_are_not_printed_before_the_error(src, tmp_path):
    """Exit codes: tifffile logged warnings about a damaged TIFF before samoe's one line."""
    import logging
    import random

    import numpy as np
    import tifffile

    from stages.data import DataError, read_image

    folder = tmp_path / "verify"
    (folder / "images").mkdir(parents=True)
    bad = folder / "images" / "scene.tif"
    tifffile.imwrite(bad, np.zeros((2, 16, 16), np.float32), photometric="minisblack", planarconfig="separate")
    good = bad.read_bytes()
    logged: list = []
    handler = type("H", (logging.Handler,), {"emit": lambda self, record: logged.append(record)})(logging.WARNING)
    logging.getLogger("tifffile").addHandler(handler)
    try:
        for seed in range(300):  # damaged tags: find one that tifffile logs warnings about, then fails on
            raw, rnd = bytearray(good), random.Random(seed)
            for _ in range(3):
                raw[rnd.randrange(8, 300)] = rnd.randrange(256)
            bad.write_bytes(bytes(raw))
            logged.clear()
            try:
                read_image(bad)
            except DataError:
                if logged:
                    break
        else:
            pytest.skip("no damaged TIFF found that makes tifffile warn and fail")
    finally:
        logging.getLogger("tifffile").removeHandler(handler)
    proc = subprocess.run([SAMOE, "expand", str(src), "--out", str(tmp_path / "g"), "--experts", "8", "--groups", "2",
                           "--verify", str(folder)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: "), proc.stderr
    assert "scene.tif" in proc.stderr
