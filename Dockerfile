# One image for all three services: python -m adapter_store | gpu_worker | router.
#
# TORCH_INDEX_URL picks the torch build. The default (CPU wheels) keeps the image small for the
# router and the adapter store. For the GPU worker, build with a CUDA index; the CUDA wheels carry
# their own CUDA runtime, so the slim base works on any host with the NVIDIA driver and the
# NVIDIA Container Toolkit:
#   docker build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 -t loraserve-gpu .
# (docker-compose.yml does this for the gpu-worker service.)
FROM python:3.11-slim

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# A pin, like the Makefile's TORCH_SPEC (e.g. torch==2.13.0); pyproject needs torch>=2.4.
ARG TORCH_SPEC=torch
# Optional extras, e.g. "[demo]" for the image the Kubernetes cpu-demo overlay builds the demo model with.
ARG PIP_EXTRAS=""

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HOME=/var/cache/huggingface

WORKDIR /app

# torch first, from the chosen index, in its own layer: `pip install .` then finds it installed.
RUN pip install --index-url "${TORCH_INDEX_URL}" "${TORCH_SPEC}"

# Runtime deps from pyproject.toml (grpcio-tools among them), then `make protos` into ./loraserve/v1.
COPY . .
RUN pip install ".${PIP_EXTRAS}" \
 && python -m grpc_tools.protoc -I protos --python_out=. --pyi_out=. --grpc_python_out=. \
        protos/loraserve/v1/*.proto

# Non-root user; the cache dirs are created owned by it so named volumes mounted there inherit
# the ownership on first use.
RUN useradd --uid 10001 --no-create-home --shell /usr/sbin/nologin loraserve \
 && mkdir -p /var/cache/loraserve/adapters /var/cache/huggingface \
 && chown -R loraserve:loraserve /var/cache/loraserve /var/cache/huggingface
USER loraserve

EXPOSE 50051 50052 50053
CMD ["python", "-m", "router"]
