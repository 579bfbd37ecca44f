"""The study's version-2 statistics (study/analysis.py): Student's t without scipy, seed-level intervals, Holm."""

from __future__ import annotations

import math

import numpy as np
import pytest

from megatron_apo.study.analysis import holm, t_abs_cdf, t_interval, t_quantile_95

# two-sided 95% critical values from a printed t-table
TABLE = {1: 12.706, 2: 4.303, 3: 3.182, 5: 2.571, 10: 2.228, 11: 2.201, 23: 2.069, 35: 2.030}


@pytest.mark.parametrize("df, q", list(TABLE.items()))
def test_t_quantile_matches_the_table(df, q):
    assert t_quantile_95(df) == pytest.approx(q, abs=1e-3)
    assert t_abs_cdf(q, df) == pytest.approx(0.95, abs=1e-4)


def test_t_cdf_limits_and_normal_for_large_df():
    assert t_abs_cdf(0.0, 4) == 0.0 and t_abs_cdf(1e6, 7) == pytest.approx(1.0)
    assert t_abs_cdf(1.959964, 2000) == pytest.approx(0.95, abs=1e-3)


def test_seed_level_interval_and_p_value():
    d = np.array([0.10, 0.05, 0.12, 0.08, 0.02, 0.09])[:, None]
    r = t_interval(d)
    mean, se = d.mean(), d.std(ddof=1) / math.sqrt(6)
    assert r["est"][0] == pytest.approx(mean) and r["se"][0] == pytest.approx(se)
    assert r["ci_low"][0] == pytest.approx(mean - 2.571 * se, abs=1e-4)
    assert r["p"][0] == pytest.approx(1 - t_abs_cdf(mean / se, 5)) and r["p"][0] < 0.01
    one = t_interval(d[:1])
    assert math.isnan(one["ci_low"][0])  # one replicate: no interval


def test_holm_step_down():
    got = holm({"a": 0.01, "b": 0.04, "c": 0.03, "d": 0.005})
    assert [got[k]["p_holm"] for k in "dabc"] == pytest.approx([0.02, 0.03, 0.06, 0.06])
    assert [got[k]["rejected"] for k in "dabc"] == [True, True, False, False]
    # step-down stops at the first non-rejection even if a later raw p would pass its own threshold
    assert not holm({"x": 0.03, "y": 0.03})["y"]["rejected"]


def test_branch_state_of_wrong_responses():
    from megatron_apo.study.diagnostics import branch_state

    valid = [[5, 6, 9], [5, 7, 9], [8, 9]]  # answers + stop (9)
    assert branch_state([5, 6, 9], valid) is None  # valid
    assert branch_state([5, 4, 9], valid) == (1, {6, 7})  # wrong second token: the state after [5]
    assert branch_state([3, 9], valid) == (0, {5, 8})  # wrong first token
    assert branch_state([8, 2, 9], valid) == (1, {9})  # a valid answer that does not stop
