#!/usr/bin/env bash
# The whole samoe pipeline on built-in synthetic SAR data with the `tiny` preset (CPU, a few minutes).
# Usage: bash scripts/demo.sh [DIR]   (default DIR=demo; everything is written under it, re-runs replace it)
set -euo pipefail
cd "$(dirname "$0")/.."
samoe() { .venv/bin/samoe "$@"; }
D="${1:-demo}"
R=recipes/demo.toml   # tiny: 4 experts -> 16 in 4 groups (+1 block), like 16 -> 117 in 8 (recipes/10b.toml)

samoe demo-data --out "$D/data" --force
samoe init --preset tiny --out "$D/ckpt/init" --force
# A trained source model stands in for the user's 1.5B: train the tiny one on A (+B unlabelled).
samoe train --stage 3 --recipe recipes/demo-source.toml --from "$D/ckpt/init" --run-dir "$D/runs/source" \
      --data "$D/data/A" --unlabelled "$D/data/B" --force
samoe plan "$D/runs/source/final" --recipe $R
samoe expand "$D/runs/source/final" --recipe $R --out "$D/ckpt/grown" --verify "$D/data/A" --force
rm -rf "$D/data/B-pseudo"
samoe pseudo-label "$D/runs/source/final" --images "$D/data/B" --out "$D/data/B-pseudo" --threshold 0.5
samoe train --stage 1 --recipe $R --from "$D/ckpt/grown" --run-dir "$D/runs/s1" --data "$D/data/B-pseudo" --data "$D/data/A" --force
samoe train --stage 2 --recipe $R --from "$D/runs/s1/final" --run-dir "$D/runs/s2" --data "$D/data/A" --unlabelled "$D/data/B" --force
samoe train --stage 3 --recipe $R --from "$D/runs/s2/final" --run-dir "$D/runs/s3" --data "$D/data/A" --unlabelled "$D/data/B" --force
samoe eval "$D/runs/source/final" "$D/runs/s3/final" --data "$D/data/A-test" \
      --plots "$D/plots/eval" --report "$D/report" --force
samoe plot "$D/runs/s1" "$D/runs/s2" "$D/runs/s3" --out "$D/plots/training" --force
samoe inspect-checkpoint "$D/runs/s3/final"
