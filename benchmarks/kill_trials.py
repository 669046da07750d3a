"""Seeded `kill -9` trials: an interrupted expand or train, re-run, ends exactly like an uninterrupted run.

For each command (tiny preset): one uninterrupted reference run, then N trials
that start the same command, SIGKILL it after a seeded random delay within the
reference's duration, check that no half-written checkpoint is visible, re-run
the identical command to completion and compare the result with the reference
(shard digests for expand, every tensor bit for bit for train). Prints counts.

    .venv/bin/python benchmarks/kill_trials.py [--trials 20] [--seed 0] [--work /tmp/samoe-kill]
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

SAMOE = str(Path(sys.executable).parent / "samoe")


def run(args: list[str]) -> tuple[int, float]:
    t = time.perf_counter()
    proc = subprocess.run([SAMOE, *args], capture_output=True, text=True)
    return proc.returncode, time.perf_counter() - t


def killed_at(args: list[str], delay: float) -> bool:
    """Start the command, SIGKILL it after `delay` s; True if it was still running."""
    proc = subprocess.Popen([SAMOE, *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        proc.wait(timeout=delay)
        return False
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        return True


def digests(ckpt: Path) -> dict:
    return json.loads((ckpt / "samoe.json").read_text())["files"]


def tensors(ckpt: Path) -> dict[str, torch.Tensor]:
    from upscale import Checkpoint

    return dict(Checkpoint.open(ckpt).iter_tensors())


def visible_ok(ckpt: Path) -> bool:
    """Either no checkpoint at the path or a complete one that opens and verifies."""
    if not ckpt.exists():
        return True
    from upscale import Checkpoint

    c = Checkpoint.open(ckpt)
    return not c.verify_digests()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", type=Path, default=Path("/tmp/samoe-kill"))
    args = ap.parse_args()
    rng = random.Random(args.seed)
    w = args.work
    shutil.rmtree(w, ignore_errors=True)
    w.mkdir(parents=True)
    assert run(["demo-data", "--out", str(w / "data"), "--labelled-scenes", "8", "--unlabelled-scenes", "4", "--test-scenes", "2"])[0] == 0
    assert run(["init", "--preset", "tiny", "--out", str(w / "src")])[0] == 0
    grow = ["--experts", "16", "--groups", "4", "--extra-blocks", "1", "--set", "noise_std=0.01", "--seed", "3"]

    # expand
    rc, t_ref = run(["expand", str(w / "src"), "--out", str(w / "ref"), *grow, "--set", "shard_size_gib=0.001"])
    assert rc == 0
    ref = digests(w / "ref")
    counts = {"expand": {"trials": 0, "killed_mid_run": 0, "identical": 0, "corrupt_visible": 0}}
    for i in range(args.trials):
        out = w / f"e{i}"
        c = counts["expand"]
        c["trials"] += 1
        c["killed_mid_run"] += killed_at(["expand", str(w / "src"), "--out", str(out), *grow, "--set", "shard_size_gib=0.001"], rng.uniform(0.5, t_ref))
        c["corrupt_visible"] += not visible_ok(out)
        if not out.exists():
            assert run(["expand", str(w / "src"), "--out", str(out), *grow, "--set", "shard_size_gib=0.001"])[0] == 0
        leftovers = [p.name for p in w.glob(f".{out.name}.*")]
        c["identical"] += digests(out) == ref and not leftovers
        print(f"expand trial {i}: {c}", flush=True)

    # train
    assert run(["expand", str(w / "src"), "--out", str(w / "grown"), *grow])[0] == 0
    train = ["train", "--stage", "1", "--from", str(w / "grown"), "--data", str(w / "data" / "A"), "--unlabelled",
             str(w / "data" / "B"), "--set", "max_steps=8", "--set", "checkpoint_every=2", "--set", "batch_size=2"]
    rc, _ = run([*train, "--run-dir", str(w / "run-ref")])
    assert rc == 0
    ref_t = tensors(w / "run-ref" / "final")
    ref_metrics = (w / "run-ref" / "metrics.csv").read_text()
    # a second uninterrupted run: it must equal the first (determinism), and times the kill window
    rc, t_ref = run([*train, "--run-dir", str(w / "run-ref2")])
    again = tensors(w / "run-ref2" / "final")
    counts["train_rerun_identical"] = rc == 0 and all(torch.equal(again[k], ref_t[k]) for k in ref_t)
    counts["train"] = {"trials": 0, "killed_mid_run": 0, "identical": 0, "corrupt_visible": 0}
    for i in range(args.trials):
        run_dir = w / f"run{i}"
        c = counts["train"]
        c["trials"] += 1
        c["killed_mid_run"] += killed_at([*train, "--run-dir", str(run_dir)], rng.uniform(1.0, 0.9 * t_ref))
        latest = run_dir / "checkpoints" / "latest"
        if latest.exists():
            c["corrupt_visible"] += not visible_ok(run_dir / "checkpoints" / latest.read_text().strip() / "model")
        if not (run_dir / "final" / "samoe.json").exists():
            assert run([*train, "--run-dir", str(run_dir)])[0] == 0
        got = tensors(run_dir / "final")
        same = got.keys() == ref_t.keys() and all(torch.equal(got[k], ref_t[k]) for k in ref_t)
        c["identical"] += same and (run_dir / "metrics.csv").read_text() == ref_metrics
        print(f"train trial {i}: {c}", flush=True)
    print(json.dumps(counts))
    shutil.rmtree(w)


if __name__ == "__main__":
    main()
