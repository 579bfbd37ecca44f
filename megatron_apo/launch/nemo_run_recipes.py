"""NeMo-Run launch configs: the train / eval / convert / plan recipes and the executors that run them.

    import nemo_run as run
    from megatron_apo.launch import nemo_run_recipes as R

    recipe = R.train_recipe("configs/apo_qwen2.5_32b.yaml", tp=8, pp=2, checkpoint_dir="/shared/ckpt/apo32b")
    executor = R.slurm_executor(account="acct", partition="batch", nodes=4, gpus_per_node=8,
                                container_image="/shared/images/megatron-apo.sqsh", job_dir="/shared/nemo_run")
    R.launch(recipe, executor, name="apo-qwen2.5-32b")

Commands are `run.Script`s of `python -m megatron_apo.cli ...` (one process per rank: the executor's
ntasks_per_node; NeMo-Run's Slurm launcher runs it under srun, whose SLURM_PROCID/SLURM_NTASKS
`megatron_apo.parallel.init_distributed` maps to torch.distributed). The planner is a `run.Partial` of a pure
function. Multi-node RL with a separate vLLM fleet uses slurm/train_apo.sbatch (its Ray fleet lives on other
nodes); these recipes cover the trainer-only and single-allocation cases and everything that is one command.
"""

from __future__ import annotations

import os
import sys
from typing import Optional

import nemo_run as run

PYTHON = "python"


def _cli(args: list[str], env: Optional[dict[str, str]] = None, python: str = PYTHON) -> run.Script:
    return run.Script(path="megatron_apo.cli", args=[str(a) for a in args], entrypoint=python, m=True,
                      env=dict(env or {}))


def train_recipe(config: Optional[str], tp: int = 1, pp: int = 1, checkpoint_dir: Optional[str] = None,
                 save_interval: Optional[int] = None, total_steps: Optional[int] = None,
                 ray_address: Optional[str] = None, overrides: Optional[list[str]] = None,
                 python: str = PYTHON) -> run.Script:
    """`megatron-apo train --config CONFIG` with the launch-level overrides
    (the same keys slurm/train_apo.sbatch sets)."""
    args = ["train"] + (["--config", config] if config else []) + [
        f"parallel.tensor_model_parallel_size={tp}", f"parallel.pipeline_model_parallel_size={pp}"]
    if checkpoint_dir:
        args.append(f"checkpoint.dir={checkpoint_dir}")
    if save_interval:
        args.append(f"checkpoint.save_interval={save_interval}")
    if total_steps:
        args.append(f"trainer.total_steps={total_steps}")
    if ray_address:
        args.append(f"rollout.ray_address={ray_address}")
    return _cli(args + list(overrides or []), python=python)


def smoke_recipe(tp: int = 2, pp: int = 1, steps: int = 5, model: str = "tiny", python: str = PYTHON) -> run.Script:
    """The TP/PP language-model smoke training (spawns its own TP*PP local ranks: run it as ONE task)."""
    return _cli(["smoke", "--tp", tp, "--pp", pp, "--steps", steps, "--model", model], python=python)


def eval_recipe(model: str, data: str, out: str, samples: int = 16, engines: int = 0,
                ray_address: Optional[str] = None, extra_args: Optional[list[str]] = None,
                python: str = PYTHON) -> run.Script:
    """pass@k of a checkpoint over a verl parquet (`megatron-apo eval`); engines > 0: a Ray fleet of that many."""
    args = ["eval", "--model", model, "--data", data, "--out", out, "--n", samples, "--engines", engines]
    if ray_address:
        args += ["--ray-address", ray_address]
    return _cli(args + list(extra_args or []), python=python)


def convert_recipe(megatron_dir: str, out_dir: str, python: str = PYTHON) -> run.Script:
    """Megatron checkpoint -> Hugging Face folder (`megatron-apo convert megatron-to-hf`)."""
    return _cli(["convert", "megatron-to-hf", "--megatron", megatron_dir, "--out", out_dir], python=python)


