"""The demo's toy task `toy_digit_sum`: write k digits (0-9) that sum to N, as `d+d+...+d`.

Prompts are short (`"k=3 sum=14 :"`) for a small sentencepiece tokenizer trained on the task's corpus.
Most prompts have many correct answers (k=3, N=14: 75 ordered triples), so pass@k measures diversity.
"""

from __future__ import annotations

import random
from functools import lru_cache
from pathlib import Path
from typing import Sequence

from megatron_apo.data.parquet import write_verl_parquet
from megatron_apo.rewards.toy import TOY_DATA_SOURCE


def toy_prompt_text(k: int, total: int) -> str:
    return f"k={k} sum={total} :"


@lru_cache(maxsize=None)
def count_digit_sums(k: int, total: int) -> int:
    """Number of ordered k-tuples of digits 0-9 summing to `total`."""
    if k == 0:
        return 1 if total == 0 else 0
    if total < 0 or total > 9 * k:
        return 0
    return sum(count_digit_sums(k - 1, total - d) for d in range(10))


def make_toy_dataset(num_prompts: int, seed: int, k_values: Sequence[int] = (3,), *, split: str = "train",
                     min_solutions: int = 2) -> list[dict]:
    """`num_prompts` verl-schema rows; N is drawn uniformly among sums with at least `min_solutions` answers."""
    if num_prompts < 1:
        raise ValueError(f"num_prompts must be >= 1, got {num_prompts}")
    if not k_values or any(int(k) < 1 for k in k_values):
        raise ValueError(f"k_values must be positive digit counts, got {k_values!r}")
    choices = {k: [n for n in range(9 * k + 1) if count_digit_sums(k, n) >= min_solutions] for k in k_values}
    for k, sums in choices.items():
        if not sums:
            raise ValueError(f"no sum has {min_solutions} answers with k={k}; lower min_solutions")
    rng = random.Random(seed)
    rows = []
    for i in range(num_prompts):
        k = int(rng.choice(list(k_values)))
        total = rng.choice(choices[k])
        rows.append({
            "data_source": TOY_DATA_SOURCE,
            "prompt": [{"role": "user", "content": toy_prompt_text(k, total)}],
            "ability": "arithmetic",
            "reward_model": {"ground_truth": str(total), "style": "rule"},
            "extra_info": {"k": k, "index": i, "split": split},
        })
    return rows


def write_toy_parquet(path: str | Path, num_prompts: int, seed: int, k_values: Sequence[int] = (3,), **kw) -> Path:
    return write_verl_parquet(make_toy_dataset(num_prompts, seed, k_values, **kw), path)


def sample_valid_answers(total: int, k: int, rng: random.Random | int, n: int) -> list[str]:
    """n correct answers `d+...+d`, each drawn uniformly from all valid ordered k-tuples (with replacement)."""
    if count_digit_sums(k, total) == 0:
        raise ValueError(f"no {k} digits sum to {total} (valid sums are 0..{9 * k})")
    rng = random.Random(rng) if isinstance(rng, int) else rng
    answers = []
    for _ in range(n):
        digits, left = [], total
        for j in range(k, 0, -1):  # choose each digit with weight = number of completions
            weights = [count_digit_sums(j - 1, left - d) for d in range(10)]
            d = rng.choices(range(10), weights=weights)[0]
            digits.append(d)
            left -= d
        answers.append("+".join(map(str, digits)))
    return answers
