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


@pytest.mark.slow
def test_a_start_up_failure_after_the_fleet_started_is_one_line_and_reaps_ray(tmp_path):
    """The resume's sampler state does not fit the data files: the controller finds it after its fleet started.
    The run ends in one line, stops that fleet (no Ray process outlives it) and releases the run lock."""
    from megatron_apo.data.parquet import write_verl_parquet
    from megatron_apo.data.toy import make_toy_dataset

    env = toy_env(tmp_path / "toy")
    out = tmp_path / "run"
    first = subprocess.run([sys.executable, "-m", "megatron_apo.cli", "train", *overrides(env, out, tp=1, steps=1)],
                           cwd=REPO, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stdout + first.stderr
    other = tmp_path / "other.parquet"  # more prompts than the checkpoint's sampler knows
    write_verl_parquet(make_toy_dataset(48, 3, (2,), split="train"), other)
    args = [*overrides(env, out, tp=1, steps=2), f"data.train_files=[{other}]"]
    p = subprocess.Popen([sys.executable, "-m", "megatron_apo.cli", "train", *args], cwd=REPO,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    ray_pids: set[int] = set()
    try:
        deadline = time.time() + 300
        while p.poll() is None and time.time() < deadline:
            try:
                ray_pids.update(q.pid for q in _ray_processes(p.pid))
            except psutil.NoSuchProcess:
                break
            time.sleep(0.1)
        stdout, stderr = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 2, stdout + stderr
    assert "Traceback" not in stderr, stderr
    error = stderr.strip().splitlines()[-1]  # (Ray's own start-up line may come before it)
    assert error.startswith("megatron-apo train: error: ") and "data.train_files" in error, stderr
    assert ray_pids, "the fleet never started: the failure came too early to test the clean-up"
    left = survivors(sorted(ray_pids), grace_s=15)
    assert not left, [cmdline(pid) for pid in left]
    from megatron_apo.trainer.runlock import check_out_dir_free

    check_out_dir_free(out)  # the run lock was released (its file stays: the lock is the flock on it)
