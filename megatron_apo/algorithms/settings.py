"""Validation of the loss/advantage settings (`AlgorithmConfig`), shared by the losses and advantages.

Accepts an `AlgorithmConfig` or a plain mapping with the same key names (the official APO repository's);
every bad key or value raises one `ConfigError` (a `ValueError`) whose message names `algorithm.<key>`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

from megatron_apo.config import (
    AdvCalibration,
    AdvStdScope,
    AlgorithmConfig,
    ApoPullForm,
    ApoPullWeight,
    ApoRectification,
    ConfigError,
    KlLossType,
    LossAggMode,
)

# the valid values of the choice fields: the Enums of config.py
LOSS_AGG_MODES = tuple(m.value for m in LossAggMode)
APO_RECTIFICATIONS = tuple(m.value for m in ApoRectification)
APO_PULL_FORMS = tuple(m.value for m in ApoPullForm)
APO_PULL_WEIGHTS = tuple(m.value for m in ApoPullWeight)
ADV_CALIBRATIONS = tuple(m.value for m in AdvCalibration)
ADV_STD_SCOPES = tuple(m.value for m in AdvStdScope)
# kl_loss_type's names (config.KlLossType) -> the estimator each stands for
KL_LOSS_TYPES = {"kl": "k1", "k1": "k1", "abs": "abs", "mse": "k2", "k2": "k2", "low_var_kl": "k3", "k3": "k3"}
assert set(KL_LOSS_TYPES) == {m.value for m in KlLossType}


BUILTIN_LOSS_MODES = ("vanilla", "apo_ratio", "casp")  # registered by losses.py when it is imported


def registered_loss_modes() -> tuple[str, ...]:
    """The loss modes of the registry in `losses.py`. A mode registered elsewhere imports `losses` first, so
    while `losses` is not loaded only the built-ins exist (and validation need not import torch)."""
    import sys

    losses = sys.modules.get("megatron_apo.algorithms.losses")
    return tuple(losses.POLICY_LOSS_REGISTRY) if losses is not None else BUILTIN_LOSS_MODES


def resolve_algorithm_config(config: Any) -> AlgorithmConfig:
    """An `AlgorithmConfig` (validated) from a dataclass instance or a mapping of its keys."""
    if isinstance(config, AlgorithmConfig):
        cfg = config
    elif isinstance(config, Mapping):
        known = {f.name for f in dataclasses.fields(AlgorithmConfig)}
        unknown = sorted(set(config) - known)
        if unknown:
            raise ConfigError(f"algorithm.{unknown[0]}: unknown key; valid keys: {', '.join(sorted(known))}")
        cfg = AlgorithmConfig(**dict(config))
    elif dataclasses.is_dataclass(config):
        cfg = resolve_algorithm_config(dataclasses.asdict(config))
    else:
        raise ConfigError(f"algorithm config must be an AlgorithmConfig or a mapping (got {type(config).__name__})")
    validate_algorithm_config(cfg)
    return cfg


def validate_algorithm_config(cfg: AlgorithmConfig) -> None:
    """Raises ConfigError naming the first bad key."""

    def bad(key: str, why: str) -> None:
        raise ConfigError(f"algorithm.{key}={getattr(cfg, key)!r}: {why}")

    def choice(key: str, options) -> None:
        if getattr(cfg, key) not in options:
            bad(key, f"must be one of {', '.join(options)}")

    def number(key: str, lo: float | None = None, hi: float | None = None, lo_open=False, hi_open=False) -> float:
        v = getattr(cfg, key)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            bad(key, "must be a finite number")
        if lo is not None and (v <= lo if lo_open else v < lo):
            bad(key, f"must be {'>' if lo_open else '>='} {lo}")
        if hi is not None and (v >= hi if hi_open else v > hi):
            bad(key, f"must be {'<' if hi_open else '<='} {hi}")
        return v

    def positive_int(key: str) -> None:
        v = getattr(cfg, key)
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            bad(key, "must be a positive integer")

    def boolean(key: str) -> None:
        if not isinstance(getattr(cfg, key), bool):
            bad(key, "must be true or false")

    choice("loss_mode", registered_loss_modes())
    choice("loss_agg_mode", LOSS_AGG_MODES)
    number("clip_ratio_low", 0.0, 1.0, hi_open=True)
    number("clip_ratio_high", 0.0)
    number("clip_ratio_c", 1.0, lo_open=True)
    number("entropy_coeff")
    number("apo_push_coeff", 0.0)
    number("apo_pull_coeff", 0.0)
    positive_int("apo_topk")
    boolean("apo_exclude_sampled")
    choice("apo_rectification", APO_RECTIFICATIONS)
    choice("apo_pull_form", APO_PULL_FORMS)
    choice("apo_pull_weight", APO_PULL_WEIGHTS)
    boolean("use_kl_loss")
    boolean("use_kl_loss_on_wrong")
    number("kl_loss_coef", 0.0)
    choice("kl_loss_type", tuple(KL_LOSS_TYPES))
    positive_int("casp_topn")
    number("casp_alpha", 0.0, 1.0)
    number("casp_top1_gamma", 0.0)
    number("casp_entropy_quantile", 0.0, 1.0)
    boolean("anchor_metrics")
    boolean("norm_adv_by_std")
    choice("adv_std_scope", ADV_STD_SCOPES)
    choice("adv_calibration", ADV_CALIBRATIONS)
    number("calib_alpha", 0.0)
    boolean("adv_calibration_memory")
    number("calib_memory_gamma", 0.0, 1.0)
    positive_int("calib_memory_ngram")
    number("calib_memory_similarity", 0.0, 1.0)
    positive_int("calib_memory_max_per_prompt")
    positive_int("logprob_chunk_size")
