# megatron-apo's GPU image: ONE torch (the one vLLM pins), Transformer Engine built against it, megatron-core.
#
#   docker build -t megatron-apo:0.1.0 .
#   enroot import -o /shared/images/megatron-apo.sqsh dockerd://megatron-apo:0.1.0   # for pyxis: CONTAINER_IMAGE=
#
# The NGC base provides CUDA 13.0 (the toolkit torch 2.13's wheels are built for), cuDNN, NCCL and the
# compilers Transformer Engine's PyTorch extension needs. Its own torch build and everything compiled
# against it (TE, apex, flash-attn, torch-tensorrt ...) is removed first: vLLM ships binaries for the stock
# torch 2.13.0 wheel, and extensions built for another torch fail at import (docs/gpu.md, "The image").
# Every Python package pinned here must match pyproject.toml (tests/unit/test_dockerfile.py checks it).
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:25.10-py3
FROM ${BASE_IMAGE}

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# NGC images pin their torch through PIP_CONSTRAINT: lifted, the stack below is pinned here instead.
ENV PIP_CONSTRAINT="" \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    NVTE_FRAMEWORK=pytorch

# 1) the heavy, rarely changing layer. Order matters: torch first (vLLM's exact pin), then vLLM and the
# rest, then Transformer Engine compiled against that torch (no build isolation: it must see it).
# transformer-engine 2.11 is the newest megatron-core 0.16.1 supports (its dev extra: >=2.9,<2.12).
# No job launcher here: NeMo-Run (the `launch` extra) runs where jobs are submitted, and its leptonai pins
# prometheus-fastapi-instrumentator==7.0.0 where vLLM needs >=8 (tests/unit/test_resolve.py resolves this set).
# pytest + pytest-timeout: scripts/gpu_check.sh runs the gpu-marked tests in the image, a hung NCCL test times out.
# CUDA_DEVICE_MAX_CONNECTIONS is not set image-wide: the trainer sets it for its own CUDA context only
# (vLLM engines and Ray must not inherit it; docs/gpu.md).
RUN pip uninstall -y torch torchvision torchaudio triton transformer-engine transformer_engine_cu12 \
        transformer_engine_cu13 transformer_engine_torch apex flash-attn flash_attn torch-tensorrt \
        torchao nvidia-modelopt megatron-core \
    && pip install --no-cache-dir "torch==2.13.0" \
    && pip install --no-cache-dir \
        "vllm==0.32.0" \
        "ray>=2.40" \
        "megatron-core==0.16.1" \
        "pytest>=8" \
        "pytest-timeout>=2.3" \
    && pip install --no-cache-dir --no-build-isolation "transformer-engine[core_cu13,pytorch]==2.11.0" \
    && python -c "import vllm, transformer_engine.pytorch, megatron.core"

# 2) the package's own dependencies, read from pyproject.toml itself (no second list to drift), and the user
COPY pyproject.toml README.md /opt/megatron-apo/
RUN mkdir -p /opt/megatron-apo/megatron_apo \
    && touch /opt/megatron-apo/megatron_apo/__init__.py \
    && pip install --no-cache-dir /opt/megatron-apo \
    && pip uninstall -y megatron-apo \
    && useradd --create-home --uid 1000 --shell /bin/bash apo

# 3) this package: the only layer that changes with the code, a few hundred kB
COPY --chown=1000:1000 . /opt/megatron-apo
RUN pip install --no-cache-dir --no-deps -e /opt/megatron-apo
USER 1000
WORKDIR /opt/megatron-apo
CMD ["megatron-apo", "--help"]
