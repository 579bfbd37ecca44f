"""slurm/train_apo.sbatch on a real local Slurm cluster (scripts/slurm_local.sh: 2 nodes on this host).

The plumbing tests run tests/slurm_train_probe.py, a stand-in that obeys `megatron-apo train`'s launch contract
(srun ranks -> torch.distributed, the Ray fleet address, checkpoints with `latest`, save-and-exit on SIGUSR1);
the `*_real_trainer` tests run `megatron-apo train` itself once the trainer is on the branch.
"""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from slurm_util import (
    REPO, TRAIN_SBATCH, ensure_local_slurm, job_env, sacct_states, sbatch, squeue_state, trainer_is_built,
    wait_gone,
)

pytestmark = pytest.mark.slurm
PROBE = f"{sys.executable} {REPO / 'tests' / 'slurm_train_probe.py'}"
NO_TRAINER = "megatron-apo train is not on this branch yet"


@pytest.fixture(scope="module", autouse=True)
def local_slurm():
    ensure_local_slurm()


def submit_train(tmp: Path, nodes: int, rollout_nodes: int, train_cmd: str, **env) -> str:
    e = job_env(TRAINER_NODES=str(nodes - rollout_nodes), ROLLOUT_NODES=str(rollout_nodes), GPUS_PER_NODE="2",
                FLEET_GPUS_PER_NODE="0", TP="2", PP="1", CKPT_DIR=str(tmp / "ckpt"), TRAIN_CMD=train_cmd,
                RAY_HEAD_PORT="auto", RAY_PORT_BASE="auto", **env)
    # the #SBATCH defaults are a GPU cluster's; a CPU test cluster overrides them on the command line
    return sbatch(TRAIN_SBATCH, ["--account=root", "--partition=debug", f"--nodes={nodes}", "--gpus-per-node=0",
                                 "--time=10", "--job-name=apo-test"], e, cwd=tmp)


def job_log(tmp: Path, job: str) -> str:
    f = tmp / f"apo-test-{job}.out"
    return f.read_text() if f.exists() else "<no job output>"


def allocation_states(job: str) -> list[str]:
    return [state for jid, state, _ in sacct_states(job) if jid == job]


