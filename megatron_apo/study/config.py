"""The study config (`megatron-apo study --config configs/study_toy.yaml`): task, reference, methods x seeds.

```yaml
out_dir: runs/study_toy
task: {kind: toy_code, num_categories: 96, ...}   # or {kind: files, train: a.parquet, val: b.parquet,
                                                  #     tokenizer: ..., model: qwen2.5-7b}
reference: {sft_steps: 400, ...}                  # or {checkpoint: /path/to/megatron/ckpt} (no SFT)
rl: [trainer.total_steps=60, ...]                 # RunConfig overrides shared by every run
seeds: [1, 2, 3]
methods: {grpo: [algorithm.loss_mode=vanilla], apo: [algorithm.loss_mode=apo_ratio], ...}
reference_label: reference                        # the untrained reference, evaluated like a method
baseline: grpo                                    # differences in the table are taken against it
```
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from megatron_apo.config import ConfigError


@dataclass
class TaskSection:
    kind: str = "toy_code"  # toy_code (generated here) | files (existing parquet + tokenizer + model)
    num_categories: int = 96
    hard_fraction: float = 0.3
    easy_popular_mass: float = 0.6
    hard_popular_mass: float = 0.7
    seed: int = 0
    train: Optional[str] = None  # kind=files
    val: Optional[str] = None
    tokenizer: Optional[str] = None
    model: str = "tiny"  # model_configs name or path (kind=toy_code: its shape, with the task's vocabulary)


@dataclass
class ReferenceSection:
    checkpoint: Optional[str] = None  # an existing Megatron checkpoint (skips SFT)
    sft_steps: int = 400
    sft_per_category: int = 64  # demonstrations per category
    sft_batch_size: int = 128
    sft_lr: float = 3e-3
    seed: int = 7


@dataclass
class StudyConfig:
    out_dir: str = "runs/study"
    tp: int = 1  # trainer tensor parallel size of every run (local processes)
    task: TaskSection = field(default_factory=TaskSection)
    reference: ReferenceSection = field(default_factory=ReferenceSection)
    rl: list[str] = field(default_factory=list)
    seeds: list[int] = field(default_factory=lambda: [1, 2, 3])
    methods: dict[str, Optional[list[str]]] = field(default_factory=dict)  # name: overrides (null drops it)
    reference_label: str = "reference"
    baseline: str = "grpo"
    eval_n: int = 64
    bootstrap: int = 2000  # paired bootstrap resamples for the confidence bands
    run_timeout_s: float = 3600.0


def load_study_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> StudyConfig:
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    layers = [OmegaConf.structured(StudyConfig)]
    if path is not None:
        if not Path(path).is_file():
            raise ConfigError(f"study config file not found: {path}")
        layers.append(OmegaConf.load(path))
    try:
        if overrides:
            layers.append(OmegaConf.from_dotlist(list(overrides)))
        cfg: StudyConfig = OmegaConf.to_object(OmegaConf.merge(*layers))
    except (OmegaConfBaseException, ValueError) as e:  # yaml errors are ValueErrors
        raise ConfigError(f"{path}: {str(e).strip().splitlines()[0]}") from None
    cfg.methods = {k: list(v) for k, v in cfg.methods.items() if v is not None}
    if not cfg.methods:
        raise ConfigError(f"{path}: methods is empty; list at least one method (name: [overrides])")
    if cfg.baseline not in cfg.methods:
        raise ConfigError(f"{path}: baseline={cfg.baseline!r} is not one of the methods ({', '.join(cfg.methods)})")
    if cfg.reference_label in cfg.methods:
        raise ConfigError(f"{path}: reference_label={cfg.reference_label!r} clashes with a method name")
    if not cfg.seeds or len(set(cfg.seeds)) != len(cfg.seeds):
        raise ConfigError(f"{path}: seeds must be a non-empty list of distinct integers (got {cfg.seeds})")
    if cfg.task.kind not in ("toy_code", "files"):
        raise ConfigError(f"{path}: task.kind={cfg.task.kind!r}: must be toy_code or files")
    if cfg.task.kind == "files":
        missing = [k for k in ("train", "val", "tokenizer") if not getattr(cfg.task, k)]
        if missing or not cfg.reference.checkpoint:
            raise ConfigError(f"{path}: task.kind=files needs task.train, task.val, task.tokenizer and "
                              "reference.checkpoint")
    if cfg.eval_n < 1:
        raise ConfigError(f"{path}: eval_n={cfg.eval_n}: must be >= 1")
    return cfg


def as_dict(cfg: Any) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.structured(cfg))
