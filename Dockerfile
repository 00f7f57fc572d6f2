# Two images from one file:
#   docker build --target api -t sdserve-api .      slim, no torch
#   docker build --target worker -t sdserve-worker . CUDA runtime with PyTorch
# The deployment issue hardens these (pinned digests, healthchecks, model fetch); see deploy/.

FROM python:3.11-slim AS api
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 SDSERVE_LOG_JSON=true
WORKDIR /srv
COPY pyproject.toml README.md ./
COPY app ./app
COPY worker ./worker
RUN pip install '.[api]' && useradd --create-home --uid 10001 sdserve
USER sdserve
EXPOSE 8000
CMD ["sdserve", "api", "--host", "0.0.0.0", "--port", "8000"]

FROM pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime AS worker
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 SDSERVE_LOG_JSON=true HF_HOME=/models
WORKDIR /srv
COPY pyproject.toml README.md ./
COPY app ./app
COPY worker ./worker
RUN pip install '.[worker]' && useradd --create-home --uid 10001 sdserve \
    && mkdir -p /models && chown sdserve /models
USER sdserve
CMD ["sdserve", "worker"]
