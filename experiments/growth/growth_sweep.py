"""Schedules for the growth experiment's (a) and (b) arms, side by side, on sources that hard_protocol.py trained.

hard_protocol.py runs one schedule per arm; this runs several, for every seed at once (one process per
run, `--jobs` at a time), from the sources and grown checkpoints of a hard_protocol.py work folder
(`--work`, laid out as seed<N>/source/final and seed<N>/grown). Every arm gets the same extra
compute E = `--extra` x the source's S, counted as in hard_protocol.py (FLOPs of one real step of each
stage, so the grown model's costlier steps buy it fewer of them). Arms:

    a:<lr>                  the source trained further (stage 3)
    <grown arm>@<variant>   the same, from another growth of the source, parts joined by '+': noise<std>
                            (copy + noise of that relative std), interp<w> (interpolation of two source
                            experts), blocks<n> (n extra blocks, not 1), rk<k> (k experts per token in a
                            new group) or rep (`--replicate`: 4 exact copies of the source's experts, each
                            token routed to one, at the source's cost per token); blocks, rk and rep change
                            the layout, so the arm counts its own FLOPs. (The variants that measured neutral
                            or worse left samoe: docs/growth-experiments.md, "Removed variants".)
    ft:<lr>                 the grown model, stage 3 only (every parameter trains)
    stage1:<lr>             the grown model, stage 1 only, on A: the source frozen, only the new experts
                            and the routers train (the plan's integration stage; cheaper steps, no weight
                            gradients for the source's parts, and the source's function cannot be lost)
    staged:<s1>/<s2>/<s3>:<lr1>/<lr2>/<lr3>   stages 1-3 sharing E (shares in percent); stage 1 on
                            the source's pseudo-labels of B, stages 2-3 on A

It prints mIoU and SDF error per arm, every arm against the source and the first arm, every grown
arm against every (a), and each seed's mIoU, with paired bootstrap 95% intervals over (seed, image)
pairs; the grown arms against (a) also with seeds resampled first (a two-stage bootstrap: with a few
seeds that disagree, pooled images make an interval too narrow for a new seed), and as the mean of
each seed's own mIoU (pooled mIoU sums the seeds' confusion matrices, which rewards seeds that learnt
different look-alike classes). Selecting the best of several arms on the same test images flatters
it, so report the whole table (and `--test` scores the same runs on a larger held-out set drawn
from another seed).

`--converge N` first trains each source N more steps (and grows that): growth is for a model that has
stopped improving, and on an under-trained source "train it further" wins by default.

    python experiments/growth/growth_sweep.py --work W --extra 0.5 --arms a:0.05 a:0.1 ft:0.1 staged:10/30/60:0.1/0.1/0.1
    python experiments/growth/growth_sweep.py --work W --converge 864 --converge-lr 0.2 --converge-batch 16 --extra 2 \
        --arms a:0.02 a:0.01 a:0.05 ft:0.02 ft:0.05 staged:5/15/80:0.05/0.02/0.02 --test T/A-test
"""

from __future__ import annotations

import argparse
import hashlib
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

import hard_protocol
from hard_protocol import concat, image_stats, samoe, step_flops, train


def flops(w: Path, d: Path, batch: int) -> dict[str, float]:
    """Per-step FLOPs of the source (stage 3) and of the grown model in stages 1-3 (one thread: the
    counter is a global dispatch mode). Needs the pseudo-labels for stage 1's batch."""
    src, grown, A = w / "source" / "final", w / "grown", d / "A"
    return {"src": step_flops(src, 3, A, None, batch), **{f"g{k}": step_flops(grown, k, w / "B-pseudo" if k == 1 else A,
                                                                               None, batch) for k in (1, 2, 3)}}


def converge(work: Path, seed: int, steps: int, lr: float, batch: int) -> None:
    """Train seed's source `steps` more (batch `batch`) and grow it, into work/converged-<steps>/seed<N>/{source/final,grown}."""
    w, out = work / f"seed{seed}", work / f"converged-{steps}" / f"seed{seed}"
    out.mkdir(parents=True, exist_ok=True)
    train(3, w / "source" / "final", out / "source", work / "data" / "A", None, steps, lr, seed, force_input=True,
                batch=batch)
    grow(out, seed, "")


LAYOUT_PARTS = ("blocks", "rk", "rep")  # variant parts that change the grown layout, hence the FLOPs of a step


