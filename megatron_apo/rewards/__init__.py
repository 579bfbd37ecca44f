"""Verifiable rewards: a registry by `data_source` behind verl's custom-reward signature, the math verifier
(last `\\boxed{}` + math-verify, per-sample time limit), the demo's toy verifier, and a process pool.

    from megatron_apo.rewards import compute_score
    compute_score("math_dapo", "... \\\\boxed{\\\\frac12}", "0.5")  # -> 1.0
"""

from megatron_apo.rewards.boxed import extract_last_boxed
from megatron_apo.rewards.deadline import SampleTimeout, time_limit
from megatron_apo.rewards.loader import load_reward_fn
from megatron_apo.rewards.math_reward import math_equivalent, math_score
from megatron_apo.rewards.pool import (
    RewardBatch,
    RewardFailed,
    RewardItem,
    RewardPool,
    RewardWorkerError,
    TooManyRewardErrors,
    score_item,
)
from megatron_apo.rewards.registry import (
    BadRewardValue,
    answer_of,
    as_result,
    as_score,
    compute_score,
    default_answer,
    get_reward_fn,
    register_reward,
    registered_data_sources,
)
from megatron_apo.rewards.toy import TOY_DATA_SOURCE, toy_digit_sum_score

__all__ = [
    "BadRewardValue",
    "RewardBatch",
    "RewardFailed",
    "RewardItem",
    "RewardPool",
    "RewardWorkerError",
    "SampleTimeout",
    "TOY_DATA_SOURCE",
    "TooManyRewardErrors",
    "answer_of",
    "as_result",
    "as_score",
    "compute_score",
    "default_answer",
    "extract_last_boxed",
    "get_reward_fn",
    "load_reward_fn",
    "math_equivalent",
    "math_score",
    "register_reward",
    "registered_data_sources",
    "score_item",
    "time_limit",
    "toy_digit_sum_score",
]
