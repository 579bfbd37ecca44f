# megatron-apo on an NGC PyTorch image (CUDA, cuDNN, NCCL, apex and Transformer Engine come with the base).
#
#   docker build -t megatron-apo:0.1.0 .
#   enroot import -o /shared/images/megatron-apo.sqsh dockerd://megatron-apo:0.1.0   # for pyxis: CONTAINER_IMAGE=
#
# Every Python package pinned here must match pyproject.toml (tests/test_dockerfile.py checks it).
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:25.06-py3
FROM ${BASE_IMAGE}

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# NGC images pin their torch through PIP_CONSTRAINT; vLLM pins its own torch build, so the constraint is
# lifted for the fleet stack and Transformer Engine is rebuilt against the torch that ends up installed.
ENV PIP_CONSTRAINT="" \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    CUDA_DEVICE_MAX_CONNECTIONS=1

# 1) the heavy, rarely changing layer: rollout fleet, Ray, Megatron-Core, NeMo-Run.
# Transformer Engine is left unpinned on purpose (as in pyproject's gpu extra): it must be built for the
# base image's CUDA and the torch vLLM brought in.
# hadolint ignore=DL3013
RUN pip install --no-cache-dir \
        "vllm==0.11.0" \
        "ray>=2.40" \
        "megatron-core>=0.16.1,<0.17" \
        "nemo-run==0.11.1" \
        "leptonai<0.47" \
    && pip install --no-cache-dir --no-build-isolation "transformer-engine[pytorch]"

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
