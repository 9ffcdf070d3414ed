# syntax=docker/dockerfile:1
# The finetune-job image: a slim Debian, its Python, exactly the hashed pins of requirements.lock (PyPI's torch 2.13.0,
# the CUDA 13.0 build, with the CUDA libraries it needs as nvidia-* wheels), a non-root user with a fixed UID, and
# every cache under /cache so that it runs with a read-only root filesystem (mount writable volumes on /tmp and
# /cache, as the Helm chart does).
#
#   docker build --build-arg REVISION="$(git rev-parse HEAD)" --build-arg CREATED="$(date -u +%FT%TZ)" -t finetune-job .
#
# One CUDA story: torch brings its CUDA 13.0 runtime, cuBLAS, cuDNN and NCCL as wheels pinned in the lock, so the base
# needs none (a CUDA base image's own runtime would go unused). What the node must give is a driver that runs CUDA
# 13.0 (>= 580.65.06 on Linux), which NVIDIA_REQUIRE_CUDA below declares to the NVIDIA container runtime.
# BASE_IMAGE and PYTHON are build arguments for CI's locally bootstrapped Debian (.ci/image-test.sh); the lock is
# resolved for this Python, so change them together (and PYTHON_VERSION in scripts/lock.sh).
ARG BASE_IMAGE=debian:bookworm-slim

FROM ${BASE_IMAGE} AS base
ARG PYTHON=python3.11
# Debian's security fixes of these packages come with a rebuild; pinning their exact versions would break the build
# each time the archive drops an old one. The base image's tag is the pin.
# gcc, libc6-dev and the Python headers: on a GPU, Triton (Liger's kernels, FT_COMPILE) builds small C launchers at
# run time with the system C compiler ("Failed to find C compiler" without one); g++: FT_COMPILE on a CPU (inductor's
# C++ backend). .ci/image-test.sh builds an extension and compiles a function with both.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends "${PYTHON}" ca-certificates gcc g++ libc6-dev "${PYTHON}-dev" \
 && rm -rf /var/lib/apt/lists/*

FROM base AS build
ARG PYTHON=python3.11
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends "${PYTHON}-venv" \
 && rm -rf /var/lib/apt/lists/*
ENV PATH=/opt/venv/bin:$PATH \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# Dependencies first, from the lock alone: this layer is reused until the lock changes. --require-hashes: a file
# whose hash is not in the lock, or a dependency the lock does not pin, stops the build.
COPY requirements.lock /tmp/requirements.lock
RUN "${PYTHON}" -m venv /opt/venv \
 && pip install --no-cache-dir --require-hashes --only-binary=:all: -r /tmp/requirements.lock

# Then the package itself as a wheel, with the locked setuptools (no build isolation): nothing else comes from PyPI.
# A stage of its own, so that building it leaves the build stage's /opt/venv (and its cached layer) untouched.
FROM build AS wheel
COPY pyproject.toml README.md /src/
COPY job /src/job
RUN pip wheel --no-cache-dir --no-deps --no-build-isolation --wheel-dir /wheels /src

FROM base
# A fixed UID and GID: the Helm chart's runAsUser, runAsGroup and fsGroup are 10001. /cache and /workspace are
# writable by any UID (sticky, like /tmp), so that `--user` with another UID works without a volume on them.
RUN groupadd --gid 10001 finetune \
 && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin finetune \
 && mkdir -p /cache /workspace \
 && chown 10001:10001 /cache /workspace \
 && chmod 1777 /cache /workspace

# The dependencies (6 GB, nearly all CUDA libraries) are one layer that stays the same until the lock changes, so a
# change of the job's code rebuilds, pushes and pulls only the small layer of its wheel.
COPY --from=build /opt/venv /opt/venv
COPY --from=wheel /wheels /wheels
RUN /opt/venv/bin/pip install --no-cache-dir --no-deps --no-index /wheels/*.whl \
 && /opt/venv/bin/pip check \
 && rm -rf /wheels

# Every library that writes a cache or a config file is pointed under /cache (or /tmp), never under the image.
# NVIDIA_*: what the NVIDIA container runtime reads (a CUDA base image would set them): the CUDA version the driver
# must support, and the GPUs and driver libraries to inject.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp \
    XDG_CACHE_HOME=/cache \
    XDG_CONFIG_HOME=/cache/config \
    HF_HOME=/cache/huggingface \
    TORCH_HOME=/cache/torch \
    TORCHINDUCTOR_CACHE_DIR=/cache/torchinductor \
    TRITON_HOME=/cache \
    TRITON_CACHE_DIR=/cache/triton \
    CUDA_CACHE_PATH=/cache/nv \
    MPLCONFIGDIR=/cache/matplotlib \
    NUMBA_CACHE_DIR=/cache/numba \
    NVIDIA_REQUIRE_CUDA="cuda>=13.0" \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

# Last: REVISION and CREATED change with every build and would otherwise invalidate the layers after them.
ARG BASE_IMAGE=debian:bookworm-slim
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG CREATED=unknown
LABEL org.opencontainers.image.title="finetune-job" \
      org.opencontainers.image.description="QLoRA fine-tuning of an LLM as a batch job, configured by FT_* environment variables" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="${BASE_IMAGE}"

WORKDIR /workspace
USER 10001:10001
ENTRYPOINT ["finetune-job"]
