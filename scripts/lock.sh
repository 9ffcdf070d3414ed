#!/usr/bin/env bash
# Re-pin requirements.lock (runtime) and requirements-dev.lock (test tools) from pyproject.toml.
# torch is pinned by hand to the release whose CPU build lies on the development machines (see README).
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH=${TORCH:-torch==2.13.0}
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
python3 -m venv "$scratch/venv"
pip="$scratch/venv/bin/pip"
deps=$(python3 -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml","rb"))["project"]["dependencies"]))' | grep -v '^torch')
test=$(python3 -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml","rb"))["project"]["optional-dependencies"]["test"]))')
"$pip" install -q "$TORCH" $deps
{
  echo "# Runtime pins: the exact versions the Makefile, the Dockerfile and CI install."
  echo "# Regenerate with \`make lock\` after changing pyproject.toml's dependencies."
  echo "# torch==2.13.0 resolves to the CPU build where one lies on disk (CI) and to PyPI's CUDA build elsewhere (Docker)."
  "$pip" freeze | sed 's/+cpu//'
} > requirements.lock
"$pip" freeze | sed 's/+cpu//' | sort > "$scratch/runtime"
"$pip" install -q $test
{
  echo "# Test tool pins, on top of requirements.lock. Regenerate with \`make lock\`."
  echo "-r requirements.lock"
  "$pip" freeze | sed 's/+cpu//' | sort | comm -23 - "$scratch/runtime"
} > requirements-dev.lock
echo "re-pinned requirements.lock and requirements-dev.lock"
