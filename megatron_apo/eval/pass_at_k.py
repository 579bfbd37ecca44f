"""The unbiased pass@k estimator (Chen et al. 2021) and its aggregation over prompts.

pass@k for one prompt with n samples of which c are correct is `1 - C(n-c, k) / C(n, k)`: the chance that
k samples drawn without replacement from the n contain at least one correct one. The binomials overflow
floats long before n=1024 (C(1024, 512) ~ 1e306), so we use the equivalent product
`C(n-c, k) / C(n, k) = prod_{i=n-c+1}^{n} (1 - k/i)`, every factor in [0, 1].
"""

from __future__ import annotations

from typing import Iterable, Sequence


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for n samples with c correct; exact up to float rounding for any n."""
    n, c, k = int(n), int(c), int(k)
    if n < 1:
        raise ValueError(f"pass_at_k: n (samples) must be >= 1, got n={n}")
    if not 0 <= c <= n:
        raise ValueError(f"pass_at_k: c (correct) must be in [0, n={n}], got c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"pass_at_k: k must be in [1, n={n}], got k={k}")
    if c == 0:
        return 0.0
    if n - c < k:  # every k-subset contains a correct sample
        return 1.0
    miss = 1.0
    for i in range(n - c + 1, n + 1):
        miss *= 1.0 - k / i
    return 1.0 - miss


def powers_of_two_up_to(n: int) -> list[int]:
    """The k values reported for n samples: 1, 2, 4, ... <= n."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    ks, k = [], 1
    while k <= n:
        ks.append(k)
        k *= 2
    return ks


def mean_pass_at_k(counts: Iterable[tuple[int, int]], ks: Sequence[int]) -> dict[str, float]:
    """Mean over prompts of pass@k, for (n, c) per prompt; keys 'pass@1', 'pass@2', ..."""
    counts = list(counts)
    if not counts:
        return {f"pass@{k}": float("nan") for k in ks}
    return {f"pass@{k}": sum(pass_at_k(n, c, k) for n, c in counts) / len(counts) for k in ks}
