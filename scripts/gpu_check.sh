#!/usr/bin/env bash
# The GPU check: CUDA-marked tests, then benchmarks/gpu.py, in under 7 minutes on one H100/H200.
#
#   bash scripts/gpu_check.sh            # from the repository root
#
# Made for a bare GPU machine without internet: it installs segment-anything and blake3
# from the wheels carried in .whl/ (pip download --no-deps --only-binary=:all:
# --python-version 3.12 --platform manylinux2014_x86_64 -d .whl segment-anything==1.0
# blake3==1.0.11) into /tmp/site and runs from the source tree. Everything it prints also goes
# to $OUT/gpu-check.log ($OUT defaults to ./gpu-check-out).
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
set -uo pipefail
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4
OUT=${OUT:-$PWD/gpu-check-out}
mkdir -p "$OUT"
LOG=$OUT/gpu-check.log
: >"$LOG"
say() { echo "$@" | tee -a "$LOG"; }

say "== gpu_check $(date -u +%FT%TZ) on $(hostname)"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee -a "$LOG"
python3 - <<'EOF' 2>&1 | tee -a "$LOG"
import torch
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, GPUs {torch.cuda.device_count()}, "
      f"capability {torch.cuda.get_device_capability() if torch.cuda.is_available() else None}")
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard  # noqa: F401  (FSDP2, public since 2.6)
import segment_anything
print("torch._grouped_mm:", hasattr(torch, "_grouped_mm"), "| fully_shard, MixedPrecisionPolicy: ok",
      "| segment_anything:", segment_anything.__file__)
EOF

status=0
say "== pytest -m cuda (limit 200 s)"
timeout 200 python3 -m pytest -m cuda -x -q -p no:cacheprovider 2>&1 | tee -a "$LOG"
rc=${PIPESTATUS[0]}
say "== pytest exit code: $rc"
[ "$rc" -eq 0 ] || status=1

say "== benchmarks/gpu.py (limit 240 s)"
timeout 240 python3 benchmarks/gpu.py 2>&1 | tee -a "$LOG"
rc=${PIPESTATUS[0]}
say "== benchmark exit code: $rc"
[ "$rc" -eq 0 ] || status=1

say "== gpu_check done: $([ $status -eq 0 ] && echo PASS || echo FAIL) (log: $LOG)"
exit $status
