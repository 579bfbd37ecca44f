"""A stop signal while the rollout fleet starts: `megatron-apo train` still exits with the preemption code and
one line, and no process of the run's local Ray cluster outlives it."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.helpers.procs import cmdline, survivors
from tests.helpers.rl_setup import overrides, toy_env

REPO = Path(__file__).resolve().parents[2]


def _ray_processes(pid: int) -> list[psutil.Process]:
    out = []
    for p in psutil.Process(pid).children(recursive=True):
        try:
            if p.name().startswith("ray") or "/ray/" in " ".join(p.cmdline()):
                out.append(p)
        except psutil.NoSuchProcess:
            pass
    return out


@pytest.mark.slow
def test_sigterm_while_the_fleet_starts_exits_75_with_one_line_and_reaps_ray(tmp_path):
    env = toy_env(tmp_path / "toy")
    out = tmp_path / "run"
    p = subprocess.Popen([sys.executable, "-m", "megatron_apo.cli", "train", *overrides(env, out, tp=1, steps=2)],
                         cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and not any("raylet" in q.name() for q in _ray_processes(p.pid)):
            assert p.poll() is None, p.communicate()
            time.sleep(0.2)
        time.sleep(3)  # Ray is up, its engine actor starting: the fleet start and the first sync lie ahead
        assert not (out / "metrics.jsonl").exists()  # still starting
        ray_pids = [q.pid for q in _ray_processes(p.pid)]
        names = {q.name() for q in _ray_processes(p.pid)}
        assert "raylet" in names and "gcs_server" in names, names
        p.send_signal(signal.SIGTERM)  # the launcher alone; it forwards the signal to its ranks
        stdout, stderr = p.communicate(timeout=300)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 75, stdout + stderr
    assert "Traceback" not in stdout + stderr and "SystemExit" not in stderr, stderr
    assert stdout.strip().splitlines()[-1].startswith("train: stopped by a signal after step 1 (checkpointed); exit "
                                                      "code 75"), stdout
    left = survivors(ray_pids, grace_s=15)
    assert not left, [cmdline(pid) for pid in left]
