"""Megatron-Core DDP wrapping and optimizer construction (DistributedOptimizer when DP > 1)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class OptimConfig:
    lr: float = 1e-6
    min_lr: float = 0.0
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    use_distributed_optimizer: bool = True


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
