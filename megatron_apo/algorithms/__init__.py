"""RL algorithms on vocab-sharded logits: policy losses (vanilla PPO/GRPO, APO, CaSP, KL) and advantages."""

from megatron_apo.algorithms.advantages import (
    AnswerMemory,
    broadcast_to_tokens,
    compute_advantages,
    grpo_advantages,
    inverse_success_weights,
)
from megatron_apo.algorithms.losses import aggregate_loss, compute_policy_loss, kl_penalty
from megatron_apo.algorithms.settings import resolve_algorithm_config, validate_algorithm_config

__all__ = [
    "AnswerMemory",
    "aggregate_loss",
    "broadcast_to_tokens",
    "compute_advantages",
    "compute_policy_loss",
    "grpo_advantages",
    "inverse_success_weights",
    "kl_penalty",
    "resolve_algorithm_config",
    "validate_algorithm_config",
]
