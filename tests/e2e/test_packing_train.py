"""The RL trainer end to end with packed micro-batches: the same steps as the padded layout, at DP 2 with the Ray
CPU fleet (rollouts are seeded, so both runs train on the same samples)."""

from __future__ import annotations

import pytest

from megatron_apo.config import load_config
from megatron_apo.parallel import run_distributed
from tests.helpers.rl_setup import overrides, toy_env


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return toy_env(tmp_path_factory.mktemp("toy"))


def _train(cfg):
    from megatron_apo.trainer.train import train

    return train(cfg).history


@pytest.mark.slow
def test_packed_steps_equal_padded_steps_at_dp2(env, tmp_path):
    """Two steps at DP 2 (TP 1): packed rows of 64 tokens, balanced over the ranks by tokens, give the padded run's
    loss and gradient norm, and the update the second step starts from. seq-mean-token-sum: the padded run's own
    normaliser is then already global (equal micro-batches), so the two runs must agree to float rounding."""
    reward = tmp_path / "parity_reward.py"  # non-zero advantages: step 1 updates the weights step 2 starts from
    reward.write_text("def compute_score(data_source, solution_str, ground_truth, extra_info=None):\n"
                      "    return float(len(solution_str) % 2)\n")
    runs = {}
    layouts = {"padded": [], "packed": ["trainer.micro_batch_tokens=64", "trainer.pack_sequences=true"]}
    for name, extra in layouts.items():
        extra = [*extra, "algorithm.loss_agg_mode=seq-mean-token-sum", f"data.reward_fn={reward}:compute_score"]
        cfg = load_config(None, overrides(env, tmp_path / name, tp=1, steps=2, extra=extra))
        runs[name] = run_distributed(_train, 2, cfg, timeout=400)[0]
    assert runs["padded"][0]["train/grad_norm"] > 0
    for padded, packed in zip(runs["padded"], runs["packed"]):
        for key in ("loss", "train/grad_norm", "reward/mean"):
            assert packed[key] == pytest.approx(padded[key], rel=1e-5, abs=1e-6), key