def growth_args(variant: str) -> list[str]:
    """expand's options for an arm's `@variant`: parts joined by '+', each one of noise<std> or interp<w> (the
    init; default copy + 1% noise), blocks<n> (n extra blocks instead of hard_protocol.py's 1), rk<k> (k experts
    per token inside a chosen new group: `--routed-top-k`) or rep (`--replicate`: 4 exact copies of the source's
    experts, one per token, at the source's cost per token); '' is hard_protocol.py's growth."""
    layout, init, extra = list(hard_protocol.GROW), ["--noise-std", "0.01"], []
    for part in filter(None, variant.split("+")):
        if part.startswith("blocks"):
            layout[layout.index("--extra-blocks") + 1] = part[len("blocks"):]
        elif part.startswith("rk"):
            layout += ["--routed-top-k", part[len("rk"):]]
        elif part.startswith("noise"):
            init = ["--noise-std", part[len("noise"):]]
        elif part.startswith("interp"):
            init = ["--init", "interpolate", "--interp-weight", part[len("interp"):] or "0.3"]
        elif part == "rep":
            extra += ["--replicate"]
            init = []
        else:
            raise SystemExit(f"unknown growth variant part {part!r} in @{variant}: use noise<std>, interp<w>, "
                             "blocks<n>, rk<k> or rep, joined by '+'")
    return [*layout, *init, *extra]


def changes_layout(variant: str) -> bool:
    return any(part.startswith(LAYOUT_PARTS) for part in variant.split("+"))


def grown_dir(w: Path, variant: str) -> Path:
    """w/grown (the default growth) or w/grown-<variant>."""
    return w / (f"grown-{variant}" if variant else "grown")


def grow(w: Path, seed: int, variant: str) -> Path:
    """grown_dir(w, variant), grown from w/source/final."""
    out = grown_dir(w, variant)
    samoe("expand", str(w / "source" / "final"), "--out", str(out), *growth_args(variant), "--seed", str(seed),
          out=out)
    return out


