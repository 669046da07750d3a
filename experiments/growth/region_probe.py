"""Can a router tell the regions apart? A linear probe on the tokens an MoE layer's router sees.

For each encoder MoE block, collects the MLP inputs (what the router scores) of the first `--images`
test images of every region folder (`samoe demo-data --preset hard --regions D --region r`), fits
a linear classifier (Adam, standardised features) on 3/4 of the tokens and reports held-out token
accuracy for "which region" and for "region 0 or another", against always guessing the most common
answer. Near chance means no per-token router over these (frozen) features can route by region.
`--pooled` probes each image's token mean and std instead (what a router given the image's
context would see): the region is an image-wide statistic (the sensor's noise floor).

    python experiments/growth/region_probe.py CKPT /tmp/gw7/region0/A-test /tmp/gw7/region1/A-test ...
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root
from stages.data import LabelledFolder  # noqa: E402
from upscale import load_model  # noqa: E402


def image_stats(x: torch.Tensor) -> torch.Tensor:
    """(B, ..., D) -> (B, 2 D): the mean and standard deviation of each image's tokens (the image context
    that `expand --image-context` routed by, kept here since that variant left the product)."""
    std, mean = torch.std_mean(x.reshape(x.shape[0], -1, x.shape[-1]), dim=1, correction=0)
    return torch.cat([mean, std], dim=-1)


def block_inputs(model: torch.nn.Module, images: torch.Tensor, blocks: list[int], pooled: bool = False) -> dict[int, torch.Tensor]:
    """(tokens, D) MLP inputs of each block for a batch of images; with `pooled`, (images, 2 D): `image_stats`."""
    got: dict[int, torch.Tensor] = {}

    def keep(b: int, x: torch.Tensor) -> None:
        x = x.detach()
        got[b] = image_stats(x) if pooled else x.reshape(-1, x.shape[-1])  # pooled: what --image-context routed by

    hooks = [model.image_encoder.blocks[b].mlp.register_forward_pre_hook(lambda mod, args, b=b: keep(b, args[0]))
             for b in blocks]
    try:
        with torch.no_grad():
            model(images)
    finally:
        for h in hooks:
            h.remove()
    return got


def probe(x: torch.Tensor, y: torch.Tensor, steps: int = 300) -> tuple[float, float]:
    """(held-out accuracy, majority-class accuracy) of a linear classifier fit on the first 3/4 of (x, y)."""
    n = len(y) * 3 // 4
    mu, sd = x[:n].mean(0), x[:n].std(0) + 1e-6
    x = (x - mu) / sd
    lin = torch.nn.Linear(x.shape[1], int(y.max()) + 1)
    opt = torch.optim.Adam(lin.parameters(), 1e-2)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(lin(x[:n]), y[:n]).backward()
        opt.step()
    with torch.no_grad():
        acc = float((lin(x[n:]).argmax(1) == y[n:]).float().mean())
    return acc, float(torch.bincount(y[n:]).max()) / len(y[n:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("ckpt")
    ap.add_argument("regions", nargs="+", help="one labelled test folder per region, region 0 first")
    ap.add_argument("--images", type=int, default=48)
    ap.add_argument("--pooled", action="store_true", help="probe per image (token mean and std), not per token")
    args = ap.parse_args()
    torch.manual_seed(0)
    model = load_model(args.ckpt).eval()
    cfg = model.config
    blocks = [b for b in range(cfg.total_blocks) if cfg.is_moe_block(b)]
    feats: dict[int, list[torch.Tensor]] = {b: [] for b in blocks}
    labels: list[torch.Tensor] = []
    for r, folder in enumerate(args.regions):
        data = LabelledFolder(folder, cfg.num_classes)
        images = torch.stack([data[i]["image"] for i in range(min(args.images, len(data)))])
        got = block_inputs(model, images, blocks, args.pooled)
        for b in blocks:
            feats[b].append(got[b])
        labels.append(torch.full((got[blocks[0]].shape[0],), r))
    y = torch.cat(labels)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    for b in blocks:
        x = torch.cat(feats[b])[order]
        for name, target in (("which region", y[order]), ("region 0 or another", (y[order] == 0).long())):
            acc, chance = probe(x, target)
            unit = "image" if args.pooled else "token"
            print(f"block {b}, {name}: held-out {unit} accuracy {acc:.3f} (majority {chance:.3f})")


if __name__ == "__main__":
    main()
