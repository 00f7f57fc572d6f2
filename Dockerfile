# syntax=docker/dockerfile:1
# Two images from one file:
#   docker build --target api -t sdserve-api .        slim: no torch, no model
#   docker build --target worker -t sdserve-worker .  CUDA runtime, PyTorch, diffusers
# Optional, bake a hub model into the worker image (else it downloads on first start into
# HF_HOME, a volume):  --build-arg PREFETCH_MODEL=stable-diffusion-v1-5/stable-diffusion-v1-5

FROM python:3.11.11-slim-bookworm AS api
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 SDSERVE_LOG_JSON=true \
    SDSERVE_STORAGE=file:///images
WORKDIR /srv
COPY docker/constraints.txt pyproject.toml README.md ./
COPY app ./app
COPY worker ./worker
# With its bytecode: the user the image runs as cannot write it beside the sources, and without
# it every start compiles them again (a worker's imports on a 2-core host: 14-15 s instead of 6).
RUN pip install -c constraints.txt '.[api]' \
    && useradd --create-home --uid 10001 sdserve \
    && mkdir -p /images && chown sdserve /images
USER 10001:10001
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2)"]
CMD ["sdserve", "api", "--host", "0.0.0.0", "--port", "8000"]

FROM pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime AS worker
ARG PREFETCH_MODEL=""
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    SDSERVE_LOG_JSON=true SDSERVE_METRICS_PORT=9400 \
    HF_HOME=/models SDSERVE_COMPILE_CACHE=/models/inductor SDSERVE_STORAGE=file:///images
WORKDIR /srv
COPY docker/constraints.txt pyproject.toml README.md ./
COPY app ./app
COPY worker ./worker
RUN pip install -c constraints.txt '.[worker]' \
    && useradd --create-home --uid 10001 sdserve \
    && mkdir -p /models /images && chown sdserve /models /images
USER 10001:10001
RUN if [ -n "$PREFETCH_MODEL" ]; then \
      python -c "import sys; from huggingface_hub import snapshot_download; snapshot_download(sys.argv[1])" "$PREFETCH_MODEL"; \
    fi
VOLUME ["/models"]
EXPOSE 9400
# The metrics port answers once the model is loaded and warmed up (compilation included).
HEALTHCHECK --interval=30s --timeout=5s --start-period=600s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/metrics' % os.environ['SDSERVE_METRICS_PORT'], timeout=3)"]
CMD ["sdserve", "worker"]
