"""The quick premise gate: does the grown layout store more of the codebook than tiny, token by token?

A token-level stand-in built on samoe's own MoE layer (`upscale.moe.MoEMLP`) and input scaling
(`stages.data.sar_to_input`): each training example is one 16x16 patch wearing a codebook signature
(stages/codebook.py), drawn from a pool of `--pool` rendered patches per signature, and its class is the
table's; the test tokens are rendered fresh, so a layout that memorises its pool's speckle does not gain.
The model is the tiny encoder's per-token path without attention or decoder: a linear patch embedding
(768 -> 64), 2 dense MLP blocks, 2 MoE MLP blocks (pre-norm residual), a linear classifier.
  tiny:  4 experts, top-2, as the tiny preset;
  grown: 16 experts as 4 groups of 4, one group per token, top-2 inside (the replica layout: the
         same experts per token as tiny, so the same FLOPs per step);
  grown8: the same with 8 groups (32 experts), the plan's number of routed groups.
Both train from scratch for the same number of steps; the table is mIoU over the 16 classes and accuracy
on fresh test tokens. It answers in minutes what `capacity.py` answers in hours with the real pipeline,
and picks the numbers of signatures worth the real run.

    python benchmarks/token_tier.py --optimizer adamw --lrs 0.003 --signatures 2200 --steps 6000 --seeds 0 1 2 --layouts tiny grown8
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from segment_anything.modeling.common import MLPBlock  # noqa: E402

from stages.codebook import DEFAULT_GRID, GRIDS, NUM_CLASSES, codebook  # noqa: E402
from stages.data import sar_to_input  # noqa: E402
from stages.evaluate import iou_per_class  # noqa: E402
from upscale.config import MoEConfig  # noqa: E402
from upscale.moe import MoEMLP  # noqa: E402

LAYOUTS = {
    "tiny": MoEConfig(groups=(4,), core_groups=1, top_k=2),
    "grown": MoEConfig(groups=(4, 4, 4, 4), core_groups=0, top_k=2, top_k_groups=1, replicas=True),
    # the plan's shape at tiny scale: 8 routed groups, one per token (117 experts in 8 groups from 16)
    "grown8": MoEConfig(groups=(4,) * 8, core_groups=0, top_k=2, top_k_groups=1, replicas=True),
}
PATCH, DIM, HIDDEN = 16, 64, 256


def render(book, idx: np.ndarray, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 768) model inputs of B patches wearing signatures `idx`, and their (B,) classes."""
    sigs = [book.signatures[i] for i in idx]
    vv = np.array([s.vv_db for s in sigs])[:, None, None, None]
    ratio = np.array([s.ratio_db for s in sigs])[:, None, None, None]
    looks = np.array([s.looks for s in sigs], dtype=np.float64)[:, None, None, None]
    nu = np.array([s.texture for s in sigs])[:, None, None, None]
    n = len(idx)
    level = 10 ** (np.concatenate([vv, vv - ratio], axis=1) / 10)  # (B, 2, 1, 1)
    tex = np.where(nu > 0, rng.gamma(np.where(nu > 0, nu, 1.0) * np.ones((n, 1, PATCH, PATCH)),
                                     1.0 / np.where(nu > 0, nu, 1.0)), 1.0)
    shape = looks * np.ones((n, 2, PATCH, PATCH))
    x = level * tex * rng.gamma(shape, 1.0 / shape)
    # sar_to_input works pixel by pixel: all patches as one (2, B*16, 16) image
    inputs = sar_to_input(x.transpose(1, 0, 2, 3).reshape(2, n * PATCH, PATCH))
    inputs = inputs.reshape(3, n, PATCH, PATCH).transpose(1, 0, 2, 3)
    classes = np.array([book.classes[i] for i in idx])
    return torch.from_numpy(np.ascontiguousarray(inputs).reshape(n, -1)), torch.from_numpy(classes)


class TokenModel(nn.Module):
    """Patch embedding, 2 dense and 2 MoE pre-norm residual MLP blocks, classifier."""

    def __init__(self, moe: MoEConfig) -> None:
        super().__init__()
        self.embed = nn.Linear(3 * PATCH * PATCH, DIM)
        self.norms = nn.ModuleList(nn.LayerNorm(DIM) for _ in range(4))
        self.mlps = nn.ModuleList([MLPBlock(DIM, HIDDEN), MLPBlock(DIM, HIDDEN), MoEMLP(DIM, HIDDEN, moe), MoEMLP(DIM, HIDDEN, moe)])
        self.head = nn.Linear(DIM, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.embed(x)
        for norm, mlp in zip(self.norms, self.mlps):
            h = h + mlp(norm(h))
        aux = sum(m.aux_loss for m in self.mlps if isinstance(m, MoEMLP))
        return self.head(h), aux


_POOLS: dict[tuple[int, int, str], tuple[torch.Tensor, torch.Tensor]] = {}


def token_pool(book, signatures: int, per_signature: int, grid: str) -> tuple[torch.Tensor, torch.Tensor]:
    """`per_signature` training patches of every signature, rendered once (the same pool for every arm and seed)."""
    key = (signatures, per_signature, grid)
    if key not in _POOLS:
        rng = np.random.default_rng([777, signatures])
        idx = np.repeat(np.arange(len(book)), per_signature)
        parts = [render(book, idx[i : i + 4096], rng) for i in range(0, len(idx), 4096)]
        _POOLS[key] = (torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]))
    return _POOLS[key]


