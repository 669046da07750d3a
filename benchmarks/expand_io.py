"""`samoe expand` end to end, as a user runs it, against writing the same bytes to the same disk.

The case (issue 40): a ViT-B-width float32 source with 2 experts in each of its 12 blocks (and the
decoder's), grown to 20 experts in 4 groups plus 1 extra block with `--init mixed --dtype bfloat16`
(2.62 GB out). The timer starts before the `samoe expand` process does, so imports, opening and
planning count, as they do for a user. Time to first write is when the first shard of the output
first holds data (the parent polls the output's temporary directory every 2 ms).

In the same run, the same number of bytes is written to the same directory in files of expand's
shard sizes, through `O_DIRECT` with fsync (what the disk can do). Every timed job starts after the
same idle time (`--idle`): on this kind of VM freed pages go back to the host within seconds, and a
writer that reuses still-mapped page-cache pages is faster than one that faults in fresh ones. The
jobs are interleaved, `--repeats` times; the best of each is reported with their ratio, expand's CPU
time and its peak RSS (it must stay near a shard, not grow with the output). `--baseline DIR` times
another checkout's `samoe expand` (e.g. main's) in the same run, interleaved.

    .venv/bin/python benchmarks/expand_io.py [--dir /tmp/samoe-bench] [--repeats 3] [--idle 5] [--workers 2]
                                             [--baseline /path/to/main-checkout]
"""

from __future__ import annotations

import argparse
import mmap
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from datetime import date
from pathlib import Path

from startup import ROOT, child_env, samoe

CHUNK = 64 * 2**20
EXPAND_ARGS = ["--experts", "20", "--groups", "4", "--extra-blocks", "1", "--init", "mixed", "--dtype", "bfloat16"]


def make_source(path: Path) -> int:
    """The case's float32 source checkpoint (random weights); returns its parameter count."""
    import torch

    from upscale.checkpoint import build_meta, save_model
    from upscale.config import SAM_VITS, MoEConfig, SamMoEConfig
    from upscale.model import build_model

    cfg = SamMoEConfig(**SAM_VITS["vit_b"], moe_blocks=tuple(range(12)), moe=MoEConfig(groups=(2,), top_k=2))
    model = build_model(cfg, seed=0)
    save_model(model, path, build_meta(cfg, {n: "random" for n in model.state_dict()}, [], [], torch.float32))
    return sum(t.numel() for t in model.state_dict().values())


def _first_write(out: Path, start: float, stop: threading.Event, seen: dict) -> None:
    """Poll the output's temporary directory until a shard holds data; record when."""
    prefix = f".{out.name}.tmp-"
    while not stop.is_set():
        for entry in os.scandir(out.parent):
            if entry.name.startswith(prefix):
                try:
                    if any(f.name.endswith(".safetensors") and f.stat().st_size > 0 for f in os.scandir(entry.path)):
                        seen["first_write_s"] = time.perf_counter() - start
                        return
                except FileNotFoundError:
                    pass
        time.sleep(0.002)


def run_expand(src: Path, out: Path, workers: int, tree: Path = ROOT) -> dict:
    """`samoe expand` of checkout `tree` in a fresh process, timed from before its start to its exit."""
    env = child_env(src.parent / tree.name, tree)
    cmd = [*samoe(), "expand", str(src), "--out", str(out), *EXPAND_ARGS, "--workers", str(workers)]
    seen: dict = {}
    stop = threading.Event()
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=tree)
    poller = threading.Thread(target=_first_write, args=(out, start, stop, seen), daemon=True)
    poller.start()
    _, status, usage = os.wait4(proc.pid, 0)
    elapsed = time.perf_counter() - start
    stop.set()
    poller.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        sys.exit(f"samoe expand failed: {proc.stderr.read().decode()[-2000:]}")
    proc.stderr.close()
    shards = sorted(p.stat().st_size for p in out.glob("*.safetensors"))
    return {"seconds": elapsed, "first_write_s": seen.get("first_write_s", float("nan")), "user_s": usage.ru_utime,
            "sys_s": usage.ru_stime, "peak_rss": usage.ru_maxrss * 1024, "shards": shards}


