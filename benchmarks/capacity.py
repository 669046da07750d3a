"""The premise, checked before any growth run: at equal counted FLOPs, trained from scratch to their plateaus,
does the grown layout beat the source layout (`small`: tiny with 16 decoder channels) on the knowledge-bound
codebook set?

Growth can only beat "train the source further" where the grown layout is the better use of compute in the
first place. For each number of signatures N (`--signatures`), on `samoe demo-data --preset codebook`:
  tiny   the `small` preset with 16 classes (protocol.PRESET; `tiny`'s 4 decoder channels cannot learn 16
         classes), trained with `samoe train --stage 3` for S steps;
  grown  the layout growth makes (`--layout`, default: 32 experts as 8 replicas of the 4-expert pool, one
         group per token), every expert initialised independently, trained for the same counted
         forward+backward FLOPs (torch's FlopCounterMode over one real step of each).
Each layout's peak learning rate is chosen on a validation split (fresh scenes, the same table) from
`--lrs` with seed 0, then used for every seed. A run is at its plateau when its training loss fell less
than 1% over its last 1000 steps. The premise holds when grown - tiny in interior mIoU on the test split is
at least +0.10 and at least 5x the standard deviation of that difference over seeds.

    python benchmarks/capacity.py --work .lab/capacity --signatures 2200 --seeds 0 1 2 --steps 6000

Every finished run and its scores are cached under --work (an ignored folder of the work tree survives to the
next session): rerunning the same command finishes what is missing and prints the table.
"""

from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

import protocol as P

LAYOUTS = {
    # the plan's shape (8 routed groups, one per token) as replicas of the 4-expert pool: the token tier's `grown8`,
    # which beat tiny by +0.20 mIoU on the fine grid at N = 2200 (docs/growth-experiments.md). Its decoder routes
    # groups per token too, so a step costs 1.01x `small`'s (mixing all 8 groups there doubles it)
    "replicas8": dict(experts=32, groups=(4,) * 8, core_groups=0, top_k_groups=1, replicate=True, noise_std=0.0,
                      decoder_group_mixing=False),
    "replicas": dict(experts=16, groups=(4, 4, 4, 4), core_groups=0, top_k_groups=1, replicate=True, noise_std=0.0),
    "plan": dict(experts=16, groups=(4, 4, 4, 4), core_groups=1, top_k_groups=1, routed_top_k=1, noise_std=0.0),
}