def run(layout: str, signatures: int, steps: int, lr: float, seed: int, batch: int, test_tokens: int,
        optimizer: str, pool: int = 128, grid: str = DEFAULT_GRID) -> dict[str, float]:
    torch.manual_seed(seed)
    book = codebook(signatures, grid=grid)
    model = TokenModel(LAYOUTS[layout])
    if optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-5)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    rng = np.random.default_rng([seed, 1])
    pool_x, pool_y = token_pool(book, signatures, pool, grid)
    warm = max(1, steps // 20)
    t0 = time.perf_counter()
    for step in range(steps):
        factor = (step + 1) / warm if step < warm else (1 - (step - warm) / (steps - warm)) ** 0.9
        for g in opt.param_groups:
            g["lr"] = lr * factor
        pick = torch.from_numpy(rng.integers(len(pool_y), size=batch))
        x, y = pool_x[pick], pool_y[pick]
        logits, aux = model(x)
        loss = nn.functional.cross_entropy(logits, y) + 0.01 * aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    trng = np.random.default_rng([12345, signatures])  # the same test tokens for every arm and seed
    cm = np.zeros((NUM_CLASSES, NUM_CLASSES), dtype=np.int64)
    model.eval()
    with torch.no_grad():
        for _ in range(test_tokens // 1024):
            x, y = render(book, trng.integers(len(book), size=1024), trng)
            pred = model(x)[0].argmax(-1)
            np.add.at(cm, (y.numpy(), pred.numpy()), 1)
    return {"miou": float(np.nanmean(iou_per_class(cm))), "accuracy": float(np.trace(cm) / cm.sum()),
            "seconds": time.perf_counter() - t0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--signatures", type=int, nargs="+", default=[2200])
    ap.add_argument("--grid", choices=list(GRIDS), default=DEFAULT_GRID, help="the codebook's signature grid")
    ap.add_argument("--steps", type=int, default=4000)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--lrs", type=float, nargs="+", default=[0.05, 0.2])
    ap.add_argument("--optimizer", choices=["sgd", "adamw"], default="sgd")
    ap.add_argument("--batch", type=int, default=512, help="tokens per step (the tiny model sees 8 images x 64 tokens)")
    ap.add_argument("--test-tokens", type=int, default=16384)
    ap.add_argument("--pool", type=int, default=128, help="training patches rendered per signature")
    ap.add_argument("--layouts", nargs="+", choices=sorted(LAYOUTS), default=["tiny", "grown"],
                    help="the first is the source layout each other is compared with")
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(f"token tier: {args.grid} grid, {args.steps} steps x {args.batch} tokens, {args.optimizer}, seeds {args.seeds}, "
          f"lrs {args.lrs}")
    print("| signatures | layout | lr | mIoU per seed | mean mIoU | accuracy |\n|---|---|---|---|---|---|", flush=True)
    for n in args.signatures:
        best = {}
        for layout in args.layouts:
            for lr in args.lrs:
                res = [run(layout, n, args.steps, lr, s, args.batch, args.test_tokens, args.optimizer, args.pool, args.grid)
                       for s in args.seeds]
                m = float(np.mean([r["miou"] for r in res]))
                per_seed = " / ".join(f"{r['miou']:.3f}" for r in res)
                print(f"| {n} | {layout} | {lr:g} | {per_seed} | {m:.4f} | "
                      f"{np.mean([r['accuracy'] for r in res]):.4f} |", flush=True)
                if m > best.get(layout, (-1.0, None))[0]:
                    best[layout] = (m, [r["miou"] for r in res])
        source = args.layouts[0]
        for layout in args.layouts[1:]:
            gap = [g - t for g, t in zip(best[layout][1], best[source][1])]
            sd = float(np.std(gap, ddof=1)) if len(gap) > 1 else math.nan
            print(f"| {n} | {layout} - {source} (each at its best lr) | | {' / '.join(f'{g:+.3f}' for g in gap)} | "
                  f"{np.mean(gap):+.4f} | sd {sd:.4f} |", flush=True)


if __name__ == "__main__":
    main()
