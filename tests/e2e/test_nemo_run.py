"""NeMo-Run recipes: the tiny training with a LocalExecutor, and with a SlurmExecutor on the local Slurm cluster."""

import os
import subprocess
import sys

import pytest

run = pytest.importorskip("nemo_run", reason="nemo-run is in the dev and launch extras: pip install -e '.[dev]'")

from megatron_apo.launch import nemo_run_recipes as R  # noqa: E402
from tests.helpers.slurm_util import REPO, ensure_local_slurm  # noqa: E402

pytestmark = pytest.mark.slow  # every test here takes more than ~10 s on 2 cores

ENV = {"PYTHONPATH": str(REPO), "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]}


@pytest.fixture()
def nemorun_home(tmp_path, monkeypatch):
    """A fresh NEMORUN_HOME per test (NeMo-Run keeps experiment state there).

    NeMo-Run's shell commands (invoke) echo stdin to the child; pytest's captured stdin refuses reads, so give
    them an empty one, as a batch or CI shell has.
    """
    monkeypatch.setattr(sys, "stdin", open(os.devnull))
    old = run.config.get_nemorun_home()
    # NOT ".../nemo_run": without a container NeMo-Run rewrites every "/nemo_run" in the sbatch script
    run.config.set_nemorun_home(str(tmp_path / "nrhome"))
    yield tmp_path / "nrhome"
    run.config.set_nemorun_home(old)


def test_recipes_are_the_cli_commands():
    t = R.train_recipe("cfg.yaml", tp=8, pp=2, checkpoint_dir="/ck", save_interval=20, ray_address="h:6379",
                       overrides=["algorithm.apo_topk=16"])
    assert (t.entrypoint, t.m, t.path) == ("python", True, "megatron_apo.cli")
    assert t.args == ["train", "--config", "cfg.yaml", "parallel.tensor_model_parallel_size=8",
                      "parallel.pipeline_model_parallel_size=2", "checkpoint.dir=/ck", "checkpoint.save_interval=20",
                      "rollout.ray_address=h:6379", "algorithm.apo_topk=16"]
    e = R.eval_recipe("/hf", "/d.parquet", "/out", samples=8, engines=4, ray_address="h:6379")
    assert e.args == ["eval", "--model", "/hf", "--data", "/d.parquet", "--out", "/out", "--n", "8", "--engines", "4",
                      "--ray-address", "h:6379"]
    c = R.convert_recipe("/ck", "/hf")
    assert c.args == ["convert", "megatron-to-hf", "--megatron", "/ck", "--out", "/hf"]
    ex = R.slurm_executor(account="a", partition="p", nodes=4, gpus_per_node=8, container_image="img.sqsh",
                          env_vars={"NCCL_SOCKET_IFNAME": "ib0"}, job_dir="/tmp/jobs")
    assert (ex.nodes, ex.ntasks_per_node, ex.gpus_per_node, ex.container_image) == (4, 8, 8, "img.sqsh")
    assert ex.signal == "USR1@120" and ex.env_vars == {"NCCL_SOCKET_IFNAME": "ib0"}
    assert isinstance(ex.tunnel, run.LocalTunnel) and ex.tunnel.job_dir == "/tmp/jobs"


def test_local_executor_runs_smoke_training_and_planner(nemorun_home):
    status = R.launch(R.smoke_recipe(tp=2, steps=3, python=sys.executable), R.local_executor(env_vars=ENV),
                      name="smoke-local")
    assert status == {"smoke-local": "SUCCEEDED"}
    assert "(falling)" in R.job_logs("smoke-local")
    status = R.launch(R.plan_recipe("qwen2.5-7b", 8), R.local_executor(env_vars=ENV), name="plan-local")
    assert status == {"plan-local": "SUCCEEDED"}
    assert "recommended: trainer TP=2 PP=1 DP=2 on 4 GPUs" in R.job_logs("plan-local")


@pytest.mark.slurm
def test_slurm_executor_runs_smoke_training_on_local_slurm(nemorun_home):
    ensure_local_slurm()
    # no pyxis here: no container_image; run.Packager() runs the code where it is (no git archive to unpack)
    ex = R.slurm_executor(account="root", partition="debug", nodes=1, gpus_per_node=None, ntasks_per_node=1,
                          env_vars=ENV, time="00:10:00", packager=run.Packager())
    status = R.launch(R.smoke_recipe(tp=2, steps=3, python=sys.executable), ex, name="smoke-slurm")
    assert status == {"smoke-slurm": "SUCCEEDED"}, R.job_logs("smoke-slurm")
    assert "(falling)" in R.job_logs("smoke-slurm")
    jobs = subprocess.run(["sacct", "-n", "-X", "-P", "--name", "root-root.smoke-slurm", "-o", "State"],
                          capture_output=True, text=True, timeout=30).stdout.split()
    assert jobs and jobs[-1] == "COMPLETED"


def test_local_executor_runs_tiny_training(nemorun_home, tmp_path):
    """`megatron-apo train` on the toy task, two ranks under NeMo-Run's torchrun launcher."""
    from omegaconf import OmegaConf

    from tests.helpers.rl_setup import overrides, toy_env

    ov = [o for o in overrides(toy_env(tmp_path / "toy"), tmp_path / "out", steps=1) if not o.startswith("parallel.")]
    # a config file rather than list-valued overrides on the command line (torchx re-quotes "[...]" arguments)
    cfg = tmp_path / "train.yaml"
    OmegaConf.save(OmegaConf.from_dotlist(ov), cfg)
    recipe = R.train_recipe(str(cfg), tp=2, checkpoint_dir=str(tmp_path / "ckpt"), python=sys.executable)
    assert R.launch(recipe, R.local_executor(ntasks_per_node=2, env_vars=ENV), name="train-local") == {
        "train-local": "SUCCEEDED"}, R.job_logs("train-local")
    assert (tmp_path / "ckpt" / "latest").read_text().strip() == "1"
