"""Helpers for the `slurm` tests: bring up the local cluster (scripts/slurm_local.sh), submit, wait, inspect."""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TRAIN_SBATCH = REPO / "slurm" / "train_apo.sbatch"
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL",
                "DEADLINE"}


_STARTED_BY_US: list[bool] = []


def ensure_local_slurm() -> None:
    """Starts (idempotently) the local Slurm cluster, or skips when this machine cannot run one.

    A cluster this process started is stopped again when the test process exits (`slurm_local.sh down`);
    one that was already up is left running.
    """
    if _STARTED_BY_US:
        return
    if os.geteuid() != 0:
        pytest.skip("the local Slurm cluster needs root (scripts/slurm_local.sh installs Debian packages)")
    if not shutil.which("apt-get") and not shutil.which("slurmctld"):
        pytest.skip("no apt-get and no Slurm installed: cannot start a local Slurm cluster")
    script = str(REPO / "scripts" / "slurm_local.sh")
    was_up = subprocess.run(["bash", script, "status"], capture_output=True, timeout=60).returncode == 0
    r = subprocess.run(["bash", script, "up"], capture_output=True, text=True, timeout=600)
    if r.returncode:
        pytest.fail(f"scripts/slurm_local.sh up failed:\n{r.stdout}\n{r.stderr}")
    _STARTED_BY_US.append(not was_up)
    if not was_up:
        atexit.register(stop_if_started)


def stop_if_started() -> None:
    """Stops the cluster `ensure_local_slurm` started (once; tests/conftest.py calls it at the session's end, as
    pytest then exits without running exit handlers)."""
    if _STARTED_BY_US and _STARTED_BY_US[0]:
        _STARTED_BY_US[0] = False
        subprocess.run(["bash", str(REPO / "scripts" / "slurm_local.sh"), "down"], capture_output=True, timeout=120)


def job_env(**extra: str) -> dict[str, str]:
    """The submitting shell's environment for sbatch: this venv first on PATH, this checkout importable."""
    env = dict(os.environ)
    bindir = str(Path(sys.executable).parent)
    env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(PYTHON=sys.executable, RAY_CMD=str(Path(bindir) / "ray"), CONTAINER_IMAGE="", APO_ROOT=str(REPO))
    env.update(extra)
    return env


def sbatch(script: Path, args: list[str], env: dict[str, str], cwd: Path) -> str:
    r = subprocess.run(["sbatch", "--parsable", *args, str(script)], env=env, cwd=cwd, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, f"sbatch failed: {r.stderr}"
    return r.stdout.strip().split(";")[0]


def squeue_state(job: str) -> str:
    r = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True, text=True, timeout=30)
    return r.stdout.strip()


def wait_gone(job: str, timeout: float) -> None:
    """Polls squeue until the job left the queue (faster than sbatch --wait)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not squeue_state(job):
            return
        time.sleep(1)
    subprocess.run(["scancel", job], timeout=30)
    pytest.fail(f"slurm job {job} still queued/running after {timeout:.0f} s")


def sacct_states(job: str, timeout: float = 30) -> list[tuple[str, str, str]]:
    """[(jobid, state, exitcode)] including the steps; retried because sacct lags the job's end."""
    deadline = time.monotonic() + timeout
    rows: list[tuple[str, str, str]] = []
    while time.monotonic() < deadline:
        r = subprocess.run(["sacct", "-n", "-P", "-D", "-j", job, "-o", "JobID,State,ExitCode"], capture_output=True,
                           text=True, timeout=30)
        rows = [tuple(line.split("|")) for line in r.stdout.split("\n") if line.strip()]
        alloc = [x for x in rows if x[0] == job]
        if alloc and alloc[-1][1].split()[0] in FINAL_STATES:
            return rows
        time.sleep(1)
    pytest.fail(f"sacct never reported a final state for job {job}: {rows}")

