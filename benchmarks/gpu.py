"""GPU numbers in one run (one CUDA device; about 2-3 minutes on an H100):

1. MoE layer forward+backward vs a dense MLP of the same FLOPs per token, bf16, ViT-B
   width (768 -> 3072): 16 experts (top-2: 2 expert MLPs per token, dense hidden 6144)
   and 117 experts in 8 groups (top-2 core + top-2 in one routed group: 4 per token,
   dense hidden 12288), at 16k and 64k tokens; fp32 weights under bf16 autocast (the
   one-GPU training path) and bf16 weights (what FSDP2's bf16 policy all-gathers).
   Target: MoE / dense <= 1.3x.
2. One-GPU training throughput (labelled images/s of seed 004's two-phase step) and
   peak memory: the tiny preset (fp32 and bf16), and a ViT-B-width model grown to 117
   experts in 8 groups + 1 extra MoE block (bf16, stage 1).
3. `samoe plan`'s memory model (weights + gradients + SGD momentum, activations
   excluded) vs the bytes held after a step and the measured peak.

Each part runs on its own: a failure prints FAILED with the reason and the next part
runs. Usage: python benchmarks/gpu.py [--quick]
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch import nn  # noqa: E402

GiB = 2**30
T0 = time.perf_counter()


def say(msg: str = "") -> None:
    print(msg, flush=True)


def part(title: str):
    """Decorator: run a benchmark part, print its title, and FAILED with the reason instead of stopping."""

    def wrap(fn):
        def run(*a, **kw):
            say(f"\n=== {title}  (t={time.perf_counter() - T0:.0f}s)")
            try:
                return fn(*a, **kw)
            except Exception as e:  # noqa: BLE001 - a benchmark part must not hide the others
                say(f"FAILED: {type(e).__name__}: {str(e)[:400]}")
                traceback.print_exc(limit=3, file=sys.stdout)
            finally:
                torch.cuda.empty_cache()

        return run

    return wrap


def timed(fn, warmup: int = 3, iters: int = 10) -> float:
    """Median milliseconds of fn() on the GPU (CUDA events around each call)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2]


# --------------------------------------------------------------------------- 1. MoE layer vs dense


@part("1. MoE layer fwd+bwd vs dense MLP of equal FLOPs per token (bf16, D=768, H=3072)")
def moe_vs_dense(quick: bool) -> None:
    from upscale.config import MoEConfig
    from upscale.expand import resolve_groups
    from upscale.moe import MoEMLP, balance_losses

    D, H = 768, 3072
    cases = [("16 experts", MoEConfig(groups=(16,), core_groups=1, top_k=2), 2),
             ("117 experts / 8 groups", MoEConfig(groups=resolve_groups(16, 117, "8", 1), core_groups=1, top_k=2,
                                                  top_k_groups=1), 4)]
    say(f"{'layer':<24} {'weights':<16} {'tokens':>7} {'MoE ms':>8} {'dense ms':>9} {'ratio':>6} {'router ms':>9}  target <= 1.3x")
    for name, cfg, per_token in cases:
        cfg.validate()
        for weights in ("fp32+autocast", "bf16"):
            dtype = torch.float32 if weights == "fp32+autocast" else torch.bfloat16
            torch.manual_seed(0)
            moe = MoEMLP(D, H, cfg).to("cuda", dtype)
            with torch.no_grad():
                if hasattr(moe.router, "group_scale"):
                    moe.router.group_scale.fill_(0.5)
            dense = nn.Sequential(nn.Linear(D, per_token * H), nn.GELU(), nn.Linear(per_token * H, D)).to("cuda", dtype)
            for tokens in ((16384,) if quick else (16384, 65536)):
                x = torch.randn(tokens, D, device="cuda", dtype=dtype, requires_grad=True)
                g = torch.randn(tokens, D, device="cuda", dtype=dtype)

                def step(module: nn.Module) -> None:
                    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == torch.float32):
                        y = module(x)
                    y.backward(g)

                def router() -> None:
                    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == torch.float32):
                        r = moe.router(x)
                    (r.weight.sum() + balance_losses(moe.cfg, r.pool_sums)[0]).backward()

                t_moe, t_dense, t_router = timed(lambda: step(moe)), timed(lambda: step(dense)), timed(router)
                assert int(moe.expert_counts.sum()) == tokens * per_token, "unexpected assignments per token"
                say(f"{name:<24} {weights:<16} {tokens:>7} {t_moe:8.2f} {t_dense:9.2f} {t_moe / t_dense:5.2f}x {t_router:9.2f}"
                    f"  {'met' if t_moe / t_dense <= 1.3 else 'missed'}")
                del x, g
            del moe, dense


# --------------------------------------------------------------------------- 2+3. training throughput and memory


def _synthetic_batch(cfg, n: int) -> tuple[dict, dict]:
    s, c = cfg.img_size, cfg.num_classes
    gen = torch.Generator().manual_seed(0)
    batch = {"image": torch.randn(n, 3, s, s, generator=gen), "mask": torch.randint(0, c, (n, s, s), generator=gen),
             "sdf": torch.rand(n, c, s, s, generator=gen) * 2 - 1, "boundary": (torch.rand(n, 1, s, s, generator=gen) > 0.8).float()}
    return ({k: v.cuda() for k, v in batch.items()}, {"image": torch.randn(n, 3, s, s, generator=gen).cuda()})


