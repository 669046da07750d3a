"""No command destroys what it did not make, one job per output, a run's
identity includes its data, failed commands leave nothing misleading, bad numbers are one line.

Tests are grouped by case (the sections below). The CLI runs in-process (typer's
runner: real exit codes and stderr) except where a second process is the point.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import cli
from stages.data import make_demo_data
from upscale.config import PRESETS
from upscale.create import init_from_preset
from upscale.expand import GrowthSpec, expand_checkpoint, resolve_groups
from upscale.ownership import OWNER_FILE, exclusive, lock_paths
from conftest import one_error_line

pytestmark = pytest.mark.usefixtures("one_thread")


def samoe(*args):
    return CliRunner().invoke(cli.app, [str(a) for a in args])


def tree(path: Path) -> dict[str, str]:
    """Every file under `path` (or the file itself) with its digest: 'untouched' means equal trees."""
    if path.is_file():
        return {path.name: hashlib.sha256(path.read_bytes()).hexdigest()}
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("safety")


@pytest.fixture(scope="module")
def data(work: Path) -> Path:
    make_demo_data(work / "data", labelled=4, unlabelled=4, test=0, size=128, seed=0)
    return work / "data"


@pytest.fixture(scope="module")
def src(work: Path) -> Path:
    return init_from_preset(PRESETS["tiny"], work / "src", 0, torch.float32, ["test"], False)


@pytest.fixture(scope="module")
def grown(src: Path, work: Path) -> Path:
    spec = GrowthSpec(experts=8, groups=resolve_groups(4, 8, "2", 1), extra_blocks=1, noise_std=0.01)
    return expand_checkpoint(src, work / "grown", spec, ["test"])


def train(grown: Path, run_dir: Path, data: Path, *extra):
    return samoe("train", "--stage", 1, "--set", "lr=0.01", "--from", grown, "--run-dir", run_dir, "--data", data, "--set", "batch_size=4",
                 "--set", "max_steps=1", *extra)


# --------------------------------------------------------------------------- case 2: --force never deletes its own input


def test_case2_train_force_keeps_its_own_input(grown, data, work):
    run = work / "run-own-input"
    assert train(grown, run, data / "A").exit_code == 0
    before = tree(run / "final")
    res = samoe("train", "--stage", 2, "--set", "lr=0.01", "--from", run / "final", "--run-dir", run, "--data", data / "A", "--set", "max_steps=1",
                "--force")
    one_error_line(res, str(run), "--from")
    assert tree(run / "final") == before


def test_case2_train_force_keeps_the_data_it_reads(grown, data):
    """The demo-data folder is samoe's own (marker), so only the overlap check protects it."""
    before = tree(data)
    one_error_line(train(grown, data, data / "A", "--force"), str(data), "--data")
    assert tree(data) == before


# --------------------------------------------------------------------------- case 3: --force deletes only what samoe wrote


def test_case3_outputs_carry_an_ownership_marker(data, grown, work):
    assert (data / OWNER_FILE).is_file()
    run = work / "run-marker"
    assert train(grown, run, data / "A").exit_code == 0
    assert (run / OWNER_FILE).is_file()
    out = work / "demo-again"  # the marker is what lets --force replace samoe's own output
    args = ("demo-data", "--out", out, "--labelled-scenes", 1, "--unlabelled-scenes", 0, "--test-scenes", 0, "--size", 16)
    assert samoe(*args).exit_code == 0
    one_error_line(samoe(*args), "already exists")
    assert samoe(*args, "--force").exit_code == 0


@pytest.mark.parametrize("kind", ["folder", "file", "symlink"])
def test_case3_demo_data_force_refuses_what_samoe_did_not_write(work, kind):
    target = work / f"mine-{kind}"
    if kind == "folder":
        target.mkdir()
        (target / "thesis.tex").write_text("years of work")
    elif kind == "file":
        target.write_text("years of work")
    else:
        (work / "mine-target").mkdir(exist_ok=True)
        (work / "mine-target" / "notes.txt").write_text("keep")
        target.symlink_to(work / "mine-target")
    before = tree(target)
    one_error_line(samoe("demo-data", "--out", target, "--labelled-scenes", 1, "--unlabelled-scenes", 0, "--test-scenes", 0, "--size", 16, "--force"),
                   str(target))
    assert tree(target) == before


# --------------------------------------------------------------------------- case 4: pseudo-label never writes into foreign masks


def test_case4_pseudo_label_refuses_a_labelled_folder(src, data, work):
    labelled = work / "ground-truth"
    shutil.copytree(data / "A", labelled)
    before = tree(labelled)
    one_error_line(samoe("pseudo-label", src, "--images", data / "B", "--out", labelled), str(labelled))
    assert tree(labelled) == before


