"""Reward functions by `data_source`, behind verl's custom-reward signature.

`compute_score(data_source, solution_str, ground_truth, extra_info=None) -> float` is the signature verl
calls a user's `custom_reward_function` with, so any existing verl reward file plugs in through
`load_reward_fn("file.py:fn")` (see loader.py). Built-in functions take `(solution_str, ground_truth,
extra_info)` and are looked up here by exact data_source first, then by prefix.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Callable

from megatron_apo.config import InputError
from megatron_apo.rewards.boxed import extract_last_boxed
from megatron_apo.rewards.codes import CODE_DATA_SOURCE, toy_code_score
from megatron_apo.rewards.deadline import SampleTimeout
from megatron_apo.rewards.math_reward import dapo_math_answer, dapo_math_score, math_score
from megatron_apo.rewards.squeeze import SQUEEZE_DATA_SOURCE, toy_squeeze_score
from megatron_apo.rewards.toy import TOY_DATA_SOURCE, toy_digit_sum_score

ScoreFn = Callable[[str, str, "dict | None"], float]
AnswerFn = Callable[[str], "str | None"]

_EXACT: dict[str, ScoreFn] = {}
_PREFIX: list[tuple[str, ScoreFn]] = []
_ANSWER: dict[ScoreFn, AnswerFn] = {}


class BadRewardValue(ValueError):
    """A reward function returned something that is not a finite number (None, a string, NaN, inf, ...)."""

    def __init__(self, message: str, nonfinite: bool = False):
        super().__init__(message)
        self.nonfinite = nonfinite


def register_reward(data_source: str, fn: ScoreFn, *, prefix: bool = False, answer_fn: AnswerFn | None = None) -> None:
    """Route `data_source` (or every data_source starting with it, with prefix=True) to `fn`.

    `answer_fn(response) -> final answer | None` is what the answer memory compares (default: `default_answer`).
    """
    if answer_fn is not None:
        _ANSWER[fn] = answer_fn
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


def default_answer(solution_str: str) -> str:
    """The final answer of a response whose reward names none: its last `\\boxed{}`, else the whole text stripped."""
    boxed = extract_last_boxed(solution_str or "")
    return boxed if boxed is not None else (solution_str or "").strip()


def answer_of(data_source: str, solution_str: str) -> str | None:
    """The final answer the registered reward of `data_source` reads from the response."""
    return _ANSWER.get(get_reward_fn(data_source), default_answer)(solution_str)


def as_result(result: Any) -> tuple[float, str | None]:
    """(score, answer) of a reward's return: a number, or verl's dict with 'score' (and optionally 'answer').

    Anything else (None, a string, a list) and a NaN/inf score raise `BadRewardValue`: a broken reward must
    never become a training signal.
    """
    answer = None
    if isinstance(result, dict):
        if "score" not in result:
            raise BadRewardValue(f"reward function returned a dict without a 'score' key: keys {sorted(result)}")
        answer = None if result.get("answer") is None else str(result["answer"])
        result = result["score"]
    if hasattr(result, "item") and getattr(result, "ndim", 0) == 0:  # numpy / torch scalars
        result = result.item()
    if isinstance(result, bool) or not isinstance(result, numbers.Real):
        raise BadRewardValue(f"reward function returned {type(result).__name__} {str(result)[:60]!r}, not a number")
    score = float(result)
    if not math.isfinite(score):
        raise BadRewardValue(f"reward function returned a non-finite score ({score})", nonfinite=True)
    return score, answer


def as_score(result: Any) -> float:
    """verl reward functions return a number or a dict with 'score' (and often 'acc'); we want the number."""
    return as_result(result)[0]


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
    register_reward(_name, math_score, answer_fn=extract_last_boxed)
for _name in ("math_dapo", "math_dapo_reasoning"):
    register_reward(_name, dapo_math_score, answer_fn=dapo_math_answer)
for _prefix in ("aime", "numina_", "deepscaler", "MATH"):
    register_reward(_prefix, math_score, prefix=True)
register_reward(TOY_DATA_SOURCE, toy_digit_sum_score, answer_fn=str.strip)  # the whole response is the answer
register_reward(CODE_DATA_SOURCE + "/", toy_code_score, prefix=True, answer_fn=str.strip)
register_reward(SQUEEZE_DATA_SOURCE + "/", toy_squeeze_score, prefix=True, answer_fn=str.strip)
