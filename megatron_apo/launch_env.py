"""Which rank this process is, as the launcher says: torchrun's RANK/WORLD_SIZE/LOCAL_RANK or srun's SLURM_*.

The one place that reads the launcher's environment (the CLI, `init_distributed`, the log prefix) or writes it (the
local spawner, `run_distributed`). Standard library only: the CLI's checks before any rank starts stay torch-free.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping


@dataclass(frozen=True)
class LaunchEnv:
    launched: bool  # under torchrun or srun: this process is one rank of a job
    rank: int
    world_size: int
    local_rank: int


def launch_env(environ: Mapping[str, str] = os.environ) -> LaunchEnv:
    """torchrun's variables win over srun's; without either, a single process (rank 0 of 1)."""
    if "RANK" in environ:
        return LaunchEnv(True, int(environ["RANK"]), int(environ.get("WORLD_SIZE", "1")),
                         int(environ.get("LOCAL_RANK", "0")))
    if "SLURM_PROCID" in environ:
        return LaunchEnv(True, int(environ["SLURM_PROCID"]), int(environ.get("SLURM_NTASKS", "1")),
                         int(environ.get("SLURM_LOCALID", "0")))
    return LaunchEnv(False, 0, 1, 0)


def rank_env(rank: int, world_size: int, master_port: int, master_addr: str = "127.0.0.1",
             local_rank: int | None = None) -> dict[str, str]:
    """The variables torchrun would set for one rank (what `init_distributed` reads)."""
    return {"RANK": str(rank), "LOCAL_RANK": str(rank if local_rank is None else local_rank),
            "WORLD_SIZE": str(world_size), "MASTER_ADDR": master_addr, "MASTER_PORT": str(master_port)}


def export_torch_env(environ=os.environ) -> None:
    """Under srun without torchrun: RANK/WORLD_SIZE/LOCAL_RANK from SLURM_*, so torch.distributed finds them."""
    env = launch_env(environ)
    if env.launched and "RANK" not in environ:
        environ.update(RANK=str(env.rank), WORLD_SIZE=str(env.world_size), LOCAL_RANK=str(env.local_rank))
