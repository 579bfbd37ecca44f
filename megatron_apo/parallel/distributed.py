"""Distributed initialisation: torch.distributed, Megatron parallel state, the control-plane group, seeds.

The collective rule (docs/gpu.md): data-plane tensors (activations, gradients, weight pieces) live on the
model's device and go over the default group (NCCL with CUDA, gloo without); control-plane traffic (the
batch broadcast, metrics, stop flags, finite checks) goes over a separate gloo group with a long timeout
(`megatron_apo.parallel.control_plane`), so no rank sits in an NCCL collective while rank 0 works alone.
"""

from __future__ import annotations

import datetime
import os
import random

import numpy as np
import torch
import torch.distributed as dist

from megatron_apo.config import ParallelConfig
from megatron_apo.launch_env import export_torch_env
from megatron_apo.parallel import control_plane, cpu_compat
from megatron_apo.parallel.cuda_context import bind_gpu

DEFAULT_TIMEOUT_MINUTES = 30  # the default (data-plane) group: every rank is busy in lockstep there
DEFAULT_CONTROL_TIMEOUT_MINUTES = 360  # the control plane: ranks 1..N wait while rank 0 rolls out / evaluates


def default_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def local_device_index() -> int:
    """This process's GPU: LOCAL_RANK modulo the visible GPUs (torchrun/srun set LOCAL_RANK per node)."""
    return int(os.environ.get("LOCAL_RANK", "0")) % max(1, torch.cuda.device_count())


def init_distributed(
    parallel: ParallelConfig | None = None,
    seed: int = 1234,
    backend: str | None = None,
    timeout_minutes: int = DEFAULT_TIMEOUT_MINUTES,
    control_timeout_minutes: int = DEFAULT_CONTROL_TIMEOUT_MINUTES,
) -> None:
    """Initialise torch.distributed from the torchrun/srun environment and Megatron's parallel state.

    Reads RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT (torchrun) or SLURM_PROCID/SLURM_NTASKS (srun).
    Without any of them, starts a single-process group so TP=PP=1 code runs unchanged.
    `timeout_minutes` bounds the default group's collectives (NCCL on GPU: its watchdog), and Megatron's
    groups; `control_timeout_minutes` the gloo control-plane group's. `backend="gloo"` never touches a
    GPU (no set_device), whatever the node has.
    """
    from megatron.core import parallel_state

    parallel = parallel or ParallelConfig()
    export_torch_env()
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(find_free_port())
    cpu_compat.apply()
    backend = backend or default_backend()
    if not dist.is_initialized():
        if backend == "nccl":
            bind_gpu(local_device_index())  # one CUDA work queue for this rank's context only (cuda_context.py)
        timeout = datetime.timedelta(minutes=timeout_minutes)
        store = _loopback_store(timeout)  # a local run's rendezvous listens on loopback only
        ranks = dict(rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"])) if store else {}
        dist.init_process_group(backend=backend, timeout=timeout, store=store, **ranks)
    world = dist.get_world_size()
    parallel.validate(world)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=parallel.tensor_model_parallel_size,
            pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
            virtual_pipeline_model_parallel_size=parallel.virtual_pipeline_model_parallel_size,
            expert_model_parallel_size=parallel.expert_model_parallel_size,
            distributed_timeout_minutes=timeout_minutes,
        )
    control_plane.init(control_timeout_minutes)
    set_seed(seed)


def _loopback_store(timeout: datetime.timedelta):
    """The rendezvous store of a run whose MASTER_ADDR is a loopback address, listening on that address only (torch's
    env:// store listens on every interface); None otherwise (another host's address, or torchrun's agent store)."""
    import ipaddress
    import socket

    host = os.environ["MASTER_ADDR"]
    try:
        if not ipaddress.ip_address(host).is_loopback or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
            return None
    except ValueError:  # a host name
        return None
    rank, world, port = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["MASTER_PORT"])
    if rank != 0:
        return dist.TCPStore(host, port, world, is_master=False, timeout=timeout)
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen()
    return dist.TCPStore(host, port, world, is_master=True, timeout=timeout, master_listen_fd=sock.detach())


def set_seed(seed: int) -> None:
    """Seeds python, numpy, torch, and Megatron's model-parallel RNG tracker.

    The data-parallel stream gets `seed` on every rank (so TP ranks initialise identical replicas);
    Megatron derives the tensor-parallel stream from it.
    """
    from megatron.core import tensor_parallel

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed, **cpu_compat.rng_tracker_kwargs())


def destroy_distributed() -> None:
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    control_plane.destroy()
    if dist.is_initialized():
        dist.destroy_process_group()


# Why not bind(port 0): that hands out the kernel's ephemeral ports (32768+ on Linux), which every process
# starting at the same moment (spawned ranks, a replacement vLLM engine core, Ray workers) also draws from, so the
# port could be taken between this check and the store binding it. A random port below that range rarely is.
_PORT_RANGE = (20000, 32000)


def find_free_port(bind_host: str = "127.0.0.1", attempts: int = 64) -> int:
    """A port free on `bind_host` now, for a TCPStore about to bind it (MASTER_PORT, the weight-sync store)."""
    import socket

    rng = random.SystemRandom()
    for _ in range(attempts):
        port = rng.randrange(*_PORT_RANGE)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((bind_host, port))
            except OSError:
                continue
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:  # a crowded range: any free port
        s.bind((bind_host, 0))
        return s.getsockname()[1]