def arm_runs(work: Path, n: int, layout: str, grow: dict | None, data: dict[str, Path], seeds: list[int],
             lrs: list[float], steps: int, batch: int, every: int, jobs: int) -> dict:
    """Train one layout: every lr with seed 0, the best one (on validation) with the other seeds; return runs and scores."""
    def run(seed: int, lr: float) -> dict:
        init = P.init_checkpoint(work / f"init-{layout}-s{seed}", seed, 16, grow)
        out = work / f"N{n}" / f"{layout}-lr{lr:g}-s{seed}"
        final = P.train(3, init, out, data["A"], steps, lr, seed, batch, every=every)
        val = P.cached(out.parent / f"{out.name}-val.json",
                       lambda: {str(s): P.score(c, data["val"]).metrics for s, c in P.step_checkpoints(out).items()})
        test = P.cached(out.parent / f"{out.name}-test.json", lambda: P.score(final, data["test"]).metrics)
        return {"lr": lr, "seed": seed, "steps": steps, "run": str(out), "val": val, "test": test,
                "drop_per_1000": P.loss_drop_per_1000(out)}

    with ThreadPoolExecutor(jobs) as pool:
        first = list(pool.map(lambda lr: run(seeds[0], lr), lrs))
        best = max(first, key=lambda r: r["val"][max(r["val"], key=int)]["miou_interior"])
        rest = list(pool.map(lambda s: run(s, best["lr"]), seeds[1:]))
    return {"lr_search": first, "runs": [best] + rest}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path(".lab/capacity"))
    ap.add_argument("--signatures", type=int, nargs="+", default=[2200])
    ap.add_argument("--grid", choices=["fine", "coarse"], default="fine", help="the codebook's signature grid")
    ap.add_argument("--layout", choices=sorted(LAYOUTS), default="replicas8")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--lrs", type=float, nargs="+", default=[0.1, 0.3], help="peak learning rates tried with seed 0")
    ap.add_argument("--steps", type=int, default=6000, help="tiny's steps S; the grown layout gets S x its FLOP ratio")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--eval-every", type=int, default=1000, help="validation points along each run (the curves)")
    ap.add_argument("--labelled", type=int, default=4000)
    ap.add_argument("--val", type=int, default=200)
    ap.add_argument("--test", type=int, default=400)
    ap.add_argument("--jobs", type=int, default=2, help="runs side by side, one thread each")
    args = ap.parse_args()
    t0 = time.perf_counter()
    grow = LAYOUTS[args.layout]
    report = {}
    for n in args.signatures:
        data = P.codebook_data(args.work, n, args.labelled, args.val, args.test, args.grid)
        inits = {"tiny": P.init_checkpoint(args.work / "init-tiny-s0", 0, 16),
                 args.layout: P.init_checkpoint(args.work / f"init-{args.layout}-s0", 0, 16, grow)}
        flops = P.cached(args.work / f"flops-{args.layout}-b{args.batch}.json",
                         lambda: {k: P.step_flops(v, 3, data["A"], args.batch) for k, v in inits.items()})
        steps = {"tiny": args.steps, args.layout: round(args.steps * flops["tiny"] / flops[args.layout])}
        report[n] = {k: arm_runs(args.work, n, k, None if k == "tiny" else grow, data, args.seeds, args.lrs, steps[k],
                                 args.batch, args.eval_every, args.jobs) for k in ("tiny", args.layout)}
        report[n]["flops_per_step"] = flops
    (args.work / f"capacity-{args.layout}.json").write_text(json.dumps(report, indent=1))
    print(f"\npremise on the codebook set: {args.layout} layout vs tiny from scratch at equal counted FLOPs; seeds {args.seeds}; "
          f"batch {args.batch}; {time.perf_counter() - t0:.0f} s\n")
    print("| N | layout | lr (val) | steps | TFLOP | interior mIoU per seed | mean | sd | loss fall / 1000 steps |")
    print("|---|---|---|---|---|---|---|---|---|")
    for n, r in report.items():
        for k in ("tiny", args.layout):
            runs = r[k]["runs"]
            vals = [x["test"]["miou_interior"] for x in runs]
            tflop = runs[0]["steps"] * r["flops_per_step"][k] / 1e12
            print(f"| {n} | {k} | {runs[0]['lr']:g} | {runs[0]['steps']} | {tflop:.1f} | "
                  + " / ".join(f"{v:.4f}" for v in vals) + f" | {np.mean(vals):.4f} | {np.std(vals, ddof=1) if len(vals) > 1 else float('nan'):.4f} | "
                  + " / ".join(f"{x['drop_per_1000']:.2%}" for x in runs) + " |")
        gap = [g["test"]["miou_interior"] - t["test"]["miou_interior"] for g, t in zip(r[args.layout]["runs"], r["tiny"]["runs"])]
        mean, lo, hi = P.t_interval(gap)
        sd = float(np.std(gap, ddof=1)) if len(gap) > 1 else float("nan")
        holds = mean >= 0.10 and mean >= 5 * sd
        print(f"| {n} | {args.layout} - tiny | | | | " + " / ".join(f"{g:+.4f}" for g in gap)
              + f" | {mean:+.4f} [{lo:+.4f}, {hi:+.4f}] | {sd:.4f} | premise {'holds' if holds else 'does not hold'} |")
    print("\nvalidation interior mIoU along each seed-0 run (step: value):")
    for n, r in report.items():
        for k in ("tiny", args.layout):
            for x in r[k]["lr_search"]:
                print(f"  N {n} {k} lr {x['lr']:g}: " + ", ".join(f"{s}: {m['miou_interior']:.3f}" for s, m in x["val"].items()))


if __name__ == "__main__":
    main()
