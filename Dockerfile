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
# The CUDA variant only needs the driver-facing CUDA base: the torch (and vLLM) wheels ship
# their own CUDA runtime libraries, so a -runtime/-cudnn image would duplicate ~3 GB.
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-base-ubuntu24.04

# ---- base images: the Python each variant runs on, and where its torch build comes from -------
FROM python:${PYTHON_VERSION}-slim-bookworm AS base-cpu
ENV TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

FROM ${CUDA_IMAGE} AS base-cuda
ENV TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
 && rm -rf /var/lib/apt/lists/*

# hadolint ignore=DL3006
FROM base-${VARIANT} AS base
ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# ---- builder: everything goes into /opt/venv, copied whole into the runtime image -----------
FROM base AS builder
# Optional extras from pyproject.toml, comma-separated (e.g. "vllm"; CUDA variant only).
ARG EXTRAS=""
# The torch requirement (pyproject's); pin it with e.g. --build-arg TORCH_SPEC="torch==2.7.1".
ARG TORCH_SPEC="torch>=2.4"
WORKDIR /src
RUN python3 -m venv /opt/venv \
 && pip install --upgrade "pip>=24" "setuptools>=68" "wheel>=0.42"
# Layers from the least to the most often changed: torch, then the dependencies (from
# pyproject.toml alone), then the source. Editing server/ or models/ reuses the first three.
# hadolint ignore=DL3013
RUN pip install --index-url "$TORCH_INDEX_URL" "$TORCH_SPEC"
COPY pyproject.toml README.md ./
RUN python -c "import os, tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; extras = [e.strip() for e in os.environ.get('EXTRAS', '').split(',') if e.strip()]; print('\n'.join(p['dependencies'] + [d for e in extras for d in p['optional-dependencies'][e]]))" > /tmp/requirements.txt \
 && cat /tmp/requirements.txt \
 && pip install -r /tmp/requirements.txt
COPY server/ server/
COPY models/ models/
RUN pip install --no-deps --no-build-isolation . \
 && moe-serve --help > /dev/null

# ---- runtime: non-root, no compilers, no build files -------------------------------------------
FROM base AS runtime
ARG VARIANT
LABEL org.opencontainers.image.title="moe-serve" \
      org.opencontainers.image.description="OpenAI-compatible inference server for Mixture-of-Experts LLMs" \
      org.opencontainers.image.licenses="Apache-2.0" \
      io.moe-serve.variant="${VARIANT}"
RUN groupadd --system --gid 10001 app \
 && useradd --system --uid 10001 --gid app --home-dir /home/app --create-home --shell /usr/sbin/nologin app \
 && mkdir -p /models \
 && chown app:app /models
COPY --from=builder /opt/venv /opt/venv
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
