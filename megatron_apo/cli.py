"""`megatron-apo` command line: parses arguments and calls into the package; no logic lives here."""

from __future__ import annotations

import argparse
import sys

NOT_BUILT = {
    "train": "RL training (`megatron-apo train --config FILE key=value ...`) is not built yet: see the trainer issue.",
    "eval": "pass@k evaluation (`megatron-apo eval`) is not built yet: see the rewards/eval issue.",
    "convert": "HF <-> Megatron conversion (`megatron-apo convert`) is not built yet: see the conversion issue.",
    "demo": "the end-to-end APO vs GRPO demo is not built yet: see the trainer issue. `megatron-apo smoke` runs a TP=2 training.",
}


def _add_smoke(sub) -> None:
    p = sub.add_parser("smoke", help="TP/PP language-model smoke training of the tiny model on local processes")
    p.add_argument("--tp", type=int, default=2, help="tensor parallel size (default 2)")
    p.add_argument("--pp", type=int, default=1, help="pipeline parallel size (default 1)")
    p.add_argument("--dp", type=int, default=1, help="data parallel size (default 1)")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--model", default="tiny", help="model_configs/<name>.yaml or a path")
    p.set_defaults(func=_run_smoke)


def _run_smoke(args) -> int:
    from megatron_apo.models import load_model_config
    from megatron_apo.parallel import run_distributed
    from megatron_apo.trainer.smoke import smoke_train

    load_model_config(args.model).validate(args.tp, args.pp)  # fail fast, before any process starts
    world = args.tp * args.pp * args.dp
    losses = run_distributed(smoke_train, world, tp=args.tp, pp=args.pp, steps=args.steps, model=args.model,
                             timeout=60 + 10 * args.steps)[0]
    k = max(1, len(losses) // 5)
    first, last = sum(losses[:k]) / k, sum(losses[-k:]) / k
    print(f"smoke: TP={args.tp} PP={args.pp} DP={args.dp}: loss {first:.3f} -> {last:.3f} "
          f"({'falling' if last < first else 'NOT falling'})")
    return 0 if last < first else 1


def _add_plan(sub) -> None:
    p = sub.add_parser("plan", help="recommend TP/PP/DP and trainer/fleet GPU split for a model and cluster")
    p.add_argument("--model", required=True, help="model_configs/<name>.yaml or a path (e.g. qwen2.5-32b)")
    p.add_argument("--gpus", type=int, required=True, help="total GPUs (trainer + fleet)")
    p.add_argument("--gpu-memory", type=float, default=80.0, help="GiB per GPU (default 80)")
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--gpu-name", default="H100")
    p.add_argument("--seq-length", type=int, default=4096, help="prompt + response tokens (default 4096)")
    p.add_argument("--micro-batch-size", type=int, default=1)
    p.add_argument("--num-micro-batches", type=int, default=8)
    p.add_argument("--recompute", choices=["none", "full"], default="none")
    p.add_argument("--no-reference", action="store_true", help="no frozen reference model (e.g. plain GRPO)")
    p.add_argument("--reference-offload", action="store_true", help="reference weights live on the host")
    p.add_argument("--vllm-gpu-memory-utilization", type=float, default=0.85)
    p.add_argument("--fleet-gpus", type=int, default=None, help="GPUs for the vLLM fleet (default: a third)")
    p.add_argument("--fleet-fraction", type=float, default=1 / 3)
    p.add_argument("--all", action="store_true", help="show every layout tried, not only the plausible ones")
    p.set_defaults(func=_run_plan)


def _run_plan(args) -> int:
    from megatron_apo.launch.planner import Cluster, Workload, format_plan, plan
    from megatron_apo.models import load_model_config

    cfg = load_model_config(args.model)
    cluster = Cluster(num_gpus=args.gpus, gpu_memory_gib=args.gpu_memory, gpus_per_node=args.gpus_per_node,
                      gpu_name=args.gpu_name)
    workload = Workload(seq_length=args.seq_length, micro_batch_size=args.micro_batch_size,
                        num_micro_batches=args.num_micro_batches, recompute=args.recompute,
                        reference_model=not args.no_reference, reference_offload=args.reference_offload,
                        vllm_gpu_memory_utilization=args.vllm_gpu_memory_utilization)
    result = plan(cfg, cluster, workload, fleet_fraction=args.fleet_fraction, fleet_gpus=args.fleet_gpus)
    print(format_plan(result, show_all=args.all))
    return 0 if result.recommended and result.fleet else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="megatron-apo",
        description="Anchored Policy Optimization (APO) and RLVR baselines on Megatron-Core.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, helptext in [
        ("train", "RL training (APO, GRPO, KL, CaSP) with torchrun/srun"),
        ("eval", "pass@k evaluation of a checkpoint with the rollout fleet"),
        ("convert", "checkpoint conversion Hugging Face <-> Megatron, any TP/PP"),
        ("demo", "the embedded CPU demo: APO vs GRPO on a toy task, pass@k table and plot"),
    ]:
        p = sub.add_parser(name, help=helptext + (" [not built yet]" if name in NOT_BUILT else ""))
        p.add_argument("rest", nargs=argparse.REMAINDER)
        p.set_defaults(func=_not_built(name))
    _add_smoke(sub)
    _add_plan(sub)
    return parser


def _not_built(name: str):
    def run(_args) -> int:
        print(f"megatron-apo {name}: {NOT_BUILT[name]}", file=sys.stderr)
        return 2

    return run


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as e:
        # Config and input errors are one line naming the key/path; no traceback.
        print(f"megatron-apo {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
