"""Math reward: the last `\\boxed{...}` of the response, checked for equivalence with math-verify.

Score 1.0 when the boxed answer is mathematically equivalent to the ground truth (fractions, decimals,
`\\frac`/`\\dfrac`, radicals, intervals, percentages, ... as math-verify decides), else 0.0. A response with
no box scores 0.0, except for DAPO-style data (`math_dapo`) whose prompts ask for a final `Answer: ...`
line: there the last such line is used when no box exists.
"""

from __future__ import annotations

import logging

from megatron_apo.rewards.boxed import extract_last_boxed
from megatron_apo.rewards.deadline import time_limit

DEFAULT_TIMEOUT_S = 5.0


class _DropDisabledTimeoutWarning(logging.Filter):
    """We disable math-verify's signal timeouts on purpose (see deadline.py); its warning about that is noise."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Timeout is disabled")


for _name in ("math_verify.parser", "math_verify.grader"):
    logging.getLogger(_name).addFilter(_DropDisabledTimeoutWarning())


def extract_answer_line(text: str) -> str | None:
    """The text after the last `Answer:` up to the end of its line (DAPO's answer format)."""
    pos = text.rfind("Answer:")
    if pos < 0:
        return None
    line = text[pos + len("Answer:") :].split("\n", 1)[0].strip().strip("$").strip()
    return line or None


def _normalise_ground_truth(ground_truth: str) -> str:
    gt = str(ground_truth).strip()
    boxed = extract_last_boxed(gt)
    if boxed is not None:
        gt = boxed
    if len(gt) >= 2 and gt[0] == "$" and gt[-1] == "$":
        gt = gt.strip("$").strip()
    return gt


def math_equivalent(answer: str, ground_truth: str) -> bool:
    """Whether `answer` (a LaTeX/plain expression, no box) is equivalent to `ground_truth` per math-verify."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    gt = _normalise_ground_truth(ground_truth)
    if not answer.strip() or not gt:
        return False
    # Both sides go through the same `\boxed{}` wrapper so math-verify's LaTeX extractor takes exactly them.
    gold = parse("\\boxed{" + gt + "}", extraction_config=[LatexExtractionConfig(), ExprExtractionConfig()],
                 parsing_timeout=None)
    pred = parse("\\boxed{" + answer + "}", extraction_config=[LatexExtractionConfig(), ExprExtractionConfig()],
                 parsing_timeout=None)
    if not gold or not pred:
        return False
    return bool(verify(gold, pred, timeout_seconds=None))


def math_score(solution_str: str, ground_truth: str, extra_info: dict | None = None, *,
               allow_answer_line: bool = False, timeout_s: float | None = DEFAULT_TIMEOUT_S) -> float:
    """1.0 if the last boxed answer (or, with `allow_answer_line`, the last `Answer:` line) equals the ground truth.

    Raises `SampleTimeout` past `timeout_s` (main thread); `compute_score` and `RewardPool` turn that into 0.0.
    """
    if not solution_str:
        return 0.0
    import math_verify  # noqa: F401  (the first import takes seconds on a busy node: not the sample's time)

    with time_limit(timeout_s):
        answer = extract_last_boxed(solution_str)
        if answer is None and allow_answer_line:
            answer = extract_answer_line(solution_str)
        if answer is None:
            return 0.0
        return 1.0 if math_equivalent(answer, ground_truth) else 0.0


def dapo_math_answer(solution_str: str) -> str | None:
    """The answer `dapo_math_score` checks: the last box, else the last `Answer:` line."""
    answer = extract_last_boxed(solution_str or "")
    return answer if answer is not None else extract_answer_line(solution_str or "")


def dapo_math_score(solution_str: str, ground_truth: str, extra_info: dict | None = None,
                    timeout_s: float | None = DEFAULT_TIMEOUT_S) -> float:
    return math_score(solution_str, ground_truth, extra_info, allow_answer_line=True, timeout_s=timeout_s)
