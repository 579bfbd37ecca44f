"""Which of this node's GPUs a local Ray cluster (and so the rollout engines) may use.

Without torchrun/srun, `megatron-apo train` spawns its ranks on the node's first GPUs (rank r takes visible
device r, `parallel/spawn.py`); under torchrun, local rank r does the same. A local Ray cluster started by
rank 0 would otherwise own every GPU and put engine 0 on GPU 0, next to rank 0 (vLLM then finds too little
free memory, and NCCL refuses two ranks on one GPU). So the local cluster gets only the GPUs no rank uses.
Torch-free: the pre-start checks use it too.
"""

from __future__ import annotations

import os
from typing import Mapping


def visible_gpus(cuda_visible_devices: str | None, device_count: int) -> list[str]:
    """The node's GPUs as `CUDA_VISIBLE_DEVICES` names them (indices or UUIDs): all `device_count` if unset."""
    if cuda_visible_devices is None:
        return [str(i) for i in range(device_count)]
    return [d.strip() for d in cuda_visible_devices.split(",") if d.strip()]


def engine_gpus(ranks_on_node: int, cuda_visible_devices: str | None, device_count: int) -> list[str]:
    """The visible GPUs left after the node's `ranks_on_node` trainer ranks took the first ones."""
    return visible_gpus(cuda_visible_devices, device_count)[max(ranks_on_node, 0):]


def ranks_on_node(environ: Mapping[str, str] = os.environ) -> int:
    """Trainer ranks on this node: torchrun's LOCAL_WORLD_SIZE, srun's SLURM_NTASKS_PER_NODE, else WORLD_SIZE
    (the local launcher's ranks all share one node)."""
    for key in ("LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE", "WORLD_SIZE"):
        if environ.get(key, "").isdigit():
            return int(environ[key])
    return 1


def node_gpu_count() -> int:
    """NVIDIA GPUs the driver reports on this node, without importing torch or CUDA (0 without the driver)."""
    try:
        return len(os.listdir("/proc/driver/nvidia/gpus"))
    except OSError:
        return 0
