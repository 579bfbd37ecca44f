"""APO's knobs (`apo_anchor_ratio`, `apo_all_wrong_pull`, `apo_min_anchor_mass`) and metrics against formulas written
here from the specification (docs/algorithms.md), independently of autograd: the gradient of log pi(k) w.r.t. the
logits is e_k - pi. The full loss/gradient/metric comparison of every form x knob at TP 1 and 2 is in
tests/unit/test_losses.py (CASES "apo_<form>_aw<gamma>_tau<tau>").

Tolerance: fp32, 1e-6 absolute on losses and gradients (gradients are O(1e-2) here), exact on 0/1 counts.
"""

from __future__ import annotations

import pytest
import torch

from megatron_apo.config import ConfigError
from megatron_apo.rollout.engine import Sample
from megatron_apo.trainer.batch import build_batch
from tests.helpers.vocab_parallel_bodies import run_loss_case
from tests.unit.test_losses import APO_FORMS, VOCAB, make_inputs

ATOL = 1e-6


def _on_policy(case: dict) -> dict:
    """pi_old = pi at the sampled tokens and at the reference Top-K (the start of an update); pi_ref stays apart."""
    lp = torch.log_softmax(case["logits"][..., :VOCAB], -1)
    return {**case, "old_logprobs": lp.gather(-1, case["ids"][..., None])[..., 0],
            "old_anchor_logprobs": lp.gather(-1, case["ref_topk_indices"])}


def _run(case: dict, **config) -> dict:
    return run_loss_case({**case, "config": {"loss_mode": "apo_ratio", **config}}, 0, 1)


def _safe_set(case: dict, k: int = 8):
    """S (reference Top-K minus y), pi, pi_ref on S and Z_ref, from the inputs."""
    idx = case["ref_topk_indices"][..., :k]
    in_s = idx != case["ids"][..., None]
    pi = torch.softmax(case["logits"][..., :VOCAB], -1)
    ref_s = case["ref_topk_logprobs"][..., :k].exp() * in_s
    return idx, in_s, pi, ref_s, ref_s.sum(-1)


def _sum_grad_log_pi(idx, coef, pi) -> torch.Tensor:
    """sum_k coef_k * d log pi(k) / d logits = sum_k coef_k (e_k - pi), [B, T, VOCAB]."""
    onehot = torch.zeros(*idx.shape, VOCAB).scatter_(-1, idx[..., None], 1.0)
    return (coef[..., None] * (onehot - pi[..., None, :])).sum(-2)


@pytest.mark.parametrize("reading", ["old", "ref"])
def test_paper_form_at_pi_old_starts_at_push_minus_pull_and_pulls_anchors_by_the_readings_weights(reading):
    case = _on_policy(make_inputs(31, {}))
    beta, lam = 0.1, 1.05
    with_pull = _run(case, apo_anchor_ratio=reading)
    no_pull = _run(case, apo_anchor_ratio=reading, apo_pull_coeff=0.0)
    idx, in_s, pi, ref_s, z_ref = _safe_set(case)
    a, m = case["advantages"], case["mask"]
    n = m.sum()
    neg = (a < 0) & (m > 0)
    assert with_pull["metrics"]["apo/neg_grad_off_frac"] == 0.0  # r~ inside the clip everywhere
    if reading == "old":
        # r_anchor = 1, so r~ = lambda - beta on every A < 0 token and the loss is known in closed form
        assert abs(with_pull["metrics"]["apo/anchor_ratio"] - 1.0) < ATOL
        want = (torch.where(neg, -a * (lam - beta), -a) * m).sum() / n
        assert abs(with_pull["loss"].item() - want.item()) < ATOL
        coef = ref_s / z_ref[..., None]  # w_k = pi_ref(k) / Z_ref: the reference's weight, whatever pi(k) is
    else:
        coef = pi.gather(-1, idx) * in_s / z_ref[..., None]  # pi(k) / Z_ref: the anchor's current probability
    # the pull's share of the gradient: -A*(-beta*r_anchor) / N per token, d r_anchor = sum_k coef_k d log pi(k)
    want_grad = torch.where(neg[..., None], (beta * a / n)[..., None] * _sum_grad_log_pi(idx, coef, pi), 0.0)
    got_grad = (with_pull["grad"] - no_pull["grad"])[..., :VOCAB]
    assert (got_grad - want_grad).abs().max() < ATOL and want_grad.abs().max() > 1e-3


def test_old_and_ref_readings_differ_once_the_policy_has_left_the_reference():
    case = _on_policy(make_inputs(32, {}))
    old, ref = _run(case, apo_anchor_ratio="old"), _run(case, apo_anchor_ratio="ref")
    assert abs(old["metrics"]["apo/anchor_ratio"] - ref["metrics"]["apo/anchor_ratio"]) > 1e-2
    assert (old["grad"] - ref["grad"]).abs().max() > 1e-4


