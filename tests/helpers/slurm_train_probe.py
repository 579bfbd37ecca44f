"""A stand-in trainer for the Slurm plumbing tests: it obeys `megatron-apo train`'s launch contract and nothing more.

    python tests/helpers/slurm_train_probe.py [key=value ...]   (one process per rank, under srun or torchrun)

Contract exercised: rank/world from the srun environment through `megatron_apo.parallel.init_distributed`
(a real gloo group: an all-reduce of the ranks), the `parallel.*`, `checkpoint.dir`, `checkpoint.save_interval`,
`trainer.total_steps`, `rollout.ray_address` overrides, `iter_XXXXXXX/` checkpoints with a `latest` file,
automatic resume, and on SIGUSR1/SIGTERM: save a checkpoint and exit 0. Each run appends one JSON line to
`<checkpoint.dir>/probe_runs.jsonl` (rank 0) so the tests can see what every (re)start did.
It is NOT the trainer; the real-trainer tests in tests/e2e/test_slurm.py run `megatron-apo train` once it exists.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path


def parse_overrides(argv: list[str]) -> dict[str, str]:
    """key=value overrides; `--ray-address ADDR` and `--engines N` (as `megatron-apo eval` takes them) too."""
    out = {}
    args = iter(argv)
    for a in args:
        if a in ("--ray-address", "--engines"):
            out["rollout.ray_address" if a == "--ray-address" else "eval.engines"] = next(args)
        elif "=" in a:
            k, v = a.split("=", 1)
            out[k] = v
        else:
            raise SystemExit(f"probe: expected key=value, got {a!r}")
    return out


def latest_iteration(ckpt: Path) -> int:
    f = ckpt / "latest"
    return int(f.read_text().strip()) if f.is_file() else 0


def save(ckpt: Path, step: int) -> None:
    d = ckpt / f"iter_{step:07d}"
    d.mkdir(parents=True, exist_ok=True)
    (d / "state.json").write_text(json.dumps({"step": step}))
    tmp = ckpt / "latest.tmp"
    tmp.write_text(str(step))
    tmp.replace(ckpt / "latest")  # atomic: a preempted save never leaves a torn `latest`


def main() -> int:
    import torch
    import torch.distributed as dist

    from megatron_apo.parallel import ParallelConfig, init_distributed

    o = parse_overrides(sys.argv[1:])
    tp = int(o.get("parallel.tensor_model_parallel_size", 1))
    pp = int(o.get("parallel.pipeline_model_parallel_size", 1))
    ckpt = Path(o["checkpoint.dir"])
    interval = int(o.get("checkpoint.save_interval", 1))
    total = int(o.get("trainer.total_steps", 5))
    step_seconds = float(o.get("probe.step_seconds", 0.2))
    stop = {"signal": None}

    def on_signal(signum, _frame):
        stop["signal"] = signal.Signals(signum).name

    signal.signal(signal.SIGUSR1, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    init_distributed(ParallelConfig(tp, pp), backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    rank_sum = torch.tensor(float(rank))
    dist.all_reduce(rank_sum)

    ray_nodes = None
    if o.get("rollout.ray_address") not in (None, "None", "") and rank == 0:
        import ray

        ray.init(address=o["rollout.ray_address"], logging_level="ERROR", log_to_driver=False)
        # one entry per node: its megatron-apo role resources ("apo_rollout_node", "apo_trainer_node") and GPUs
        ray_nodes = sorted(
            "+".join(sorted(k for k in n["Resources"] if k.startswith("apo_")))
            + f":gpu={n['Resources'].get('GPU', 0):g}"
            for n in ray.nodes() if n.get("Alive")
        )
        ray.shutdown()

    start = latest_iteration(ckpt)
    step = start
    while step < total:
        time.sleep(step_seconds)
        step += 1
        # every rank must agree to stop at the same step: max-reduce the "signal seen" flag
        flag = torch.tensor(1.0 if stop["signal"] else 0.0)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if rank == 0 and (step % interval == 0 or step == total or flag.item() > 0):
            save(ckpt, step)
        if flag.item() > 0:
            break
    dist.barrier()
    if rank == 0:
        with open(ckpt / "probe_runs.jsonl", "a") as f:
            f.write(json.dumps({
                "world_size": world, "rank_sum": rank_sum.item(), "tp": tp, "pp": pp, "resumed_from": start,
                "ended_at": step, "signal": stop["signal"], "ray_nodes": ray_nodes, "engines": o.get("eval.engines"),
                "restart_count": int(os.environ.get("SLURM_RESTART_COUNT", 0)),
                "master_addr": os.environ.get("MASTER_ADDR"), "job_id": os.environ.get("SLURM_JOB_ID"),
            }) + "\n")
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
