"""Run-config checks that need no torch: the CLI runs them before any process or process group starts."""

from __future__ import annotations

from pathlib import Path

from megatron_apo.algorithms.settings import validate_algorithm_config
from megatron_apo.config import RunConfig
from megatron_apo.dtypes import DTYPE_NAMES
from megatron_apo.models.config import ModelConfig, load_model_config

__all__ = ["DTYPE_NAMES", "validate_run_config"]  # DTYPE_NAMES re-exported: trainer/train.py imports it from here


def validate_run_config(cfg: RunConfig, world_size: int | None = None) -> ModelConfig:
    """Everything checkable before a process group starts; raises ValueError/FileNotFoundError (one line)."""
    p = cfg.parallel
    # the per-key checks first: a zero size would otherwise surface as "0 processes"
    p.validate(world_size if world_size is not None and world_size >= 1 else
               p.tensor_model_parallel_size * p.pipeline_model_parallel_size * p.expert_model_parallel_size)
    if world_size is not None and world_size < 1:
        raise ValueError(f"{world_size} processes: launch at least one (--nproc / WORLD_SIZE)")
    model_cfg = load_model_config(cfg.model.config)
    model_cfg.validate(p.tensor_model_parallel_size, p.pipeline_model_parallel_size, source=f"model {model_cfg.name}",
                       expert_parallel_size=p.expert_model_parallel_size)
    if cfg.model.moe_aux_loss_coeff < 0:
        raise ValueError(f"model.moe_aux_loss_coeff={cfg.model.moe_aux_loss_coeff} must be >= 0 (0 turns it off)")
    if cfg.model.moe_aux_loss_coeff > 0 and not model_cfg.is_moe:
        raise ValueError(f"model.moe_aux_loss_coeff={cfg.model.moe_aux_loss_coeff} needs a mixture-of-experts model "
                         f"({model_cfg.name} is dense); remove it")
    validate_algorithm_config(cfg.algorithm)
    if cfg.model.params_dtype not in DTYPE_NAMES:
        raise ValueError(f"model.params_dtype={cfg.model.params_dtype!r} is unknown; use one of {sorted(DTYPE_NAMES)}")
    if cfg.model.transformer_impl not in (None, "transformer_engine", "local"):
        raise ValueError(f"model.transformer_impl={cfg.model.transformer_impl!r} is unknown; use transformer_engine "
                         "or local (or leave it unset: transformer_engine with CUDA, local without)")
    if cfg.rollout.sync_dtype is not None and cfg.rollout.sync_dtype not in DTYPE_NAMES:
        raise ValueError(f"rollout.sync_dtype={cfg.rollout.sync_dtype!r} is unknown; use one of {sorted(DTYPE_NAMES)} "
                         "(or leave it unset: the engine's dtype)")
    for key in ("nccl_timeout_minutes", "control_timeout_minutes"):
        if getattr(cfg.parallel, key) < 1:
            raise ValueError(f"parallel.{key} must be >= 1 (minutes), got {getattr(cfg.parallel, key)}")
    if not cfg.data.train_files:
        raise ValueError("data.train_files is empty: give at least one verl-schema parquet file")
    for f in cfg.data.train_files:
        if not Path(f).is_file():
            raise FileNotFoundError(f"data.train_files: {f} does not exist")
    if cfg.data.tokenizer is None or not Path(cfg.data.tokenizer).exists():
        raise FileNotFoundError(f"data.tokenizer: {cfg.data.tokenizer!r} does not exist "
                                f"(an HF folder or a sentencepiece .model)")
    t = cfg.trainer
    for key in ("total_steps", "ppo_epochs", "micro_batch_size"):
        if getattr(t, key) < 1:
            raise ValueError(f"trainer.{key} must be >= 1, got {getattr(t, key)}")
    if cfg.data.train_batch_size < 1 or cfg.rollout.n < 1:
        raise ValueError("data.train_batch_size and rollout.n must be >= 1")
    if cfg.rollout.one_step_off_policy and cfg.rollout.tis_cap < 1.0:
        raise ValueError(f"rollout.tis_cap={cfg.rollout.tis_cap} must be >= 1 (it truncates pi_old / pi_rollout)")
    if t.lr_decay_style not in ("constant", "linear", "cosine"):
        raise ValueError(f"trainer.lr_decay_style={t.lr_decay_style!r}; use constant, linear or cosine")
    if cfg.checkpoint.load is not None and not Path(cfg.checkpoint.load).exists():
        raise FileNotFoundError(f"checkpoint.load: {cfg.checkpoint.load} does not exist")
    return model_cfg
