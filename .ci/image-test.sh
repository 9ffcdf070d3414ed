#!/usr/bin/env bash
# The image test: build the Dockerfile with buildah from a locally bootstrapped Debian (no registry is needed), with the
# production lock (PyPI's CUDA torch and its nvidia-* wheels: the image that ships, but for the base image's origin),
# then run the embedded tiny job in it as the Helm chart runs it: UID 10001, read-only root, tmpfs /tmp and /cache, no
# network, all capabilities dropped, model and data mounted read-only, the output on a mounted volume. Asserts exit 0,
# the manifest's checksums, published files readable by another UID, and "permission denied" for an unreadable model.
#
#   bash .ci/image-test.sh      (root; installs buildah, podman, runc, mmdebstrap from Debian when missing)
#
# Layers are kept in the machine's container storage: a second run rebuilds only what changed (the lock layer is
# reused until requirements.lock changes). IMAGE_TEST_KEEP=1 keeps the scratch folder for a look.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PY:-$ROOT/.venv/bin/python}
SUITE=${SUITE:-bookworm}
BASE=localhost/finetune-job-base:$SUITE
IMAGE=${IMAGE:-localhost/finetune-job:ci}
CA=${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
start=$(date +%s)
say() { echo "image-test [$(( $(date +%s) - start ))s] $*"; }

if ! command -v buildah >/dev/null || ! command -v podman >/dev/null || ! command -v mmdebstrap >/dev/null \
   || ! command -v runc >/dev/null; then
  say "installing buildah, podman, runc, mmdebstrap"
  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
    buildah podman runc mmdebstrap uidmap fuse-overlayfs slirp4netns >/dev/null
fi

scratch=$(mktemp -d /tmp/finetune-image-test.XXXXXX)
chmod 755 "$scratch"
[ "${IMAGE_TEST_KEEP:-}" = 1 ] || trap 'rm -rf "$scratch"' EXIT
# This machine's cgroups (v1 + v2) and rlimits: runc, and ulimits within the hard limits (crun refuses both).
cat > "$scratch/containers.conf" <<'EOF'
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]
[engine]
runtime = "runc"
EOF
export CONTAINERS_CONF=$scratch/containers.conf

