"""GRPO advantages, inverse-success calibration and the answer memory against hand-computed values."""

from __future__ import annotations

import io
import math

import pytest
import torch

from megatron_apo.algorithms.advantages import (
    AnswerMemory,
    broadcast_to_tokens,
    compute_advantages,
    grpo_advantages,
    inverse_success_weights,
    normalize_answer,
)

# groups: A = [1, 0, 1], all-correct [1, 1], all-wrong [0, 0, 0], single [1], B = [1, 0]
REWARDS = torch.tensor([1.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0])
GROUPS = ["A", "A", "A", "ok", "ok", "bad", "bad", "bad", "one", "B", "B"]
EPS = 1e-6


def _hand_grpo_std():
    sa, sb = math.sqrt(((1 / 3) ** 2 * 2 + (2 / 3) ** 2) / 2), math.sqrt(0.5)
    a = [(1 / 3) / (sa + EPS), (-2 / 3) / (sa + EPS), (1 / 3) / (sa + EPS)]
    b = [0.5 / (sb + EPS), -0.5 / (sb + EPS)]
    return torch.tensor(a + [0, 0] + [0, 0, 0] + [0] + b)


def test_grpo_with_std_matches_hand_values():
    got = grpo_advantages(REWARDS, GROUPS)
    assert torch.allclose(got, _hand_grpo_std(), atol=1e-6)


def test_grpo_without_std_matches_hand_values():
    got = grpo_advantages(REWARDS, GROUPS, norm_adv_by_std=False)
    want = torch.tensor([1 / 3, -2 / 3, 1 / 3, 0, 0, 0, 0, 0, 0, 0.5, -0.5])
    assert torch.allclose(got, want, atol=1e-7)


def test_grpo_batch_std_scope():
    centred = torch.tensor([1 / 3, -2 / 3, 1 / 3, 0, 0, 0, 0, 0, 0, 0.5, -0.5])
    std = math.sqrt((6 / 9 + 0.5) / 9)  # 10 responses in groups of >= 2 (the single one is left out)
    got = grpo_advantages(REWARDS, GROUPS, std_scope="batch")
    assert torch.allclose(got, centred / (std + EPS), atol=1e-6)


def test_group_ids_may_be_ints_in_any_order():
    perm = torch.tensor([9, 0, 4, 1, 10, 2, 5, 3, 8, 6, 7])
    ints = torch.tensor([{"A": 0, "ok": 1, "bad": 2, "one": 3, "B": 4}[g] for g in GROUPS])
    got = grpo_advantages(REWARDS[perm], ints[perm])
    assert torch.allclose(got, _hand_grpo_std()[perm], atol=1e-6)


@pytest.mark.parametrize("alpha, w_a, w_b", [(1.0, 0.8, 1.2), (2.0, 8 / 13, 18 / 13)])
def test_inverse_success_calibration_matches_hand_values(alpha, w_a, w_b):
    # success rates: A 2/3, B 1/2; only A and B have non-zero std. alpha=1: raw 1/3, 1/2, mean 5/12.
    w = inverse_success_weights(REWARDS > 0, GROUPS, REWARDS, alpha)
    assert torch.allclose(w[[0, 1, 2]], torch.full((3,), w_a)) and torch.allclose(w[[9, 10]], torch.full((2,), w_b))
    got = compute_advantages(REWARDS, GROUPS, {"adv_calibration": "inverse_success", "calib_alpha": alpha})
    want = _hand_grpo_std() * torch.tensor([w_a] * 3 + [1] * 6 + [w_b] * 2)
    assert torch.allclose(got, want, atol=1e-6)
    informative = torch.tensor([0, 1, 2, 9, 10])
    assert torch.isclose(w[informative[[0, 3]]].mean(), torch.tensor(1.0))  # mean weight over groups is 1


def test_inverse_success_without_informative_groups_is_identity():
    r = torch.tensor([1.0, 1.0, 0.0, 0.0])
    assert torch.equal(inverse_success_weights(r > 0, [0, 0, 1, 1], r), torch.ones(4))


def test_broadcast_to_tokens():
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert torch.equal(broadcast_to_tokens(torch.tensor([2.0, -1.0]), mask),
                       torch.tensor([[2.0, 2.0, 0.0], [-1.0, 0.0, 0.0]]))


# ---------------------------------------------------------------------------------------------------------
# answer memory (distribution-level calibration)

COMMON = "we add forty and two step by step and the total is 42"
RARE = "six groups of seven objects multiply to give 42 in all"


def test_frequent_correct_answer_gets_smaller_positive_advantage():
    rewards = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0])
    groups = ["p1"] * 5
    answers = ["42", "42", "\\boxed{42}", "42", "41"]
    texts = [COMMON, COMMON + " indeed", COMMON, RARE, "wrong"]
    cfg = {"adv_calibration_memory": True, "calib_memory_gamma": 0.5}
    mem = AnswerMemory.from_config(cfg)
    base = grpo_advantages(rewards, groups)
    first = compute_advantages(rewards, groups, cfg, calibrator=mem, answers=answers, texts=texts)
    assert torch.equal(first, base)  # a fresh prompt: frequencies are measured before the batch is added (0)
    got = compute_advantages(rewards, groups, cfg, calibrator=mem, answers=answers, texts=texts)
    # in memory now: three of the four correct answers are one mode (freq 3/4), the fourth is alone (1/4)
    assert torch.allclose(got[:3], base[:3] * (1 - 0.5 * 0.75), atol=1e-6)
    assert torch.isclose(got[3], base[3] * (1 - 0.5 * 0.25), atol=1e-6)
    assert got[3] > got[0] > 0
    assert got[4] == base[4] < 0  # wrong responses are untouched


