#!/usr/bin/env bash
# Bring the packages the GPU machine lacks, as cp312 wheels, into the ignored .whl/ (run here, in the repo root):
#   bash bench/wheels.sh
# .whl/*.whl: what the job needs there (bench/gpu_session.sh installs them into /tmp/site).
# .whl/unsloth/*.whl: the Unsloth peer and the versions it insists on (trl <= 1.15, datasets < 5), installed apart
#   into /tmp/site-unsloth and put first on the peer's PYTHONPATH only.
# Everything must travel in one device call (64 MiB): bitsandbytes' wheel (43 MB) carries a library for every CUDA
# release, and the machine's torch is built for CUDA 13, so only the CUDA 13 and CPU libraries are kept; Unsloth's
# wheel carries its web UI (studio/, 82 MB unpacked), which training never imports.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
get() {
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$@"
}
get .whl bitsandbytes==0.50.2 trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 structlog==26.1.0 \
  pydantic-settings==2.16.3 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
  python-dotenv==1.2.4 liger-kernel==0.8.5 gguf==0.17.1  # gguf: scripts/real_model.py (bench/quality.py convert)
get .whl/unsloth unsloth==2026.10.9 unsloth-zoo==2026.10.9 trl==1.15.0 datasets==4.8.5 tyro==1.0.17 \
  docstring-parser==0.17.0 typeguard==4.4.4 cut-cross-entropy==25.1.1 torchao==0.18.0 msgspec==0.22.0 \
  json5==0.17.3 nest-asyncio==1.6.0 hf-transfer==0.1.9

# Drop files from a wheel (and from its RECORD, which pip checks against the files).
trim() {
  python3 - "$@" <<'EOF'
import re, sys, zipfile, shutil
wheel, keep_out = sys.argv[1], re.compile(sys.argv[2])
tmp = wheel + ".tmp"
with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as dst:
    for item in src.infolist():
        if keep_out.search(item.filename):
            continue
        data = src.read(item)
        if item.filename.endswith(".dist-info/RECORD"):
            data = b"".join(line for line in data.splitlines(keepends=True) if not keep_out.search(line.decode()))
        dst.writestr(item, data)
shutil.move(tmp, wheel)
EOF
}
trim .whl/bitsandbytes-0.50.2-*.whl 'libbitsandbytes_(cuda1[12]|rocm)'
trim .whl/unsloth/unsloth-2026.10.9-*.whl '^studio/'
du -sh .whl .whl/unsloth
