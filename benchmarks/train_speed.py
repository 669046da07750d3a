"""Training throughput per stage, where a step's time goes, and how far it is from the hardware.

For the tiny preset (grown 4 -> 13 experts in 4 groups + 1 extra block) and,
unless `--no-vitb`, a ViT-B-width grown model (256 px, 4 blocks, 16 -> 32
experts), runs the seed-004 training step of each stage (unsupervised +
supervised phase, demo data, batch `--batch`) exactly as `samoe train` does
(same loader, optimizers, deterministic CPU kernels) after one warm-up epoch
(steady state: the labelled set's targets are cached from the second epoch
on), and reports
  - images/s (labelled images; each step also runs one unlabelled batch);
  - the share of a step in data loading (`StreamingLoader.next`), forward
    (model calls), the losses (`engine._losses`: task losses, pseudo-targets
    and routing losses, the objective's forward; their backward is in
    backward), backward, optimizer steps, and the rest (bookkeeping);
  - forward FLOPs per step counted by `torch.utils.flop_counter`, times 3 for
    forward + backward, against this machine's float32 matmul FLOP/s measured in
    the same run (a 2048^3 matmul on all threads): the FLOP-bound time of a step
    and the ratio of the real step to it.
With `--compile`, every stage runs twice, eager and then compiled as `samoe train --compile` compiles
(upscale/compile.py: each block, the heads and the loss sums), and prints the compiled images/s, its ratio
to eager's, and the compile time: the warm-up epoch's extra time over eager's, and the steps after
which compiling has paid for itself. The machine is shared: run the cases of one comparison in one invocation.

    .venv/bin/python benchmarks/train_speed.py [--steps 6] [--batch 4] [--workers 0] [--no-vitb | --no-tiny] [--precision bf16 [--no-masters]]
    .venv/bin/python benchmarks/train_speed.py --no-vitb --batch 8 --compile [--stages 3] [--threads 1]

The FLOP-bound estimate always uses the float32 matmul rate (a bf16 run's ratio is relative to it).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import shutil
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from stages import engine
from stages.data import UnlabelledFolder, make_demo_data
from stages.engine import StreamingLoader, apply_stage, open_labelled, train_step
from stages.master import BankMasters, expert_bank_params
from stages.optim import KeptGrads, build_optimizers
from stages.semisup import gating_without_grad, task_stats
from upscale import load_model
from upscale.checkpoint import Checkpoint, build_meta, save_model
from upscale.compile import compile_fn, compile_model
from upscale.config import PRESETS, SAM_VITS, MoEConfig, SamMoEConfig
from upscale.device import autocast
from upscale.expand import GrowthSpec, expand_checkpoint, resolve_groups
from upscale.model import build_model


def matmul_flops(n: int = 2048, repeats: int = 5) -> float:
    """Best float32 matmul FLOP/s of this machine right now (all intra-op threads)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


class Timer:
    """Accumulates wall time of wrapped callables by phase (only the outermost call counts)."""

    def __init__(self) -> None:
        self.acc: dict[str, float] = collections.defaultdict(float)
        self.depth = 0

    def wrap(self, fn, phase: str):
        def timed(*args, **kwargs):
            if self.depth:
                return fn(*args, **kwargs)
            self.depth += 1
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.acc[phase] += time.perf_counter() - t
                self.depth -= 1
        return timed


def grown_checkpoint(work: Path, which: str) -> Path:
    if which == "tiny":
        cfg = PRESETS["tiny"]
        spec = GrowthSpec(experts=13, groups=resolve_groups(4, 13, "4", 1), extra_blocks=1)
    else:
        cfg = SamMoEConfig(**{**SAM_VITS["vit_b"], "depth": 4, "global_attn_indexes": (1, 3)}, img_size=256, moe_blocks=(2, 3),
                           moe=MoEConfig(groups=(16,), top_k=2))
        spec = GrowthSpec(experts=32, groups=resolve_groups(16, 32, "4", 1), extra_blocks=1)
    model = build_model(cfg, seed=0)
    save_model(model, work / f"{which}-src", build_meta(cfg, {n: "source" for n in model.state_dict()}, [], [], torch.float32))
    return expand_checkpoint(work / f"{which}-src", work / f"{which}-grown", spec, ["benchmark"])


