"""Run-config checks that need no torch: the CLI runs them before any process or process group starts."""

from __future__ import annotations

from pathlib import Path

from megatron_apo.config import ConfigError, MissingInputError, RunConfig
from megatron_apo.models.config import ModelConfig, load_model_config


def validate_run_config(cfg: RunConfig, world_size: int | None = None) -> ModelConfig:
    """Everything checkable before a process group starts; raises ConfigError / MissingInputError
    (one line; user errors, see config.UserError)."""
    p = cfg.parallel
    p.validate(world_size if world_size is not None else  # first: a size of 0 names its key, not "0 processes"
               p.tensor_model_parallel_size * p.pipeline_model_parallel_size * p.expert_model_parallel_size)
    if world_size is not None and world_size < 1:
        raise ConfigError(f"{world_size} processes: launch at least one (--nproc / WORLD_SIZE)")
    model_cfg = load_model_config(cfg.model.config)
    model_cfg.validate(p.tensor_model_parallel_size, p.pipeline_model_parallel_size, source=f"model {model_cfg.name}",
                       expert_parallel_size=p.expert_model_parallel_size)
    if cfg.model.moe_aux_loss_coeff > 0 and not model_cfg.is_moe:
        raise ConfigError(f"model.moe_aux_loss_coeff={cfg.model.moe_aux_loss_coeff} needs a mixture-of-experts model "
                          f"({model_cfg.name} is dense); remove it")
    if world_size is not None:  # each data-parallel rank trains an equal share of every RL step's samples
        dp = world_size // (p.tensor_model_parallel_size * p.pipeline_model_parallel_size)
        samples = cfg.data.train_batch_size * cfg.rollout.n
        if samples % dp:
            raise ConfigError(f"data.train_batch_size * rollout.n = {cfg.data.train_batch_size} * {cfg.rollout.n} = "
                              f"{samples} samples per step do not split over {dp} data-parallel ranks; make it a "
                              f"multiple of {dp}")
    cfg.validate()  # every section's choices and ranges (load_config ran it too; a config built in code may not)
    if not cfg.data.train_files:
        raise ConfigError("data.train_files is empty: give at least one verl-schema parquet file")
    for f in cfg.data.train_files:
        if not Path(f).is_file():
            raise MissingInputError(f"data.train_files: {f} does not exist")
    if cfg.data.tokenizer is None or not Path(cfg.data.tokenizer).exists():
        raise MissingInputError(f"data.tokenizer: {cfg.data.tokenizer!r} does not exist "
                                f"(an HF folder or a sentencepiece .model)")
    if cfg.checkpoint.load is not None and not Path(cfg.checkpoint.load).exists():
        raise MissingInputError(f"checkpoint.load: {cfg.checkpoint.load} does not exist")
    return model_cfg
