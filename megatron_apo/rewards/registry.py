"""Reward functions by `data_source`, behind verl's custom-reward signature.

`compute_score(data_source, solution_str, ground_truth, extra_info=None) -> float` is the signature verl
calls a user's `custom_reward_function` with, so any existing verl reward file plugs in through
`load_reward_fn("file.py:fn")` (see loader.py). Built-in functions take `(solution_str, ground_truth,
extra_info)` and are looked up here by exact data_source first, then by prefix.
"""

from __future__ import annotations

from typing import Any, Callable

from megatron_apo.config import InputError
from megatron_apo.rewards.codes import CODE_DATA_SOURCE, toy_code_score
from megatron_apo.rewards.deadline import SampleTimeout
from megatron_apo.rewards.math_reward import dapo_math_score, math_score
from megatron_apo.rewards.toy import TOY_DATA_SOURCE, toy_digit_sum_score

ScoreFn = Callable[[str, str, "dict | None"], float]

_EXACT: dict[str, ScoreFn] = {}
_PREFIX: list[tuple[str, ScoreFn]] = []


def register_reward(data_source: str, fn: ScoreFn, *, prefix: bool = False) -> None:
    """Route `data_source` (or every data_source starting with it, with prefix=True) to `fn`."""
    if prefix:
        _PREFIX.append((data_source, fn))
        _PREFIX.sort(key=lambda p: -len(p[0]))  # longest prefix wins
    else:
        _EXACT[data_source] = fn


def registered_data_sources() -> list[str]:
    return sorted(_EXACT) + [p + "*" for p, _ in _PREFIX]


def get_reward_fn(data_source: str) -> ScoreFn:
    if data_source in _EXACT:
        return _EXACT[data_source]
    for prefix, fn in _PREFIX:
        if data_source.startswith(prefix):
            return fn
    raise InputError(
        f"no reward function for data_source={data_source!r}; known: {', '.join(registered_data_sources())}. "
        "Register one with megatron_apo.rewards.register_reward, or pass a verl-style function as "
        "reward.custom_fn=path/to/file.py:fn_name"
    )


def as_score(result: Any) -> float:
    """verl reward functions return a number or a dict with 'score' (and often 'acc'); we want the number."""
    if isinstance(result, dict):
        if "score" not in result:
            raise ValueError(f"reward function returned a dict without a 'score' key: keys {sorted(result)}")
        result = result["score"]
    return float(result)


def compute_score(data_source: str, solution_str: str, ground_truth: str, extra_info: dict | None = None) -> float:
    """The reward of one response; a sample that runs past its time limit scores 0.0."""
    fn = get_reward_fn(data_source)
    try:
        return as_score(fn(solution_str, ground_truth, extra_info))
    except SampleTimeout:
        return 0.0


# Math sets as verl names them (DAPO-Math-17k uses "math_dapo", whose prompts ask for an `Answer:` line).
for _name in ("math", "lighteval/MATH", "DigitalLearningGmbH/MATH-lighteval", "HuggingFaceH4/MATH-500",
              "openai/gsm8k", "gsm8k", "math500", "amc", "amc23"):
    register_reward(_name, math_score)
for _name in ("math_dapo", "math_dapo_reasoning"):
    register_reward(_name, dapo_math_score)
for _prefix in ("aime", "numina_", "deepscaler", "MATH"):
    register_reward(_prefix, math_score, prefix=True)
register_reward(TOY_DATA_SOURCE, toy_digit_sum_score)
register_reward(CODE_DATA_SOURCE + "/", toy_code_score, prefix=True)
