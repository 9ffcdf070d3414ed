#!/usr/bin/env bash
# Re-pin both lock files from pyproject.toml with uv (installed from PyPI into a scratch venv), every file hashed:
#
#   requirements.lock      the image: linux x86_64, the image's Python (PYTHON_VERSION), PyPI's torch (the CUDA 13.0
#                          build with its nvidia-* and triton wheels), the `gpu` extra (liger-kernel). The Dockerfile
#                          installs it with --require-hashes.
#   requirements-dev.lock  development and CI machines: the same versions, torch's CPU build (TORCH_CPU, found in
#                          TORCH_CPU_FIND_LINKS: the folder pip's configuration names here, PyTorch's CPU index
#                          elsewhere), the `test` extra, no CUDA wheels.
#
# Both are resolved for linux x86_64 whatever machine runs this, so `make lock` gives the same files everywhere.
set -euo pipefail
cd "$(dirname "$0")/.."
UV=${UV:-uv==0.13.9}
TORCH=${TORCH:-2.13.0}
TORCH_CPU=${TORCH_CPU:-$TORCH+cpu}
PYTHON_VERSION=${PYTHON_VERSION:-3.11}
PLATFORM=${PLATFORM:-x86_64-manylinux_2_28}
INDEX=${INDEX:-https://pypi.org/simple}
TORCH_CPU_FIND_LINKS=${TORCH_CPU_FIND_LINKS:-$(python3 -m pip config get global.find-links 2>/dev/null \
                                                || echo https://download.pytorch.org/whl/cpu/torch/)}
# PyPI is reached through the host's CA bundle where a proxy intercepts TLS.
export SSL_CERT_FILE=${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}

scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
python3 -m venv "$scratch/venv"
"$scratch/venv/bin/pip" install -q "$UV"
compile=("$scratch/venv/bin/uv" pip compile pyproject.toml --no-config --quiet --generate-hashes --no-annotate
         --python-version "$PYTHON_VERSION" --python-platform "$PLATFORM" --index-url "$INDEX"
         --custom-compile-command "make lock")

echo "torch==$TORCH" > "$scratch/image.txt"
"${compile[@]}" --extra gpu -c "$scratch/image.txt" -o "$scratch/requirements.lock"
{
  echo "# The image's pins (linux x86_64, Python $PYTHON_VERSION, PyPI's CUDA torch, liger-kernel), every file hashed."
  echo "# Regenerate with \`make lock\` (scripts/lock.sh) after changing pyproject.toml's dependencies."
  grep -v '^#' "$scratch/requirements.lock"
} > requirements.lock

# The development lock keeps every version the image pins (only torch's build differs).
grep -E '^[A-Za-z0-9]' requirements.lock | sed 's/ .*//' | grep -v '^torch==' > "$scratch/dev.txt"
echo "torch==$TORCH_CPU" >> "$scratch/dev.txt"
"${compile[@]}" --extra test -c "$scratch/dev.txt" --find-links "$TORCH_CPU_FIND_LINKS" \
  -o "$scratch/requirements-dev.lock"
{
  echo "# Development and CI pins: requirements.lock's versions with torch's CPU build ($TORCH_CPU, from the machine's"
  echo "# find-links or https://download.pytorch.org/whl/cpu), plus the test tools; every file hashed."
  echo "# Regenerate with \`make lock\` (scripts/lock.sh)."
  grep -v '^#' "$scratch/requirements-dev.lock"
} > requirements-dev.lock
echo "re-pinned requirements.lock and requirements-dev.lock"
