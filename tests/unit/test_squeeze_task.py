"""Task B (data/squeeze_task.py, rewards/squeeze.py): the design's numbers hold, and the verifier agrees with the
listed valid set."""

from __future__ import annotations

import pytest

from megatron_apo.data.squeeze_task import (
    SqueezeTaskConfig,
    attractor,
    make_squeeze_categories,
    reference_topk_mass,
    squeeze_behaviour_valid_prob,
    squeeze_eval_rows,
    squeeze_train_rows,
)
from megatron_apo.rewards.registry import compute_score
from megatron_apo.rewards.squeeze import valid_sequences


def test_design_numbers():
    cfg = SqueezeTaskConfig()
    cats = make_squeeze_categories(cfg)
    assert cats == make_squeeze_categories(cfg)  # a pure function of the config
    for split in ("trained_hard", "heldout_hard"):
        assert sum(c.split == split for c in cats) >= 48
    assert cfg.vocab_words >= 300
    for c in cats:
        for j, (ok, dist) in enumerate(zip(c.valid, c.dists)):
            assert abs(sum(p for _, p in dist) - 1.0) < 1e-9
            ranked = [w for w, _ in sorted(dist, key=lambda wp: -wp[1])]
            top8 = set(ranked[:8])
            if c.hard:
                # every valid continuation inside the reference Top-8, the attractor outside it and wrong
                assert set(ok) <= top8 and attractor(j) not in top8 and attractor(j) not in ok
                assert 0.6 <= reference_topk_mass(c, 8)[j] <= 0.85
            else:
                assert attractor(j) in ok
        if c.hard:
            assert 0.02 < squeeze_behaviour_valid_prob(c) < 0.1
    assert len(squeeze_eval_rows(cats)) == 192 and len(squeeze_train_rows(cats)) == 96


def test_verifier_matches_the_listed_valid_set():
    cats = make_squeeze_categories(SqueezeTaskConfig(num_categories=8, seed=2))
    rows = squeeze_eval_rows(cats)
    for row, c in zip(rows, cats):
        gt = row["reward_model"]["ground_truth"]
        answers = valid_sequences(gt)
        assert len(answers) == len(set(answers)) == pytest.approx(
            len(c.valid[0]) * len(c.valid[1]) * len(c.valid[2]))
        for a in answers[:3]:
            assert compute_score(row["data_source"], f" {a} ", gt) == 1.0
        first = answers[0].split()
        wrong_last = " ".join(first[:2] + ["w999"])  # a valid prefix, a wrong last word
        assert compute_score(row["data_source"], wrong_last, gt) == 0.0
        assert compute_score(row["data_source"], " ".join(first[:2]), gt) == 0.0  # too short