def wait_for(path: Path, timeout: float, job: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not path.exists():
        assert squeue_state(job), f"job {job} ended before {path} appeared"
        time.sleep(0.5)
    assert path.exists(), f"{path} did not appear in {timeout} s"


def preempt(job: str) -> None:
    """The time-limit warning: SIGUSR1 to the batch shell, as `#SBATCH --signal=B:USR1@120` sends it."""
    subprocess.run(["scancel", "--batch", "--signal=USR1", job], check=True, timeout=30)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and squeue_state(job) not in ("PENDING", ""):
        time.sleep(0.5)
    # requeued: pending until its old credential expires (cred_expire=10 in the local slurm.conf), then runs again


def test_two_nodes_trainer_ranks_and_ray_fleet(tmp_path):
    """Node 1: two srun trainer ranks (one gloo group, TP=2); node 2: the Ray head; node 1 joins Ray with 0 GPUs."""
    job = submit_train(tmp_path, 2, 1, f"{PROBE} trainer.total_steps=4", SAVE_INTERVAL="2")
    wait_gone(job, 300)
    assert allocation_states(job) == ["COMPLETED"], job_log(tmp_path, job)
    runs = [json.loads(x) for x in (tmp_path / "ckpt" / "probe_runs.jsonl").read_text().splitlines()]
    assert len(runs) == 1
    r = runs[0]
    assert (r["world_size"], r["rank_sum"], r["tp"], r["pp"]) == (2, 1.0, 2, 1)
    assert r["ray_nodes"] == ["apo_rollout_node:gpu=0", "apo_trainer_node:gpu=0"]
    assert (tmp_path / "ckpt" / "latest").read_text() == "4"
    assert sorted(p.name for p in (tmp_path / "ckpt").glob("iter_*")) == ["iter_0000002", "iter_0000004"]
    assert "2 nodes alive" in job_log(tmp_path, job)


def test_one_node_fleet_colocated_on_the_trainer_node(tmp_path):
    """ROLLOUT_NODES=0 + COLOCATED_FLEET_GPUS: one Ray node on the trainer node offering only those GPUs."""
    job = submit_train(tmp_path, 1, 0, f"{PROBE} trainer.total_steps=2", SAVE_INTERVAL="2",
                       COLOCATED_FLEET_GPUS="1")
    wait_gone(job, 300)
    assert allocation_states(job) == ["COMPLETED"], job_log(tmp_path, job)
    r = json.loads((tmp_path / "ckpt" / "probe_runs.jsonl").read_text())
    # CUDA_VISIBLE_DEVICES=1 for the raylet: Ray offers exactly one GPU (declared; this host has none)
    assert r["world_size"] == 2 and r["ray_nodes"] == ["apo_rollout_node+apo_trainer_node:gpu=1"]


def test_usr1_checkpoints_requeues_and_resumes(tmp_path):
    job = submit_train(tmp_path, 1, 0, f"{PROBE} trainer.total_steps=20", SAVE_INTERVAL="1",
                       EXTRA_OVERRIDES="probe.step_seconds=0.3")
    wait_for(tmp_path / "ckpt" / "latest", 90, job)
    preempt(job)
    wait_gone(job, 300)
    log = job_log(tmp_path, job)
    assert allocation_states(job) == ["REQUEUED", "COMPLETED"], log
    first, second = [json.loads(x) for x in (tmp_path / "ckpt" / "probe_runs.jsonl").read_text().splitlines()]
    assert first["signal"] == "SIGUSR1" and first["restart_count"] == 0 and 0 < first["ended_at"] < 20
    assert second["restart_count"] == 1 and second["resumed_from"] == first["ended_at"] and second["ended_at"] == 20
    assert "got SIGUSR1" in log and "requeueing job" in log and "restart 1" in log


def test_eval_sbatch_fleet_over_two_nodes(tmp_path):
    """slurm/eval.sbatch: Ray over both nodes; the driver on the head gets the cluster's address and --engines."""
    probe = f"{PROBE} checkpoint.dir={tmp_path / 'ckpt'} trainer.total_steps=1"
    e = job_env(FLEET_GPUS_PER_NODE="0", RAY_HEAD_PORT="auto", RAY_PORT_BASE="auto",
                EVAL_CMD=probe, EXTRA_ARGS="")
    job = sbatch(REPO / "slurm" / "eval.sbatch", ["--account=root", "--partition=debug", "--gpus-per-node=0",
                                                  "--time=10", "--job-name=apo-test"], e, cwd=tmp_path)
    wait_gone(job, 300)
    assert allocation_states(job) == ["COMPLETED"], job_log(tmp_path, job)
    r = json.loads((tmp_path / "ckpt" / "probe_runs.jsonl").read_text())
    assert r["ray_nodes"] == ["apo_rollout_node:gpu=0", "apo_rollout_node:gpu=0"]
    # 2 CPU nodes offer no GPUs: one engine, passed to the driver as `--engines 1 --ray-address HOST:PORT`
    assert r["engines"] == "1" and "1 engine(s) of TP=2" in job_log(tmp_path, job)


def _train_cmd(tmp: Path, steps: int) -> str:
    cfg = tmp / "train.yaml"
    cfg.write_text("model:\n  config: tiny\n")
    return f"{sys.executable} -m megatron_apo.cli train --config {cfg} trainer.total_steps={steps}"


@pytest.mark.skipif(not trainer_is_built(), reason=NO_TRAINER)
def test_tiny_training_through_slurm_real_trainer(tmp_path):
    job = submit_train(tmp_path, 1, 0, _train_cmd(tmp_path, 4), SAVE_INTERVAL="2")
    wait_gone(job, 200)
    assert allocation_states(job) == ["COMPLETED"], job_log(tmp_path, job)
    assert (tmp_path / "ckpt" / "latest").read_text().strip() == "4"
    assert (tmp_path / "ckpt" / "iter_0000004").is_dir()


@pytest.mark.skipif(not trainer_is_built(), reason=NO_TRAINER)
def test_requeue_resumes_real_trainer(tmp_path):
    ckpt = tmp_path / "ckpt"
    job = submit_train(tmp_path, 1, 0, _train_cmd(tmp_path, 30), SAVE_INTERVAL="2")
    wait_for(ckpt / "iter_0000002", 150, job)
    time.sleep(1)
    first_save = (ckpt / "iter_0000002").stat().st_mtime_ns
    preempt(job)
    saved_at_signal = int((ckpt / "latest").read_text())
    wait_gone(job, 240)
    assert allocation_states(job) == ["REQUEUED", "COMPLETED"], job_log(tmp_path, job)
    assert saved_at_signal >= 2 and int((ckpt / "latest").read_text()) == 30
    # resumed, not restarted: a run from step 0 would have written iter_0000002 again
    assert (ckpt / "iter_0000002").stat().st_mtime_ns == first_save
