"""This rank's CUDA context, made with CUDA_DEVICE_MAX_CONNECTIONS=1, and only this one.

Megatron overlaps tensor-parallel communication with compute on the assumption that the GPU runs kernels in the
order the host issues them, which one hardware work queue per device gives (`CUDA_DEVICE_MAX_CONNECTIONS=1`).
CUDA reads the variable when a context is created, so it is set around the creation of this rank's context and
then put back as it was: the processes a rank starts later (rank 0's local Ray cluster and its vLLM engines) keep
CUDA's default of several queues, which vLLM's overlapped scheduling needs. A value the user set is kept as is.
"""

from __future__ import annotations

import os

import torch

MAX_CONNECTIONS = "CUDA_DEVICE_MAX_CONNECTIONS"


def bind_gpu(index: int) -> None:
    """`torch.cuda.set_device(index)` and the context created there, with one work queue (see the module doc)."""
    before = os.environ.get(MAX_CONNECTIONS)
    os.environ.setdefault(MAX_CONNECTIONS, "1")
    try:
        torch.cuda.set_device(index)
        torch.zeros(1, device=f"cuda:{index}")  # creates the context now, while the variable is set
    finally:
        if before is None:
            os.environ.pop(MAX_CONNECTIONS, None)
