"""RL algorithms on vocab-sharded logits: policy losses (vanilla PPO/GRPO, APO, CaSP, KL) and advantages."""

from megatron_apo.algorithms.settings import resolve_algorithm_config, validate_algorithm_config

_LAZY = {
    "AnswerMemory": "advantages", "broadcast_to_tokens": "advantages", "compute_advantages": "advantages",
    "grpo_advantages": "advantages", "inverse_success_weights": "advantages",
    "aggregate_loss": "losses", "compute_policy_loss": "losses", "kl_penalty": "losses",
}


def __getattr__(name):
    # losses/advantages import torch; loading them on first use keeps config validation (CLI) fast.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"megatron_apo.algorithms.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'megatron_apo.algorithms' has no attribute {name!r}")


__all__ = [
    "AnswerMemory", "aggregate_loss", "broadcast_to_tokens", "compute_advantages", "compute_policy_loss",
    "grpo_advantages", "inverse_success_weights", "kl_penalty", "resolve_algorithm_config", "validate_algorithm_config",
]
