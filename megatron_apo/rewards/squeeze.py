"""Verifier for the support-squeeze task `toy_squeeze/<split>` (megatron_apo.data.squeeze_task).

An answer is a sequence of words, one per position. The ground truth lists the valid words of each position:
positions separated by ';', words by '|' (e.g. "w017|w203;w044;w310|w009"). A response is correct iff its
whitespace-separated words are exactly one word per position, each valid there. The valid set is the product of
the positions' sets, so it can be listed (exact evaluation, coverage).
"""

from __future__ import annotations

import itertools

SQUEEZE_DATA_SOURCE = "toy_squeeze"  # data sources are "toy_squeeze/<split>", routed here by prefix


def valid_words(ground_truth: str) -> list[frozenset[str]]:
    positions = [frozenset(w.strip() for w in part.split("|") if w.strip()) for part in str(ground_truth).split(";")]
    if not positions or not all(positions):
        raise ValueError(f"{SQUEEZE_DATA_SOURCE}: ground truth {ground_truth!r} has a position with no valid word")
    return positions


def valid_sequences(ground_truth: str) -> list[str]:
    """Every valid answer, as the text a response holds (words joined by single spaces)."""
    return [" ".join(ws) for ws in itertools.product(*(sorted(p) for p in valid_words(ground_truth)))]


def toy_squeeze_score(solution_str: str, ground_truth: str, extra_info: dict | None = None) -> float:
    words = (solution_str or "").split()
    positions = valid_words(ground_truth)
    return 1.0 if len(words) == len(positions) and all(w in p for w, p in zip(words, positions)) else 0.0
