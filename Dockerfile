# syntax=docker/dockerfile:1
# The finetune-job image: a CUDA runtime, Python 3.12, exactly the pins of requirements.lock, a non-root user with a
# fixed UID, and every cache under /cache so that it runs with a read-only root filesystem (mount writable volumes
# on /tmp and /cache, as the Helm chart does).
#
#   docker build --build-arg REVISION="$(git rev-parse HEAD)" --build-arg CREATED="$(date -u +%FT%TZ)" -t finetune-job .
#   docker run --gpus all --read-only --tmpfs /tmp --tmpfs /cache -e FT_OUTPUT_URI=... finetune-job

# The CUDA runtime and cuDNN of the base (NVIDIA_REQUIRE_CUDA) set the oldest driver the image runs on.
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 AS base
# Ubuntu's security fixes of these packages come with a rebuild; pinning their exact versions would break the build
# each time the archive drops an old one. The base image's tag is the pin.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3.12 ca-certificates \
 && rm -rf /var/lib/apt/lists/*

FROM base AS build
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3.12-venv \
 && rm -rf /var/lib/apt/lists/*
ENV PATH=/opt/venv/bin:$PATH \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# Dependencies first, from the lock alone: this layer is reused until the lock changes.
COPY requirements.lock /tmp/requirements.lock
RUN python3.12 -m venv /opt/venv \
 && pip install --no-cache-dir -r /tmp/requirements.lock
# Then the package itself, without dependencies: everything it imports comes from the lock.
COPY pyproject.toml README.md /src/
COPY job /src/job
RUN pip install --no-cache-dir --no-deps /src \
 && pip check

FROM base
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG CREATED=unknown
LABEL org.opencontainers.image.title="finetune-job" \
      org.opencontainers.image.description="QLoRA fine-tuning of an LLM as a batch job, configured by FT_* environment variables" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="docker.io/nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04"

# A fixed UID and GID: the Helm chart's runAsUser, runAsGroup and fsGroup are 10001.
RUN groupadd --gid 10001 finetune \
 && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin finetune \
 && mkdir -p /cache /workspace \
 && chown 10001:10001 /cache /workspace

COPY --from=build /opt/venv /opt/venv

# Every library that writes a cache or a config file is pointed under /cache (or /tmp), never under the image.
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
    NUMBA_CACHE_DIR=/cache/numba

WORKDIR /workspace
USER 10001:10001
ENTRYPOINT ["finetune-job"]
