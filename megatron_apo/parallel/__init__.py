"""Distributed init, Megatron parallel state, the CPU shims, and a local multi-process launcher."""

from megatron_apo.parallel.distributed import (
    ParallelConfig,
    default_backend,
    destroy_distributed,
    find_free_port,
    init_distributed,
    set_seed,
)
from megatron_apo.parallel.spawn import DistributedError, RanksStopped, run_distributed

__all__ = [
    "ParallelConfig",
    "DistributedError",
    "RanksStopped",
    "default_backend",
    "destroy_distributed",
    "find_free_port",
    "init_distributed",
    "run_distributed",
    "set_seed",
]
