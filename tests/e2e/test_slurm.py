"""slurm/train_apo.sbatch on a real local Slurm cluster (scripts/slurm_local.sh: 2 nodes on this host).

The Ray-fleet plumbing tests run tests/helpers/slurm_train_probe.py, a light stand-in that obeys `megatron-apo train`'s
launch contract (srun ranks -> torch.distributed, the Ray fleet address, checkpoints with `latest`); the
`*_real_trainer` tests run `megatron-apo train` itself: the tiny RL training, and SIGUSR1 -> checkpoint ->
requeue -> resume.
"""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers.slurm_util import (
    REPO,
    TRAIN_SBATCH,
    ensure_local_slurm,
    job_env,
    sacct_states,
    sbatch,
    squeue_state,
    wait_gone,
)

pytestmark = pytest.mark.slurm
PROBE = f"{sys.executable} {REPO / 'tests' / 'helpers' / 'slurm_train_probe.py'}"


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
    """`megatron-apo train` on the toy task (tests/helpers/rl_setup.py); the sbatch appends TP/PP/checkpoint keys."""
    from tests.helpers.rl_setup import overrides, toy_env

    env = toy_env(tmp / "toy")
    ov = [o for o in overrides(env, tmp / "out", steps=steps) if not o.startswith("parallel.")]
    return f"{sys.executable} -m megatron_apo.cli train " + " ".join(ov + ["checkpoint.keep_last=0"])


def _metric_steps(tmp: Path) -> list[int]:
    return [json.loads(x)["step"] for x in (tmp / "out" / "metrics.jsonl").read_text().splitlines() if x.strip()]


def test_tiny_training_through_slurm_real_trainer(tmp_path):
    job = submit_train(tmp_path, 1, 0, _train_cmd(tmp_path, 2), SAVE_INTERVAL="1")
    wait_gone(job, 400)
    assert allocation_states(job) == ["COMPLETED"], job_log(tmp_path, job)
    assert (tmp_path / "ckpt" / "latest").read_text().strip() == "2"
    assert (tmp_path / "ckpt" / "iter_0000002").is_dir() and _metric_steps(tmp_path) == [1, 2]


def test_requeue_resumes_real_trainer(tmp_path):
    ckpt = tmp_path / "ckpt"
    job = submit_train(tmp_path, 1, 0, _train_cmd(tmp_path, 4), SAVE_INTERVAL="1")
    wait_for(ckpt / "latest", 400, job)
    preempt(job)
    wait_gone(job, 500)
    log = job_log(tmp_path, job)
    assert allocation_states(job) == ["REQUEUED", "COMPLETED"], log
    assert "got SIGUSR1" in log and "restart 1" in log
    assert int((ckpt / "latest").read_text()) == 4
    # resumed, not restarted: every step was trained exactly once across the two runs
    assert _metric_steps(tmp_path) == [1, 2, 3, 4], log
