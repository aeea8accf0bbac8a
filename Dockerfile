# syntax=docker/dockerfile:1
#
# Modelium's image, in two variants chosen by a build argument:
#
#   docker build -t modelium:cpu .                                   # torch's CPU build (the default)
#   docker build -t modelium:cuda --build-arg VARIANT=cuda .         # a CUDA base and torch's CUDA build
#
# The install mirrors the Makefile: torch at the Makefile's pin first (the CPU build from PyTorch's
# CPU index, or the CUDA build that PyPI serves), then `pip install .` with the extras named in
# EXTRAS; every other requirement comes from pyproject.toml. The server runs as an unprivileged
# user, listens on 0.0.0.0:8000, reads models from /models and keeps its event log in /data.

ARG VARIANT=cpu
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
# torch's CUDA wheels bring their own CUDA libraries; the base image brings the NVIDIA container
# runtime's settings (NVIDIA_VISIBLE_DEVICES, NVIDIA_DRIVER_CAPABILITIES) and a Python 3.12
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-base-ubuntu24.04

# ------------------------------------------------------------------ the two bases

FROM ${PYTHON_IMAGE} AS base-cpu
ENV TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

FROM ${CUDA_IMAGE} AS base-cuda
# the distribution's Python, at the version its release ships
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
ENV TORCH_INDEX_URL=https://pypi.org/simple

# ------------------------------------------------------------------ the image

# hadolint ignore=DL3006
FROM base-${VARIANT}
ARG VARIANT
ARG TORCH_VERSION=2.13.0
# extras of pyproject.toml to install, comma-separated (e.g. EXTRAS=ray, or EXTRAS=vllm on the CUDA variant;
# the Makefile adds test too, which an image does not need)
ARG EXTRAS=""

ENV VIRTUAL_ENV=/opt/modelium \
    PATH=/opt/modelium/bin:$PATH \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1

# hadolint ignore=DL3013
RUN python3 -m venv "$VIRTUAL_ENV" \
    && pip install --upgrade pip \
    && pip install "torch==${TORCH_VERSION}" --index-url "$TORCH_INDEX_URL"

WORKDIR /src
COPY pyproject.toml README.md ./
COPY modelium ./modelium
COPY actors ./actors
COPY storage ./storage
COPY replay ./replay
# the project itself: its requirements and their bounds are pyproject.toml's
# hadolint ignore=DL3013
RUN pip install ".${EXTRAS:+[$EXTRAS]}" \
    && python -c "import torch, modelium; print('torch', torch.__version__, '· modelium', modelium.__version__)"

RUN groupadd --system --gid 10001 modelium \
    && useradd --system --uid 10001 --gid modelium --create-home --home-dir /home/modelium modelium \
    && mkdir -p /models /data \
    && chown modelium:modelium /models /data

# settings as MODELIUM_* variables: flags given to `docker run IMAGE ...` override them
ENV MODELIUM_HOST=0.0.0.0 \
    MODELIUM_PORT=8000 \
    MODELIUM_MODELS_DIRS=/models \
    MODELIUM_DB=/data/modelium.db

VOLUME ["/models", "/data"]
WORKDIR /data
USER 10001:10001
EXPOSE 8000

# /health needs no API key; it answers 200 while the server runs (also while it drains)
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('MODELIUM_PORT', '8000'), timeout=4)"]

# SIGTERM drains (up to MODELIUM_DRAIN_S, default 30 s): give `docker stop` a longer --time
STOPSIGNAL SIGTERM
ENTRYPOINT ["modelium", "serve"]
CMD []
