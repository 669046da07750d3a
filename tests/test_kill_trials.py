"""Seeded `kill -9` trials (a short version of benchmarks/kill_trials.py): an expand or a train
killed mid-write and re-run with the identical command ends exactly like an uninterrupted run,
never shows a half-written checkpoint, and leaves no temporaries or lock files behind.

The kill moment is seeded but tied to progress (the writer's temporary directory appearing, or
the N-th metrics row), so every trial really interrupts a write on a slow or busy machine.
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from stages.data import make_demo_data
from upscale.checkpoint import Checkpoint
from upscale.config import PRESETS
from upscale.create import init_from_preset

SAMOE = str(Path(sys.executable).parent / "samoe")
GROW = ["--experts", "16", "--groups", "4", "--extra-blocks", "1", "--set", "noise_std=0.01", "--seed", "3", "--set", "shard_size_gib=0.0005"]
TRIALS = 2

pytestmark = pytest.mark.slow  # each trial kills a real expand or train and reruns it


def run(args: list) -> None:
    proc = subprocess.run([SAMOE, *map(str, args)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr


def samoe_in_process(args: list) -> None:
    from typer.testing import CliRunner

    import cli

    res = CliRunner().invoke(cli.app, [str(a) for a in args])
    assert res.exit_code == 0, res.stderr


def kill_when(args: list, ready, extra_delay: float, timeout: float = 120) -> bool:
    """Start the command, SIGKILL it `extra_delay` s after `ready()` holds; True if it was still running then."""
    proc = subprocess.Popen([SAMOE, *map(str, args)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        t_end = time.monotonic() + timeout
        while not ready() and proc.poll() is None and time.monotonic() < t_end:
            time.sleep(0.01)
        time.sleep(extra_delay)
        alive = proc.poll() is None
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        return alive
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def visible_ok(ckpt: Path) -> bool:
    """Either no checkpoint at the path or a complete one whose digests verify."""
    return not ckpt.exists() or not Checkpoint.open(ckpt).verify_digests()


def leftovers(out: Path) -> list[str]:
    return [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


def tensors(ckpt: Path) -> dict[str, torch.Tensor]:
    return dict(Checkpoint.open(ckpt).iter_tensors())


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    w = tmp_path_factory.mktemp("kill")
    make_demo_data(w / "data", labelled=4, unlabelled=2, test=0, size=128, seed=0)
    init_from_preset(PRESETS["tiny"], w / "src", 0, torch.float32, ["test"], False)
    return w


def test_expand_killed_then_rerun_is_identical(setup):
    w, rng = setup, random.Random(0)
    samoe_in_process(["expand", w / "src", "--out", w / "ref", *GROW])  # the uninterrupted reference
    ref = json.loads((w / "ref" / "samoe.json").read_text())["files"]
    assert len(ref) > 2  # several shards: a kill can land between them
    killed = 0
    for i in range(TRIALS):
        out = w / f"e{i}"
        writing = lambda: any(p.name.startswith(f".{out.name}.tmp-") for p in w.iterdir())  # noqa: E731
        killed += kill_when(["expand", w / "src", "--out", out, *GROW], writing, rng.uniform(0.0, 0.3))
        assert visible_ok(out)
        if not out.exists():
            run(["expand", w / "src", "--out", out, *GROW])
        assert json.loads((out / "samoe.json").read_text())["files"] == ref
        assert leftovers(out) == []
    assert killed >= 1


def test_train_killed_then_rerun_is_identical(setup):
    w, rng = setup, random.Random(1)
    samoe_in_process(["expand", w / "src", "--out", w / "grown", *GROW])
    train = ["train", "--stage", "1", "--set", "lr=0.01", "--from", w / "grown", "--data", w / "data" / "A", "--unlabelled", w / "data" / "B",
             "--set", "max_steps=4", "--set", "checkpoint_every=2", "--set", "batch_size=2"]
    samoe_in_process([*train, "--run-dir", w / "run-ref"])  # the uninterrupted reference (bit-exact with any thread count)
    ref = tensors(w / "run-ref" / "final")
    ref_metrics = (w / "run-ref" / "metrics.csv").read_text()
    killed = 0
    for i in range(TRIALS):
        run_dir = w / f"run{i}"
        rows = rng.randint(1, 3)

        def stepped() -> bool:
            try:
                return len((run_dir / "metrics.csv").read_text().splitlines()) > rows
            except OSError:
                return False

        killed += kill_when([*train, "--run-dir", run_dir], stepped, rng.uniform(0.0, 0.2))
        latest = run_dir / "checkpoints" / "latest"
        if latest.exists():
            assert visible_ok(run_dir / "checkpoints" / latest.read_text().strip() / "model")
        run([*train, "--run-dir", run_dir])
        got = tensors(run_dir / "final")
        assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)
        assert (run_dir / "metrics.csv").read_text() == ref_metrics
        assert leftovers(run_dir) == []
    assert killed >= 1
