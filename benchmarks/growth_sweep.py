"""Schedules for the growth experiment's (a) and (b) arms, side by side, on sources that growth.py trained.

growth.py runs one schedule per arm; this runs several, for every seed at once (one process per
run, `--jobs` at a time), from the sources and grown checkpoints of a growth.py work folder
(`--work`, laid out as seed<N>/source/final and seed<N>/grown). Every arm gets the same extra
compute E = `--extra` x the source's S, counted as in growth.py (FLOPs of one real step of each
stage, so the grown model's costlier steps buy it fewer of them). Arms:

    a:<lr>                  the source trained further (stage 3)
    ft:<lr>                 the grown model, stage 3 only (every parameter trains)
    staged:<s1>/<s2>/<s3>:<lr1>/<lr2>/<lr3>   stages 1-3 sharing E (shares in percent); stage 1 on
                            the source's pseudo-labels of B, stages 2-3 on A

It prints mIoU and SDF error per arm and every arm against the first, with paired bootstrap 95%
intervals over (seed, image) pairs; selecting the best of several arms on the same test images
flatters it, so report the whole table.

    python benchmarks/growth_sweep.py --work W --extra 0.5 --arms a:0.05 a:0.1 ft:0.1 staged:10/30/60:0.1/0.1/0.1
"""

from __future__ import annotations

import argparse
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

import growth
from growth import concat, image_stats, samoe, step_flops, train


def flops(w: Path, d: Path, batch: int) -> dict[str, float]:
    """Per-step FLOPs of the source (stage 3) and of the grown model in stages 1-3 (one thread: the
    counter is a global dispatch mode). Needs the pseudo-labels for stage 1's batch."""
    src, grown, A = w / "source" / "final", w / "grown", d / "A"
    return {"src": step_flops(src, 3, A, None, batch), **{f"g{k}": step_flops(grown, k, w / "B-pseudo" if k == 1 else A,
                                                                               None, batch) for k in (1, 2, 3)}}


def converge(work: Path, seed: int, steps: int, lr: float) -> None:
    """Train seed's source `steps` more and grow it, into work/converged-<steps>/seed<N>/{source/final,grown}."""
    w, out = work / f"seed{seed}", work / f"converged-{steps}" / f"seed{seed}"
    out.mkdir(parents=True, exist_ok=True)
    src = train(3, w / "source" / "final", out / "source", work / "data" / "A", None, steps, lr, seed, force_input=True)
    samoe("expand", str(src), "--out", str(out / "grown"), *growth.GROW, "--noise-std", "0.01", "--seed", str(seed),
          out=out / "grown")


def run_arm(arm: str, w: Path, d: Path, seed: int, E: float, f: dict[str, float]) -> Path:
    """Train one arm of one seed with extra compute E (FLOPs); returns its final checkpoint."""
    kind, _, rest = arm.partition(":")
    A, tag = d / "A", arm.replace(":", "_").replace("/", "-")
    src, grown = w / "source" / "final", w / "grown"
    if kind == "a":
        return train(3, src, w / f"sweep-{tag}", A, None, max(1, round(E / f["src"])), float(rest), seed, force_input=True)
    if kind == "ft":
        return train(3, grown, w / f"sweep-{tag}", A, None, max(1, round(E / f["g3"])), float(rest), seed, force_input=True)
    shares, lrs = ([float(v) for v in part.split("/")] for part in rest.split(":"))
    ckpt = grown
    for stage, share, lr in zip((1, 2, 3), shares, lrs):
        if share > 0:
            steps = max(1, round(share / 100 * E / f[f"g{stage}"]))
            ckpt = train(stage, ckpt, w / f"sweep-{tag}-s{stage}", w / "B-pseudo" if stage == 1 else A, None, steps, lr, seed)
    return ckpt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True, help="a growth.py work folder (its sources are reused)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--arms", nargs="+", required=True)
    ap.add_argument("--extra", type=float, default=0.5)
    ap.add_argument("--source-steps", type=int, default=768)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--jobs", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of each samoe process")
    ap.add_argument("--bootstrap", type=int, default=2000)
    ap.add_argument("--converge", type=int, default=0, metavar="STEPS",
                    help="first train each source STEPS more (stage 3, --converge-lr) and grow that: a source nearer "
                         "its plateau, as a user's trained model is; E stays a fraction of the original S")
    ap.add_argument("--converge-lr", type=float, default=0.1)
    ap.add_argument("--device", default=None, help="samoe train's --device for every run (e.g. cuda)")
    args = ap.parse_args()
    from stages.evaluate import bootstrap_diff

    growth.REUSE, growth.THREADS, growth.BATCH = True, args.threads, args.batch_size
    growth.DEVICE = ["--device", args.device] if args.device else []
    d, t0 = args.work / "data", time.perf_counter()
    if args.converge:
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            list(pool.map(lambda s: converge(args.work, s, args.converge, args.converge_lr), args.seeds))
        args.work = args.work / f"converged-{args.converge}"
    f = {}
    for s in args.seeds:
        w = args.work / f"seed{s}"
        samoe("pseudo-label", str(w / "source" / "final"), "--images", str(d / "B"), "--out", str(w / "B-pseudo"),
              out=w / "B-pseudo")
        f[s] = flops(w, d, args.batch_size)
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = {(s, arm): pool.submit(run_arm, arm, args.work / f"seed{s}", d, s,
                                         args.extra * args.source_steps * f[s]["src"], f[s])
                   for s in args.seeds for arm in args.arms}
        finals = {key: fut.result() for key, fut in futures.items()}
    stats = {arm: concat([image_stats(finals[s, arm], d / "A-test")[0] for s in args.seeds]) for arm in args.arms}
    source = concat([image_stats(args.work / f"seed{s}" / "source" / "final", d / "A-test")[0] for s in args.seeds])
    print(f"\nextra compute E = {args.extra} S; seeds {args.seeds}; {time.perf_counter() - t0:.0f} s\n")
    print("| arm | miou | sdf_mae | miou - source [95% CI] | miou - first arm [95% CI] |\n|---|---|---|---|---|")
    print(f"| source | {source.metrics()['miou']:.4f} | {source.metrics()['sdf_mae']:.4f} | | |")
    first = args.arms[0]
    for arm in args.arms:
        m = stats[arm].metrics()
        vs_src = bootstrap_diff(source, stats[arm], args.bootstrap)["miou"]
        vs_first = bootstrap_diff(stats[first], stats[arm], args.bootstrap)["miou"]
        fmt = lambda x: f"{x['diff']:+.4f} [{x['ci_low']:+.4f}, {x['ci_high']:+.4f}]"
        print(f"| {arm} | {m['miou']:.4f} | {m['sdf_mae']:.4f} | {fmt(vs_src)} | {fmt(vs_first)} |")


if __name__ == "__main__":
    main()