def plan_report(model: str, gpus: int, gpu_memory_gib: float = 80.0, gpus_per_node: int = 8,
                seq_length: int = 4096, recompute: str = "none") -> str:
    """The planner's table (a pure function, so NeMo-Run can run it as a `run.Partial`)."""
    from megatron_apo.launch.planner import Cluster, Workload, format_plan, plan
    from megatron_apo.models import load_model_config

    text = format_plan(plan(load_model_config(model), Cluster(gpus, gpu_memory_gib, gpus_per_node),
                            Workload(seq_length=seq_length, recompute=recompute)))
    print(text, flush=True)
    return text


def plan_recipe(model: str, gpus: int, **kwargs) -> run.Partial:
    return run.Partial(plan_report, model=model, gpus=gpus, **kwargs)


def local_executor(ntasks_per_node: int = 1, env_vars: Optional[dict[str, str]] = None) -> run.LocalExecutor:
    """Runs on this machine; ntasks_per_node > 1 launches that many ranks with torchrun.

    This interpreter's bin directory goes first on PATH: NeMo-Run runs `python -m nemo_run...` for Partials.
    """
    env = {"PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")}
    env.update(env_vars or {})
    return run.LocalExecutor(ntasks_per_node=ntasks_per_node, launcher="torchrun" if ntasks_per_node > 1 else None,
                             env_vars=env)


def slurm_executor(account: str, partition: str, nodes: int = 1, gpus_per_node: Optional[int] = 8,
                   ntasks_per_node: Optional[int] = None, container_image: Optional[str] = None,
                   container_mounts: Optional[list[str]] = None, env_vars: Optional[dict[str, str]] = None,
                   time: str = "04:00:00", job_dir: Optional[str] = None, ssh_host: Optional[str] = None,
                   ssh_user: Optional[str] = None, packager: Optional[run.Packager] = None,
                   requeue_signal: Optional[str] = "USR1@120", **sbatch) -> run.SlurmExecutor:
    """A Slurm executor: one task per GPU by default; container_image needs pyxis (leave None without it).

    job_dir is where NeMo-Run keeps job scripts and logs; with no ssh_host it submits from this machine
    (LocalTunnel), and then job_dir must be `<NEMORUN_HOME>/experiments` (NeMo-Run looks for logs there).
    `requeue_signal`: the trainer checkpoints and exits on SIGUSR1 (see slurm/train_apo.sbatch).
    """
    job_dir = job_dir or os.path.join(run.config.get_nemorun_home(), "experiments")
    if ssh_host:
        tunnel = run.SSHTunnel(host=ssh_host, user=ssh_user or os.environ.get("USER", ""), job_dir=job_dir)
    else:
        tunnel = run.LocalTunnel(job_dir=job_dir)
    ex = run.SlurmExecutor(
        account=account, partition=partition, nodes=nodes,
        ntasks_per_node=ntasks_per_node or (gpus_per_node or 1),
        gpus_per_node=gpus_per_node or None, container_image=container_image,
        container_mounts=list(container_mounts or []), env_vars=dict(env_vars or {}), time=time, tunnel=tunnel,
        packager=packager or run.GitArchivePackager(), signal=requeue_signal, **sbatch,
    )
    return ex


def launch(recipe, executor, name: str, detach: bool = False, tail_logs: bool = False) -> dict[str, str]:
    """Runs one recipe as a NeMo-Run experiment; returns {task name: final status} (waits unless detach)."""
    with run.Experiment(name, log_level="WARN") as exp:
        exp.add(recipe, executor=executor, name=name, tail_logs=tail_logs)
        exp.run(sequential=True, detach=detach)
    # leaving the `with` block is where NeMo-Run waits for the jobs; their states are final now
    return {} if detach else {job.id: job.state.name for job in exp.jobs}


def job_logs(name: str, home: Optional[str] = None) -> str:
    """Concatenated task logs of the newest experiment called `name` (local and Slurm executors)."""
    import glob

    root = os.path.join(home or run.config.get_nemorun_home(), "experiments", name)
    runs = sorted(glob.glob(os.path.join(root, f"{name}_*")))
    if not runs:
        return ""
    files = sorted(glob.glob(os.path.join(runs[-1], "**", "*.out"), recursive=True)
                   + glob.glob(os.path.join(runs[-1], "**", "stdout.log"), recursive=True))
    return "".join(open(f, errors="replace").read() for f in files)
