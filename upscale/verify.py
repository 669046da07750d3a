"""How far a grown model's outputs are from its source's, on real images.

Growth with `--noise-std 0` and copy init must preserve the function (new
groups are gated by zero-initialised scales, new blocks start as the identity),
so `samoe expand --verify DATA` reports, per head, the relative deviation
||grown - source||_F / ||source||_F over a few images, and the worst
max|grown - source| / max|source|. The images come in as a tensor (the CLI
reads them with `stages.data.load_images`): the model package reads no data folders.
"""

from __future__ import annotations

import torch


@torch.no_grad()
def output_deviation(source: torch.nn.Module, grown: torch.nn.Module, images: torch.Tensor, batch: int = 4) -> dict[str, dict[str, float]]:
    """Per head: relative Frobenius deviation and relative max deviation of grown vs source."""
    source.eval()
    grown.eval()
    sq_diff: dict[str, float] = {}
    sq_ref: dict[str, float] = {}
    max_diff: dict[str, float] = {}
    max_ref: dict[str, float] = {}
    for i in range(0, images.shape[0], batch):
        x = images[i : i + batch]
        p, q = next(source.parameters()), next(grown.parameters())
        a = source(x.to(p.device, p.dtype))
        b = grown(x.to(q.device, q.dtype))
        for head in a:
            d = (b[head].double() - a[head].double())
            sq_diff[head] = sq_diff.get(head, 0.0) + float(d.pow(2).sum())
            sq_ref[head] = sq_ref.get(head, 0.0) + float(a[head].double().pow(2).sum())
            max_diff[head] = max(max_diff.get(head, 0.0), float(d.abs().max()))
            max_ref[head] = max(max_ref.get(head, 0.0), float(a[head].abs().max()))
    return {
        head: {
            "relative": (sq_diff[head] / max(sq_ref[head], 1e-30)) ** 0.5,
            "relative_max": max_diff[head] / max(max_ref[head], 1e-30),
        }
        for head in sq_diff
    }
