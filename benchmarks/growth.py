"""Growth experiment: is the grown model really better than the source trained further?

On demo data (CPU, minutes):
  1. train the tiny source model (it stands in for the user's trained 1.5B);
  2. (a) train the source further for E extra steps (full fine-tune, same data);
     (b) grow it (4 -> 16 experts in 4 groups + 1 extra block), pseudo-label B
         with the source, run stages 1, 2, 3 for the same E extra steps in total;
  3. `samoe eval` source, (a) and (b) side by side on the held-out A-test, with
     paired bootstrap 95% intervals.
Prints the table (markdown) and writes the full eval JSON next to the work dir.

    .venv/bin/python benchmarks/growth.py [--work /tmp/samoe-growth] [--source-epochs 20] [--stage-epochs 10]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

SAMOE = str(Path(sys.executable).parent / "samoe")


def samoe(*args: str) -> str:
    t = time.perf_counter()
    proc = subprocess.run([SAMOE, *args], capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"samoe {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    print(f"  {time.perf_counter() - t:6.1f} s  samoe {' '.join(args)}", flush=True)
    return proc.stdout


def steps_of(run: Path) -> int:
    return json.loads((run / "final" / "samoe.json").read_text())["stages"][-1]["steps"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--work", type=Path, default=Path("/tmp/samoe-growth"))
    ap.add_argument("--source-epochs", type=int, default=20)
    ap.add_argument("--stage-epochs", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    w = args.work
    shutil.rmtree(w, ignore_errors=True)
    d, e = w / "data", str(args.stage_epochs)
    samoe("demo-data", "--out", str(d), "--seed", str(args.seed))
    samoe("init", "--preset", "tiny", "--out", str(w / "init"), "--seed", str(args.seed))
    samoe("train", "--stage", "3", "--force", "--from", str(w / "init"), "--run-dir", str(w / "source"), "--data", str(d / "A"),
          "--unlabelled", str(d / "B"), "--epochs", str(args.source_epochs), "--lr", "0.05", "--seed", str(args.seed))
    src = w / "source" / "final"
    # (b) grow + stages 1-3
    samoe("expand", str(src), "--out", str(w / "grown"), "--experts", "16", "--groups", "4", "--extra-blocks", "1",
          "--noise-std", "0.01", "--seed", str(args.seed), "--verify", str(d / "A"), "--verify-tol", "1e-5")
    samoe("pseudo-label", str(src), "--images", str(d / "B"), "--out", str(d / "B-pseudo"), "--threshold", "0.5")
    samoe("train", "--stage", "1", "--from", str(w / "grown"), "--run-dir", str(w / "s1"), "--data", str(d / "B-pseudo"),
          "--epochs", e, "--lr", "0.05", "--seed", str(args.seed))
    samoe("train", "--stage", "2", "--from", str(w / "s1" / "final"), "--run-dir", str(w / "s2"), "--data", str(d / "A"),
          "--unlabelled", str(d / "B"), "--epochs", e, "--lr", "0.02", "--seed", str(args.seed))
    samoe("train", "--stage", "3", "--from", str(w / "s2" / "final"), "--run-dir", str(w / "s3"), "--data", str(d / "A"),
          "--unlabelled", str(d / "B"), "--epochs", e, "--lr", "0.01", "--seed", str(args.seed))
    extra = sum(steps_of(w / s) for s in ("s1", "s2", "s3"))
    # (a) the source trained further for the same number of steps
    samoe("train", "--stage", "3", "--force", "--from", str(src), "--run-dir", str(w / "further"), "--data", str(d / "A"),
          "--unlabelled", str(d / "B"), "--max-steps", str(extra), "--lr", "0.02", "--seed", str(args.seed))
    report = json.loads(samoe("eval", str(w / "further" / "final"), str(w / "s3" / "final"), str(src),
                              "--data", str(d / "A-test"), "--json"))
    (w.parent / f"{w.name}-eval.json").write_text(json.dumps(report, indent=1))
    names = [f"(a) source + {extra} steps", "(b) grown + stages 1-3", "source"]
    cks = report["checkpoints"]
    print(f"\n{report['images']} held-out images (A-test); extra training steps for (a) and (b): {extra}\n")
    print("| metric | " + " | ".join(f"{n} ({c['total_params'] / 1e6:.2f}M)" for n, c in zip(names, cks)) + " | (b) - (a) [95% CI] |")
    print("|---" * (len(cks) + 2) + "|")
    for m in ("miou", "mean_dice", "pixel_accuracy", "boundary_f1", "sdf_mae"):
        d_ = report["comparisons"][0]["diff"][m]
        print(f"| {m} | " + " | ".join(f"{c['metrics'][m]:.4f}" for c in cks)
              + f" | {d_['diff']:+.4f} [{d_['ci_low']:+.4f}, {d_['ci_high']:+.4f}] |")
    route = cks[1]["routing"]
    print("\nnew-group traffic of (b) per MoE layer (share of assignments / of routing weight): "
          + ", ".join(f"{k.replace('image_encoder.blocks.', 'enc').replace('mask_decoder.transformer.layers.', 'dec').removesuffix('.mlp')}"
                      f" {v['new_share']:.2f}/{v['new_weight_share']:.3f}" for k, v in route.items()))


if __name__ == "__main__":
    main()
