"""Megatron-Core DDP wrapping and optimizer construction (DistributedOptimizer when DP > 1)."""

from __future__ import annotations

import torch

from megatron_apo.config import OptimConfig

__all__ = ["OptimConfig", "build_optimizer", "wrap_ddp", "zero_grads"]  # OptimConfig: the one in config.py


def wrap_ddp(model: torch.nn.Module, use_distributed_optimizer: bool):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    ddp_cfg = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=use_distributed_optimizer,
    )
    from megatron.core.distributed import finalize_model_grads

    # the schedules call this after the last backward: DP grad all-reduce (or reduce-scatter with the
    # distributed optimizer), tied-embedding grads across pipeline stages, layernorm grads under SP.
    model.config.finalize_model_grads_func = finalize_model_grads
    return DistributedDataParallel(config=model.config, ddp_config=ddp_cfg, module=model)


def build_optimizer(model_chunks, cfg: OptimConfig):
    """`cfg`: an OptimConfig, e.g. the run config's `trainer` section (a TrainerSection is one)."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    params_dtype = model_chunks[0].config.params_dtype
    ocfg = OptimizerConfig(
        optimizer="adam",
        lr=cfg.lr,
        min_lr=cfg.min_lr,
        weight_decay=cfg.weight_decay,
        adam_beta1=cfg.adam_beta1,
        adam_beta2=cfg.adam_beta2,
        adam_eps=cfg.adam_eps,
        clip_grad=cfg.clip_grad,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        params_dtype=params_dtype,
        use_distributed_optimizer=cfg.use_distributed_optimizer,
    )
    return get_megatron_optimizer(ocfg, list(model_chunks))


def zero_grads(model_chunks, optimizer) -> None:
    for m in model_chunks:
        m.zero_grad_buffer()
    optimizer.zero_grad()
