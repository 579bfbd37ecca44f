"""Verifier for the demo's toy task `toy_digit_sum`: write k digits (0-9) that sum to N.

A response is correct iff, after stripping surrounding whitespace, it is `d+d+...+d` with exactly k
single digits whose sum is N (ground truth `str(N)`, `extra_info={"k": k}`). Many answers are correct for
most prompts, so pass@k measures how diverse the policy's correct answers are.
"""

from __future__ import annotations

TOY_DATA_SOURCE = "toy_digit_sum"


def parse_digit_sum(text: str) -> list[int] | None:
    """The digits of a `d+d+...+d` string, or None if it is not exactly that form."""
    parts = text.strip().split("+")
    if not all(len(p) == 1 and "0" <= p <= "9" for p in parts):
        return None
    return [int(p) for p in parts]


def toy_digit_sum_score(solution_str: str, ground_truth: str, extra_info: dict | None = None) -> float:
    if not extra_info or "k" not in extra_info:
        raise ValueError(f"{TOY_DATA_SOURCE}: extra_info must contain 'k' (number of digits), got {extra_info!r}")
    k, target = int(extra_info["k"]), int(str(ground_truth).strip())
    digits = parse_digit_sum(solution_str or "")
    return 1.0 if digits is not None and len(digits) == k and sum(digits) == target else 0.0