def test_case4_pseudo_label_resumes_its_own_folder(src, data, work):
    out = work / "pl-own"
    assert samoe("pseudo-label", src, "--images", data / "B", "--out", out).exit_code == 0
    assert (out / OWNER_FILE).is_file()
    res = samoe("pseudo-label", src, "--images", data / "B", "--out", out, "--json")
    assert res.exit_code == 0, res.stderr
    assert '"skipped": 4' in res.stdout


# --------------------------------------------------------------------------- case 5: one job per output


@pytest.mark.parametrize("command", ["init", "expand", "demo-data", "pseudo-label", "train"])
def test_case5_second_job_fails_at_once_naming_the_holder(command, src, grown, data, work):
    out = work / f"locked-{command}"
    argv = {
        "init": ["init", "--preset", "tiny", "--out", out],
        "expand": ["expand", src, "--out", out, "--experts", 8, "--groups", 2],
        "demo-data": ["demo-data", "--out", out, "--labelled-scenes", 1, "--unlabelled-scenes", 0, "--test-scenes", 0, "--size", 16],
        "pseudo-label": ["pseudo-label", src, "--images", data / "B", "--out", out],
        "train": ["train", "--stage", 1, "--set", "lr=0.01", "--from", grown, "--run-dir", out, "--data", data / "A", "--set", "max_steps=1"],
    }[command]
    with exclusive(out):  # the first job
        t = time.perf_counter()
        res = samoe(*argv)
        assert time.perf_counter() - t < 30
        one_error_line(res, str(out), f"pid {os.getpid()}")
        assert not out.exists()
    assert not any(p.exists() for p in lock_paths(out))


def test_case5_lock_of_a_killed_job_does_not_block(work):
    out = work / "killed-holder"
    code = ("import sys, time\nfrom pathlib import Path\nfrom upscale.ownership import exclusive\n"
            f"with exclusive(Path({str(out)!r})):\n    print('held', flush=True)\n    time.sleep(600)\n")
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=Path(cli.__file__).parent)
    try:
        assert holder.stdout.readline().strip() == "held"
        one_error_line(samoe("init", "--preset", "tiny", "--out", out), f"pid {holder.pid}")
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert lock_paths(out)[0].exists()  # the stale lock file is still there ...
    assert samoe("init", "--preset", "tiny", "--out", out).exit_code == 0  # ... and blocks nothing
    assert not any(p.exists() for p in lock_paths(out))


# --------------------------------------------------------------------------- case 6: a run's identity includes its data


def test_case6_changed_data_is_refused_unless_force(grown, data, work):
    mine = work / "data6"
    shutil.copytree(data / "A", mine)
    run = work / "run6"
    assert train(grown, run, mine, "--set", "max_steps=2", "--set", "checkpoint_every=1").exit_code == 0
    shutil.rmtree(run / "final")  # as if it had stopped after its step-1 checkpoint
    victim = sorted((mine / "images").iterdir())[0]
    victim.unlink()
    (mine / "masks" / (victim.stem + ".png")).unlink()
    one_error_line(train(grown, run, mine, "--set", "max_steps=2", "--set", "checkpoint_every=1"), "changed", "--force")
    assert train(grown, run, mine, "--set", "max_steps=2", "--set", "checkpoint_every=1", "--force").exit_code == 0


def test_case6_run_that_failed_before_its_first_step_blocks_nothing(grown, data, work, monkeypatch):
    import stages.engine as engine

    run = work / "run6-failed"

    def broken(*a, **k):
        raise RuntimeError("failed before the first step")

    with monkeypatch.context() as m:
        m.setattr(engine, "train_step", broken)
        assert train(grown, run, data / "A", "--set", "lr=0.5").exit_code == 1
    res = train(grown, run, data / "A", "--set", "lr=0.01")  # the corrected command
    assert res.exit_code == 0, res.stderr
    assert (run / "final" / "samoe.json").is_file()


# --------------------------------------------------------------------------- case 7: failures leave nothing misleading


def test_case7_expand_verify_bad_folder_fails_before_writing(src, work):
    bad = work / "verify-bad"
    (bad / "images").mkdir(parents=True)
    (bad / "images" / "x.tif").write_bytes(b"not a tiff at all")
    out = work / "grown-verify"
    one_error_line(samoe("expand", src, "--out", out, "--experts", 8, "--groups", 2, "--verify", bad))
    assert not out.exists()
    assert [p.name for p in work.iterdir() if p.name.startswith(f".{out.name}.")] == []


