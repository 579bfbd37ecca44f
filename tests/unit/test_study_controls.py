"""The study's controls: the advantage sign filter and the `apo_neg_clipped` loss, against hand values and the
vanilla loss on the same inputs (tests/unit/test_losses.py's cases)."""

from __future__ import annotations

import pytest
import torch

import megatron_apo.study.controls  # noqa: F401  (registers apo_neg_clipped)
from megatron_apo.algorithms.advantages import compute_advantages, grpo_advantages
from megatron_apo.config import ConfigError
from tests.helpers.vocab_parallel_bodies import run_loss_case
from tests.unit.test_losses import make_inputs

REWARDS = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0, 1.0])
GROUPS = [0, 0, 0, 1, 1, 1, 2, 2]


@pytest.mark.parametrize("sign", ["all", "positive", "negative"])
def test_sign_filter_keeps_one_sign(sign):
    full = grpo_advantages(REWARDS, GROUPS)
    got = compute_advantages(REWARDS, GROUPS, {"adv_sign_filter": sign})
    keep = {"all": torch.ones_like(full, dtype=torch.bool), "positive": full > 0, "negative": full < 0}[sign]
    assert torch.equal(got, torch.where(keep, full, torch.zeros_like(full)))
    if sign != "all":
        assert (got != 0).sum() == keep.sum() > 0 and (got != 0).sum() < (full != 0).sum()


def test_sign_filter_rejects_unknown_value():
    with pytest.raises(ConfigError, match="adv_sign_filter"):
        compute_advantages(REWARDS, GROUPS, {"adv_sign_filter": "both"})


def test_neg_clipped_is_vanilla_without_the_negative_gradient():
    case = make_inputs(30, {})
    got = run_loss_case({**case, "config": {"loss_mode": "apo_neg_clipped"}}, 0, 1)
    van = run_loss_case({**case, "config": {"loss_mode": "vanilla"}}, 0, 1)
    # the same value (the negative tokens' terms are kept, detached) ...
    assert torch.allclose(got["loss"], van["loss"], atol=1e-7)
    # ... and the gradient of the vanilla loss with the A < 0 responses' advantages set to 0 (pg is linear in A
    # at fixed ratios, and a zero advantage contributes no gradient)
    pos = run_loss_case({**case, "advantages": case["advantages"].clamp(min=0), "config": {"loss_mode": "vanilla"}},
                        0, 1)
    assert torch.allclose(got["grad"], pos["grad"], atol=1e-7)
    assert not torch.allclose(got["grad"], van["grad"], atol=1e-4)  # the negative gradient was there to remove
    assert got["metrics"]["apo/neg_grad_off_frac"] == 1.0
