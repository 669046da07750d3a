"""Does growing pay, at equal training compute, where capacity binds? The growth protocol on the codebook set.

Run `capacity.py` first: its tiny runs at their plateau are the sources here, its grown-layout runs from
scratch are arm (c), and the premise it checks is what makes this comparison mean anything. For each seed,
with extra compute E = `--extra` x the source's S (counted forward+backward FLOPs):
  (a) the source trained further: `samoe train --stage 3` for E, at lr_scale m x its own peak rate;
  (b) the source grown (`samoe expand`, `--layout`) and trained through stages 1, 2, 3 sharing E
      (`--stage-share`), each stage at its default scale (1, 0.3, 0.1) x m x the source's peak rate; stage 1
      trains on `--stage1-data`: the labelled set, the source's pseudo-labels of unlabelled scenes, or both;
  (c) the grown layout from scratch at its plateau (capacity.py), for its total compute.
Each arm's multiplier m is chosen on the validation split with seed 0 from `--mults`, then used for every seed.
Scores are on the test split: interior mIoU (pixels more than half a patch from a class border). Reported per
seed: (b) - (a) with a t-interval over seeds, every arm's FLOPs, and what (b)'s new parts add (switched off).

    python benchmarks/growth.py --work .lab/capacity --signatures 2200 --seeds 0 1 2 --extra 0.5 1

Finished runs and scores are cached under --work; rerun the same command to finish or reprint.
"""

from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

import protocol as P
from capacity import LAYOUTS

GROW_ARGS = {  # the same layouts as capacity.LAYOUTS, through `samoe expand`
    "replicas8": ["--experts", "32", "--groups", "8", "--set", "replicate=true", "--set", "decoder_group_mixing=false"],
    "replicas": ["--experts", "16", "--groups", "4", "--set", "replicate=true"],
    "plan": ["--experts", "16", "--groups", "4", "--set", "routed_top_k=1", "--set", "noise_std=0"],
}


def source_run(cap: dict, seed: int) -> dict:
    return next(r for r in cap["tiny"]["runs"] if r["seed"] == seed)


def arm_a(work: Path, src: Path, data: dict, seed: int, m: float, steps: int, batch: int) -> Path:
    return P.train(3, src, work / f"a-m{m:g}-s{seed}", data["A"], steps, None, seed, batch, extra=("--set", f"lr_scale={m:g}"))