def measure_stage(path: Path, stage: int, data: Path, steps: int, batch: int, workers: int, flops_per_s: float,
                  precision: str = "fp32", masters: bool = True, compiled: bool = False) -> dict:
    ck = Checkpoint.open(path)
    model = load_model(path)
    apply_stage(model, ck.provenance, stage, 1)
    stats = task_stats
    if compiled:  # as `samoe train --compile`
        torch._dynamo.reset()
        compile_model(model)
        stats = compile_fn(task_stats)
    torch.use_deterministic_algorithms(True, warn_only=True)  # as `samoe train` on CPU
    opts = build_optimizers(model, 1e-3)
    opts.kept = KeptGrads(list(model.parameters()))  # as `samoe train` in one process
    amp = (lambda: autocast(torch.device("cpu"), precision)) if precision != "fp32" else None
    if precision == "bf16" and masters:  # as `samoe train` at precision bf16 in one process
        opts.masters = BankMasters(expert_bank_params(model))
    size = model.config.img_size
    loader = StreamingLoader(open_labelled(data / "A", model.config.num_classes, size), batch, 0, workers)
    uloader = StreamingLoader(UnlabelledFolder(data / "B", size=size), batch, 1, workers)
    timer = Timer()
    loader.next = timer.wrap(loader.next, "data")
    uloader.next = timer.wrap(uloader.next, "data")
    model.forward = timer.wrap(model.forward, "forward")
    losses = engine._losses
    engine._losses = timer.wrap(losses, "loss")
    for opt in opts.named().values():
        opt.step = timer.wrap(opt.step, "optimizer")
    backward = torch.Tensor.backward
    torch.Tensor.backward = timer.wrap(backward, "backward")
    try:
        def step(i: int) -> None:
            b, u = loader.next(), uloader.next()
            train_step(model, opts, b, u, 0.5, 0.01, False, i, amp=amp, stats=stats)
        t = time.perf_counter()
        for i in range(loader.steps_per_epoch):  # warm-up: one epoch (allocations, lazy inits, the target cache, compiling)
            step(i)
        warmup = time.perf_counter() - t
        with FlopCounterMode(display=False) as fc, amp() if amp else contextlib.nullcontext():
            b = loader.next()
            model(b["image"])
            with gating_without_grad(model):
                model(b["image"])
        fwd_flops = fc.get_total_flops()  # one labelled + one unlabelled forward per step
        model.zero_grad(set_to_none=True)
        timer.acc.clear()
        t = time.perf_counter()
        for i in range(steps):
            step(i + 1)
        total = time.perf_counter() - t
    finally:
        torch.Tensor.backward = backward
        engine._losses = losses
        torch.use_deterministic_algorithms(False)
    shares = {k: v / total for k, v in timer.acc.items()}
    shares["other"] = 1 - sum(shares.values())
    flop_bound = 3 * fwd_flops / flops_per_s  # forward + backward ~ 3x forward
    return {"stage": stage, "compiled": compiled, "warmup_s": warmup, "warmup_steps": loader.steps_per_epoch,
            "images_per_s": steps * batch / total, "step_s": total / steps, "shares": shares,
            "step_gflop": 3 * fwd_flops / 1e9, "flop_bound_s": flop_bound, "ratio_to_flop_bound": total / steps / flop_bound}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--dir", type=Path, default=Path("/tmp/samoe-trainspeed"))
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--no-vitb", action="store_true")
    ap.add_argument("--no-tiny", action="store_true")
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="bf16: autocast, as samoe train")
    ap.add_argument("--no-masters", action="store_true", help="bf16 without the bf16 banks + fp32 masters (plain autocast)")
    ap.add_argument("--compile", action="store_true", help="each stage eager, then compiled (samoe train --compile)")
    ap.add_argument("--stages", default="1,2,3", help="the stages to run, e.g. 3")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    shutil.rmtree(args.dir, ignore_errors=True)
    args.dir.mkdir(parents=True)
    flops = matmul_flops()
    print(f"precision {args.precision}{' (plain autocast)' if args.no_masters else ''}; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32 matmul {flops / 1e9:.1f} GFLOP/s (best of 5, 2048^3)")
    rows = []
    for which in ([] if args.no_tiny else ["tiny"]) + ([] if args.no_vitb else ["vit-b"]):
        path = grown_checkpoint(args.dir, which)
        size = Checkpoint.open(path).config.img_size
        make_demo_data(args.dir / f"data-{size}", labelled=4 * args.batch, unlabelled=4 * args.batch, test=1, size=size)
        print(f"{which} grown: {sum(i.numel for i in Checkpoint.open(path).tensors.values()):,} params, {size} px, batch {args.batch}")
        print(f"  {'stage':>5} {'img/s':>7} {'step s':>7} {'data':>6} {'fwd':>6} {'loss':>6} {'bwd':>6} {'optim':>6} {'other':>6} {'GFLOP':>7} {'x FLOP-bound':>12}")
        for stage in (int(v) for v in args.stages.split(",")):
            for compiled in (False, True) if args.compile else (False,):
                r = measure_stage(path, stage, args.dir / f"data-{size}", args.steps, args.batch, args.workers, flops,
                                  args.precision, not args.no_masters, compiled)
                r["model"] = which
                rows.append(r)
                s = r["shares"]
                label = f"{stage}{'c' if compiled else ''}"
                print(f"  {label:>5} {r['images_per_s']:7.2f} {r['step_s']:7.3f} " + " ".join(f"{100 * s.get(k, 0):5.1f}%" for k in
                      ("data", "forward", "loss", "backward", "optimizer", "other")) + f" {r['step_gflop']:7.1f} {r['ratio_to_flop_bound']:11.1f}x", flush=True)
                if compiled:
                    eager = rows[-2]
                    cost = r["warmup_s"] - eager["warmup_s"] * r["warmup_steps"] / eager["warmup_steps"]
                    saved = eager["step_s"] - r["step_s"]
                    pays = f"pays for itself after {cost / saved:,.0f} steps" if saved > 0 else "never pays"
                    print(f"        compiled: x{r['images_per_s'] / eager['images_per_s']:.2f} eager's images/s; compile "
                          f"{cost:.0f} s (warm-up epoch over eager's), {pays}", flush=True)
    print(json.dumps({"matmul_flops": flops, "rows": rows}))
    shutil.rmtree(args.dir)


if __name__ == "__main__":
    main()
