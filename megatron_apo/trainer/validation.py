"""Run-config checks that need no torch: the CLI runs them before any process or process group starts."""

from __future__ import annotations

import os
from pathlib import Path

from megatron_apo.algorithms.registry import check_loss_mode, import_loss_modules
from megatron_apo.config import ConfigError, MissingInputError, RunConfig
from megatron_apo.models.config import ModelConfig, load_model_config


def validate_run_config(cfg: RunConfig, world_size: int | None = None) -> ModelConfig:
    """Everything checkable before a process group starts; raises ConfigError / MissingInputError
    (one line; user errors, see config.UserError). The CLI and every rank (trainer/train.py) run it, so the
    modules of `algorithm.loss_modules` are imported in each process before the loss mode is checked."""
    import_loss_modules(cfg.algorithm)
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
    if cfg.rollout.routing_replay and not model_cfg.is_moe:
        raise ConfigError(f"rollout.routing_replay needs a mixture-of-experts model ({model_cfg.name} is dense); "
                          "remove it")
    if cfg.rollout.routing_replay and cfg.trainer.recompute == "full" and p.pipeline_model_parallel_size > 1:
        # a recomputing backward re-runs a router after later micro-batches' forwards set their routes
        raise ConfigError("rollout.routing_replay with trainer.recompute=full needs pipeline_model_parallel_size 1; "
                          "turn one of them off")
    if world_size is not None:  # each data-parallel rank trains an equal share of every RL step's samples
        dp = world_size // (p.tensor_model_parallel_size * p.pipeline_model_parallel_size)
        samples = cfg.data.train_batch_size * cfg.rollout.n
        if samples % dp:
            raise ConfigError(f"data.train_batch_size * rollout.n = {cfg.data.train_batch_size} * {cfg.rollout.n} = "
                              f"{samples} samples per step do not split over {dp} data-parallel ranks; make it a "
                              f"multiple of {dp}")
    cfg.validate()  # every section's choices and ranges (load_config ran it too; a config built in code may not)
    check_loss_mode(cfg.algorithm)  # the registry owns the names: built-ins and those of algorithm.loss_modules
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
    for key, path in (("out_dir", cfg.out_dir), ("checkpoint.dir", cfg.checkpoint.dir)):
        if path is not None:
            check_path_fits(key, path)
    check_tokenizer_fits(cfg.data.tokenizer, model_cfg)
    return model_cfg


def check_path_fits(key: str, path: str | Path) -> None:
    """Every component of `path` within the filesystem's name limit (NAME_MAX, 255 bytes on most), the whole
    within PATH_MAX: found here instead of as an OSError when the run first writes there."""
    path = Path(path).expanduser().absolute()
    existing = next((p for p in path.parents if _exists(p)), Path("/"))
    name_max, path_max = _pathconf(existing, "PC_NAME_MAX", 255), _pathconf(existing, "PC_PATH_MAX", 4096)
    for part in path.parts:
        if len(os.fsencode(part)) > name_max:
            raise ConfigError(f"{key}: the path component {part[:40]!r}... is {len(os.fsencode(part))} bytes, more "
                              f"than the filesystem allows ({name_max}); choose a shorter {key}")
    # the deepest file the run writes is about 100 bytes below out_dir (checkpoints/iter_XXXXXXX/model/...)
    if len(os.fsencode(str(path))) + 100 > path_max:
        raise ConfigError(f"{key}: {str(path)[:60]!r}... is {len(os.fsencode(str(path)))} bytes; with the files the "
                          f"run writes below it that exceeds the filesystem's {path_max}; choose a shorter {key}")


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except OSError:  # ENAMETOOLONG: a component too long is what we are checking
        return False


def _pathconf(path: Path, name: str, default: int) -> int:
    try:
        return os.pathconf(path, name)
    except (OSError, ValueError):
        return default


def check_tokenizer_fits(tokenizer_path: str | None, model_cfg: ModelConfig) -> None:
    """A tokenizer with more ids than the model's vocab_size would index past the embedding inside the engines."""
    from megatron_apo.data.tokenizer import load_tokenizer

    try:
        size = load_tokenizer(tokenizer_path).vocab_size
    except Exception:  # noqa: BLE001 - a tokenizer that does not load is preflight's one-line error (data.tokenizer)
        return
    if size > model_cfg.vocab_size:
        raise ConfigError(f"data.tokenizer: {tokenizer_path} has {size} tokens but model {model_cfg.name} has "
                          f"vocab_size={model_cfg.vocab_size}; use the model's own tokenizer or a model config "
                          f"with vocab_size >= {size}")
