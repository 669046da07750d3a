"""`samoe predict` on a huge scene (peak memory) and on a dense one (windows/s against eval's bare forward).

In one run, on the tiny preset:
  1. a `--size` x `--size` two-band float32 GeoTIFF (default 20000: a Sentinel-1 GRD
     scene is about 25000 x 17000), written *sparse*: speckled linear sigma0 in a
     `--data` x `--data` block at the centre, the rest never written (read back as 0,
     declared nodata, as a GRD scene's borders are), so it costs little disk.
     `samoe predict` runs on it in a child process: wall time and peak RSS (getrusage).
     Every row of the scene is read, converted, blended and written; windows without
     data are not run through the model.
  2. a dense `--dense` x `--dense` scene (speckle everywhere): predict in this process
     (the function `samoe predict` calls, after start-up), and the model's forward alone
     (what `samoe eval` runs per batch) on the same windows, same batch size, threads
     and device; windows/s of both and their ratio: what reading, converting, blending
     and writing the outputs cost on top of the forward.
The scenes are deleted afterwards.

    .venv/bin/python benchmarks/predict.py [--size 20000] [--dense 1024] [--batch 8] [--threads 2] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import rasterio
import torch
from affine import Affine
from rasterio.windows import Window

from stages.data import to_model_input
from stages.predict import PredictOptions, Tiling, predict, window_starts
from stages.rasters import open_raster
from stages.units import Units
from upscale import load_model
from upscale.config import PRESETS
from upscale.create import init_from_preset

TRANSFORM = Affine(10.0, 0.0, 300000.0, 0.0, -10.0, 5000000.0)


def write_scene(path: Path, size: int, data: int) -> None:
    """A tiled GeoTIFF: speckle in a central `data` x `data` block; elsewhere unwritten (sparse, nodata 0)."""
    rng = np.random.default_rng(0)
    with rasterio.open(path, "w", driver="GTiff", height=size, width=size, count=2, dtype="float32", tiled=True,
                       blockxsize=512, blockysize=512, SPARSE_OK=True, BIGTIFF="YES", nodata=0.0, crs="EPSG:32633",
                       transform=TRANSFORM) as d:
        top = (size - data) // 2
        for y in range(top, top + data, 512):
            rows = min(512, top + data - y)
            block = rng.gamma(4, 0.025, size=(2, rows, data)).astype(np.float32)
            block[1] *= 0.2
            d.write(block, window=Window(top, y, data, rows))


def run_predict(ckpt: Path, scene: Path, out: Path, args: argparse.Namespace) -> tuple[float, int, dict]:
    """`samoe predict` in a child process: (wall seconds, its peak RSS in bytes, its JSON summary)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    cmd = [sys.executable, "-c", f"import torch; torch.set_num_threads({args.threads}); import cli; cli.main()",
           "predict", str(ckpt), "--images", str(scene), "--out", str(out), "--batch-size", str(args.batch),
           "--device", args.device, "--json"]
    t = time.perf_counter()
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if res.returncode != 0:
        sys.exit(f"predict failed ({res.returncode}): {res.stderr.strip()}")
    return wall, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024, json.loads(res.stdout)


def forward_only(ckpt: Path, scene: Path, tiling: Tiling, batch: int, device: str) -> tuple[float, int]:
    """Windows/s of the bare forward (inputs prepared beforehand) on every window of `scene`."""
    model = load_model(ckpt, device=device).eval()
    size = tiling.window
    with open_raster(scene) as r:
        tiles = []
        for y in window_starts(r.height, size, tiling.stride):
            for x in window_starts(r.width, size, tiling.stride):
                raw = r.read(y, y + size, x, x + size)
                tiles.append(to_model_input(raw, Units("linear"), r.valid(y, y + size, x, x + size, values=raw)))
    x = torch.from_numpy(np.stack(tiles))
    dev = torch.device(device)
    with torch.no_grad():
        model(x[:batch].to(dev))  # warm-up
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        for i in range(0, len(x), batch):
            model(x[i:i + batch].to(dev))["seg"].softmax(1).cpu()
        if dev.type == "cuda":
            torch.cuda.synchronize()
    return len(x) / (time.perf_counter() - t), len(x)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=20000, help="side of the huge sparse scene")
    ap.add_argument("--data", type=int, default=2048, help="side of its block with data")
    ap.add_argument("--dense", type=int, default=1024, help="side of the dense scene timed against the bare forward")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="samoe-predict-", dir=args.workdir))
    try:
        ckpt = init_from_preset(PRESETS["tiny"], work / "tiny", 0, torch.float32, ["benchmark"], False)
        tiling = Tiling.of(PRESETS["tiny"].img_size)
        huge, dense = work / "huge.tif", work / "dense.tif"
        write_scene(huge, args.size, args.data)
        write_scene(dense, args.dense, args.dense)
        wall, peak, summary = run_predict(ckpt, huge, work / "out-huge", args)
        with rasterio.open(summary["scenes"]["huge"]["outputs"]["masks"]) as m:
            assert (m.height, m.width) == (args.size, args.size) and m.transform == TRANSFORM
        side = len(window_starts(args.data, tiling.window, tiling.stride)) + 1
        print(f"huge: {args.size} x {args.size} x 2 float32 ({args.size ** 2 * 8 / 2**30:.1f} GiB of pixels, "
              f"{os.stat(huge).st_blocks * 512 / 2**20:.0f} MiB on disk), {tiling.count(args.size, args.size)} windows "
              f"of {tiling.window} px (stride {tiling.stride}), about {side * side} with data: predicted in {wall:.1f} s, "
              f"peak RSS {peak / 2**30:.2f} GiB")
        options = PredictOptions(batch_size=args.batch, device=torch.device(args.device))
        predict(ckpt, [dense], work / "warm-up", PredictOptions(batch_size=args.batch, device=torch.device(args.device)))
        t = time.perf_counter()
        predict(ckpt, [dense], work / "out-dense", options)
        wall = time.perf_counter() - t
        n = tiling.count(args.dense, args.dense)
        fwd, _ = forward_only(ckpt, dense, tiling, args.batch, args.device)
        print(f"dense: {args.dense} x {args.dense}, {n} windows: predict {n / wall:.2f} windows/s, forward alone "
              f"(eval's per-batch work) {fwd:.2f} windows/s; ratio predict / forward {n / wall / fwd:.2f}")
        print(f"threads {args.threads}, batch {args.batch}, device {args.device}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
