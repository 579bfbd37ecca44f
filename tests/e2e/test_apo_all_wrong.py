"""APO's all-wrong pull through the real trainer: the Ray CPU fleet samples, the rewards mark the all-wrong groups in
the RL batch (`build_batch`), and the train pass hands that mask to the loss. A random model never solves the toy
task, so every group is all wrong and GRPO's advantages are all 0: without the knob no parameter moves, with it the
pull alone does."""

from __future__ import annotations

import pytest

from megatron_apo.config import load_config
from megatron_apo.parallel import run_distributed
from megatron_apo.trainer.metrics import read_metrics
from tests.helpers.rl_setup import overrides, toy_env


def _train(cfg):
    from megatron_apo.trainer.train import train

    return train(cfg).history


@pytest.mark.slow
def test_all_wrong_groups_get_the_pull_only_when_the_knob_is_on(tmp_path):
    env = toy_env(tmp_path / "toy")
    rows = {}
    for gamma in (0.0, 1.0):
        out = tmp_path / f"aw{gamma}"
        cfg = load_config(None, overrides(env, out, tp=1, steps=1, extra=[f"algorithm.apo_all_wrong_pull={gamma}"]))
        run_distributed(_train, 1, cfg, timeout=300)
        rows[gamma] = read_metrics(out / "metrics.jsonl")[-1]
    for r in rows.values():
        assert r["reward/pass_rate"] == 0.0  # every group is all wrong: A = 0 on every token
    assert rows[0.0]["train/grad_norm"] == 0.0 and "apo/all_wrong_frac" not in rows[0.0]
    assert rows[1.0]["apo/all_wrong_frac"] > 0.9  # every response token with a non-empty safe manifold
    assert rows[1.0]["train/grad_norm"] > 0.0 and rows[1.0]["apo/all_wrong_loss"] < 0.0