def test_memory_persists_across_steps_and_survives_save_load():
    mem = AnswerMemory(gamma=0.5)
    for _ in range(3):  # the policy keeps producing the common mode
        mem.calibrate(torch.tensor([1.0]), ["p1"], ["42"], [COMMON], torch.tensor([True]))
    state = mem.state_dict()
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    restored = AnswerMemory()
    restored.load_state_dict(torch.load(buf, weights_only=True))
    assert len(restored) == len(mem) == 3
    step = dict(advantages=torch.tensor([0.8, 0.8]), prompt_ids=["p1", "p1"], answers=["42", "42"],
                texts=[COMMON, RARE], correct=torch.tensor([True, True]))
    a = mem.calibrate(**step)
    b = restored.calibrate(**step)
    assert torch.equal(a, b)
    # the memory before this batch: three COMMON answers -> freq 1 for COMMON, 0 for RARE
    assert torch.isclose(a[0], torch.tensor(0.8 * (1 - 0.5))) and torch.isclose(a[1], torch.tensor(0.8))
    fresh = AnswerMemory().calibrate(**step)  # without the remembered history both are equally rare
    assert torch.equal(fresh[0], fresh[1])
    assert AnswerMemory().frequency("other", "42", COMMON) == 0.0


def test_memory_keeps_the_newest_answers_per_prompt():
    mem = AnswerMemory(max_per_prompt=2)
    for text in (COMMON, RARE, RARE):
        mem.add("p", "42", text)
    assert len(mem) == 2 and mem.frequency("p", "42", COMMON) == 0.0


def test_normalize_answer():
    assert normalize_answer(" \\boxed{ 3/4 } ") == normalize_answer("$3 / 4$.") == "3/4"


def test_memory_on_without_calibrator_names_the_key():
    with pytest.raises(ValueError, match="algorithm.adv_calibration_memory"):
        compute_advantages(REWARDS, GROUPS, {"adv_calibration_memory": True})
    with pytest.raises(ValueError, match="algorithm.adv_calibration"):
        compute_advantages(REWARDS, GROUPS, {"adv_calibration": "magic"})
    with pytest.raises(ValueError, match="algorithm.calib_memory_gamma"):
        AnswerMemory(gamma=2.0)


def test_memory_compares_the_rewards_final_answers_not_whole_responses():
    """Two responses with a slightly different wording and the same boxed answer are one mode: the trainer passes
    the reward's extracted answer to the memory (passing whole texts, as before, made them two answers)."""
    from megatron_apo.rewards import RewardItem, RewardPool
    from megatron_apo.trainer.controller import advantages_of

    cfg = {"adv_calibration_memory": True, "calib_memory_gamma": 0.5}
    step1 = [COMMON + " so the answer is \\boxed{42}", "I think it is \\boxed{41}"]
    step2 = [COMMON + " hence the answer is \\boxed{ 42 }", "I think it is \\boxed{40}"]
    with RewardPool(num_workers=0) as pool:
        scored1, scored2 = (pool.score([RewardItem("math", t, "42") for t in texts]) for texts in (step1, step2))
    assert scored1.scores == scored2.scores == [1.0, 0.0] and scored2.answers[0] == "42"
    mem = AnswerMemory.from_config(cfg)
    base = advantages_of(scored1, [7, 7], step1, cfg, mem)
    damped = advantages_of(scored2, [7, 7], step2, cfg, mem)
    assert base[0] > 0 and torch.isclose(damped[0], base[0] * 0.5)  # freq 1: the same answer as last step
    assert damped[1] == base[1] < 0
    whole_texts = AnswerMemory.from_config(cfg)  # the old call: answers=texts
    for texts in (step1, step2):
        old = compute_advantages(torch.tensor([1.0, 0.0]), [7, 7], cfg, calibrator=whole_texts, answers=texts,
                                 texts=texts)
    assert torch.isclose(old[0], base[0])  # not recognised as the same answer


def test_failed_rewards_are_no_training_signal():
    """A sample whose reward failed gets advantage 0 and is left out of its group's mean and std."""
    from megatron_apo.rewards.pool import RewardBatch
    from megatron_apo.trainer.controller import advantages_of

    scored = RewardBatch(scores=[1.0, 0.0, 0.0, 1.0, 0.0], timed_out=[False] * 5,
                         errors=[None, None, "ValueError: nan", None, None], answers=["a", None, None, "b", None],
                         nonfinite=[False, False, True, False, False])
    adv = advantages_of(scored, [0, 0, 0, 1, 1], ["t"] * 5, {}, None)
    expected = grpo_advantages(torch.tensor([1.0, 0.0, 1.0, 0.0]), [0, 0, 1, 1])
    assert adv[2] == 0.0
    assert torch.allclose(adv[[0, 1, 3, 4]], expected)
    assert adv.isfinite().all()
