#!/usr/bin/env bash
# One device call on a 2-GPU machine (nvidia-h200-x2), run from the repo root with `.whl` carried:
#   bash bench/gpu_session.sh "<single-GPU variants>" "<scale-out variants>" [samples]
# 1. bench/check_varlen.py on GPU 1 (correctness and speed of the varlen kernel), while
# 2. bench/run.py times the single-GPU variants on GPU 0, then
# 3. bench/run.py times the scale-out variants on both GPUs.
# Everything lands in $OUT as few files (the device tool brings back at most 8): two results.json, the varlen check,
# and one archive of every log.
set -uo pipefail
OUT=${OUT:-/tmp/out}
SINGLE=${1:-fast-4k,fast-varlen-8k}  # "-" skips the list
SCALE=${2:-1gpu-ga2,ddp-2gpu,fsdp-2gpu,2nodes-1gpu}
[ "$SINGLE" = - ] && SINGLE=
[ "$SCALE" = - ] && SCALE=
SAMPLES=${3:-1000}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
rm -rf /tmp/b && mkdir -p /tmp/b/single /tmp/b/scale  # a warm machine keeps the last call's files
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader

varlen=
if [ "${CHECK_VARLEN:-1}" = 1 ]; then
  CUDA_VISIBLE_DEVICES=1 timeout 200 python3 bench/check_varlen.py --out /tmp/b > /tmp/b/check_varlen.txt 2>&1 &
  varlen=$!
fi
[ -n "$SINGLE" ] && CUDA_VISIBLE_DEVICES=0 timeout "${SINGLE_BUDGET:-250}" python3 bench/run.py --out /tmp/b/single \
  --samples "$SAMPLES" --rounds "${ROUNDS:-1}" --variants "$SINGLE" > /tmp/b/single.txt 2>&1
[ -n "$varlen" ] && wait $varlen
[ -n "$SCALE" ] && timeout "${SCALE_BUDGET:-280}" python3 bench/run.py --out /tmp/b/scale \
  --samples "$SAMPLES" --rounds "${ROUNDS:-1}" --variants "$SCALE" > /tmp/b/scale.txt 2>&1

cp /tmp/b/single/results.json "$OUT/single.json" 2>/dev/null
cp /tmp/b/scale/results.json "$OUT/scale.json" 2>/dev/null
cp /tmp/b/check_varlen.json "$OUT/" 2>/dev/null
tar czf "$OUT/logs.tgz" -C /tmp --exclude='runs' --exclude='*.safetensors' b
[ -n "$varlen" ] && { echo "== varlen check"; tail -25 /tmp/b/check_varlen.txt; }
for f in single scale; do
  echo "== $f"; grep -v '^{' /tmp/b/$f.txt | tail -14
  grep -h '"level": "error"' /tmp/b/$f/*.log 2>/dev/null | cut -c1-400 | head -4
done