@pytest.mark.parametrize("form", ["old", "split"])
@pytest.mark.parametrize("tau", [0.0, 0.5])
def test_all_wrong_tokens_get_the_pull_alone(form, tau):
    case = _on_policy(make_inputs(33, {}, all_wrong_row=2, flat_ref=tau > 0))
    knobs = {"apo_min_anchor_mass": tau, **APO_FORMS[form]}
    on, off = _run(case, apo_all_wrong_pull=1.0, **knobs), _run(case, **knobs)
    others = torch.arange(4) != 2
    assert torch.allclose(on["grad"][others], off["grad"][others], rtol=0, atol=1e-7)  # nothing else changes
    assert off["grad"][2].abs().max() == 0  # A = 0: without the all-wrong pull the group gets no gradient
    idx, in_s, pi, ref_s, z_ref = _safe_set(case)
    m = case["mask"]
    pulled = (m[2] > 0) & in_s[2].any(-1) & ~(z_ref[2] < tau)
    if form == "old":  # L_aw = -gamma * r_anchor inside the clip (r_anchor = 1): d = -gamma sum_k w_k d log pi(k)
        coef = ref_s[2] / z_ref[2][..., None]
    else:  # L_aw = -gamma * rho (u = 1, rho = 1 inside the clip): d rho = sum_S (pi(k) / M) d log pi(k)
        p_s = pi[2].gather(-1, idx[2]) * in_s[2]
        coef = p_s / p_s.sum(-1, keepdim=True)
    want = torch.where(pulled[..., None], -_sum_grad_log_pi(idx[2], coef, pi[2]) / m.sum(), 0.0)
    assert (on["grad"][2, :, :VOCAB] - want).abs().max() < ATOL and want.abs().max() > 1e-3
    if tau > 0:  # the flat reference's positions are junk: no all-wrong pull there either
        assert (~pulled & (m[2] > 0)).any() and on["grad"][2][~pulled].abs().max() == 0
        assert on["metrics"]["apo/junk_anchor_frac"] > 0


@pytest.mark.parametrize("form", ["old", "ref", "split_pg", "split_pull"])
def test_grad_off_fractions_count_exactly_the_negative_tokens_without_gradient(form):
    case = make_inputs(34, {})  # off-policy: some ratios are far outside the clip
    a, m = case["advantages"], case["mask"]
    neg = (a < 0) & (m > 0)
    if form in ("old", "ref"):
        got = _run(case, apo_anchor_ratio=form, apo_pull_coeff=0.3)
        frac, sel = got["metrics"]["apo/neg_grad_off_frac"], neg
    elif form == "split_pg":  # the dual-clipped PG alone
        got = _run(case, apo_rectification="split", apo_pull_coeff=0.0)
        frac, sel = got["metrics"]["apo/neg_grad_off_frac"], neg
    else:  # the clipped pull alone, on tokens with a non-empty S
        got = _run(case, apo_rectification="split", apo_push_coeff=0.0, apo_pull_coeff=1.0)
        _, in_s, _, _, _ = _safe_set(case)
        frac, sel = got["metrics"]["apo/pull_grad_off_frac"], neg & in_s.any(-1)
    zero_grad = got["grad"].abs().amax(-1) == 0
    assert 0 < frac < 1, frac
    assert frac == pytest.approx(zero_grad[sel].float().mean().item(), abs=1e-7)


def test_junk_anchor_metric_uses_one_in_a_thousand_when_the_knob_is_off():
    case = make_inputs(35, {})
    case["ref_topk_logprobs"] = case["ref_topk_logprobs"].clone()
    case["ref_topk_logprobs"][3, :2] = -12.0  # reference mass on S ~ 5e-5 at two positions of a wrong response
    got = _run(case)["metrics"]
    assert got["apo/junk_anchor_frac"] == pytest.approx(2 / 12)  # 12 A < 0 tokens
    assert _run(case, apo_min_anchor_mass=0.5)["metrics"]["apo/junk_anchor_frac"] > 2 / 12


def test_all_wrong_pull_without_the_mask_names_the_argument():
    case = {**make_inputs(36, {}), "all_wrong": None}
    with pytest.raises(ConfigError, match="all_wrong: algorithm.apo_all_wrong_pull"):
        _run(case, apo_all_wrong_pull=1.0)
    _run(case)  # off: not needed


@pytest.mark.parametrize("override, key", [({"apo_anchor_ratio": "new"}, "apo_anchor_ratio"),
                                           ({"apo_all_wrong_pull": -1.0}, "apo_all_wrong_pull"),
                                           ({"apo_min_anchor_mass": 1.0}, "apo_min_anchor_mass")])
def test_bad_knobs_name_the_key(override, key):
    with pytest.raises(ValueError, match=f"algorithm.{key}"):
        _run(make_inputs(37, {}), **override)


def test_build_batch_marks_the_tokens_of_all_wrong_groups():
    def smp(p, i, n):
        return Sample(p, i, list(range(1, n + 1)), [-1.0] * n, "stop")

    samples = [[smp(0, 0, 2), smp(0, 1, 3)], [smp(1, 0, 3), smp(1, 1, 1)], [smp(2, 0, 1), smp(2, 1, 2)]]
    rewards = torch.tensor([0.0, -1.0, 1.0, 0.0, 0.0, 0.0])  # group 1 has a correct response; 0 and 2 none
    batch = build_batch([[7, 8], [7], [9, 9, 9]], samples, rewards, torch.zeros(6))
    want = torch.tensor([[1, 1, 0], [1, 1, 1], [0, 0, 0], [0, 0, 0], [1, 0, 0], [1, 1, 0]], dtype=torch.bool)
    assert torch.equal(batch.all_wrong, want)
    mb = batch.micro_batches(4)
    assert torch.equal(mb[1]["all_wrong"], want[4:])  # every micro-batch carries its rows