def train_case(label: str, src_cfg, spec, precision: str, batch_size: int, steps: int, stage: int = 1) -> None:
    """Build the grown model on the GPU (random weights), run seed 004 steps, print throughput and memory."""
    from stages.engine import apply_stage, train_step
    from stages.optim import build_optimizers
    from upscale.device import autocast
    from stages.plan import plan_report
    from upscale.expand import grown_config, planned_provenance
    from upscale.model import build_model

    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    cfg = grown_config(src_cfg, spec) if spec is not None else src_cfg
    model = build_model(cfg, device="meta")
    model.to_empty(device="cuda")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("group_scale"):
                p.fill_(0.5)
            elif p.dim() > 1:
                nn.init.normal_(p, std=0.02)
            else:
                p.zero_()
        for b in model.buffers():
            b.zero_()
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    provenance = planned_provenance(src_cfg, cfg, shapes) if spec is not None else {}
    counts = apply_stage(model, provenance, stage if spec is not None else 3, 4)
    trainable = sum(c[0] for c in counts.values())
    opts = build_optimizers(model, 1e-3)
    batch, ubatch = _synthetic_batch(cfg, batch_size)
    amp = (lambda: autocast(torch.device("cuda"), precision)) if precision != "fp32" else None
    model.train()

    def one() -> dict:
        return train_step(model, opts, batch, ubatch, 0.5, 0.01, False, 0, amp=amp)

    m = one()
    one()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(steps):
        m = one()
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t) / steps
    held = torch.cuda.memory_allocated() - base  # weights + gradients + optimizer state (activations freed)
    peak = torch.cuda.max_memory_allocated() - base
    params = sum(p.numel() for p in model.parameters())
    if spec is not None:
        plan = plan_report(src_cfg, spec, "float32")["memory_per_stage"][f"stage{stage}"]
        predicted = plan["total_bytes"]
    else:
        predicted = sum(p.numel() for p in model.parameters()) * 4 * 3  # stage 3: weights + grads + momentum
    say(f"{label:<34} {precision:<5} {params / 1e6:9.1f}M {trainable / 1e6:9.1f}M {batch_size:>5} {batch_size / dt:9.1f} "
        f"{dt * 1000:8.1f} {predicted / GiB:9.2f} {held / GiB:9.2f} {held / predicted:6.3f} {peak / GiB:9.2f}  "
        f"loss {m['loss']:.4f}")
    del model, opts, batch, ubatch


@part("2+3. one-GPU training: throughput, peak memory, `samoe plan` prediction vs measured")
def training(quick: bool) -> None:
    from upscale.config import PRESETS, SAM_VITS, MoEConfig, SamMoEConfig
    from upscale.expand import GrowthSpec, resolve_groups

    say("images/s = labelled images of one seed-004 step (unsupervised + supervised phase on batches of the same size) / step time")
    say("predicted = `samoe plan` (fp32 weights + grads + SGD momentum of the trainable part, activations excluded); "
        "held = allocated after a step; peak includes activations")
    say(f"{'model':<34} {'prec':<5} {'params':>10} {'trainable':>10} {'batch':>5} {'images/s':>9} {'step ms':>8} "
        f"{'pred GiB':>9} {'held GiB':>9} {'held/pred':>6} {'peak GiB':>9}")
    tiny = PRESETS["tiny"]
    tiny_spec = GrowthSpec(experts=16, groups=resolve_groups(4, 16, "4", 1), extra_blocks=1)
    for precision in ("fp32", "bf16"):
        try:
            train_case("tiny grown 16e/4g +1 block (128px)", tiny, tiny_spec, precision, 32, 5 if quick else 10)
        except Exception as e:  # noqa: BLE001
            say(f"tiny {precision}: FAILED: {type(e).__name__}: {str(e)[:300]}")
    if time.perf_counter() - T0 > 200:
        say("skipping the ViT-B model: over the time budget")
        return
    vitb = SamMoEConfig(**{**SAM_VITS["vit_b"]}, img_size=512, moe_blocks=(10, 11), num_classes=4,
                        moe=MoEConfig(groups=(16,), top_k=2))
    spec = GrowthSpec(experts=117, groups=resolve_groups(16, 117, "8", 1), extra_blocks=1)
    train_case("ViT-B width 117e/8g +1 block (512px)", vitb, spec, "bf16", 8, 3 if quick else 5)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="16k tokens only, fewer steps")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks/gpu.py needs a CUDA GPU (torch.cuda.is_available() is False)")
    p = torch.cuda.get_device_properties(0)
    say(f"device: {p.name}, {p.total_memory / GiB:.0f} GiB, capability {p.major}.{p.minor}; torch {torch.__version__}, "
        f"CUDA {torch.version.cuda}; torch._grouped_mm: {hasattr(torch, '_grouped_mm')}")
    moe_vs_dense(args.quick)
    training(args.quick)
    say(f"\ndone in {time.perf_counter() - T0:.0f}s")


if __name__ == "__main__":
    main()
