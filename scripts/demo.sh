#!/usr/bin/env bash
# The whole samoe pipeline on built-in synthetic SAR data with the `tiny` preset (CPU, minutes).
# Usage: bash scripts/demo.sh [DIR]   (default DIR=demo; everything is written under it)
set -euo pipefail
cd "$(dirname "$0")/.."
samoe() { .venv/bin/samoe "$@"; }
D="${1:-demo}"

samoe demo-data --out "$D/data" --force
samoe init --preset tiny --out "$D/ckpt/src" --force
samoe plan "$D/ckpt/src" --experts 16 --groups 4 --extra-blocks 1
samoe expand "$D/ckpt/src" --out "$D/ckpt/grown" --experts 16 --groups 4 --extra-blocks 1 \
      --init copy-noise --noise-std 0.01 --seed 0 --verify "$D/data/A" --verify-tol 1e-5 --force
samoe inspect-checkpoint "$D/ckpt/grown"