def run_arm(arm: str, w: Path, d: Path, seed: int, E: float, f: dict[str, float], extra: float) -> Path:
    """Train one arm of one seed with extra compute E (FLOPs); returns its final checkpoint.

    Runs are named by arm and `--extra`, so a sweep with another E never reuses them."""
    A, tag = d / "A", arm.replace(":", "_").replace("/", "-") + f"-E{extra:g}"
    arm, _, variant = arm.partition("@")
    kind, _, rest = arm.partition(":")
    src, grown = w / "source" / "final", grown_dir(w, variant)
    if kind == "a":
        return train(3, src, w / f"sweep-{tag}", A, None, max(1, round(E / f["src"])), float(rest), seed, force_input=True)
    if kind in ("ft", "stage1"):
        stage, per_step = (3, f.get(f"g3@{variant}", f["g3"])) if kind == "ft" else (1, f[f"g1A@{variant}"])
        return train(stage, grown, w / f"sweep-{tag}", A, None, max(1, round(E / per_step)), float(rest), seed,
                     force_input=True)
    if changes_layout(variant):
        raise SystemExit(f"{arm}@{variant}: staged arms count the default layout's FLOPs; use ft: with @blocks<n> or @rk<k>")
    shares, lrs = ([float(v) for v in part.split("/")] for part in rest.split(":"))
    ckpt = grown
    for stage, share, lr in zip((1, 2, 3), shares, lrs):
        if share > 0:
            steps = max(1, round(share / 100 * E / f[f"g{stage}"]))
            ckpt = train(stage, ckpt, w / f"sweep-{tag}-s{stage}", w / "B-pseudo" if stage == 1 else A, None, steps, lr, seed)
    return ckpt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True, help="a hard_protocol.py work folder (its sources are reused)")
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
    ap.add_argument("--converge-threads", type=int, default=0, help="OMP_NUM_THREADS of the --converge runs (0: --threads)")
    ap.add_argument("--converge-batch", type=int, default=0, help="batch size of the --converge runs (0: --batch-size); "
                    "a larger batch uses a core better, and only the source's end point matters")
    ap.add_argument("--test-scenes", type=Path, nargs="+", default=None, help="held-out folder(s) the arms are scored on, "
                    "one set of tables each (default: WORK/data/A-test); a larger one from another seed narrows the "
                    "intervals, and per-region sets (demo-data --region r) show what was kept and what was learnt")
    ap.add_argument("--train-score", type=int, default=0, metavar="K",
                    help="also score every arm on the first K training images of A: a large train - held-out gap says "
                         "the set, not the model's capacity, limits what growth can add")
    ap.add_argument("--device", default=None, help="samoe train's --device for every run (e.g. cuda)")
    args = ap.parse_args()
    hard_protocol.REUSE, hard_protocol.THREADS, hard_protocol.BATCH = True, args.threads, args.batch_size
    hard_protocol.DEVICE = ["--device", args.device] if args.device else []
    d, t0 = args.work / "data", time.perf_counter()
    if args.converge:
        hard_protocol.THREADS = args.converge_threads or args.threads
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            list(pool.map(lambda s: converge(args.work, s, args.converge, args.converge_lr, args.converge_batch), args.seeds))
        args.work = args.work / f"converged-{args.converge}"
        hard_protocol.THREADS = args.threads

    def pseudo_label(w: Path) -> None:
        samoe("pseudo-label", str(w / "source" / "final"), "--images", str(d / "B"), "--out", str(w / "B-pseudo"),
              out=w / "B-pseudo")
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        list(pool.map(pseudo_label, [args.work / f"seed{s}" for s in args.seeds]))
    f = {s: flops(args.work / f"seed{s}", d, args.batch_size) for s in args.seeds}
    variants = sorted({arm.partition("@")[2] for arm in args.arms} - {""})
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:  # growth variants of the same architecture: same FLOPs
        list(pool.map(lambda sv: grow(args.work / f"seed{sv[0]}", *sv), [(s, v) for s in args.seeds for v in variants]))
    stage1_variants = {arm.partition("@")[2] for arm in args.arms if arm.startswith("stage1:")}
    for s in args.seeds:  # a layout variant's own stage-3 step (one thread: the counter is a global mode)
        for v in filter(changes_layout, variants):
            f[s][f"g3@{v}"] = step_flops(grown_dir(args.work / f"seed{s}", v), 3, d / "A", None, args.batch_size)
        for v in stage1_variants:  # stage 1 on A: the frozen source gets no weight gradients
            f[s][f"g1A@{v}"] = step_flops(grown_dir(args.work / f"seed{s}", v), 1, d / "A", None, args.batch_size)
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = {(s, arm): pool.submit(run_arm, arm, args.work / f"seed{s}", d, s,
                                         args.extra * args.source_steps * f[s]["src"], f[s], args.extra)
                   for s in args.seeds for arm in args.arms}
        finals = {key: fut.result() for key, fut in futures.items()}
    for test in args.test or [d / "A-test"]:
        report(args, test, finals, f, t0)
    if args.train_score:
        print(f"\n| arm | mIoU on {args.train_score} training images per seed |\n|---|---|")
        for arm in ["source", *args.arms]:
            ckpts = [args.work / f"seed{s}" / "source" / "final" if arm == "source" else finals[s, arm] for s in args.seeds]
            fit = concat([image_stats(c, d / "A", args.train_score)[0] for c in ckpts]).metrics()["miou"]
            print(f"| {arm} | {fit:.4f} |")


def folder_key(test: Path) -> str:
    """A held-out folder's identity for the score cache: its path and image names."""
    names = sorted(p.name for p in (test / "images").iterdir())
    return hashlib.sha256("\n".join([str(test.resolve()), *names]).encode()).hexdigest()


def seed_labels(per_seed: list) -> np.ndarray:
    """The seed (index) each pooled image's scores came from, for `bootstrap_diff(clusters=...)`: resampling seeds
    too puts run-to-run spread in the interval."""
    return np.concatenate([np.full(st.cm.shape[0], i) for i, st in enumerate(per_seed)])


def ci(x: dict[str, float]) -> str:
    """One `bootstrap_diff` metric as 'diff [low, high]'."""
    return f"{x['diff']:+.4f} [{x['ci_low']:+.4f}, {x['ci_high']:+.4f}]"


