"""What a resume may not change silently: the run config is stored in each checkpoint and compared on resume.

A checkpoint's `megatron_apo.json` holds the run config (`run_config`, as JSON) and the SHA-256 fingerprint of its
guarded part (`config_fingerprint`): the algorithm section, the optimizer and schedule settings, `rollout.n` and
`data.train_batch_size`. Resuming with another value of any of them continues a different experiment from the
saved state, so it is refused with the changed keys named, unless `checkpoint.allow_config_change=true`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from enum import Enum

from megatron_apo.config import ConfigError, OptimConfig, RunConfig

# trainer.* keys besides OptimConfig's (lr, min_lr, weight_decay, adam_*, clip_grad, use_distributed_optimizer)
_TRAINER_KEYS = ("ppo_epochs", "ppo_mini_batch_size", "lr_warmup_steps", "lr_decay_style", "total_steps")
_OTHER_KEYS = (("rollout", "n"), ("data", "train_batch_size"))


def _plain(v):
    if isinstance(v, Enum):
        return v.value
    if dataclasses.is_dataclass(v):
        return {f.name: _plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    return v


def run_config_dict(cfg: RunConfig) -> dict:
    """The whole run config as JSON-able data (stored in each checkpoint for the record)."""
    return _plain(cfg)


def guarded_config(cfg: RunConfig) -> dict:
    """{dotted key: value} of the settings a resume must keep (total_steps excepted: extending a run is fine)."""
    out = {f"algorithm.{k}": v for k, v in _plain(cfg.algorithm).items()}
    out.update({f"trainer.{f.name}": _plain(getattr(cfg.trainer, f.name)) for f in dataclasses.fields(OptimConfig)})
    out.update({f"trainer.{k}": _plain(getattr(cfg.trainer, k)) for k in _TRAINER_KEYS if k != "total_steps"})
    out.update({f"{s}.{k}": _plain(getattr(getattr(cfg, s), k)) for s, k in _OTHER_KEYS})
    return out


def fingerprint(guarded: dict) -> str:
    return hashlib.sha256(json.dumps(guarded, sort_keys=True, default=str).encode()).hexdigest()


def checkpoint_record(cfg: RunConfig) -> dict:
    """The keys a training checkpoint's metadata gets: the run config, its guarded part and that part's hash."""
    guarded = guarded_config(cfg)
    return {"run_config": run_config_dict(cfg), "guarded_config": guarded, "config_fingerprint": fingerprint(guarded)}


def config_changes(meta: dict, cfg: RunConfig) -> list[str]:
    """'key: saved -> now' for each guarded setting that differs from the checkpoint's ([] for an old checkpoint
    that stored none)."""
    saved = meta.get("guarded_config")
    if not isinstance(saved, dict):
        return []
    now = guarded_config(cfg)
    if meta.get("config_fingerprint") == fingerprint(now):
        return []
    return [f"{k}: {saved.get(k, '(unset)')!r} -> {now.get(k, '(unset)')!r}"
            for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)]


def check_resume_config(meta: dict, cfg: RunConfig, where: str, log=None) -> list[str]:
    """Raises ConfigError (one line, the changes named) when the run config differs from the checkpoint's in a
    guarded setting, unless checkpoint.allow_config_change; with it, logs the changes. Returns them."""
    changes = config_changes(meta, cfg)
    if not changes:
        return []
    what = "; ".join(changes)
    if not cfg.checkpoint.allow_config_change:
        raise ConfigError(f"resuming from {where} with a changed config ({what}); restore those settings, train "
                          "in a new out_dir, or set checkpoint.allow_config_change=true to continue with them")
    if log is not None:
        log.warning("checkpoint: resuming from %s with a changed config (checkpoint.allow_config_change=true): %s",
                    where, what)
    return changes
