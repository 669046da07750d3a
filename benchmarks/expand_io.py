"""`samoe expand` against writing the same bytes to the same disk, honestly.

For each target output size, builds a synthetic flat-MoE source (ViT-B width,
16 experts in every block, bf16), grows it to 117 experts in 8 groups with
copy+noise through the CLI (in a child process whose imports happen before the
timer starts), and in the same run times two plain writes of the same bytes
into the same directory, in files of the same shard size:
  - `O_DIRECT` (aligned 64 MiB buffer, fsync per file): what the disk can do;
  - buffered `write()` + fsync per file: what a naive writer pays.
Every timed job starts after the same idle time (`--idle`, default 10 s): on
this kind of VM freed pages go back to the host within seconds, and a writer
that reuses still-mapped page-cache pages is faster than one that faults in
fresh ones, so a baseline run straight after deleting expand's output would
flatter it. The three jobs are interleaved and each is run `--repeats` times
(default 2); the best of each is reported, with ratios, expand's CPU time and
its peak RSS (VmHWM of its own process; it must not grow with the output).

    .venv/bin/python benchmarks/expand_io.py [--sizes-gb 2.6 8] [--dir /tmp/samoe-bench] [--workers 2] [--shard-gb 1]
"""

from __future__ import annotations

import argparse
import json
import mmap
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
CHUNK = 64 * 2**20


def source_config(blocks: int) -> SamMoEConfig:
    return SamMoEConfig(**{**SAM_VITS["vit_b"], "depth": blocks, "global_attn_indexes": (blocks - 1,)}, img_size=256,
                        moe_blocks=tuple(range(blocks)), decoder_moe=False, moe=MoEConfig(groups=(16,), top_k=2))


def grown_bytes(cfg: SamMoEConfig, spec: GrowthSpec) -> int:
    g = build_model(grown_config(cfg, spec), device="meta")
    return sum(t.numel() for t in g.state_dict().values()) * 2


def _chunk() -> mmap.mmap:
    """A page-aligned 64 MiB buffer of random bytes (O_DIRECT needs aligned memory)."""
    buf = mmap.mmap(-1, CHUNK)
    buf.write(os.urandom(CHUNK))
    return buf