def _chunk() -> mmap.mmap:
    """A page-aligned 64 MiB buffer of random bytes (O_DIRECT needs aligned memory)."""
    buf = mmap.mmap(-1, CHUNK)
    buf.write(os.urandom(CHUNK))
    return buf


def direct_write(directory: Path, sizes: list[int], buf: mmap.mmap) -> float:
    """Files of `sizes` bytes written through O_DIRECT (lengths rounded up to 4 KiB, as expand's writer pads
    its last block before truncating), fsync each; the directory is removed afterwards (not timed)."""
    directory.mkdir(parents=True, exist_ok=True)
    view = memoryview(buf)
    t = time.perf_counter()
    for k, size in enumerate(sizes):
        fd = os.open(directory / f"plain-{k}.bin", os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o644)
        try:
            todo = -(-size // 4096) * 4096
            while todo > 0:
                todo -= os.write(fd, view[: min(todo, CHUNK)])
            os.ftruncate(fd, size)
            os.fsync(fd)
        finally:
            os.close(fd)
    elapsed = time.perf_counter() - t
    shutil.rmtree(directory)
    return elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", type=Path, default=Path("/tmp/samoe-bench"))
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--idle", type=float, default=5.0, help="seconds of idle before each timed job")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--results", type=Path, default=None, help="also write the table here (default: "
                    "benchmarks/results-expand-io-<date>.txt)")
    ap.add_argument("--baseline", type=Path, default=None, help="another checkout (e.g. main) whose `samoe expand` "
                    "is timed too, interleaved, in the same run")
    args = ap.parse_args()
    trees = {"this tree": ROOT} | ({f"baseline {args.baseline}": args.baseline.resolve()} if args.baseline else {})
    work = args.dir / "expand-io"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        params = make_source(work / "src")
        buf = _chunk()
        runs: dict[str, list[dict]] = {label: [] for label in trees}
        direct: list[float] = []
        for _ in range(args.repeats):
            for label, tree in trees.items():
                time.sleep(args.idle)
                runs[label].append(run_expand(work / "src", work / "grown", args.workers, tree))
                shutil.rmtree(work / "grown")
            time.sleep(args.idle)
            direct.append(direct_write(work / "plain", runs["this tree"][-1]["shards"], buf))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    shards = runs["this tree"][0]["shards"]
    gb = sum(shards) / 1e9
    lines = [
        f"# benchmarks/expand_io.py, {date.today()}, {platform.node()}, {os.cpu_count()} CPUs, --workers {args.workers}",
        f"case: ViT-B-width fp32 source ({params / 1e6:.0f}M params, 2 experts x 12 blocks) -> 20 experts in 4 groups "
        f"+ 1 extra block, {' '.join(EXPAND_ARGS[-4:])}: {gb:.2f} GB in {len(shards)} shard(s)",
        "O_DIRECT write of the same bytes, same disk: " + ", ".join(f"{t:.2f}" for t in direct) + " s",
    ]
    for label, rs in runs.items():
        best = min(rs, key=lambda r: r["seconds"])
        lines += [
            f"{label}: samoe expand, process start to exit: " + ", ".join(f"{r['seconds']:.2f}" for r in rs) + " s; "
            "first write after " + ", ".join(f"{r['first_write_s']:.2f}" for r in rs) + " s",
            f"{label}: best {best['seconds']:.2f} s ({gb / best['seconds']:.2f} GB/s; CPU {best['user_s']:.1f} user + "
            f"{best['sys_s']:.1f} sys; peak RSS {best['peak_rss'] / 2**30:.2f} GiB) | O_DIRECT best {min(direct):.2f} s "
            f"({gb / min(direct):.2f} GB/s) | expand / O_DIRECT = {best['seconds'] / min(direct):.2f}x | "
            f"first write after {min(r['first_write_s'] for r in rs):.2f} s",
        ]
    text = "\n".join(lines) + "\n"
    print(text, end="")
    out = args.results or ROOT / "benchmarks" / f"results-expand-io-{date.today()}.txt"
    out.write_text(text)


if __name__ == "__main__":
    main()
