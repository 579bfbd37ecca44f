"""Verifier for the collapse task `toy_code/<split>` (megatron_apo.data.collapse_task).

A response is correct iff, stripped of surrounding whitespace, it is exactly one of the category's valid
codes; the ground truth is the comma-separated list of those codes (e.g. "a3,a7,k2").
"""

from __future__ import annotations

CODE_DATA_SOURCE = "toy_code"  # data sources are "toy_code/<split>", routed here by prefix


def valid_codes(ground_truth: str) -> frozenset[str]:
    codes = frozenset(c.strip() for c in str(ground_truth).split(",") if c.strip())
    if not codes:
        raise ValueError(f"{CODE_DATA_SOURCE}: ground truth {ground_truth!r} lists no valid code")
    return codes


def toy_code_score(solution_str: str, ground_truth: str, extra_info: dict | None = None) -> float:
    return 1.0 if (solution_str or "").strip() in valid_codes(ground_truth) else 0.0
