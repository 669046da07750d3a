"""Did the grown model's new experts become new capacity, or stay copies? Relative weight movement per MoE layer.

For a model grown by copy + noise (`samoe expand`, default init) and then trained, prints for each MoE layer
(mean over experts, of the `w1` banks, relative to the weight's norm):

    new vs sibling   ||new expert - the core expert it was copied from||, both after training
    new moved        ||new expert after - at growth||
    core moved       ||core expert after - at growth||
    (a) moved        with --a SOURCE TRAINED: the source's experts, trained further without growth

A new expert's origin is the core expert nearest to it at growth (copy + noise leaves it there). If "new vs
sibling" stays near the growth noise (0.01 by default), training never made the copies different: the grown model
computes the source's function with redundant parameters, and cannot beat the source trained further.

    python experiments/growth/expert_drift.py W/seed0/grown-blocks0+rk1 W/seed0/sweep-ft_0.05+mix@blocks0+rk1-E0.5/final \
        --a W/seed0/source/final W/seed0/sweep-a_0.05-E0.5/final
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root
from upscale.checkpoint import Checkpoint  # noqa: E402


def banks(path: Path) -> dict[str, torch.Tensor]:
    """Every MoE layer's expert `w1` banks of a checkpoint, by key (read from disk, no model built)."""
    ck = Checkpoint.open(path)
    names = [k for k in ck.tensors if k.endswith(".w1") and ".experts." in k]
    return {k: v.float() for k, v in ck.iter_tensors(names)}


def rel(x: torch.Tensor, y: torch.Tensor) -> float:
    return float((x - y).norm() / y.norm())


def mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def moved(before: torch.Tensor, after: torch.Tensor) -> float:
    """Mean relative movement of a bank's experts (E, H, D) between two checkpoints."""
    return mean([rel(after[j], before[j]) for j in range(before.shape[0])])


def layer_drift(g0: dict, g1: dict, layer: str) -> dict[str, float]:
    """The first three measures of the module docstring for one MoE layer (group 0 is the core)."""
    core0, core1 = g0[f"{layer}.experts.0.w1"], g1[f"{layer}.experts.0.w1"]
    sib, new = [], []
    g = 1
    while f"{layer}.experts.{g}.w1" in g0:
        n0, n1 = g0[f"{layer}.experts.{g}.w1"], g1[f"{layer}.experts.{g}.w1"]
        for j in range(n0.shape[0]):
            origin = int((core0 - n0[j]).flatten(1).norm(dim=1).argmin())
            sib.append(rel(n1[j], core1[origin]))
        new.append(moved(n0, n1))
        g += 1
    return {"new vs sibling": mean(sib), "new moved": mean(new), "core moved": moved(core0, core1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("grown", type=Path, help="the checkpoint as grown")
    ap.add_argument("trained", type=Path, help="the same model after training")
    ap.add_argument("--a", type=Path, nargs=2, metavar=("SOURCE", "TRAINED"), help="the source and the source trained further")
    args = ap.parse_args()
    g0, g1 = banks(args.grown), banks(args.trained)
    a0, a1 = (banks(args.a[0]), banks(args.a[1])) if args.a else ({}, {})
    layers = sorted({k.rsplit(".experts.", 1)[0] for k in g0})
    print("| MoE layer | new vs sibling | new moved | core moved | (a) moved |\n|---|---|---|---|---|")
    for layer in layers:
        d = layer_drift(g0, g1, layer)
        key = f"{layer}.experts.0.w1"
        a = moved(a0[key], a1[key]) if key in a0 else float("nan")
        print(f"| {layer} | {d['new vs sibling']:.3f} | {d['new moved']:.3f} | {d['core moved']:.3f} | {a:.3f} |")


if __name__ == "__main__":
    main()