def arm_b(work: Path, src: Path, data: dict, seed: int, m: float, steps: dict[int, int], batch: int, layout: str,
          stage1_data: str, augment: bool) -> Path:
    grown = work / f"grown-{layout}-s{seed}"
    if not (grown / "samoe.json").exists():
        P.samoe("expand", str(src), "--out", str(grown), *GROW_ARGS[layout], "--seed", str(seed), "--force")
    s1_data = {"labelled": [data["A"]], "pseudo": [data["B-pseudo"]], "mixed": [data["A"], data["B-pseudo"]]}[stage1_data]
    tag = f"{layout}-{stage1_data}{'-aug' if augment else ''}-m{m:g}-s{seed}"
    prev = grown
    for stage in (1, 2, 3):
        extra = ["--set", f"lr_scale={m * {1: 1.0, 2: 0.3, 3: 0.1}[stage]:g}"]
        extra += [a for d in s1_data[1:] for a in ("--data", str(d))] if stage == 1 else []
        extra += ["--set", "augment=true"] if augment else []
        first = s1_data[0] if stage == 1 else data["A"]
        prev = P.train(stage, prev, work / f"b{stage}-{tag}", first, steps[stage], None, seed, batch, extra=tuple(extra))
    return prev


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path(".lab/capacity"), help="capacity.py's --work")
    ap.add_argument("--signatures", type=int, default=2200)
    ap.add_argument("--grid", choices=["fine", "coarse"], default="fine", help="the codebook's signature grid")
    ap.add_argument("--layout", choices=sorted(LAYOUTS), default="replicas8")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--extra", type=float, nargs="+", default=[0.5, 1.0], help="E as fractions of the source's S")
    ap.add_argument("--mults", type=float, nargs="+", default=[0.3, 1.0, 3.0], help="lr multipliers tried on seed 0")
    ap.add_argument("--stage-share", type=float, nargs=3, default=[0.4, 0.3, 0.3])
    ap.add_argument("--stage1-data", choices=["labelled", "pseudo", "mixed"], default="mixed")
    ap.add_argument("--augment", action="store_true", help="every stage of (b) augments its inputs (Noisy Student)")
    ap.add_argument("--unlabelled", type=int, default=2000, help="scenes pseudo-labelled by the source (stage 1)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--jobs", type=int, default=2)
    args = ap.parse_args()
    t0 = time.perf_counter()
    cap = json.loads((args.work / f"capacity-{args.layout}.json").read_text())[str(args.signatures)]
    flops = cap["flops_per_step"]
    data = P.codebook_data(args.work, args.signatures, 0, 0, 0, args.grid)
    seeds = args.seeds
    results = {}
    for frac in args.extra:
        def one(seed: int, m: float, arm: str) -> dict:
            s = source_run(cap, seed)
            src = Path(s["run"]) / "final"
            work = args.work / f"N{args.signatures}" / f"growth-E{frac:g}"
            S = s["steps"] * flops["tiny"]
            if arm == "a":
                final = arm_a(work, src, data, seed, m, round(frac * S / flops["tiny"]), args.batch)
                compute = S + round(frac * S / flops["tiny"]) * flops["tiny"]
            else:
                unl = args.work / f"codebook-{args.grid}-{args.signatures}-unlabelled"
                if not (unl / "demo-data.json").exists():
                    P.samoe("demo-data", "--preset", "codebook", "--grid", args.grid, "--signatures", str(args.signatures), "--out", str(unl),
                            "--force", "--labelled-scenes", "0", "--test-scenes", "0", "--unlabelled-scenes", str(args.unlabelled), "--seed", "2")
                pseudo = work / f"B-pseudo-s{seed}"
                if not (pseudo / "masks").is_dir() or len(list((pseudo / "masks").iterdir())) < args.unlabelled:
                    P.samoe("pseudo-label", str(src), "--images", str(unl / "B"), "--out", str(pseudo))
                grown = work / f"grown-{args.layout}-s{seed}"
                if not (grown / "samoe.json").exists():
                    P.samoe("expand", str(src), "--out", str(grown), *GROW_ARGS[args.layout], "--seed", str(seed), "--force")
                # a stage's step costs what its trainable parts make it cost (frozen parts run forward only)
                f_b = P.cached(work / f"flops-b-{args.layout}-s{seed}.json",
                               lambda: {str(k): P.step_flops(grown, k, data["A"], args.batch) for k in (1, 2, 3)})
                steps = {k + 1: max(1, round(share * frac * S / f_b[str(k + 1)])) for k, share in enumerate(args.stage_share)}
                final = arm_b(work, src, dict(data, **{"B-pseudo": pseudo}), seed, m, steps, args.batch, args.layout,
                              args.stage1_data, args.augment)
                compute = S + sum(steps[k] * f_b[str(k)] for k in steps)
            key = f"{final.parent.name}"
            val = P.cached(final.parent.parent / f"{key}-val.json", lambda: P.score(final, data["val"]).metrics)
            test = P.cached(final.parent.parent / f"{key}-test.json", lambda: P.score(final, data["test"]).metrics)
            out = {"seed": seed, "m": m, "val": val, "test": test, "compute": compute, "path": str(final)}
            if arm == "b":
                out["off"] = P.cached(final.parent.parent / f"{key}-off.json",
                                      lambda: P.score(final, data["test"], ablate=True).metrics)
            return out

        with ThreadPoolExecutor(args.jobs) as pool:
            search = {arm: list(pool.map(lambda m: one(seeds[0], m, arm), args.mults)) for arm in ("a", "b")}
            best = {arm: max(r, key=lambda x: x["val"]["miou_interior"])["m"] for arm, r in search.items()}
            runs = {arm: [next(x for x in search[arm] if x["m"] == best[arm])]
                    + list(pool.map(lambda s: one(s, best[arm], arm), seeds[1:])) for arm in ("a", "b")}
        results[frac] = {"search": search, "runs": runs}
    c_runs = cap[args.layout]["runs"]
    print(f"\ngrowth on the codebook set (N={args.signatures}), {args.layout} layout, stage 1 on {args.stage1_data} data"
          f"{', augmented' if args.augment else ''}; seeds {seeds}; {time.perf_counter() - t0:.0f} s\n")
    print("| E / S | arm | lr multiplier (val) | TFLOP | interior mIoU per seed | mean | new parts off (mean) |")
    print("|---|---|---|---|---|---|---|")
    src_vals = [source_run(cap, s)["test"]["miou_interior"] for s in seeds]
    S = source_run(cap, seeds[0])["steps"] * flops["tiny"]
    print(f"| 0 | source (tiny at its plateau) | | {S / 1e12:.1f} | " + " / ".join(f"{v:.4f}" for v in src_vals)
          + f" | {np.mean(src_vals):.4f} | |")
    for frac, r in results.items():
        for arm, label in (("a", "(a) source trained further"), ("b", f"(b) grown ({args.layout}) + stages 1-3")):
            vals = [x["test"]["miou_interior"] for x in r["runs"][arm]]
            off = [x["off"]["miou_interior"] for x in r["runs"][arm]] if arm == "b" else None
            print(f"| {frac:g} | {label} | {r['runs'][arm][0]['m']:g} | {r['runs'][arm][0]['compute'] / 1e12:.1f} | "
                  + " / ".join(f"{v:.4f}" for v in vals) + f" | {np.mean(vals):.4f} | "
                  + (f"{np.mean(off):.4f}" if off else "") + " |")
        gap = [b["test"]["miou_interior"] - a["test"]["miou_interior"] for a, b in zip(r["runs"]["a"], r["runs"]["b"])]
        mean, lo, hi = P.t_interval(gap)
        print(f"| {frac:g} | (b) - (a) | | | " + " / ".join(f"{g:+.4f}" for g in gap) + f" | {mean:+.4f} [{lo:+.4f}, {hi:+.4f}] | |")
        adds = [x["test"]["miou_interior"] - x["off"]["miou_interior"] for x in r["runs"]["b"]]
        mean, lo, hi = P.t_interval(adds)
        print(f"| {frac:g} | what (b)'s new parts add | | | " + " / ".join(f"{g:+.4f}" for g in adds)
              + f" | {mean:+.4f} [{lo:+.4f}, {hi:+.4f}] | |")
    c_vals = [x["test"]["miou_interior"] for x in c_runs]
    c_compute = c_runs[0]["steps"] * flops[args.layout]
    print(f"| | (c) {args.layout} layout from scratch at its plateau | lr {c_runs[0]['lr']:g} | {c_compute / 1e12:.1f} | "
          + " / ".join(f"{v:.4f}" for v in c_vals) + f" | {np.mean(c_vals):.4f} | |")
    (args.work / f"growth-{args.layout}-{args.stage1_data}{'-aug' if args.augment else ''}.json").write_text(
        json.dumps({str(k): v for k, v in results.items()}, indent=1))


if __name__ == "__main__":
    main()
