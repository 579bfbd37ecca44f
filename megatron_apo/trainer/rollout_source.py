"""Where each RL step's batch comes from: rank 0 asks the fleet, every trainer rank receives the same batch.

Synchronous: step n's rollouts are generated with the weights of step n, after step n-1's weight sync.
One-step-off-policy (`rollout.one_step_off_policy`): step n+1's rollouts are generated on a thread while step n
trains, with step n's (pre-update) weights; the loss corrects for the lag with truncated importance sampling
(`rollout.tis_cap`, docs/algorithms.md). The engine actors run one call at a time, so the weight sync after
step n queues behind that generation; the fleet's lock keeps the two threads from both replacing an engine
that died (`RolloutFleet.sync_session`).
"""

from __future__ import annotations

import concurrent.futures
import time
from typing import Callable

from megatron_apo.logging_utils import get_logger
from megatron_apo.parallel import control_plane
from megatron_apo.trainer.batch import RLBatch

log = get_logger(__name__)


class FleetWeights:
    """The weight sync trainer -> rollout fleet; `sync` is collective over every trainer rank."""

    def __init__(self, controller, sender):
        self.controller = controller  # rank 0 only; None elsewhere
        self.sender = sender

    def sync(self, version: int) -> float:
        """Sends the policy's weights as `version`; returns the seconds it took."""
        t0 = time.perf_counter()
        if self.controller is not None:
            fleet = self.controller.fleet
            with fleet.sync_session():  # the prefetch thread's generate replaces no engine during this sync
                group = self.controller.sync_group()
                refs = fleet.begin_weight_sync(version)
                control_plane.barrier()  # the others wait here (gloo), not in the sender's NCCL transfers
                stats = self.sender.sync(group, version)
                fleet.finish_weight_sync(refs, stats.checksum)
        else:
            control_plane.barrier()
            self.sender.sync(None, version)
        return time.perf_counter() - t0


class RolloutSource:
    """`next(step)` returns (batch, rollout metrics) on every rank; `controller` is set on rank 0 only.

    When the fleet replaced engines and none serves the trainer's weights (FleetNeedsSync), every rank joins a
    weight sync and the step's rollout is asked for again.
    """

    def __init__(self, controller, sync_fleet: Callable[[int], float], total_steps: int, off_policy: bool):
        self.controller = controller
        self.sync_fleet = sync_fleet
        self.total_steps = total_steps
        self._prefetch = None  # one-step-off-policy: the future of the next step's rollout (rank 0)
        self._executor = (concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="rollout")
                          if off_policy and controller is not None else None)

    def next(self, step: int) -> tuple[RLBatch, dict]:
        while True:
            rollout = self._rollout(step) if self.controller is not None else None
            batch, metrics = control_plane.broadcast_object(
                (rollout.batch if rollout else None, rollout.metrics if rollout else None), src=0)
            if batch is not None:
                return batch, metrics
            self.sync_fleet(step)  # every rank: the trainer's weights reach the replacement engines

    def _rollout(self, step: int):
        from megatron_apo.rollout.fleet import FleetNeedsSync

        rollout = None
        try:
            rollout = self._prefetch.result() if self._prefetch is not None else self.controller.rollout(step)
        except FleetNeedsSync as e:  # engines replaced, none serving these weights: sync, then resume
            log.warning("train: %s", e)
            self._prefetch = None
        if rollout is not None and self._executor is not None and step + 1 < self.total_steps:
            self._prefetch = self._executor.submit(self.controller.rollout, step + 1)
        return rollout

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
