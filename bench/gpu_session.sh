#!/usr/bin/env bash
# One device call, run from the repo root with `.whl` carried (bench/wheels.sh fills it):
#   bash bench/gpu_session.sh "<variants>" [rounds] [samples]
# Installs the wheels (the job's into /tmp/site, the Unsloth peer's into /tmp/site-unsloth), then bench/run.py runs
# every variant `rounds` times over all the machine's GPUs (a scale-out variant takes two), within BUDGET seconds
# (default 500: the device tool allows 600 per call); ONCE lists variants to run in the first round only. With
# CHECK_VARLEN=1, bench/check_varlen.py runs first on GPU 0; with CHECK_LORA=1, bench/check_lora.py (what peft's LoRA
# layers cost over the base products, isolated).
# Everything lands in $OUT as few files (the device tool brings back at most 8): results.json, runs.json, the run's
# RESULTS.md and results.png, the varlen check, the profiles and one archive of every log.
set -uo pipefail
OUT=${OUT:-/tmp/out}
VARIANTS=${1:?variants}
ROUNDS=${2:-2}
SAMPLES=${3:-1000}
start=$SECONDS
pip() { python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$@"; }
pip /tmp/site .whl/*.whl || exit 1
if ls .whl/unsloth/*.whl > /dev/null 2>&1; then pip /tmp/site-unsloth .whl/unsloth/*.whl || exit 1; fi
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
rm -rf /tmp/b /tmp/bench-work && mkdir -p /tmp/b  # a warm machine keeps the last call's files
nvidia-smi --query-gpu=index,name,memory.total,clocks.max.sm --format=csv,noheader

if [ "${CHECK_VARLEN:-0}" = 1 ]; then
  CUDA_VISIBLE_DEVICES=0 timeout 200 python3 bench/check_varlen.py --out /tmp/b > /tmp/b/check_varlen.txt 2>&1
  cp /tmp/b/check_varlen.json "$OUT/" 2>/dev/null
  tail -25 /tmp/b/check_varlen.txt
fi
if [ "${CHECK_LORA:-0}" = 1 ]; then
  CUDA_VISIBLE_DEVICES=0 timeout 120 python3 bench/check_lora.py --out /tmp/b > /tmp/b/check_lora.txt 2>&1
  cp /tmp/b/check_lora.json "$OUT/" 2>/dev/null
  tail -12 /tmp/b/check_lora.txt
fi
budget=$(( ${BUDGET:-500} - (SECONDS - start) ))
python3 bench/run.py --out /tmp/b/run --samples "$SAMPLES" --rounds "$ROUNDS" --variants "$VARIANTS" \
  --budget "$budget" --once "${ONCE:-}" > /tmp/b/run.txt 2>&1

cp /tmp/b/run/results.json /tmp/b/run/runs.json /tmp/b/run/RESULTS.md /tmp/b/run/results.png "$OUT/" 2>/dev/null
[ -d /tmp/b/run/profile ] && tar czf "$OUT/profiles.tgz" --exclude='trace.json.gz' -C /tmp/b/run profile  # traces: over the 16 MB a file may bring back
tar czf "$OUT/logs.tgz" -C /tmp/b --exclude='runs' --exclude='profile' --exclude='*.safetensors' .
grep -v '^{' /tmp/b/run.txt | tail -30
python3 - <<'PY'  # the last error line of each failed run
import json
for r in json.load(open("/tmp/b/run/runs.json")):
    if r.get("exit") not in (0, "skipped"):
        lines = open(f"/tmp/b/run/{r['variant']}-r{r['round']}.log", errors="replace").read().splitlines()
        errors = [line for line in lines if '"level": "error"' in line or "Error" in line]
        print(r["variant"], r["round"], r["exit"], (errors or lines or [""])[-1][:400])
PY