def scores(ckpt: Path, test: Path, folder: str):
    """`image_stats` of a checkpoint on a held-out folder (`folder`: its `folder_key`), kept beside its run
    (score-<digest>.npz) so a later sweep with more arms or seeds scores only what is new. Keyed by the folder and
    by the checkpoint's digest (its files' hashes), so a run trained again is scored again."""
    from stages.evaluate import ImageStats
    from upscale.checkpoint import Checkpoint

    key = hashlib.sha256(f"{folder}\n{Checkpoint.open(ckpt).digest}".encode()).hexdigest()[:16]
    cache = ckpt.parent / f"score-{key}.npz"
    if cache.exists():
        with np.load(cache) as z:
            return ImageStats(z["cm"], z["boundary"], z["sdf"], z["interior"])
    st = image_stats(ckpt, test)[0]
    tmp = cache.with_name(f"{cache.stem}.{os.getpid()}.{threading.get_ident()}.tmp.npz")  # one writer each
    np.savez(tmp, cm=st.cm, boundary=st.boundary, sdf=st.sdf, interior=st.interior)
    tmp.replace(cache)
    return st


def report(args: argparse.Namespace, test: Path, finals: dict, f: dict, t0: float) -> None:
    """The tables of one held-out folder: every arm against the source, the first arm and every (a); each seed's mIoU."""
    from stages.evaluate import bootstrap_diff

    torch.set_num_threads(max(1, args.threads))  # `--jobs` checkpoints scored at once, like the runs
    ckpts = {(s, arm): finals[s, arm] for s in args.seeds for arm in args.arms}
    ckpts |= {(s, "source"): args.work / f"seed{s}" / "source" / "final" for s in args.seeds}
    folder = folder_key(test)
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        scored = dict(zip(ckpts, pool.map(lambda c: scores(c, test, folder), ckpts.values())))
    per_seed = {arm: [scored[s, arm] for s in args.seeds] for arm in ["source", *args.arms]}
    stats = {arm: concat(v) for arm, v in per_seed.items()}
    source = stats["source"]
    n_test = len(list((test / "images").iterdir()))
    print(f"\nextra compute E = {args.extra} S; seeds {args.seeds}; {n_test} held-out images ({test}); "
          f"{time.perf_counter() - t0:.0f} s\n")
    print("| arm | miou | interior miou | sdf_mae | miou - source [95% CI] | miou - first arm [95% CI] |\n"
          "|---|---|---|---|---|---|")
    print(f"| source | {source.metrics()['miou']:.4f} | {source.metrics()['miou_interior']:.4f} | "
          f"{source.metrics()['sdf_mae']:.4f} | | |")
    first = args.arms[0]
    for arm in args.arms:
        m = stats[arm].metrics()
        vs_src = bootstrap_diff(source, stats[arm], args.bootstrap)["miou"]
        vs_first = bootstrap_diff(stats[first], stats[arm], args.bootstrap)["miou"]
        print(f"| {arm} | {m['miou']:.4f} | {m['miou_interior']:.4f} | {m['sdf_mae']:.4f} | {ci(vs_src)} | {ci(vs_first)} |")
    a_arms = [arm for arm in args.arms if arm.startswith("a:")]
    b_arms = [arm for arm in args.arms if not arm.startswith("a:")]
    runs = seed_labels(per_seed["source"])
    if a_arms and b_arms:  # every grown arm against every (a): the claim needs the best (a), whichever it is
        seeds_first = "seeds, then their images, resampled"
        for label, metric, clusters, per_seed_mean, how in (
                ("miou", "miou", None, False, "images resampled"),
                ("miou_interior", "miou_interior", None, False, "images resampled"),
                ("miou", "miou", runs, False, seeds_first),
                ("mean of the seeds' own miou", "miou", runs, True, seeds_first)):
            print(f"\n| {label}, grown arm - (a) [95% CI, {how}] | " + " | ".join(a_arms) + " |\n|---|"
                  + "---|" * len(a_arms))
            for arm in b_arms:
                cells = [ci(bootstrap_diff(stats[a], stats[arm], args.bootstrap, clusters=clusters,
                                           per_cluster=per_seed_mean)[metric])
                         for a in a_arms]
                print(f"| {arm} | " + " | ".join(cells) + " |")
    costs = {k: np.mean([f[s][k] / f[s]["src"] for s in args.seeds]) for k in f[args.seeds[0]] if k != "src"}
    print("\nFLOPs per step / the source's: " + ", ".join(f"{k} {v:.2f}" for k, v in costs.items()))
    print("\n| per-seed mIoU | " + " | ".join(f"seed {s}" for s in args.seeds) + " |\n|---|" + "---|" * len(args.seeds))
    for arm in ["source", *args.arms]:
        print(f"| {arm} | " + " | ".join(f"{st.metrics()['miou']:.4f}" for st in per_seed[arm]) + " |")


if __name__ == "__main__":
    main()