def plain_write(directory: Path, total: int, shard: int, direct: bool = False, buf: mmap.mmap | None = None) -> float:
    """Sequential write of `total` bytes in files of `shard` bytes, fsync each (what expand's writer does).

    `direct`: through O_DIRECT (lengths rounded up to 4 KiB, as expand's writer
    pads its last block before truncating). The directory is removed afterwards
    (not timed)."""
    directory.mkdir(parents=True, exist_ok=True)
    buf = buf or _chunk()
    view = memoryview(buf)
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | (os.O_DIRECT if direct else 0)
    t = time.perf_counter()
    left, k = total, 0
    while left > 0:
        n = min(shard, left)
        fd = os.open(directory / f"plain-{k}.bin", flags, 0o644)
        try:
            todo = -(-n // 4096) * 4096 if direct else n
            while todo > 0:
                todo -= os.write(fd, view[: min(todo, CHUNK)])
            os.fsync(fd)
        finally:
            os.close(fd)
        left -= n
        k += 1
    elapsed = time.perf_counter() - t
    shutil.rmtree(directory)
    return elapsed


# Imports happen before the timer; peak RSS is the process's own VmHWM (ru_maxrss would count the parent's pages at fork).
RUN_EXPAND = """
import sys, time, resource
import torch, numpy, blake3, rich.progress
from cli import app
import upscale.expand, upscale.checkpoint, upscale.fastio
r0 = resource.getrusage(resource.RUSAGE_SELF)
t = time.perf_counter()
try:
    app(sys.argv[1:], standalone_mode=False)
finally:
    elapsed = time.perf_counter() - t
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    hwm = [int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")][0]
    print("RESULT", elapsed, hwm * 1024, r1.ru_utime - r0.ru_utime, r1.ru_stime - r0.ru_stime, flush=True)
"""


def run_expand(args: list[str]) -> dict:
    proc = subprocess.run([sys.executable, "-c", RUN_EXPAND, *args], capture_output=True, text=True)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")]
    if proc.returncode != 0 or not line:
        sys.exit(f"expand failed: {proc.stderr[-2000:]}")
    _, t, rss, user, sys_ = line[0].split()
    return {"seconds": float(t), "peak_rss": int(rss), "user_s": float(user), "sys_s": float(sys_)}


def compare(out: Path, expand_args: list[str], shard: int, idle: float, repeats: int) -> dict:
    """Interleave expand, an O_DIRECT write and a buffered+fsync write of expand's bytes, each after `idle` s."""
    buf = _chunk()
    best: dict[str, float] = {}
    expand = None
    written = 0
    for _ in range(repeats):
        time.sleep(idle)
        r = run_expand(expand_args)
        written = sum(p.stat().st_size for p in out.glob("*.safetensors"))
        shutil.rmtree(out)
        if expand is None or r["seconds"] < expand["seconds"]:
            expand = r
        for name, direct in (("direct", True), ("buffered", False)):
            time.sleep(idle)
            t = plain_write(out.parent / f"plain-{name}", written, shard, direct=direct, buf=buf)
            best[name] = min(best.get(name, float("inf")), t)
    return {"bytes": written, "expand": expand, "direct_s": best["direct"], "buffered_s": best["buffered"],
            "ratio_vs_direct": expand["seconds"] / best["direct"], "ratio_vs_buffered": expand["seconds"] / best["buffered"]}


def report(label: str, r: dict) -> str:
    e = r["expand"]
    gb = r["bytes"] / 1e9
    return (f"{label}: {gb:.2f} GB: expand {e['seconds']:.1f} s ({gb / e['seconds']:.2f} GB/s; CPU {e['user_s']:.1f} user + "
            f"{e['sys_s']:.1f} sys, peak RSS {e['peak_rss'] / 2**30:.2f} GiB) | O_DIRECT write {r['direct_s']:.1f} s "
            f"({gb / r['direct_s']:.2f} GB/s) | buffered+fsync {r['buffered_s']:.1f} s | expand/O_DIRECT "
            f"{r['ratio_vs_direct']:.2f}x, expand/buffered {r['ratio_vs_buffered']:.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--sizes-gb", type=float, nargs="+", default=[2.6])
    ap.add_argument("--dir", type=Path, default=Path("/tmp/samoe-bench"))
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--shard-gb", type=float, default=1.0)
    ap.add_argument("--idle", type=float, default=10.0, help="seconds of idle before each timed job")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    shard = int(args.shard_gb * 2**30)
    rows = []
    for size in args.sizes_gb:
        blocks = max(1, round(size * 1e9 / (117 * NEW_EXPERT_BF16)))
        cfg = source_config(blocks)
        spec = GrowthSpec(experts=117, groups=resolve_groups(16, 117, "8", 1))
        work = args.dir / f"{size:g}gb"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        model = build_model(cfg, seed=0)
        save_model(model, work / "src", build_meta(cfg, {n: "random" for n in model.state_dict()}, [], [], torch.bfloat16),
                   dtype=torch.bfloat16, shard_bytes=shard)
        del model
        cmd = ["expand", str(work / "src"), "--out", str(work / "grown"), "--experts", "117", "--groups", "8",
               "--noise-std", "0.01", "--workers", str(args.workers), "--shard-size", str(args.shard_gb)]
        r = compare(work / "grown", cmd, shard, args.idle, args.repeats)
        shutil.rmtree(work)
        r.update(target_gb=size, blocks=blocks, planned_bytes=grown_bytes(cfg, spec), shard_gb=args.shard_gb)
        rows.append(r)
        print(report(f"{blocks} ViT-B blocks x 117 experts", r), flush=True)
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