@pytest.mark.parametrize("fault", ["sigint", "enospc"])
def test_case7_pseudo_label_interrupted_reports_what_it_wrote(fault, src, data, work, monkeypatch):
    import stages.pseudo as pseudo

    real = pseudo.write_mask
    calls = [0]

    def write_mask(path, mask):
        calls[0] += 1
        if calls[0] == 3:
            raise KeyboardInterrupt if fault == "sigint" else OSError(errno.ENOSPC, "No space left on device")
        real(path, mask)

    monkeypatch.setattr(pseudo, "write_mask", write_mask)
    out = work / f"pl-{fault}"
    res = samoe("pseudo-label", src, "--images", data / "B", "--out", out, "--batch-size", 1)
    line = one_error_line(res, "2 new mask(s) were written", str(out), code=130 if fault == "sigint" else 2)
    assert "nothing was written" not in line
    if fault == "enospc":
        assert "No space left" in line
    assert len(list((out / "masks").iterdir())) == 2
    assert not (out / ".partial").exists()
    monkeypatch.setattr(pseudo, "write_mask", real)
    res = samoe("pseudo-label", src, "--images", data / "B", "--out", out, "--json")  # the rerun finishes the job
    assert res.exit_code == 0 and '"labelled": 2' in res.stdout, res.stderr


def test_case7_demo_data_full_disk_is_reported_as_a_full_disk(work, monkeypatch):
    import stages.data as data_mod

    real = data_mod.write_image
    calls = [0]

    def write_image(path, image):
        calls[0] += 1
        if calls[0] == 3:  # what numpy's tofile (inside tifffile) raises when the disk fills mid-write: no errno
            raise OSError(f"{image.nbytes} requested and 4096 written")
        real(path, image)

    monkeypatch.setattr(data_mod, "write_image", write_image)
    out = work / "demo-full"
    line = one_error_line(samoe("demo-data", "--out", out, "--labelled-scenes", 4, "--unlabelled-scenes", 0, "--test-scenes", 0, "--size", 32))
    assert "No space left on device" in line and "free space" in line
    assert not out.exists() and [p.name for p in work.iterdir() if p.name.startswith(f".{out.name}.")] == []


# --------------------------------------------------------------------------- case 8: numeric options


BAD_OPTIONS = {
    "expand-shard-size-nan": ("expand", "--set", "shard_size_gib=nan"),
    "train-timeline-0": ("train", "--set", "timeline=0"),
    "train-momentum-neg": ("train", "--set", "momentum=-1"),
    "train-workers-neg": ("train", "--set", "workers=-1"),
    "train-seed-1e23": ("train", "--seed", "1e23"),
    "train-seed-huge": ("train", "--seed", str(10**23)),
    "train-weight-decay-huge": ("train", "--set", "weight_decay=400"),
    "train-warmup-nan": ("train", "--set", "warmup=nan"),
    "demo-seed-neg": ("demo-data", "--seed", "-1"),
    "eval-seed-neg": ("eval", "--seed", "-1"),
    "train-unsup-weight-nan": ("train", "--set", "unsup_weight=nan"),
    "train-router-lr-mult-inf": ("train", "--set", "router_lr_mult=inf"),
    "pseudo-batch-size-float": ("pseudo-label", "--batch-size", "1e3"),
}


@pytest.mark.parametrize("case", list(BAD_OPTIONS))
def test_case8_bad_numbers_are_one_line(case, src, grown, data, work):
    command, option, value = BAD_OPTIONS[case]
    out = work / f"opt-{case}"
    base = {
        "expand": ["expand", src, "--out", out, "--experts", 8, "--groups", 2],
        "train": ["train", "--stage", 1, "--set", "lr=0.01", "--from", grown, "--run-dir", out, "--data", data / "A", "--set", "max_steps=1"],
        "demo-data": ["demo-data", "--out", out, "--labelled-scenes", 1, "--unlabelled-scenes", 0, "--test-scenes", 0],
        "pseudo-label": ["pseudo-label", src, "--images", data / "B", "--out", out],
        "eval": ["eval", src, "--data", data / "A"],
    }[command]
    one_error_line(samoe(*base, option, value), value.split("=")[0] if option == "--set" else option)
    assert not out.exists()


def test_case8_console_script_prints_one_line(work):
    """Through the real entry point too (typer would draw a multi-line box)."""
    proc = subprocess.run([str(Path(sys.executable).parent / "samoe"), "train", "--stage", "1", "--set", "lr=0.01", "--from", "x", "--run-dir",
                           str(work / "r"), "--data", "d", "--seed", "1e23"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and len(proc.stderr.splitlines()) == 1 and "--seed" in proc.stderr, proc.stderr
