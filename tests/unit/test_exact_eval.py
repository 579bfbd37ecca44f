"""Exact pass@k (eval/exact.py): teacher-forced p(valid | prompt) against hand values, and against a large sample
drawn by the CPU engine from the same weights (the spot check: within the binomial interval)."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_apo.config import InputError
from megatron_apo.eval.exact import exact_pass_at_k, listed_answers, valid_probs
from megatron_apo.rollout import SamplingParams
from megatron_apo.rollout.cpu_engine import CPUEngine
from tests.helpers.rollout_helpers import TINY_HF_CONFIG, random_hf_state

STOP = 5


def test_hand_values_with_fixed_logits_and_temperature():
    # every position has the same logits over 6 tokens; p(answer) = prod softmax(z / T)[token] * softmax[stop]
    z = torch.tensor([0.0, 1.0, -1.0, 0.5, 2.0, 0.3])

    def logits_fn(seqs):
        return z.expand(len(seqs), len(seqs[0]), 6).clone()

    for temp in (1.0, 0.7):
        q = torch.softmax(z / temp, -1)
        params = SamplingParams(temperature=temp, max_new_tokens=3)
        got = valid_probs(logits_fn, [[0, 1], [2]], [[[1], [2, 3]], [[4, 4], [4, 4, 4]]], [STOP], params)
        want0 = float(q[1] * q[STOP] + q[2] * q[3] * q[STOP])
        want1 = float(q[4] * q[4] * q[STOP])  # [4, 4, 4] + stop needs 4 tokens > max_new_tokens: left out
        assert got == pytest.approx([want0, want1], rel=1e-6)
    assert exact_pass_at_k(0.25, 4) == pytest.approx(1 - 0.75 ** 4)


@pytest.mark.slow  # ~15 s: 8000 sampled responses
def test_exact_agrees_with_a_large_sample_of_the_engine():
    cfg = dict(TINY_HF_CONFIG, vocab_size=6)  # near-uniform over 6 tokens: p(valid) is not tiny
    engine = CPUEngine(cfg, random_hf_state(3, cfg), version=0, max_batch_size=2048)
    prompts = [[0, 1, 2], [3, 0]]
    answers = [[[1], [2], [0], [2, 3]], [[4], [3], [4, 4], [0, 1, 2]]]
    params = SamplingParams(n=4000, temperature=1.5, max_new_tokens=4, stop_token_ids=(STOP,), seed=11)
    exact = valid_probs(engine.logits, prompts, answers, [STOP], params)
    samples = engine.generate(prompts, params)
    for p, ans, group in zip(exact, answers, samples):
        ok = {tuple(a) + (STOP,) for a in ans}
        hits = sum(tuple(s.token_ids) in ok for s in group)
        est, se = hits / len(group), math.sqrt(p * (1 - p) / len(group))
        assert 0.01 < p < 0.95 and abs(est - p) < 4 * se, (p, est, se)


def test_listed_answers_of_the_toy_tasks_and_an_unlisted_source():
    assert listed_answers("toy_code/heldout_hard", "b3,a7") == ["a7", "b3"]
    assert listed_answers("toy_squeeze/trained_easy", "w1|w2;w3") == ["w1 w3", "w2 w3"]
    with pytest.raises(InputError, match="does not list its valid answers"):
        listed_answers("math", "42")
