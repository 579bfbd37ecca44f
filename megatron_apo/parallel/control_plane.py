"""The control plane: a gloo group over every trainer rank, with a long timeout of its own.

Rank 0 works alone for long stretches (starting the fleet, rolling out, evaluating) while ranks 1..N wait
for the next batch. Waiting inside an NCCL collective would trip NCCL's watchdog (and NCCL rejects host
tensors anyway), so everything that is control rather than data goes through this group, with host
tensors and python objects: the batch broadcast, metrics, stop flags, finite checks, "rank 0 is ready".
Data-plane tensors (activations, gradients, weight pieces) stay on the model's device and Megatron's
(NCCL) groups. See docs/gpu.md.

`init_distributed` creates the group; every helper here is collective over all trainer ranks.
"""

from __future__ import annotations

import datetime
import math
from typing import Any

import torch
import torch.distributed as dist

_GROUP = None
_TIMEOUT_MINUTES: float | None = None


def init(timeout_minutes: float) -> None:
    """Collective (every rank, once after init_process_group): creates the gloo control group."""
    global _GROUP, _TIMEOUT_MINUTES
    if timeout_minutes <= 0:
        raise ValueError(f"control-plane timeout must be > 0 minutes, got {timeout_minutes}")
    if _GROUP is None:
        _GROUP = dist.new_group(backend="gloo", timeout=datetime.timedelta(minutes=timeout_minutes))
        _TIMEOUT_MINUTES = timeout_minutes


def destroy() -> None:
    global _GROUP, _TIMEOUT_MINUTES
    _GROUP, _TIMEOUT_MINUTES = None, None


def group():
    if _GROUP is None:
        raise RuntimeError("the control-plane group does not exist: call megatron_apo.parallel.init_distributed first")
    return _GROUP


def timeout_minutes() -> float | None:
    return _TIMEOUT_MINUTES


def backend() -> str:
    return dist.get_backend(group())


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """`obj` from global rank `src` to every rank (pickled, host memory)."""
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=group())
    return box[0]


def all_gather_object(obj: Any) -> list:
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj, group=group())
    return out


def any_true(flag: bool) -> bool:
    """True on every rank when it is True on at least one."""
    t = torch.tensor([1.0 if flag else 0.0])
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group())
    return bool(t.item())


def all_finite(values) -> bool:
    """True on every rank when every rank's `values` (floats or tensors, any device) are finite."""
    return not any_true(not all(math.isfinite(float(v)) for v in values))


def barrier() -> None:
    dist.barrier(group=group())


def mean_over_reporting_ranks(per_mb: list[dict]) -> dict:
    """Means of the micro-batch metrics of the ranks that have any (the last pipeline stage), on every rank."""
    local = {}
    if per_mb:
        local = {k: sum(float(m[k]) for m in per_mb) / len(per_mb) for k in per_mb[0]}
    merged: dict = {}
    counts: dict = {}
    for d in all_gather_object(local):
        for k, v in d.items():
            merged[k] = merged.get(k, 0.0) + v
            counts[k] = counts.get(k, 0) + 1
    return {k: merged[k] / counts[k] for k in merged}
