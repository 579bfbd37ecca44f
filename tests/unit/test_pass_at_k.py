"""pass@k against exact rational combinatorics (Python ints are exact), edge cases, and n=1024."""

import math
import random
from fractions import Fraction

import pytest

from megatron_apo.eval import mean_pass_at_k, pass_at_k, powers_of_two_up_to


def exact_pass_at_k(n: int, c: int, k: int) -> Fraction:
    return 1 - Fraction(math.comb(n - c, k), math.comb(n, k))  # comb(a, k) = 0 for k > a


def test_random_n_c_k_match_exact_fractions():
    rng = random.Random(1234)
    worst = 0.0
    for _ in range(3000):
        n = rng.choice([1, 2, 3, 7, 16, 100, 257, 1024])
        c, k = rng.randint(0, n), rng.randint(1, n)
        got, want = pass_at_k(n, c, k), exact_pass_at_k(n, c, k)
        worst = max(worst, abs(got - float(want)))
        assert 0.0 <= got <= 1.0
    assert worst <= 1e-12, worst


@pytest.mark.parametrize("n", [1, 5, 64, 1024])
def test_edge_cases_exact(n):
    for k in sorted({1, min(2, n), n // 2 or 1, n}):
        assert pass_at_k(n, 0, k) == 0.0  # no correct sample: never passes
        assert pass_at_k(n, n, k) == 1.0  # all correct
    assert pass_at_k(n, 1, n) == 1.0  # k = n: the one correct sample is always drawn
    # n - c < k: every k-subset contains a correct sample
    if n >= 4:
        assert pass_at_k(n, n - 2, 3) == 1.0
    assert pass_at_k(n, 1, 1) == pytest.approx(1 / n, abs=1e-15)  # pass@1 is the fraction correct


def test_n_1024_no_overflow_and_exact():
    # C(1024, 512) ~ 4.5e306: the naive float ratio overflows/underflows around here; the product form must not.
    n = 1024
    for c, k in [(1, 512), (3, 512), (512, 512), (1, 1023), (10, 1), (100, 1024), (1000, 20), (2, 1000)]:
        got = pass_at_k(n, c, k)
        assert math.isfinite(got)
        assert got == pytest.approx(float(exact_pass_at_k(n, c, k)), abs=1e-12)
    with pytest.raises(OverflowError):  # why the product form exists
        float(math.comb(1024, 512)) / float(math.comb(1030, 512))


def test_monotone_in_k_and_c():
    n = 64
    for c in range(0, n + 1, 7):
        vals = [pass_at_k(n, c, k) for k in range(1, n + 1)]
        assert all(a <= b + 1e-15 for a, b in zip(vals, vals[1:]))
    for k in (1, 8, 32):
        vals = [pass_at_k(n, c, k) for c in range(n + 1)]
        assert all(a <= b + 1e-15 for a, b in zip(vals, vals[1:]))


@pytest.mark.parametrize("args", [(0, 0, 1), (4, 5, 1), (4, -1, 1), (4, 2, 0), (4, 2, 5)])
def test_invalid_arguments_raise_value_error(args):
    with pytest.raises(ValueError, match="pass_at_k"):
        pass_at_k(*args)


def test_powers_of_two_and_mean():
    assert powers_of_two_up_to(1) == [1]
    assert powers_of_two_up_to(16) == [1, 2, 4, 8, 16]
    assert powers_of_two_up_to(1000)[-1] == 512
    got = mean_pass_at_k([(4, 0), (4, 4), (4, 1)], [1, 2, 4])
    assert got["pass@1"] == pytest.approx((0 + 1 + 0.25) / 3)
    assert got["pass@2"] == pytest.approx((0 + 1 + 0.5) / 3)
    assert got["pass@4"] == pytest.approx(2 / 3)
