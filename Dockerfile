# syntax=docker/dockerfile:1
# moe-serve: OpenAI-compatible server for Mixture-of-Experts LLMs.
#
#   docker build -t moe-serve:0.1.0-cpu .                                     # CPU (default)
#   docker build --build-arg VARIANT=cuda -t moe-serve:0.1.0-cuda .           # NVIDIA GPUs
#   docker build --build-arg VARIANT=cuda --build-arg EXTRAS=vllm \
#                -t moe-serve:0.1.0-cuda-vllm .                                 # + vLLM engine, Ray
#
#   docker run -p 8000:8000 moe-serve:0.1.0-cpu                      # the bundled tiny checkpoint
#   docker run --gpus all -p 8000:8000 -v /srv/models/Mixtral-8x7B:/models/Mixtral-8x7B:ro \
#              -e MOE_SERVE_MODEL=/models/Mixtral-8x7B moe-serve:0.1.0-cuda
#
# Every `moe-serve` flag can be given as arguments after the image name or as an environment
# variable MOE_SERVE_<FLAG> (e.g. MOE_SERVE_MAX_NUM_SEQS=32). See docs/deployment.md.

ARG VARIANT=cpu
ARG PYTHON_VERSION=3.11
# The base images are build arguments: the public ones by default; on a machine without a
# registry, a local Debian bookworm image with python3 + python3-venv (scripts/image_base.sh,
# `--build-arg BASE_IMAGE_CPU=localhost/moe-serve-base:bookworm`; scripts/image_check.sh does it).
ARG BASE_IMAGE_CPU=python:${PYTHON_VERSION}-slim-bookworm
# The CUDA variant only needs the driver-facing CUDA base: the torch (and vLLM) wheels ship
# their own CUDA runtime libraries, so a -runtime/-cudnn image would duplicate ~3 GB.
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-base-ubuntu24.04

# ---- base images: the Python each variant runs on, and where its torch build comes from -------
# hadolint ignore=DL3006
FROM ${BASE_IMAGE_CPU} AS base-cpu
ENV TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

FROM ${CUDA_IMAGE} AS base-cuda
ENV TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
# Triton compiles its launcher stubs at run time: a C compiler and the Python headers belong in
# the runtime image of the CUDA variant (it inherits this stage).
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-dev gcc libc6-dev ca-certificates \
 && rm -rf /var/lib/apt/lists/*

# hadolint ignore=DL3006
FROM base-${VARIANT} AS base
# Caches (CPU kernel builds, Triton, torch inductor, Hugging Face) go under MOE_SERVE_CACHE_DIR
# (--cache-dir): writable in the image; the Helm chart mounts an emptyDir there (read-only root).
ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MOE_SERVE_CACHE_DIR=/var/cache/moe-serve \
    MOE_SERVE_PREBUILT_KERNELS=/opt/moe-serve/kernels

# ---- builder: everything goes into /opt/venv, copied whole into the runtime image -----------
# pip's configuration (an index mirror, CA certificates) can be mounted at build time, never
# copied into a layer: `podman build --volume /etc/pip.conf:/etc/pip.conf:ro ...` (image_check.sh).
FROM base AS builder
# Optional extras from pyproject.toml, comma-separated (e.g. "vllm"; CUDA variant only).
ARG EXTRAS=""
# The torch requirement; constraints.txt pins the tested release. TORCH_INDEX: "" the variant's
# PyTorch index (above), "pip" pip's own configured index, or an index URL.
ARG TORCH_SPEC="torch"
ARG TORCH_INDEX=""
# The instruction-set levels the CPU kernels are built for ahead of time (gcc -march; the
# best one the CPU supports is loaded at run time); "" builds none.
ARG CPU_KERNEL_LEVELS="x86-64-v3 x86-64-v4"
# The CPU kernels' compilers (build stage only: the CPU runtime image carries none).
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc g++ libc6-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY constraints.txt ./
RUN python3 -m venv /opt/venv \
 && pip install -c constraints.txt --upgrade pip setuptools wheel
# Layers from the least to the most often changed: torch, then the dependencies (from
# pyproject.toml alone), then the source. Editing server/ or models/ reuses the first three.
# hadolint ignore=DL3013,SC2086
RUN index="${TORCH_INDEX:-$TORCH_INDEX_URL}"; [ "$index" = pip ] && index=""; \
    pip install -c constraints.txt ${index:+--index-url "$index"} "$TORCH_SPEC"
COPY pyproject.toml ./
RUN python -c "import os, tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; extras = [e.strip() for e in os.environ.get('EXTRAS', '').split(',') if e.strip()]; print('\n'.join(p['dependencies'] + [d for e in extras for d in p['optional-dependencies'][e]]))" > /tmp/requirements.txt \
 && cat /tmp/requirements.txt \
 && pip install -c constraints.txt -r /tmp/requirements.txt
# The CPU kernels, one library per level and threading, against this torch: from their own
# sources only (cpu_build.py needs nothing but torch), so editing the Python reuses this layer.
COPY models/kernels/cpu_build.py /src/kernels/
COPY models/kernels/csrc/ /src/kernels/csrc/
# hadolint ignore=SC2086
RUN python /src/kernels/cpu_build.py --prebuild "$MOE_SERVE_PREBUILT_KERNELS" $CPU_KERNEL_LEVELS
COPY README.md LICENSE ./
COPY server/ server/
COPY models/ models/
RUN pip install --no-deps --no-build-isolation . \
 && moe-serve --help > /dev/null
# xgrammar requires triton on Linux x86-64 (~1 GB), but on CPU tensors it runs its own CPU kernel
# and moe-serve's Triton kernels are CUDA-only: the CPU image leaves it out.
ARG VARIANT
RUN if [ "$VARIANT" = cpu ]; then pip uninstall -y triton; fi

# ---- runtime: non-root, no build files; no compilers (CUDA: the C compiler Triton needs) ---
FROM base AS runtime
ARG VARIANT
LABEL org.opencontainers.image.title="moe-serve" \
      org.opencontainers.image.description="OpenAI-compatible inference server for Mixture-of-Experts LLMs" \
      org.opencontainers.image.licenses="Apache-2.0" \
      io.moe-serve.variant="${VARIANT}"
RUN groupadd --system --gid 10001 app \
 && useradd --system --uid 10001 --gid app --home-dir /home/app --create-home --shell /usr/sbin/nologin app \
 && mkdir -p /models "$MOE_SERVE_CACHE_DIR" \
 && chown app:app /models "$MOE_SERVE_CACHE_DIR"
COPY --from=builder /opt/venv /opt/venv
COPY --from=builder /opt/moe-serve /opt/moe-serve
# Listen on all interfaces inside the container. A model directory mounted under /models is
# served with MOE_SERVE_MODEL=/models/<dir> (or --model); without it, the bundled checkpoint.
ENV MOE_SERVE_HOST=0.0.0.0 \
    MOE_SERVE_PORT=8000 \
    HOME=/home/app
USER 10001:10001
WORKDIR /home/app
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=300s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('MOE_SERVE_PORT', '8000') + '/health', timeout=4)"]
# SIGTERM: /ready turns 503, in-flight requests get --drain-timeout seconds, then exit 0.
STOPSIGNAL SIGTERM
ENTRYPOINT ["moe-serve"]
CMD []
