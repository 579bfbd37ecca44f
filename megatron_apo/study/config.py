"""The study config (`megatron-apo study --config configs/study_toy.yaml`): task, reference, methods x seeds.

```yaml
out_dir: runs/study_toy
task: {kind: toy_code, num_categories: 96, ...}   # or toy_squeeze (task B), or {kind: files, train: a.parquet,
                                                  #     val: b.parquet, tokenizer: ..., model: qwen2.5-7b}
                                                  # task.instances: [0, 1, 2]: the task redrawn per instance,
                                                  #     each with its own reference SFT (replicates = instances x seeds)
reference: {sft_steps: 400, ...}                  # or {checkpoint: /path/to/megatron/ckpt} (no SFT)
rl: [trainer.total_steps=60, ...]                 # RunConfig overrides shared by every run
seeds: [1, 2, 3]
methods: {grpo: [algorithm.loss_mode=vanilla], apo: [algorithm.loss_mode=apo_ratio], ...}
reference_label: reference                        # the untrained reference, evaluated like a method
baseline: grpo                                    # differences in the table are taken against it
eval_mode: exact                                  # exact pass@k (listed valid answers) | sampled (eval_n samples)
primary: [apo]                                    # compared with the baseline at alpha 0.05; the other methods are
                                                  #     secondary comparisons, Holm-corrected
```
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from megatron_apo.config import ConfigError


@dataclass
class TaskSection:
    kind: str = "toy_code"  # toy_code | toy_squeeze (generated here) | files (existing parquet + tokenizer + model)
    num_categories: int = 96
    hard_fraction: float = 0.3
    easy_popular_mass: float = 0.6
    hard_popular_mass: float = 0.7
    seed: int = 0
    train: Optional[str] = None  # kind=files
    val: Optional[str] = None
    tokenizer: Optional[str] = None
    model: str = "tiny"  # model_configs name or path (kind=toy_code: its shape, with the task's vocabulary)
    instances: Optional[list[int]] = None  # task seeds: the task is redrawn (and the reference SFT'd) per instance
    squeeze: dict[str, Any] = field(default_factory=dict)  # kind=toy_squeeze: SqueezeTaskConfig fields


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
    eval_mode: str = "sampled"  # sampled: eval_n samples per prompt | exact: p(valid) by teacher forcing (toy tasks)
    primary: list[str] = field(default_factory=list)  # primary comparisons with the baseline; the others: Holm
    endpoint_k: int = 16  # the k of the v2 endpoints (pass@k on hard prompts); at most eval_n (then eval_n)
    report_dir: Optional[str] = None  # where results.json / report.md / plots go (default out_dir): several configs
    # can share one out_dir (its task instances, references and finished runs) and report separately
    run_timeout_s: float = 3600.0


def load_study_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> StudyConfig:
    import yaml
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
    except (OmegaConfBaseException, ValueError, yaml.YAMLError) as e:  # e.g. an override's unquoted nested list
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
    if cfg.task.kind not in ("toy_code", "toy_squeeze", "files"):
        raise ConfigError(f"{path}: task.kind={cfg.task.kind!r}: must be toy_code, toy_squeeze or files")
    if cfg.task.instances is not None and (not cfg.task.instances
                                           or len(set(cfg.task.instances)) != len(cfg.task.instances)):
        raise ConfigError(f"{path}: task.instances must be null or a non-empty list of distinct task seeds "
                          f"(got {cfg.task.instances})")
    if cfg.task.kind == "files" and cfg.task.instances is not None:
        raise ConfigError(f"{path}: task.instances redraws a generated task; it does not apply to task.kind=files")
    if cfg.eval_mode not in ("sampled", "exact"):
        raise ConfigError(f"{path}: eval_mode={cfg.eval_mode!r}: must be sampled or exact")
    unknown = [m for m in cfg.primary if m not in cfg.methods or m == cfg.baseline]
    if unknown:
        raise ConfigError(f"{path}: primary lists {unknown}: each must be a method other than the baseline")
    if cfg.endpoint_k < 1:
        raise ConfigError(f"{path}: endpoint_k={cfg.endpoint_k}: must be >= 1")
    if cfg.task.kind == "files":
        missing = [k for k in ("train", "val", "tokenizer") if not getattr(cfg.task, k)]
        if missing or not cfg.reference.checkpoint:
            raise ConfigError(f"{path}: task.kind=files needs task.train, task.val, task.tokenizer and "
                              "reference.checkpoint")
    if cfg.eval_n < 1:
        raise ConfigError(f"{path}: eval_n={cfg.eval_n}: must be >= 1")
    return cfg


def endpoint_k(cfg: StudyConfig) -> int:
    """The k of the endpoints: endpoint_k, or eval_n when that is smaller (a quick study)."""
    return min(cfg.endpoint_k, cfg.eval_n)


def replicates(cfg: StudyConfig) -> list[tuple[Optional[int], int]]:
    """(task instance, seed) pairs, instance-major; instance None: the one task of task.seed (v1 layout)."""
    return [(i, s) for i in (cfg.task.instances or [None]) for s in cfg.seeds]


def report_dir(cfg: StudyConfig, out: Path) -> Path:
    """Where this config's outputs go: results.json, report.md, the plots and diagnostics.json (`report_dir`,
    default the study folder `out`); configs sharing one `out` keep their own."""
    return Path(cfg.report_dir) if cfg.report_dir else out


def replicate_name(instance: Optional[int], seed: int) -> str:
    return f"seed_{seed}" if instance is None else f"inst_{instance}_seed_{seed}"


def as_dict(cfg: Any) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.structured(cfg))
