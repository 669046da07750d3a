"""How far a grown model's outputs are from its source's, on real images.

Growth with `--noise-std 0` and copy init must preserve the function (new
groups are gated by zero-initialised scales, new blocks start as the identity),
so `samoe expand --verify DATA` reports, per head, the relative deviation
||grown - source||_F / ||source||_F over a few images, and the worst
max|grown - source| / max|source|.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .errors import SamoeError


def load_images(folder: Path, size: int, limit: int) -> torch.Tensor:
    """Up to `limit` images of a samoe data folder (DIR/images/*), as a (B, 3, size, size) batch."""
    from stages.data import DataError, UnlabelledFolder

    if not (folder / "images").is_dir():
        raise SamoeError(f"{folder} has no images/ folder: pass a data folder such as data/A (see `samoe demo-data`)")
    try:
        data = UnlabelledFolder(folder, size=size)
    except DataError as e:
        raise SamoeError(str(e)) from None
    n = min(limit, len(data))
    return torch.stack([data[i]["image"] for i in range(n)])


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
