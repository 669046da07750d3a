"""`samoe expand` against a plain sequential write of the same bytes to the same disk.

For each target output size, builds a synthetic flat-MoE source (ViT-B width,
16 experts in every block, bf16), grows it to 117 experts in 8 groups with
copy+noise, and reports in one run:
  - expand wall time vs writing the same number of bytes (64 MiB chunks, fsync
    per shard-sized file) into the same directory;
  - expand's peak RSS (its own process) and the shard size.
Peak RSS should not grow with the output size (tensors stream to disk).

    .venv/bin/python benchmarks/expand_io.py [--sizes-gb 2 8] [--dir /tmp/samoe-bench] [--workers 2] [--shard-gb 1]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from upscale.checkpoint import build_meta, save_model
from upscale.config import SAM_VITS, MoEConfig, SamMoEConfig
from upscale.expand import GrowthSpec, grown_config, resolve_groups
from upscale.model import build_model

NEW_EXPERT_BF16 = (2 * 768 * 3072 + 3072 + 768) * 2  # bytes of one ViT-B expert in bf16


def source_config(blocks: int) -> SamMoEConfig:
    return SamMoEConfig(**{**SAM_VITS["vit_b"], "depth": blocks, "global_attn_indexes": (blocks - 1,)}, img_size=256,
                        moe_blocks=tuple(range(blocks)), decoder_moe=False, moe=MoEConfig(groups=(16,), top_k=2))


def grown_bytes(cfg: SamMoEConfig, spec: GrowthSpec) -> int:
    g = build_model(grown_config(cfg, spec), device="meta")
    return sum(t.numel() for t in g.state_dict().values()) * 2


def plain_write(directory: Path, total: int, shard: int) -> float:
    """Sequential write of `total` bytes in files of `shard` bytes, fsync each (what expand's writer does)."""
    directory.mkdir(parents=True, exist_ok=True)
    chunk = os.urandom(64 * 2**20)
    t = time.perf_counter()
    left, k = total, 0
    while left > 0:
        with open(directory / f"plain-{k}.bin", "wb") as f:
            n = min(shard, left)
            while n > 0:
                f.write(chunk[: min(n, len(chunk))])
                n -= len(chunk)
            f.flush()
            os.fsync(f.fileno())
        left -= min(shard, left)
        k += 1
    elapsed = time.perf_counter() - t
    shutil.rmtree(directory)
    return elapsed


# Peak RSS is the process's own VmHWM: ru_maxrss would also count the parent's pages at fork time.
RUN_EXPAND = """
import sys, time
from cli import app
t = time.perf_counter()
try:
    app(sys.argv[1:], standalone_mode=False)
finally:
    hwm = [int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")][0]
    print("RESULT", time.perf_counter() - t, hwm * 1024, flush=True)
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--sizes-gb", type=float, nargs="+", default=[2.0, 8.0])
    ap.add_argument("--dir", type=Path, default=Path("/tmp/samoe-bench"))
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--shard-gb", type=float, default=1.0)
    args = ap.parse_args()
    shard = int(args.shard_gb * 2**30)
    rows = []
    for size in args.sizes_gb:
        blocks = max(1, round(size * 2**30 / (117 * NEW_EXPERT_BF16)))
        cfg = source_config(blocks)
        spec = GrowthSpec(experts=117, groups=resolve_groups(16, 117, "8", 1))
        work = args.dir / f"{size:g}gb"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        model = build_model(cfg, seed=0)
        save_model(model, work / "src", build_meta(cfg, {n: "random" for n in model.state_dict()}, [], [], torch.bfloat16),
                   dtype=torch.bfloat16, shard_bytes=shard)
        del model
        out_bytes = grown_bytes(cfg, spec)
        cmd = [sys.executable, "-c", RUN_EXPAND, "expand", str(work / "src"), "--out", str(work / "grown"), "--experts", "117",
               "--groups", "8", "--noise-std", "0.01", "--workers", str(args.workers), "--shard-size", str(args.shard_gb)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")]
        if proc.returncode != 0 or not line:
            sys.exit(f"expand failed: {proc.stderr[-2000:]}")
        t_expand, rss = float(line[0].split()[1]), int(line[0].split()[2])
        written = sum(p.stat().st_size for p in (work / "grown").glob("*.safetensors"))
        shutil.rmtree(work / "grown")
        t_plain = plain_write(work / "plain", written, shard)
        shutil.rmtree(work)
        rows.append({"target_gb": size, "blocks": blocks, "bytes": written, "planned_bytes": out_bytes, "expand_s": t_expand,
                     "plain_write_s": t_plain, "ratio": t_expand / t_plain, "peak_rss_gb": rss / 2**30, "shard_gb": args.shard_gb})
        r = rows[-1]
        print(f"{r['bytes'] / 2**30:6.2f} GiB: expand {r['expand_s']:7.1f} s, plain write {r['plain_write_s']:7.1f} s, "
              f"ratio {r['ratio']:.2f}, peak RSS {r['peak_rss_gb']:.2f} GiB (shard {args.shard_gb:g} GiB)", flush=True)
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
