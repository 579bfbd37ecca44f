"""RL algorithms on vocab-sharded logits: the loss registry (`registry.py`, torch-free), the policy losses (`losses/`:
vanilla PPO/GRPO, APO, CaSP, KL) and the advantages (`advantages.py`)."""

from megatron_apo.algorithms.registry import (
    LossInputs,
    register_policy_loss,
    resolve_algorithm_config,
)

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
    "AnswerMemory", "LossInputs", "aggregate_loss", "broadcast_to_tokens", "compute_advantages", "compute_policy_loss",
    "grpo_advantages", "inverse_success_weights", "kl_penalty", "register_policy_loss", "resolve_algorithm_config",
]