if ! podman image exists "$BASE"; then
  # The Debian mirror this host uses, read at run time (no host name is written into the repository).
  mirror=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/*.sources 2>/dev/null || true)
  if [ -z "$mirror" ]; then
    mirror=$(awk '/^deb / {print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)
  fi
  say "bootstrapping $BASE from ${mirror:-the default mirror}"
  mmdebstrap --quiet --variant=minbase --include=ca-certificates "$SUITE" "$scratch/rootfs.tar" ${mirror:+"$mirror"}
  podman import --quiet --change 'CMD ["/bin/bash"]' "$scratch/rootfs.tar" "$BASE" >/dev/null
  rm -f "$scratch/rootfs.tar"
fi

# PyPI may sit behind a TLS-intercepting proxy: the host's CA bundle goes into the build as a mount, not a layer.
printf '[global]\ncert = /etc/host-ca-bundle.crt\n' > "$scratch/pip.conf"
say "building $IMAGE"
buildah bud --quiet --layers --isolation chroot --build-arg BASE_IMAGE="$BASE" \
  --build-arg REVISION="$(git rev-parse HEAD 2>/dev/null || echo unknown)" \
  -v "$CA:/etc/host-ca-bundle.crt:ro" -v "$scratch/pip.conf:/etc/pip.conf:ro" -t "$IMAGE" . >/dev/null
say "built: $(podman image inspect --format '{{.Size}}' "$IMAGE" | awk '{printf "%.2f GB", $1/1e9}')"

# The embedded tiny job: the tiny Llama, built here, and the sample data, both mounted read-only.
mkdir -p "$scratch/model" "$scratch/data" "$scratch/out"
"$PY" scripts/build_tiny_model.py "$scratch/model" --force >/dev/null
cp examples/data/sample-text.jsonl "$scratch/data/"
chmod -R a+rX "$scratch/model" "$scratch/data"
chown 10001:10001 "$scratch/out"  # what the chart's fsGroup does to a volume
grep -v -E '^(#|FT_BASE_MODEL|FT_DATASET|FT_OUTPUT_URI|FT_WORK_DIR)=?' examples/tiny.env | grep . > "$scratch/env"
printf 'FT_BASE_MODEL=/models/m\nFT_DATASET=/data/sample-text.jsonl\nFT_OUTPUT_URI=/out\nFT_RUN_ID=image-test\n' \
  >> "$scratch/env"
# /tmp and /cache as the chart's emptyDir volumes are: writable and executable (podman's --tmpfs is noexec by default)
as_the_chart=(podman run --rm --network none --read-only --tmpfs /tmp:rw,exec,mode=1777 --tmpfs /cache:rw,exec,mode=1777
              --user 10001:10001
              --cap-drop ALL --security-opt no-new-privileges --env-file "$scratch/env"
              -v "$scratch/data:/data:ro" -v "$scratch/out:/out")

say "running the tiny job"
rc=0
"${as_the_chart[@]}" -v "$scratch/model:/models/m:ro" "$IMAGE" > "$scratch/job.log" 2>&1 || rc=$?
[ "$rc" = 0 ] || { tail -40 "$scratch/job.log"; say "FAIL: the job exited $rc"; exit 1; }
say "the job exited 0"

# Every published file, read by another UID than the job's, matches the manifest's sha256 and size.
run_dir=$scratch/out/image-test
chmod 755 "$scratch/out"
setpriv --reuid=20002 --regid=20002 --clear-groups "$PY" - "$run_dir" <<'EOF'
import hashlib, json, sys
from pathlib import Path

run = Path(sys.argv[1])
manifest = json.loads((run / "manifest.json").read_text())
on_disk = {p.relative_to(run).as_posix() for p in run.rglob("*") if p.is_file()}
assert on_disk == set(manifest["files"]) | {"manifest.json"}, on_disk ^ (set(manifest["files"]) | {"manifest.json"})
for rel, entry in manifest["files"].items():
    data = (run / rel).read_bytes()
    assert hashlib.sha256(data).hexdigest() == entry["sha256"] and len(data) == entry["bytes"], rel
assert {"adapter/adapter_model.safetensors", "adapter/adapter_config.json"} <= on_disk
print(f"UID 20002 read {len(on_disk)} published files; every checksum matches the manifest")
EOF
modes=$(find "$run_dir" -type f -printf '%m\n' | sort -u | tr '\n' ' ')
[ "$modes" = "644 " ] || { say "FAIL: published file modes are $modes, not 644"; exit 1; }

# What Triton does on a GPU before its first kernel (Liger's kernels, FT_COMPILE): build a Python extension with the
# system C compiler and Python's headers into a cache under $HOME (/tmp), and load it; and FT_COMPILE on a CPU.
rc=0
"${as_the_chart[@]}" -i --entrypoint /opt/venv/bin/python "$IMAGE" - > "$scratch/cc.log" 2>&1 <<'EOF' || rc=$?
import importlib.util, os, shutil, subprocess, sysconfig, tempfile
cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("clang")
assert cc, "no C compiler: Triton cannot build its launchers"
scheme = sysconfig.get_default_scheme()
include = sysconfig.get_paths(scheme="posix_prefix" if scheme == "posix_local" else scheme)["include"]
work = tempfile.mkdtemp(dir=os.path.expanduser("~"))
src, so = os.path.join(work, "probe.c"), os.path.join(work, "probe" + sysconfig.get_config_var("EXT_SUFFIX"))
with open(src, "w") as f:
    f.write('#include <Python.h>\nstatic struct PyModuleDef m = {PyModuleDef_HEAD_INIT, "probe", NULL, -1, NULL};\n'
            "PyMODINIT_FUNC PyInit_probe(void) { return PyModule_Create(&m); }\n")
subprocess.check_call([cc, src, "-O3", "-shared", "-fPIC", "-o", so, f"-I{include}"])
spec = importlib.util.spec_from_file_location("probe", so)
spec.loader.exec_module(importlib.util.module_from_spec(spec))
import torch  # FT_COMPILE on a CPU: inductor's C++ backend (g++), its cache under $HOME
fn = torch.compile(lambda x: torch.nn.functional.silu(x) * 2 + 1)
assert torch.allclose(fn(torch.ones(8)), torch.nn.functional.silu(torch.ones(8)) * 2 + 1)
print(f"built and loaded a Python extension with {cc} in {work}; torch.compile ran on the CPU")
EOF
[ "$rc" = 0 ] || { tail -20 "$scratch/cc.log"; say "FAIL: no C toolchain for Triton in the image (exit $rc)"; exit 1; }
say "$(tail -1 "$scratch/cc.log")"

# A model file the job's UID cannot read: exit 3, "permission denied" naming the file, the setting and the UID.
cp -r "$scratch/model" "$scratch/locked"
chown 0:0 "$scratch/locked/model.safetensors" && chmod 600 "$scratch/locked/model.safetensors"
rc=0
"${as_the_chart[@]}" -v "$scratch/locked:/models/m:ro" "$IMAGE" check > "$scratch/check.log" 2>&1 || rc=$?
want='FT_BASE_MODEL=/models/m: permission denied: /models/m/model.safetensors cannot be read by UID 10001'
if [ "$rc" != 3 ] || ! grep -qF "$want" "$scratch/check.log" || grep -q Traceback "$scratch/check.log"; then
  tail -20 "$scratch/check.log"; say "FAIL: an unreadable model gave exit $rc"; exit 1
fi
say "an unreadable model file: exit 3, permission denied"
say "PASS"
