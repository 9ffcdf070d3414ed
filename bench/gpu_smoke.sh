#!/usr/bin/env bash
# The embedded default on the GPU test machine: tiny Llama, sample data, CUDA + nf4 4-bit, the job's real CLI.
# Run through the device tool from the repo root with `.whl` carried (see bench/README.md); logs go to $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/out}
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
python3 - <<'PY'
import torch, transformers, peft, trl, bitsandbytes, datasets, pyarrow
print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(), "bf16", torch.cuda.is_bf16_supported())
print("transformers", transformers.__version__, "peft", peft.__version__, "trl", trl.__version__,
      "bitsandbytes", bitsandbytes.__version__, "datasets", datasets.__version__, "pyarrow", pyarrow.__version__)
PY
python3 scripts/build_tiny_model.py build/tiny-llama > "$OUT/build.log" 2>&1 || { cat "$OUT/build.log"; exit 1; }
set -a; . ./examples/tiny.env; set +a
export FT_WORK_DIR=/tmp/work FT_OUTPUT_URI=/tmp/runs FT_RUN_ID=gpu-smoke FT_LOG_FORMAT=json
start=$(date +%s.%N)
python3 -m job run > "$OUT/run.log" 2>&1
rc=$?
end=$(date +%s.%N)
cp /tmp/runs/gpu-smoke/manifest.json "$OUT/manifest.json" 2>/dev/null
grep -E '"(loading model|model ready|run finished)"|"level": "(error|warning)"' "$OUT/run.log" | cut -c1-600
python3 - "$rc" "$start" "$end" <<'PY'
import json, sys
rc, start, end = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3])
try:
    m = json.load(open("/tmp/runs/gpu-smoke/manifest.json"))
except FileNotFoundError:
    sys.exit(f"exit code {rc}: no manifest")
print("\n| exit | device | dtype | optim | steps | train s | wall s | eval loss before -> after | peak GiB |")
print("|---|---|---|---|---|---|---|---|---|")
p, t, x = m["placement"], m["training"], m["metrics"]
print(f"| {rc} | {p['gpu']} | {p['dtype']} | {t['optim']} | {t['steps']} | {t['seconds']} | {end - start:.1f} | "
      f"{x['eval_loss_before']:.3f} -> {x['eval_loss_after']:.3f} | {x.get('peak_gpu_mem_gib')} |")
PY
