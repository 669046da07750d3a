"""MoE layer cost vs a dense MLP doing the same FLOPs, and the hierarchical router's share.

For each (width, experts) case: forward + backward time of `MoEMLP` on N tokens
against a dense SAM `MLPBlock` on N * k tokens, where k is the number of experts
a token actually uses (`MoEConfig.experts_per_token`: top_k in the core pool +
the routed top-k per chosen new group), so both do the same expert FLOPs. Routing, permutation and un-permutation are
included in the MoE time. The router share is the forward + backward time of the
`HierarchicalRouter` alone divided by the layer's. Ratios come from one run.

`--targets` instead runs the CPU performance targets at ViT-B width (16 experts fp32,
117 experts in 8 groups fp32, and the same in bf16 as `samoe train` runs
at precision bf16: `torch.autocast("cpu", dtype=torch.bfloat16)` with the expert
banks stored in bf16 and fp32 masters, stages/master.py; for reference also
plain autocast over fp32 banks, which casts every bank in each step), each
fwd+bwd with gradients freshly allocated every step (`zero_grad(set_to_none=True)`)
and with gradient buffers kept (`set_to_none=False`, what KeptGrads gives a
one-process run), against the dense MLP of equal FLOPs under the same scheme
(its weights stored in bf16 too); best of `--repeats`, interleaved.

    .venv/bin/python benchmarks/moe_layer.py [--tokens 4096] [--repeats 5] [--device cpu|cuda] [--dtype float32|bfloat16]
    .venv/bin/python benchmarks/moe_layer.py --targets [--tokens 4096] [--repeats 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from stages.master import BankMasters, expert_bank_params

try:
    from stages.expert_grads import keep_expert_grads
except ImportError:  # a tree from before stages/expert_grads.py (measured side by side)
    keep_expert_grads = None
from upscale.config import MoEConfig
from upscale.moe import MoEMLP, balance_losses
from upscale.sam import MLPBlock

CASES = [  # name, D, H, MoEConfig
    ("tiny  16e", 64, 256, MoEConfig(groups=(16,), top_k=2)),
    ("tiny 117e/8g", 64, 256, MoEConfig(groups=(16, 15, 15, 15, 14, 14, 14, 14), top_k=2)),
    ("vit-b 16e", 768, 3072, MoEConfig(groups=(16,), top_k=2)),
    ("vit-b 117e/8g", 768, 3072, MoEConfig(groups=(16, 15, 15, 15, 14, 14, 14, 14), top_k=2)),
]
GPU_CASES = [("vit-l 16e", 1024, 4096, MoEConfig(groups=(16,), top_k=2)),
             ("vit-l 117e/8g", 1024, 4096, MoEConfig(groups=(16, 15, 15, 15, 14, 14, 14, 14), top_k=2))]


def timed(fn, repeats: int, device: str) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def fwd_bwd(module: nn.Module, x: torch.Tensor, set_to_none: bool = True, autocast: bool = False):
    def run() -> None:
        module.zero_grad(set_to_none=set_to_none)
        x.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = module(x)
        y.float().square().mean().backward()
    return run


G117 = MoEConfig(groups=(16, 15, 15, 15, 14, 14, 14, 14), top_k=2)
TARGETS = [  # name, MoEConfig, precision (fp32 | bf16: banks stored bf16 | autocast: fp32 banks), target ratio
    ("vit-b 16e fp32", MoEConfig(groups=(16,), top_k=2), "fp32", 1.25),
    ("vit-b 117e/8g fp32", G117, "fp32", 1.5),
    ("vit-b 117e/8g bf16", G117, "bf16", 1.25),
    ("  (fp32 banks, autocast)", G117, "autocast", None),
]


def targets(tokens: int, repeats: int, precisions: list[str]) -> None:
    """The CPU performance targets: fresh vs kept gradient buffers, fp32 and bf16 autocast, vs dense of equal FLOPs."""
    print(f"cpu, {tokens} tokens, ViT-B width, torch {torch.__version__}, threads {torch.get_num_threads()}, best of {repeats}")
    print(f"{'case':26} {'k':>2} {'dense ms':>9} {'fresh grads':>11} {'kept grads':>10} {'target':>6}")
    for name, cfg, precision, target in TARGETS:
        if precision not in precisions:
            continue
        torch.manual_seed(0)
        moe, dense = MoEMLP(768, 3072, cfg, nn.GELU), MLPBlock(768, 3072, nn.GELU)
        ac = precision != "fp32"
        if precision == "bf16":  # what `samoe train` at precision bf16 does to the banks (and would to a dense MLP)
            BankMasters(expert_bank_params(moe))
            BankMasters(list(dense.parameters()))
        k = cfg.experts_per_token
        x = torch.randn(tokens, 768, requires_grad=True)
        xd = torch.randn(tokens * k, 768, requires_grad=True)
        own, kept = moe.run_experts if hasattr(moe, "run_experts") else None, fwd_bwd(moe, x, False, ac)

        def kept_run() -> None:  # as `samoe train` runs it: expert GEMMs writing into the kept buffers
            if keep_expert_grads is not None:
                keep_expert_grads(moe)
            kept()
            if own is not None:
                moe.run_experts = own
        runs = {"dense": fwd_bwd(dense, xd, True, ac), "fresh": fwd_bwd(moe, x, True, ac), "kept": kept_run}
        for fn in runs.values():
            fn()  # warm-up
        best = {key: float("inf") for key in runs}
        for _ in range(repeats):  # interleaved: contention hits all three alike
            for key, fn in runs.items():
                t = time.perf_counter()
                fn()
                best[key] = min(best[key], time.perf_counter() - t)
        goal = f"{target:5.2f}x" if target else "     -"
        print(f"{name:26} {k:>2} {best['dense'] * 1e3:9.1f} {best['fresh'] / best['dense']:10.2f}x "
              f"{best['kept'] / best['dense']:9.2f}x {goal}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--targets", action="store_true", help="the CPU performance targets (see above)")
    ap.add_argument("--precisions", nargs="+", choices=["fp32", "bf16", "autocast"], default=["fp32", "bf16", "autocast"],
                    help="which of the targets' precisions to run (bf16 on CPU takes minutes per case)")
    args = ap.parse_args()
    if args.targets:
        return targets(args.tokens, args.repeats, args.precisions)
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    cases = CASES if args.device == "cpu" else CASES + GPU_CASES
    print(f"device {args.device}, {args.dtype}, {args.tokens} tokens, torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"{'case':15} {'k':>2} {'moe ms':>9} {'dense ms':>9} {'ratio':>6} {'router ms':>9} {'router %':>8}")
    for name, d, h, cfg in cases:
        moe = MoEMLP(d, h, cfg, nn.GELU).to(args.device, dtype)
        k = cfg.experts_per_token
        dense = MLPBlock(d, h, nn.GELU).to(args.device, dtype)
        x = torch.randn(args.tokens, d, device=args.device, dtype=dtype, requires_grad=True)
        xd = torch.randn(args.tokens * k, d, device=args.device, dtype=dtype, requires_grad=True)
        t_moe = timed(fwd_bwd(moe, x), args.repeats, args.device)
        t_dense = timed(fwd_bwd(dense, xd), args.repeats, args.device)

        def router_only() -> None:
            moe.zero_grad(set_to_none=True)
            r = moe.router(x.detach())
            (r.weight.sum() + balance_losses(cfg, r.pool_sums)[0]).backward()
        t_router = timed(router_only, args.repeats, args.device)
        print(f"{name:15} {k:>2} {t_moe * 1e3:9.2f} {t_dense * 1e3:9.2f} {t_moe / t_dense:6.2f} {t_router * 1e3:9.2f} {100 * t_router / t_moe:7.1f}%")


if __name__ == "__main__":
    main()
