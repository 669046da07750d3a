"""Does a larger architecture beat the tiny one at equal training FLOPs, trained from scratch?

Growth can only beat "train the source further" at equal compute if, at that compute, the grown
architecture is the better use of it. This checks that premise directly, one component at a time,
before any growth experiment: for each seed, the tiny model (`samoe init --preset tiny`, as
hard_protocol.py makes it) is trained from scratch for `--source-steps` steps, and each larger layout
(`--variants`, growth_sweep.py's `@variant` syntax: blocks<n>, rk<k>, noise<std>, ...; the untrained
init grown with it, as hard_protocol.py's arm (c)) for the same forward+backward FLOPs, counted as in
hard_protocol.py, so a costlier step buys fewer steps. Every run uses the same data, learning rate and
batch. Scores on the `--test` folders (pooled: e.g. one per region), mIoU against the tiny model
with paired bootstrap 95% intervals over images, and over seeds then images, also for the mean of each
seed's own mIoU (pooled mIoU rewards seeds that learnt different look-alike classes).

    python experiments/growth/scratch_check.py --data D --out W --seeds 0 1 --source-steps 1536 \
        --variants blocks0+rk1+noise0.5 rk1+noise0.5 --test T/A-test

Runs already complete under --out are reused (a run of the same command finishes the rest).
"""

from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

import hard_protocol
from hard_protocol import concat, samoe, step_flops, train
from growth_sweep import ci, folder_key, growth_args, scores, seed_labels


def prepare(out: Path, data: Path, seed: int, variants: list[str], batch: int) -> dict[str, tuple[Path, float]]:
    """Each arm's starting checkpoint and per-step FLOPs: the tiny init, and the init grown by each variant."""
    w = out / f"seed{seed}"
    init = w / "init"
    samoe("init", "--preset", "tiny", "--num-classes", "10", "--out", str(init), "--seed", str(seed), out=init)
    arms = {"tiny": (init, step_flops(init, 3, data / "A", None, batch))}
    for v in variants:
        grown = w / f"init-{v}"
        samoe("expand", str(init), "--out", str(grown), *growth_args(v), "--seed", str(seed), out=grown)
        arms[v] = (grown, step_flops(grown, 3, data / "A", None, batch))
    return arms


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True, help="a demo-data folder (its A/ is trained on)")
    ap.add_argument("--out", type=Path, required=True, help="work folder: seed<N>/{init,init-<variant>,<arm>}")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--variants", nargs="+", required=True, help="larger layouts, growth_sweep.py's @variant syntax")
    ap.add_argument("--source-steps", type=int, default=1536, help="the tiny model's steps; the others get its FLOPs")
    ap.add_argument("--lr", type=float, default=0.2)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of each samoe process")
    ap.add_argument("--device", default=None, help="samoe train's --device for every run (e.g. cuda)")
    ap.add_argument("--bootstrap", type=int, default=2000)
    ap.add_argument("--test", type=Path, nargs="+", required=True, help="held-out folder(s), pooled")
    args = ap.parse_args()
    for folder in (args.data / "A", *args.test):
        if not (folder / "images").is_dir():
            ap.error(f"{folder} has no images/ folder: pass --data a demo-data folder and --test labelled folders")
    hard_protocol.REUSE, hard_protocol.THREADS, hard_protocol.BATCH = True, args.threads, args.batch_size
    hard_protocol.DEVICE = ["--device", args.device] if args.device else []
    t0 = time.perf_counter()
    starts = {s: prepare(args.out, args.data, s, args.variants, args.batch_size) for s in args.seeds}
    names = ["tiny", *args.variants]
    steps = {(s, a): max(1, round(args.source_steps * starts[s]["tiny"][1] / starts[s][a][1])) for s in args.seeds for a in names}
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = {(s, a): pool.submit(train, 3, starts[s][a][0], args.out / f"seed{s}" / a, args.data / "A", None,
                                       steps[s, a], args.lr, s, True) for s in args.seeds for a in names}
        finals = {key: fut.result() for key, fut in futures.items()}
    from stages.evaluate import bootstrap_diff

    keys = [(t, folder_key(t)) for t in args.test]
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        scored = dict(zip(finals, pool.map(lambda c: concat([scores(c, t, k) for t, k in keys]), finals.values())))
    per_seed = {a: [scored[s, a] for s in args.seeds] for a in names}
    stats = {a: concat(v) for a, v in per_seed.items()}
    runs = seed_labels(per_seed["tiny"])
    n = stats["tiny"].cm.shape[0] // len(args.seeds)
    print(f"\nfrom scratch at equal FLOPs ({args.source_steps} tiny steps, lr {args.lr}, batch {args.batch_size}); "
          f"seeds {args.seeds}; {n} held-out images per seed ({', '.join(map(str, args.test))}); "
          f"{time.perf_counter() - t0:.0f} s\n")
    print("| arm | FLOPs/step vs tiny | steps | mIoU | interior mIoU | - tiny [95% CI, images] "
          "| - tiny [95% CI, seeds then images] | mean of the seeds' own - tiny [95% CI, seeds then images] "
          "| per seed |\n|---|---|---|---|---|---|---|---|---|")
    for a in names:
        cost = np.mean([starts[s][a][1] / starts[s]["tiny"][1] for s in args.seeds])
        cells = ["", "", ""] if a == "tiny" else [
            ci(bootstrap_diff(stats["tiny"], stats[a], args.bootstrap, clusters=c, per_cluster=mean)["miou"])
            for c, mean in ((None, False), (runs, False), (runs, True))]
        m = stats[a].metrics()
        print(f"| {a} | {cost:.3f} | {steps[args.seeds[0], a]} | {m['miou']:.4f} | {m['miou_interior']:.4f} | "
              + " | ".join(cells) + " | " + " / ".join(f"{st.metrics()['miou']:.4f}" for st in per_seed[a]) + " |")
    print_class_iou(args.data, names, stats)


def print_class_iou(data: Path, names: list[str], stats: dict) -> None:
    """IoU per class, seeds pooled: on these sets a gap in mIoU is often one pair of look-alike classes (cropland
    and grassland differ only in their row pattern) that one layout has begun to tell apart and the other not."""
    from stages.evaluate import iou_per_class

    iou = {a: iou_per_class(stats[a].cm.sum(0)) for a in names}
    try:  # demo-data's class names; any other folder gets numbers
        classes = list(json.loads((data / "demo-data.json").read_text())["classes"])
    except (OSError, ValueError, KeyError, TypeError):
        classes = []
    if len(classes) != len(iou["tiny"]):
        classes = [f"class {c}" for c in range(len(iou["tiny"]))]
    print("\n| IoU, seeds pooled | " + " | ".join(names) + " |\n|---|" + "---|" * len(names))
    for c, name in enumerate(classes):
        print(f"| {name} | " + " | ".join(f"{iou[a][c]:.3f}" for a in names) + " |")


if __name__ == "__main__":
    main()
