"""Rollout-vs-trainer mismatch: the metrics (`sampling.logprob_mismatch`, pooled over micro-batches and ranks) and
`algorithm.rollout_correction`'s loss weights, in closed form from known log-prob pairs; the weighted loss against a
dense PPO formula written here (fp32, 1e-6)."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_apo.algorithms.losses import compute_policy_loss
from megatron_apo.config import AlgorithmConfig, ConfigError
from megatron_apo.rollout.sampling import logprob_mismatch, pool_mismatch, rollout_correction
from megatron_apo.trainer.passes import PassSettings

NAN = float("nan")
# Token ratios pi_trainer / pi_engine: row 0 has 3 response tokens, row 1 two, row 2 none (all padding).
RATIOS = [[3.0, 0.25, 1.0, NAN], [1.5, 1.6, NAN, NAN], [NAN, NAN, NAN, NAN]]
MASK = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [0, 0, 0, 0]], dtype=torch.float32)


def _pair():
    """(engine, trainer) log-probs with the ratios above; padding holds NaN, which must never leak."""
    engine = torch.full((3, 4), -2.0)
    engine[MASK == 0] = NAN
    trainer = engine + torch.tensor(RATIOS).log()
    return engine, trainer


# mode -> (weights of row 0, of row 1, weight mean over the 5 tokens, metric key, its share)
CASES = {
    "tis_token": ([2.0, 0.25, 1.0], [1.5, 1.6], 6.35 / 5, "rollout/correction_truncated_frac", 1 / 5),
    # sequence ratios 0.75 and 2.4; the second truncated at 2
    "tis_seq": ([0.75] * 3, [2.0] * 2, 6.25 / 5, "rollout/correction_truncated_frac", 2 / 5),
    "mask_token": ([0.0, 0.0, 1.0], [1.0, 1.0], 3 / 5, "rollout/correction_masked_frac", 2 / 5),
    "mask_seq": ([1.0] * 3, [0.0] * 2, 3 / 5, "rollout/correction_masked_frac", 2 / 5),
}


@pytest.mark.parametrize("mode", sorted(CASES))
def test_correction_weights_in_closed_form(mode):
    row0, row1, mean, key, share = CASES[mode]
    engine, trainer = _pair()
    w, metrics = rollout_correction(engine, trainer, MASK, mode, cap=2.0, lower=0.5, upper=2.0)
    want = torch.zeros(3, 4)
    want[0, :3], want[1, :2] = torch.tensor(row0), torch.tensor(row1)
    torch.testing.assert_close(w, want, rtol=1e-6, atol=1e-6)  # padding (and the empty row) weigh 0, never NaN
    assert float(metrics["rollout/correction_weight_mean"]) == pytest.approx(mean, rel=1e-6)
    assert set(metrics) == {"rollout/correction_weight_mean", key}
    assert float(metrics[key]) == pytest.approx(share)


def test_correction_bounds_and_none():
    engine, trainer = _pair()
    assert rollout_correction(engine, trainer, MASK, "none") == (None, {})
    # lower 0 keeps every small ratio; a wider upper bound keeps 3
    w, m = rollout_correction(engine, trainer, MASK, "mask_token", lower=0.0, upper=4.0)
    assert w[MASK.bool()].tolist() == [1.0] * 5 and float(m["rollout/correction_masked_frac"]) == 0.0
    w, _ = rollout_correction(engine, trainer, MASK, "tis_token", cap=4.0)
    torch.testing.assert_close(w[0, :3], torch.tensor([3.0, 0.25, 1.0]))
    with pytest.raises(ValueError, match="unknown mode"):
        rollout_correction(engine, trainer, MASK, "tis")
    # no response token at all: weights 0, metrics 0
    w, m = rollout_correction(engine, trainer, torch.zeros(3, 4), "tis_seq")
    assert not w.any() and float(m["rollout/correction_weight_mean"]) == 0.0


def test_mismatch_metrics_in_closed_form():
    engine, trainer = _pair()
    m = logprob_mismatch(engine, trainer, MASK)
    r = [3.0, 0.25, 1.0, 1.5, 1.6]
    assert all(math.isfinite(float(v)) for v in m.values())
    assert float(m["rollout/mismatch_k3_kl"]) == pytest.approx(sum(x - 1 - math.log(x) for x in r) / 5, rel=1e-5)
    assert float(m["rollout/mismatch_abs_diff_mean"]) == pytest.approx(sum(abs(math.log(x)) for x in r) / 5, rel=1e-5)
    assert float(m["rollout/mismatch_abs_diff_max"]) == pytest.approx(math.log(4), rel=1e-5)
    assert float(m["rollout/mismatch_ratio_outside_frac"]) == pytest.approx(2 / 5)  # 3 and 0.25
    # per-sequence log-ratio sums log 0.75 and log 2.4 (the empty row is no sequence): population std
    assert float(m["rollout/mismatch_seq_log_ratio_std"]) == pytest.approx(abs(math.log(2.4 / 0.75)) / 2, rel=1e-5)
    assert float(m["rollout/logprob_abs_diff"]) == pytest.approx(float(m["rollout/mismatch_abs_diff_mean"]))
    same = logprob_mismatch(engine, engine, MASK)
    assert all(float(same[k]) == 0.0 for k in same if k.startswith("rollout/mismatch"))


def test_pool_mismatch_equals_the_whole_batch():
    """Split into micro-batches, the pooled max and sequence std are those of the whole batch."""
    g = torch.Generator().manual_seed(0)
    engine = -torch.rand(8, 6, generator=g) * 3
    trainer = engine + 0.3 * torch.randn(8, 6, generator=g)
    mask = (torch.rand(8, 6, generator=g) > 0.3).float()
    whole = logprob_mismatch(engine, trainer, mask)
    parts = [logprob_mismatch(engine[i:i + 3], trainer[i:i + 3], mask[i:i + 3]) for i in (0, 3, 6)]
    pooled = pool_mismatch(parts)
    for k in ("rollout/mismatch_abs_diff_max", "rollout/mismatch_seq_log_ratio_std"):
        assert pooled[k] == pytest.approx(float(whole[k]), rel=1e-5)
    # a mean of the per-micro-batch stds is not the batch's std (what the pooling is for)
    mean_std = sum(float(p["rollout/mismatch_seq_log_ratio_std"]) for p in parts) / 3
    assert mean_std != pytest.approx(float(whole["rollout/mismatch_seq_log_ratio_std"]), rel=1e-3)
    assert pool_mismatch([]) == {}


def _dense_vanilla(logits, ids, old, adv, w, mask, lo=0.2, hi=0.2, c=3.0):
    """Token-mean dual-clip PPO with the advantage of each token scaled by its weight, straight from the formula."""
    logp = torch.log_softmax(logits, -1).gather(-1, ids[..., None])[..., 0]
    r = torch.exp(logp - old)
    a = adv * w
    pg = torch.maximum(-a * r, -a * r.clamp(1 - lo, 1 + hi))
    pg = torch.where(a < 0, torch.minimum(pg, -a * c), pg)
    return (pg * mask).sum() / mask.sum()


@pytest.mark.parametrize("mode", sorted(CASES))
def test_weighted_loss_equals_the_dense_formula(mode):
    g = torch.Generator().manual_seed(3)
    engine, trainer = _pair()
    ids = torch.randint(0, 11, (3, 4), generator=g)
    logits = torch.randn(3, 4, 11, generator=g)
    old = torch.where(MASK.bool(), trainer, 0.0)
    adv = torch.tensor([[0.8] * 4, [-1.1] * 4, [0.5] * 4])
    w, _ = rollout_correction(engine, trainer, MASK, mode)
    cfg = {"loss_mode": "vanilla", "clip_ratio_c": 3.0}
    got_logits, want_logits = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    got, _ = compute_policy_loss(got_logits, ids, old, adv, MASK, cfg, is_weights=w)
    want = _dense_vanilla(want_logits, ids, old, adv, w, MASK)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    got.backward()
    want.backward()
    torch.testing.assert_close(got_logits.grad, want_logits.grad, rtol=1e-6, atol=1e-6)
    plain, _ = compute_policy_loss(logits, ids, old, adv, MASK, cfg)
    assert not torch.allclose(got, plain)  # the weights changed the loss


def test_tis_cap_is_the_tis_token_case_unless_a_correction_is_chosen():
    plain = PassSettings(AlgorithmConfig(), vocab_size=8)
    assert plain.correction == ("none", 2.0)
    assert PassSettings(AlgorithmConfig(), vocab_size=8, tis_cap=3.0).correction == ("tis_token", 3.0)
    chosen = AlgorithmConfig(rollout_correction="mask_seq", rollout_correction_cap=5.0)
    assert PassSettings(chosen, vocab_size=8, tis_cap=3.0).correction == ("mask_seq", 5.0)


@pytest.mark.parametrize("override, match", [
    ({"rollout_correction": "tis"}, "algorithm.rollout_correction='tis' is unknown"),
    ({"rollout_correction_cap": 0.5}, "algorithm.rollout_correction_cap=0.5: must be >= 1.0"),
    ({"rollout_correction_lower": 1.5}, "algorithm.rollout_correction_lower=1.5: must be <= 1.0"),
    ({"rollout_correction_upper": 0.9}, "algorithm.rollout_correction_upper=0.9: must be >= 1.0"),
])
def test_bad_correction_settings_name_the_key(override, match):
    with pytest.raises(ConfigError, match=match):
        AlgorithmConfig(**override).validate()


def _old_pass_body(mode: str) -> dict:
    """The old-policy pass on a tiny model at DP 2 (real gloo), rollout log-probs perturbed per token: its
    `is_weights` and the step's gathered metrics, with the inputs to recompute them densely."""
    from megatron_apo.config import ParallelConfig
    from megatron_apo.models import build_gpt_model, load_model_config
    from megatron_apo.parallel import control_plane, init_distributed
    from megatron_apo.trainer.batch import RLBatch
    from megatron_apo.trainer.passes import OldPolicyPass, PassSettings, RefOutputs, gather_old_metrics
    from megatron_apo.trainer.schedule import forward_backward

    init_distributed(ParallelConfig(), seed=5)
    rank = torch.distributed.get_rank()
    cfg = load_model_config("tiny")
    policy = build_gpt_model(cfg)  # the same weights on both ranks (same seed)
    g = torch.Generator().manual_seed(10 + rank)
    n, prompt, t = 4, 3, 5
    ids = torch.randint(0, cfg.vocab_size, (n, t), generator=g)
    mask = torch.ones(n, t)
    mask[1, 3:] = 0
    batch = RLBatch(tokens=torch.cat([torch.randint(0, cfg.vocab_size, (n, prompt), generator=g), ids], 1),
                    resp_index=(prompt - 1 + torch.arange(t)).expand(n, -1).contiguous(), response_ids=ids,
                    response_mask=mask, rollout_logprobs=-6.0 + torch.rand(n, t, generator=g),
                    rewards=torch.zeros(n), advantages=torch.ones(n, t),
                    group_index=torch.zeros(n, dtype=torch.long), all_wrong=torch.zeros(n, t, dtype=torch.bool))
    micro = batch.micro_batches(2)
    settings = PassSettings(AlgorithmConfig(loss_mode="vanilla", rollout_correction=mode), vocab_size=cfg.vocab_size)
    with torch.no_grad():
        old = OldPolicyPass(settings, [RefOutputs(None)] * len(micro))
        forward_backward([policy], micro, old, prompt + t, 2, forward_only=True)
    metrics = gather_old_metrics(old.outputs)
    mine = {"old": torch.cat([o.logprobs for o in old.outputs]), "w": torch.cat([o.is_weights for o in old.outputs]),
            "rollout": batch.rollout_logprobs, "mask": mask}
    return {"metrics": metrics, "ranks": control_plane.all_gather_object(mine)}


