"""The growth protocol on the `hard` set, as measured until 2026-11-27: does growing pay at equal compute?

This is the old `benchmarks/growth.py`, kept so that the scripts beside it (growth_sweep.py,
scratch_check.py) and the results in results/ can be reproduced; the product's growth benchmark is
now `benchmarks/growth.py` on the `codebook` set. What it measured is in docs/growth-experiments.md.

On `samoe demo-data --preset hard` (10 SAR classes, stages/hard_scenes.py), for each seed:
  source  the tiny model (0.54M) trained from scratch for S forward+backward FLOPs;
  (a)     the source trained further, E more FLOPs (full fine-tune, the same regime);
  (b)     the source grown (4 -> 16 experts in 4 groups, +1 block, copy+noise), pseudo-labels of B
          from the source, stages 1, 2, 3 sharing E FLOPs (40/30/30%);
  (c)     the grown architecture trained from scratch for S + E FLOPs (the capacity check: a
          bigger model, the same total compute as the source plus (a) or (b)).
FLOPs are counted, not assumed: torch's FlopCounterMode (matmuls and convolutions, forward and
backward) over one real training step of each configuration (frozen parts are in the forward but
get no weight gradients), so the grown model's larger per-step cost buys it fewer steps. Arms
train supervised on A (`--semisup` adds seed 004's unsupervised phase on B to every arm); (b)'s
stage 1 learns from the source's pseudo-labels of B, as the growth plan prescribes.
All arms are evaluated on the held-out A-test; differences come with 95% intervals from a
paired bootstrap over (seed, image) pairs; per-seed differences are printed too.

    python experiments/growth/hard_protocol.py [--seeds 0 1 2] [--work /tmp/samoe-growth]

Defaults finish in about an hour on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[2]  # experiments/growth/ -> the repository root
sys.path.insert(0, str(REPO))
GROW = ["--experts", "16", "--groups", "4", "--extra-blocks", "1"]
STAGE_SHARE = {1: 0.4, 2: 0.3, 3: 0.3}
REUSE = False
THREADS = 0  # OMP_NUM_THREADS of each samoe process (0: torch's default)
DEVICE: list[str] = []  # ["--device", D] for samoe train, when given
BATCH = 4


def samoe(*args: str, out: Path | None = None) -> str:
    """Run one samoe command; with --reuse, skip it when its output `out` is already complete."""
    if REUSE and out is not None and ((out / "samoe.json").exists() or (out / "final" / "samoe.json").exists()
                                      or (out / ".samoe-owner.json").exists() and (out / "masks").is_dir()):
        print(f"  reused  {out}", flush=True)
        return ""
    t = time.perf_counter()
    # `python -m cli` from the repository root: a copy of the tree benchmarks itself, not the installed one;
    # seeds run side by side (--jobs) share the cores instead of oversubscribing them
    env = dict(os.environ, OMP_NUM_THREADS=str(THREADS)) if THREADS else None
    proc = subprocess.run([sys.executable, "-m", "cli", *args], capture_output=True, text=True, cwd=REPO, env=env)
    if proc.returncode != 0:
        sys.exit(f"samoe {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    print(f"  {time.perf_counter() - t:6.1f} s  samoe {' '.join(args)}", flush=True)
    return proc.stdout


def step_flops(ckpt: Path, stage: int, data: Path, unlabelled: Path | None, batch_size: int) -> float:
    """Forward+backward FLOPs of one training step (both phases) of `ckpt` in `stage`: the product
    benchmark's count (benchmarks/protocol.py), in this protocol's argument order."""
    from benchmarks.protocol import step_flops as count

    return count(ckpt, stage, data, batch_size, unlabelled)


def image_stats(ckpt: Path, data: Path, limit: int = 0):
    """Per-image statistics of `ckpt` on the labelled folder `data` (its first `limit` images when limit > 0)."""
    from torch.utils.data import Subset

    from stages.data import LabelledFolder
    from stages.evaluate import run_model
    from upscale.checkpoint import load_model

    model = load_model(ckpt)
    cfg = model.config
    folder = LabelledFolder(data, cfg.num_classes, size=cfg.img_size)
    if 0 < limit < len(folder):
        folder = Subset(folder, range(limit))
    stats, routing = run_model(model, folder, 8)
    return stats, {k: v.report() for k, v in routing.items()}


def concat(stats: list):
    from stages.evaluate import ImageStats

    return ImageStats(np.concatenate([s.cm for s in stats]), np.concatenate([s.boundary for s in stats]),
                      np.concatenate([s.sdf for s in stats]), np.concatenate([s.interior for s in stats]))


def train(stage: int, src: Path, run: Path, data: Path, unlabelled: Path | None, steps: int, lr: float, seed: int,
          force_input: bool = False, extra: tuple[str, ...] = (), batch: int = 0) -> Path:
    args = ["train", "--stage", str(stage), "--from", str(src), "--run-dir", str(run), "--data", str(data),
            "--max-steps", str(steps), "--lr", str(lr), "--seed", str(seed), "--checkpoint-every", "100000",
            "--batch-size", str(batch or BATCH), *DEVICE]
    if unlabelled is not None:
        args += ["--unlabelled", str(unlabelled)]
    if force_input:
        args.append("--force")
    samoe(*args, *extra, out=run)
    return run / "final"


def one_seed(w: Path, d: Path, seed: int, args: argparse.Namespace) -> dict:
    print(f"seed {seed}", flush=True)
    A, B, test = d / "A", d / "B", d / "A-test"
    samoe("init", "--preset", "tiny", "--num-classes", "10", "--out", str(w / "init"), "--seed", str(seed), out=w / "init")
    # the grown architecture from scratch: grow the untrained init (extra block = identity, experts = copies + noise)
    samoe("expand", str(w / "init"), "--out", str(w / "init-grown"), *GROW, "--noise-std", "0.5", "--seed", str(seed),
          out=w / "init-grown")
    U = B if args.semisup else None  # the seed-004 unsupervised phase doubles each step's cost
    f_src = step_flops(w / "init", 3, A, U, args.batch_size)
    f_big = step_flops(w / "init-grown", 3, A, U, args.batch_size)
    spe = math.ceil(len(list((A / "images").iterdir())) / args.batch_size)
    s_steps = args.source_epochs * spe
    S = s_steps * f_src
    E = args.extra * S
    src = train(3, w / "init", w / "source", A, U, s_steps, args.lr, seed, force_input=True)
    # (a) the source trained further
    a_steps = max(1, round(E / f_src))
    x = args.arm_suffix
    fa = train(3, src, w / f"a{x}", A, U, a_steps, args.further_lr, seed, force_input=True)
    # (b) grow, pseudo-label, stages 1-3
    samoe("expand", str(src), "--out", str(w / "grown"), *GROW, "--noise-std", "0.01", "--seed", str(seed),
          "--verify", str(A), "--verify-tol", "1e-5", out=w / "grown")
    # confidence weights the loss; no threshold (a weak teacher would have every pixel dropped)
    samoe("pseudo-label", str(src), "--images", str(B), "--out", str(w / "B-pseudo"), out=w / "B-pseudo")
    f_b = {1: step_flops(w / "grown", 1, w / "B-pseudo", None, args.batch_size),
           2: step_flops(w / "grown", 2, A, U, args.batch_size),
           3: step_flops(w / "grown", 3, A, U, args.batch_size)}
    b_steps = {k: max(1, round(STAGE_SHARE[k] * E / f_b[k])) for k in (1, 2, 3)}
    lr_b, hand = args.stage_lrs, ("--handover-coef", str(args.handover_coef))
    s1 = train(1, w / "grown", w / f"s1{x}", w / "B-pseudo", None, b_steps[1], lr_b[0], seed, extra=hand)
    s2 = train(2, s1, w / f"s2{x}", A, U, b_steps[2], lr_b[1], seed, extra=hand)
    fb = train(3, s2, w / f"s3{x}", A, U, b_steps[3], lr_b[2], seed, extra=hand)
    # (c) the grown architecture from scratch, compute S + E
    c_steps = max(1, round((S + E) / f_big))
    fc = train(3, w / "init-grown", w / "c", A, U, c_steps, args.lr, seed, force_input=True)
    arms = {"source": src, "a": fa, "b": fb, "c": fc}
    compute = {"source": S, "a": S + a_steps * f_src, "b": S + sum(b_steps[k] * f_b[k] for k in b_steps), "c": c_steps * f_big}
    steps = {"source": s_steps, "a": s_steps + a_steps, "b": f"{s_steps}+{b_steps[1]}/{b_steps[2]}/{b_steps[3]}", "c": c_steps}
    out = {"compute": compute, "steps": steps, "stats": {}, "routing": {}}
    for name, path in arms.items():
        out["stats"][name], out["routing"][name] = image_stats(path, test)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/samoe-growth"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--labelled", type=int, default=128)
    ap.add_argument("--unlabelled", type=int, default=128)
    ap.add_argument("--test", type=int, default=48)
    ap.add_argument("--source-epochs", type=int, default=16, help="source training, in epochs of A")
    ap.add_argument("--semisup", action="store_true", help="every arm also runs seed 004's unsupervised phase on B")
    ap.add_argument("--extra", type=float, default=0.5, help="extra compute E as a fraction of the source's S")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--lr", type=float, default=0.2, help="lr of training from scratch (0.05 left a 10-class model flat)")
    ap.add_argument("--further-lr", type=float, default=0.1, help="lr of (a), the source trained further")
    ap.add_argument("--stage-lrs", type=float, nargs=3, default=[0.1, 0.1, 0.05], help="lr of (b)'s stages 1, 2, 3")
    ap.add_argument("--handover-coef", type=float, default=0.1, help="(b)'s hand-over loss weight (samoe train's option)")
    ap.add_argument("--reuse", action="store_true", help="keep --work and skip every step whose output exists "
                    "(e.g. rerun (a) and (b) with other learning rates under --arm-suffix)")
    ap.add_argument("--arm-suffix", default="", help="run-dir suffix of (a)'s and (b)'s runs")
    ap.add_argument("--bootstrap", type=int, default=2000)
    ap.add_argument("--jobs", type=int, default=1, help="seeds trained side by side (each gets cores/jobs threads)")
    ap.add_argument("--device", default=None, help="samoe train's --device for every run (e.g. cuda)")
    args = ap.parse_args()
    from stages.evaluate import METRICS, bootstrap_diff

    global REUSE, THREADS, DEVICE, BATCH
    REUSE, BATCH = args.reuse, args.batch_size
    THREADS = max(1, (os.cpu_count() or 1) // args.jobs) if args.jobs > 1 else 0
    DEVICE = ["--device", args.device] if args.device else []
    t0 = time.perf_counter()
    if not args.reuse:
        shutil.rmtree(args.work, ignore_errors=True)
    d = args.work / "data"
    if not (d / "demo-data.json").exists():
        samoe("demo-data", "--preset", "hard", "--out", str(d), "--labelled", str(args.labelled),
              "--unlabelled", str(args.unlabelled), "--test", str(args.test), "--seed", "1234")
    torch.set_num_threads(max(1, THREADS) if THREADS else torch.get_num_threads())
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:  # each seed mostly waits on its samoe processes
        futures = {seed: pool.submit(one_seed, args.work / f"seed{seed}", d, seed, args) for seed in args.seeds}
        runs = {seed: f.result() for seed, f in futures.items()}
    arms = ("source", "a", "b", "c")
    label = {"source": "source (tiny, 0.54M)", "a": "(a) source trained further", "b": "(b) grown + stages 1-3 (1.99M)",
             "c": "(c) grown arch. from scratch (1.99M)"}
    pooled = {arm: concat([runs[s]["stats"][arm] for s in args.seeds]) for arm in arms}
    print(f"\n{len(args.seeds)} seeds x {args.test} held-out images (hard preset, 10 classes); "
          f"{time.perf_counter() - t0:.0f} s in all\n")
    print("| arm | compute (TFLOP, mean) | steps (seed 0) | " + " | ".join(METRICS) + " |")
    print("|---|---|---|" + "---|" * len(METRICS))
    for arm in arms:
        tf = np.mean([runs[s]["compute"][arm] for s in args.seeds]) / 1e12
        m = pooled[arm].metrics()
        print(f"| {label[arm]} | {tf:.2f} | {runs[args.seeds[0]]['steps'][arm]} | "
              + " | ".join(f"{m[k]:.4f}" for k in METRICS) + " |")
    print("\n| comparison | " + " | ".join(f"{k} diff [95% CI]" for k in METRICS) + " | per-seed mIoU diff |")
    print("|---|" + "---|" * (len(METRICS) + 1))
    report = {"args": {k: str(v) for k, v in vars(args).items()}, "comparisons": {}}
    for x, y in (("a", "b"), ("a", "c"), ("source", "c"), ("source", "b"), ("source", "a")):
        diff = bootstrap_diff(pooled[x], pooled[y], args.bootstrap, seed=0)
        per_seed = [runs[s]["stats"][y].metrics()["miou"] - runs[s]["stats"][x].metrics()["miou"] for s in args.seeds]
        report["comparisons"][f"{y}-{x}"] = {"diff": diff, "per_seed_miou": per_seed}
        print(f"| {y} - {x} | " + " | ".join(f"{diff[k]['diff']:+.4f} [{diff[k]['ci_low']:+.4f}, {diff[k]['ci_high']:+.4f}]"
                                              for k in METRICS) + " | " + ", ".join(f"{v:+.4f}" for v in per_seed) + " |")
    route = runs[args.seeds[0]]["routing"]["b"]
    print("\nnew-group share of routing weight in (b), seed 0: "
          + ", ".join(f"{k.replace('image_encoder.blocks.', 'enc').replace('mask_decoder.transformer.layers.', 'dec').removesuffix('.mlp')}"
                      f" {v['new_weight_share']:.3f}" for k, v in route.items()))
    report["compute"] = {s: runs[s]["compute"] for s in args.seeds}
    (args.work.parent / f"{args.work.name}{args.arm_suffix}.json").write_text(json.dumps(report, indent=1, default=float))


if __name__ == "__main__":
    main()
