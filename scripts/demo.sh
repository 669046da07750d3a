#!/usr/bin/env bash
# The whole samoe pipeline on built-in synthetic SAR data with the `tiny` preset (CPU, a few minutes).
# Usage: bash scripts/demo.sh [DIR]   (default DIR=demo; everything is written under it, re-runs replace it)
set -euo pipefail
cd "$(dirname "$0")/.."
samoe() { .venv/bin/samoe "$@"; }
D="${1:-demo}"
GROW=(--experts 16 --groups 4 --extra-blocks 1)   # tiny: 4 experts -> 16 in 4 groups (+1 block), like 16 -> 117 in 8

samoe demo-data --out "$D/data" --force
samoe init --preset tiny --out "$D/ckpt/init" --force
# A trained source model stands in for the user's 1.5B: train the tiny one on A (+B unlabelled).
samoe train --stage 3 --force --from "$D/ckpt/init" --run-dir "$D/runs/source" \
      --data "$D/data/A" --unlabelled "$D/data/B" --epochs 20 --lr 0.05
samoe plan "$D/runs/source/final" "${GROW[@]}"
samoe expand "$D/runs/source/final" --out "$D/ckpt/grown" "${GROW[@]}" \
      --init copy-noise --noise-std 0.01 --seed 0 --verify "$D/data/A" --verify-tol 1e-5 --force
rm -rf "$D/data/B-pseudo"
samoe pseudo-label "$D/runs/source/final" --images "$D/data/B" --out "$D/data/B-pseudo" --threshold 0.5
samoe train --stage 1 --force --from "$D/ckpt/grown" --run-dir "$D/runs/s1" --data "$D/data/B-pseudo" --epochs 10 --lr 0.05
samoe train --stage 2 --force --from "$D/runs/s1/final" --run-dir "$D/runs/s2" \
      --data "$D/data/A" --unlabelled "$D/data/B" --epochs 10 --lr 0.02
samoe train --stage 3 --force --from "$D/runs/s2/final" --run-dir "$D/runs/s3" \
      --data "$D/data/A" --unlabelled "$D/data/B" --epochs 10 --lr 0.01
samoe eval "$D/runs/source/final" "$D/runs/s3/final" --data "$D/data/A-test" \
      --plots "$D/plots/eval" --report "$D/report" --force
samoe plot "$D/runs/s1" "$D/runs/s2" "$D/runs/s3" --out "$D/plots/training" --force
samoe inspect-checkpoint "$D/runs/s3/final"
