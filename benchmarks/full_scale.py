"""Full scale on this machine: 1.5B init, expand to the 10.3B layout, inspect, load.

Runs, each in its own process (peak RSS is that process's VmHWM):
  1. `samoe init --preset sam-moe-1.5b --dtype bfloat16` (peak RSS = the process's VmHWM)
  2. `samoe expand` to 117 experts in 8 groups + 1 extra block (copy+noise 0.01),
     against an O_DIRECT write and a buffered+fsync write of the same bytes to the
     same disk, each after the same idle time, imports outside the timer, best of
     `--repeats` (see expand_io.py: `compare`);
  3. `samoe inspect-checkpoint` of the result: time and bytes read (/proc/self/io rchar);
  4. `upscale.load_model` of the 1.5B checkpoint vs reading its bytes (warm page cache for both).

    .venv/bin/python benchmarks/full_scale.py [--dir /tmp/samoe-full] [--keep]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from expand_io import compare, report  # noqa: E402

WRAP = """
import sys, time
t = time.perf_counter()
rc = 0
try:
    {body}
except SystemExit as e:
    rc = e.code or 0
io = dict(l.split(": ") for l in open("/proc/self/io").read().splitlines())
hwm = [int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")][0]  # own peak, not the parent's
print("RESULT", time.perf_counter() - t, hwm * 1024, io["rchar"], rc, flush=True)
"""


def run(body: str, *args: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", WRAP.format(body=body), *args], capture_output=True, text=True)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")]
    if proc.returncode != 0 or not line or line[0].split()[4] != "0":
        sys.exit(f"failed: {args}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    _, t, rss, rchar, _ = line[0].split()
    return {"seconds": float(t), "peak_rss_gb": int(rss) / 2**30, "read_bytes": int(rchar)}


CLI = "from cli import app; app(sys.argv[1:], standalone_mode=False)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--dir", type=Path, default=Path("/tmp/samoe-full"))
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--idle", type=float, default=10.0, help="seconds of idle before each timed write")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    d = args.dir
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    res = {}
    res["init"] = run(CLI, "init", "--preset", "sam-moe-1.5b", "--dtype", "bfloat16", "--out", str(d / "1.5b"))
    src_bytes = sum(p.stat().st_size for p in (d / "1.5b").glob("*.safetensors"))
    print(f"init 1.5B bf16: {res['init']['seconds']:.1f} s, peak RSS {res['init']['peak_rss_gb']:.2f} GiB, {src_bytes / 2**30:.2f} GiB", flush=True)
    expand_args = ["expand", str(d / "1.5b"), "--out", str(d / "10b"), "--experts", "117", "--groups", "8",
                   "--extra-blocks", "1", "--set", "noise_std=0.01", "--seed", "0", "--set", "shard_size_gib=2"]
    res["expand_vs_writes"] = compare(d / "10b", expand_args, 2 * 2**30, args.idle, args.repeats)
    print(report("expand 1.5B -> 10.3B", res["expand_vs_writes"]), flush=True)
    written = res["expand_vs_writes"]["bytes"]
    run(CLI, *expand_args)  # once more, kept for inspect (not timed)
    res["inspect"] = run(CLI, "inspect-checkpoint", str(d / "10b"), "--json")
    print(f"inspect 10.3B: {res['inspect']['seconds']:.2f} s, {res['inspect']['read_bytes'] / 2**20:.1f} MiB read "
          f"(checkpoint {written / 2**30:.1f} GiB)", flush=True)
    res["load"] = run("from upscale import load_model; load_model(sys.argv[1])", str(d / "1.5b"))
    t = time.perf_counter()
    for p in sorted((d / "1.5b").glob("*.safetensors")):
        with open(p, "rb") as f:
            while f.read(64 * 2**20):
                pass
    res["read_bytes_s"] = time.perf_counter() - t
    print(f"load_model 1.5B: {res['load']['seconds']:.1f} s (incl. imports), peak RSS {res['load']['peak_rss_gb']:.2f} GiB; "
          f"reading its {src_bytes / 2**30:.2f} GiB: {res['read_bytes_s']:.1f} s", flush=True)
    print(json.dumps(res))
    if not args.keep:
        shutil.rmtree(d)


if __name__ == "__main__":
    main()