@pytest.mark.slow
def test_old_pass_weights_and_gathered_metrics_match_a_dense_recomputation():
    """DP 2: each rank's weights are the mode's formula on pi_old from the pass; the logged max |delta| and the
    sequence log-ratio std are those of all sequences of both ranks, the weight mean that of the micro-batches."""
    from megatron_apo.parallel import run_distributed

    got = run_distributed(_old_pass_body, 2, "tis_seq", timeout=240)
    assert got[0]["metrics"] == got[1]["metrics"]  # every rank logs the same
    m, ranks = got[0]["metrics"], got[0]["ranks"]
    old, rollout, mask = (torch.cat([r[k] for r in ranks]) for k in ("old", "rollout", "mask"))
    want_w, _ = rollout_correction(rollout, old, mask, "tis_seq", cap=2.0)
    torch.testing.assert_close(torch.cat([r["w"] for r in ranks]), want_w)
    assert (want_w[mask.bool()] < 2.0).any()  # not every weight at the cap: the formula is exercised
    log_ratio = torch.where(mask.bool(), old - rollout, 0.0)
    assert m["rollout/mismatch_abs_diff_max"] == pytest.approx(float(log_ratio.abs().max()), rel=1e-5)
    seq = log_ratio.sum(-1)
    assert m["rollout/mismatch_seq_log_ratio_std"] == pytest.approx(float(seq.std(unbiased=False)), rel=1e-5)
    per_mb = [float(want_w[i:i + 2][mask[i:i + 2].bool()].mean()) for i in range(0, 8, 2)]
    assert m["rollout/correction_weight_mean"] == pytest.approx(sum(per_mb) / 4, rel=1e-5)
    assert 0 <= m["rollout/correction_truncated_frac"] <= 1 and m["rollout/mismatch_k3_kl"] > 0
    assert not any(k.startswith("_mismatch/") for k in m)
