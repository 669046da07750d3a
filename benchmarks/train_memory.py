"""Training memory per stage: gradients and optimizer state exist only for trainable parameters.

Builds a ViT-B-width source (256 px, 4 blocks, MoE in blocks 2-3 and the decoder,
16 experts), grows it to 32 experts in 4 groups + 1 extra block, then for each
stage, in a fresh process: applies the stage plan, runs one seed-004 training
step (unsupervised + supervised phase, batch 2) and reports
  - parameter, gradient and optimizer-state bytes actually held,
  - what `samoe plan`'s memory model predicts (weights + grads + SGD momentum),
  - the ratio of the two, and the process's peak RSS (weights + activations + runtime).

    .venv/bin/python benchmarks/train_memory.py [--dir /tmp/samoe-trainmem]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

STEP = r"""
import json, sys, torch
from upscale import Checkpoint, load_model
from stages.engine import apply_stage, train_step
from stages.optim import build_optimizers
from stages.plan import stage_memory
stage, path = int(sys.argv[1]), sys.argv[2]
ck = Checkpoint.open(path)
model = load_model(path)
apply_stage(model, ck.provenance, stage, 1)
opts = build_optimizers(model, 1e-3)
s = model.config.img_size
torch.manual_seed(0)
batch = {"image": torch.randn(2, 3, s, s), "mask": torch.randint(0, 4, (2, s, s)),
         "sdf": torch.rand(2, 4, s, s) * 2 - 1, "boundary": (torch.rand(2, 1, s, s) > 0.8).float()}
train_step(model, opts, batch, {"image": torch.randn(2, 3, s, s)}, 0.5, 0.01, False, 0)
params = sum(p.numel() * p.element_size() for p in model.parameters())
grads = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
optim = sum(v.numel() * v.element_size() for o in opts.named().values() for st in o.state.values() for v in st.values() if torch.is_tensor(v) and v.dim() > 0)
shapes = {n: tuple(t.shape) for n, t in model.state_dict().items()}
pred = stage_memory(model.config, shapes, ck.provenance, 4, last_k=1)[f"stage{stage}"]
print("RESULT " + json.dumps({"stage": stage, "param_bytes": params, "grad_bytes": grads, "optimizer_bytes": optim,
      "predicted": pred, "peak_rss": [int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM")][0]}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--dir", type=Path, default=Path("/tmp/samoe-trainmem"))
    args = ap.parse_args()
    import torch

    from upscale.checkpoint import build_meta, save_model
    from upscale.config import SAM_VITS, MoEConfig, SamMoEConfig
    from upscale.expand import GrowthSpec, expand_checkpoint, resolve_groups
    from upscale.model import build_model

    d = args.dir
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    cfg = SamMoEConfig(**{**SAM_VITS["vit_b"], "depth": 4, "global_attn_indexes": (1, 3)}, img_size=256, moe_blocks=(2, 3),
                       moe=MoEConfig(groups=(16,), top_k=2))
    model = build_model(cfg)
    save_model(model, d / "src", build_meta(cfg, {n: "random" for n in model.state_dict()}, [], [], torch.float32))
    del model
    spec = GrowthSpec(experts=32, groups=resolve_groups(16, 32, "4", 1), extra_blocks=1)
    expand_checkpoint(d / "src", d / "grown", spec, ["benchmark"])
    print(f"{'stage':>5} {'trainable':>12} {'grads GiB':>9} {'optim GiB':>9} {'pred g+o GiB':>12} {'ratio':>6} {'weights GiB':>11} {'peak RSS GiB':>12}")
    rows = []
    for stage in (1, 2, 3):
        proc = subprocess.run([sys.executable, "-c", STEP, str(stage), str(d / "grown")], capture_output=True, text=True)
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")]
        if not line:
            sys.exit(proc.stderr[-3000:])
        r = json.loads(line[0][7:])
        rows.append(r)
        p = r["predicted"]
        held = r["grad_bytes"] + r["optimizer_bytes"]
        pred = p["grad_bytes"] + p["optimizer_bytes"]
        print(f"{stage:>5} {p['trainable_params']:>12,} {r['grad_bytes'] / 2**30:9.3f} {r['optimizer_bytes'] / 2**30:9.3f} "
              f"{pred / 2**30:12.3f} {held / pred:6.3f} {r['param_bytes'] / 2**30:11.3f} {r['peak_rss'] / 2**30:12.2f}")
    print(json.dumps(rows))
    shutil.rmtree(d)


if __name__ == "__main__":
    main()
