"""How a training run ends, as seen from outside: exit codes, and the stop-signal record.

Exit codes of `megatron-apo train` (documented in docs/reliability.md):
    0   every step trained (or nothing left to train)
    2   a configuration or input error, reported in one line before any rank starts
    75  stopped by SIGTERM/SIGUSR1 after writing a checkpoint: the run is incomplete and resumes from it
        (75 is EX_TEMPFAIL: "try again later"; `slurm/train_apo.sbatch` requeues on it)
"""

from __future__ import annotations

import contextlib
import signal
from dataclasses import dataclass, field

EXIT_OK = 0
EXIT_USER_ERROR = 2
EXIT_PREEMPTED = 75


@dataclass
class TrainResult:
    """What `train()` returns on every rank: the per-step metrics (rank 0; empty elsewhere), and the step after
    which a stop signal ended the run (checkpointed), or None when it was not stopped."""

    history: list[dict] = field(default_factory=list)
    stopped_at: int | None = None


def exit_code(result: TrainResult, rank: int = 0) -> int:
    """Rank 0 carries the preemption code; the other ranks exit 0. srun's `--kill-on-bad-exit` ends a step at the
    first non-zero exit: the other ranks, done with their checkpoint part, must not cut short rank 0's shutdown
    of the rollout fleet (srun would then report their 143, not 75)."""
    return EXIT_PREEMPTED if result.stopped_at is not None and rank == 0 else EXIT_OK


def checkpoint_due(step: int, total_steps: int, save_interval: int, stopping: bool) -> bool:
    """Whether the trainer saves after finishing `step` (1-based: the number of steps done).

    Every `checkpoint.save_interval` steps (0: never on an interval), after the last step, and when a stop
    signal was received (the run then exits with EXIT_PREEMPTED and resumes from this checkpoint).
    """
    return bool(save_interval and step % save_interval == 0) or step == total_steps or stopping


class StopFlag:
    """SIGTERM/SIGUSR1 (Slurm preemption, `scancel --signal`) -> checkpoint at the end of the step and exit."""

    def __init__(self):
        self.raised = False
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.raised = True

    def agreed(self) -> bool:
        """Collective: True on every rank when any rank received a stop signal."""
        from megatron_apo.parallel import control_plane

        return control_plane.any_true(self.raised)


@contextlib.contextmanager
def signals_blocked(sigs=(signal.SIGTERM, signal.SIGUSR1)):
    """Blocks `sigs` in this thread for the block; processes started meanwhile inherit the blocked mask.

    Slurm (and `kill` of a process group) delivers a preemption signal to every process of a job step, helpers
    included; helpers without a handler would die of it. Blocked signals stay pending in this process and
    reach the trainer's handler when the block ends.
    """
    old = signal.pthread_sigmask(signal.SIG_BLOCK, set(sigs))
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
