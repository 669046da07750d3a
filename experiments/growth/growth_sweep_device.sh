#!/usr/bin/env bash
# The converged-source growth sweep on a 16-core machine (3 converges x 5 threads, then one arm per core), run from
# the repository root with its inputs copied beside it:
#
#   mkdir -p sweep-in && cp -r W/data sweep-in/ && for s in 0 1 2; do mkdir -p sweep-in/seed$s/source;
#       cp -r W/seed$s/source/final sweep-in/seed$s/source/; done      # W: a hard_protocol.py work folder (about 47 MB)
#   run: LIMIT=430 EXTRA=0.5 ARMS="a:0.02 ft:0.02 staged:10/30/60:0.05/0.02/0.02" bash experiments/growth/growth_sweep_device.sh
#        with sweep-in/ and .whl/ copied along (.whl: see scripts/gpu_check.sh); about 330 s for 5 arms x 3 seeds
#
# sweep-in/ and .whl/ stay out of git (.git/info/exclude). The table lands in $OUT/sweep.log and each seed's
# converged source in $OUT/conv-seed<N>.tgz (to score more arms locally with growth_sweep.py --work).
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
trap 'kill $(jobs -p) 2>/dev/null' EXIT
W=/tmp/w; mkdir -p $W; cp -r sweep-in/data sweep-in/seed0 sweep-in/seed1 sweep-in/seed2 $W/
nproc; python3 -c "import torch; print(torch.__version__)"
cd experiments/growth
( while sleep 20; do date +%T; for s in 0 1 2; do tail -1 $W/converged-864/seed$s/source/metrics.csv 2>/dev/null | cut -d, -f1-3; done; done ) > $OUT/progress.log 2>&1 &
timeout ${LIMIT:-520} python3 growth_sweep.py --work $W --converge 864 --converge-lr 0.2 --converge-batch 16 --converge-threads 5 \
  --extra ${EXTRA:-0.5} --arms ${ARMS} --jobs 16 --threads 1 2>&1 | tee $OUT/sweep.log
echo "rc ${PIPESTATUS[0]}" | tee -a $OUT/sweep.log
cd $W && for s in 0 1 2; do tar czf $OUT/conv-seed$s.tgz converged-864/seed$s/source/final converged-864/seed$s/source/metrics.csv; done
ls -la $OUT
