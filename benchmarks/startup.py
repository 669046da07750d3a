"""Start-up time of the commands that should answer at once (issue 40, item 1), against `import torch`.

Each command runs as a user runs it (the `samoe` console script, this tree first on PYTHONPATH) in
a fresh process, `--repeats` times; the table gives the median and the fastest wall time, and the
time the process spent importing modules (the sum of the top-level entries of one run under
`python -X importtime`), with whether torch was among them. `inspect-checkpoint` reads a checkpoint
with the real 10.3B tensor layout (sam-moe-1.5b grown to 117 experts in 8 groups + 1 extra block,
bf16, 2 GiB shards): each shard's real safetensors header, its data a sparse file of the right size
(nothing but headers is read; the files take no space), removed afterwards.

    .venv/bin/python benchmarks/startup.py [--repeats 9] [--dir /tmp/samoe-bench]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

from upscale.checkpoint import (FORMAT, FORMAT_VERSION, INDEX_FILE, META_FILE, TensorSpec, build_meta,
                                safetensors_header, shard_file_names, shard_layout)
from upscale.config import PRESETS
from upscale.growth import GrowthSpec, grown_config, planned_provenance, resolve_groups
from upscale.layout import state_shapes

ROOT = Path(__file__).resolve().parents[1]

GROW_10B = ["--experts", "117", "--groups", "8", "--extra-blocks", "1"]


def sparse_10b_checkpoint(path: Path) -> int:
    """A checkpoint directory with the 10.3B layout whose shards hold real headers and sparse data."""
    import torch

    src = PRESETS["sam-moe-1.5b"]
    cfg = grown_config(src, GrowthSpec(experts=117, groups=resolve_groups(16, 117, "8", 1), extra_blocks=1))
    shapes = state_shapes(cfg)
    shards = shard_layout([TensorSpec(n, torch.bfloat16, s) for n, s in shapes.items()], 2 * 1024**3)
    names = shard_file_names(len(shards))
    path.mkdir(parents=True)
    files = {}
    for name, shard in zip(names, shards):
        header = safetensors_header(shard)
        size = len(header) + sum(s.nbytes for s in shard)
        with open(path / name, "wb") as f:
            f.write(header)
            f.truncate(size)
        files[name] = {"blake3": "0" * 64, "bytes": size}
    weight_map = {s.name: name for name, shard in zip(names, shards) for s in shard}
    (path / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": sum(f["bytes"] for f in files.values())},
                                               "weight_map": weight_map}))
    meta = build_meta(cfg, planned_provenance(src, cfg, shapes), [], [], torch.bfloat16)
    (path / META_FILE).write_text(json.dumps(dict(meta, format=FORMAT, format_version=FORMAT_VERSION, files=files)))
    return sum(s.nbytes for shard in shards for s in shard) // 2


def samoe() -> list[str]:
    script = Path(sys.executable).with_name("samoe")
    return [str(script)] if script.exists() else [sys.executable, "-m", "cli"]


def child_env(bench_dir: Path, tree: Path = ROOT) -> dict[str, str]:
    """Checkout `tree` first on the path, and bytecode cached (under the bench folder) as an installed samoe's
    is: compiling our modules afresh in every run would time the compiler."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    return dict(env, PYTHONPATH=os.pathsep.join(filter(None, [str(tree), os.environ.get("PYTHONPATH")])),
                PYTHONPYCACHEPREFIX=str(bench_dir / "pycache"))


def wall_times(cmd: list[str], repeats: int, env: dict[str, str]) -> list[float]:
    subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True, cwd=ROOT)  # compiles
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True, cwd=ROOT)
        times.append(time.perf_counter() - t)
    return times


def import_time(cmd: list[str], env: dict[str, str]) -> tuple[float, bool]:
    """(seconds spent in top-level imports of one run, whether torch was imported)."""
    if cmd[0] == sys.executable:
        cmd = cmd[1:]
    proc = subprocess.run([sys.executable, "-X", "importtime", *cmd], env=env, capture_output=True, text=True, cwd=ROOT)
    total, torch = 0, False
    for line in proc.stderr.splitlines():
        m = re.match(r"import time:\s+\d+ \|\s+(\d+) \|( *)(\S+)", line)
        if m and not m.group(2).strip(" ") and len(m.group(2)) == 1:  # one space: a top-level import
            total += int(m.group(1))
        if m and m.group(3) == "torch":
            torch = True
    return total / 1e6, torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--dir", type=Path, default=Path("/tmp/samoe-bench"))
    ap.add_argument("--results", type=Path, default=None,
                    help="also write the table here (default: benchmarks/results-startup-<date>.txt)")
    args = ap.parse_args()
    ckpt = args.dir / "startup-10b"
    shutil.rmtree(ckpt, ignore_errors=True)
    params = sparse_10b_checkpoint(ckpt)
    cases = [
        ("python -c pass", [sys.executable, "-c", "pass"]),
        ("python -c 'import torch' (reference)", [sys.executable, "-c", "import torch"]),
        ("samoe --help", [*samoe(), "--help"]),
        ("samoe expand --help", [*samoe(), "expand", "--help"]),
        (f"samoe inspect-checkpoint (10.3B layout, {len(list(ckpt.glob('*.safetensors')))} shards)",
         [*samoe(), "inspect-checkpoint", str(ckpt)]),
        ("samoe inspect-checkpoint --json (10.3B)", [*samoe(), "inspect-checkpoint", str(ckpt), "--json"]),
        ("samoe plan --preset sam-moe-1.5b " + " ".join(GROW_10B), [*samoe(), "plan", "--preset", "sam-moe-1.5b", *GROW_10B]),
    ]
    rows = []
    env = child_env(args.dir)
    try:
        for label, cmd in cases:
            times = wall_times(cmd, args.repeats, env)
            imports, torch = import_time(cmd, env)
            rows.append((label, statistics.median(times), min(times), imports, torch))
            print(f"{label}: median {rows[-1][1]:.3f} s", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(ckpt, ignore_errors=True)
        shutil.rmtree(args.dir / "pycache", ignore_errors=True)
    width = max(len(r[0]) for r in rows)
    lines = [f"# benchmarks/startup.py, {date.today()}, {platform.node()}, {os.cpu_count()} CPUs, {args.repeats} runs each; "
             f"inspect reads a {params / 1e9:.2f}B-parameter layout",
             f"{'command':<{width}}  median s  fastest s  imports s  torch imported"]
    lines += [f"{label:<{width}}  {med:8.3f}  {fast:9.3f}  {imp:9.3f}  {'yes' if torch else 'no'}" for label, med, fast, imp, torch in rows]
    torch_med = rows[1][1]
    lines.append("medians relative to `import torch`: " + ", ".join(f"{r[0].split(' (')[0]} {r[1] / torch_med:.2f}x" for r in rows[2:]))
    text = "\n".join(lines) + "\n"
    print(text, end="")
    (args.results or ROOT / "benchmarks" / f"results-startup-{date.today()}.txt").write_text(text)


if __name__ == "__main__":
    main()
