"""MoE routing replay (rollout.routing_replay, docs/models.md): the trainer's routers take the experts the rollout
engine routed each token to, in the old-policy and the train pass, at TP x EP and PP.

The CPU engine rolls out tiny-qwen3-moe with the trainer's weights but a perturbed router (noise 0.05 on the gate
weights), so about half of the (response token, layer) pairs are routed to other experts than Megatron's own
router picks. Replayed, none are, and the engine-vs-trainer log-prob mismatch drops (what is left comes from the
perturbed gate weights alone).
"""

import pytest
import torch

from megatron_apo.config import InputError
from megatron_apo.models.routing import prompt_experts_tensor, replay_positions
from megatron_apo.parallel import run_distributed
from tests.helpers.moe_replay_bodies import engine_samples, replay_step


@pytest.fixture(scope="module")
def noisy_rollout():
    return run_distributed(engine_samples, 1, 0.05, timeout=300)[0]


@pytest.fixture(scope="module")
def replayed(noisy_rollout):
    return run_distributed(replay_step, 1, *noisy_rollout, True, timeout=300)[0]


@pytest.mark.slow
def test_replay_routes_every_response_token_as_the_engine_and_lowers_the_logprob_mismatch(noisy_rollout, replayed):
    own = run_distributed(replay_step, 1, *noisy_rollout, False, timeout=300)[0]
    assert own["metrics"]["rollout/routing_mismatch"] > 0.2  # the perturbed router really routes differently
    assert own["train_routing_mismatch"] > 0.2
    assert replayed["metrics"]["rollout/routing_mismatch"] == 0.0  # old-policy pass
    assert replayed["train_routing_mismatch"] == 0.0  # train pass
    assert replayed["metrics"]["rollout/logprob_abs_diff"] < 0.5 * own["metrics"]["rollout/logprob_abs_diff"]


@pytest.mark.slow
def test_replay_of_an_unperturbed_engine_matches_the_trainer_to_fp32():
    """Every prompt and response position lands on its own route: with the engine's own weights the replayed
    log-probs are the trainer's (a route shifted by one position would change them)."""
    prompts, raw = run_distributed(engine_samples, 1, 0.0, timeout=300)[0]
    out = run_distributed(replay_step, 1, prompts, raw, True, timeout=300)[0]
    assert out["metrics"]["rollout/routing_mismatch"] == 0.0
    assert out["metrics"]["rollout/logprob_abs_diff"] < 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("tp,pp,ep", [(2, 1, 2), (1, 2, 1)])
def test_replay_is_the_same_at_tp_ep_and_pp(noisy_rollout, replayed, tp, pp, ep):
    world = tp * pp if pp > 1 else 4
    out = run_distributed(replay_step, world, *noisy_rollout, True, tp, pp, ep, timeout=400)
    m = out[0]["metrics"]
    assert m["rollout/logprob_abs_diff"] == pytest.approx(replayed["metrics"]["rollout/logprob_abs_diff"], abs=1e-5)
    if pp == 1:
        assert m["rollout/routing_mismatch"] == 0.0
        assert all(r["train_routing_mismatch"] == 0.0 for r in out)


@pytest.mark.slow
def test_replay_in_packed_micro_batches_is_the_padded_one(noisy_rollout, replayed):
    m = run_distributed(replay_step, 1, *noisy_rollout, True, pack=True, timeout=300)[0]["metrics"]
    assert m["rollout/routing_mismatch"] == 0.0
    assert m["rollout/logprob_abs_diff"] == pytest.approx(replayed["metrics"]["rollout/logprob_abs_diff"], abs=1e-5)


# ---- the per-position routes, without a model ----

def _batch(prompt_lens, resp_lens, s=16, layers=2, k=2):
    n, t = len(prompt_lens), max(resp_lens)
    resp = torch.full((n, t, layers, k), -1, dtype=torch.long)
    prompt_routes = []
    resp_index = torch.zeros(n, t, dtype=torch.long)
    mask = torch.zeros(n, t)
    for i, (p, r) in enumerate(zip(prompt_lens, resp_lens)):
        # expert id = 10 * sample + position, so a route's position can be read back
        resp[i, :r] = (10 * i + p - 1 + torch.arange(r))[:, None, None].expand(r, layers, k)
        prompt_routes.append([[[10 * i + q] * k] * layers for q in range(p - 1)])
        resp_index[i] = p - 1 + torch.arange(t)
        mask[i, :r] = 1
    return {"tokens": torch.zeros(n, s, dtype=torch.long), "resp_index": resp_index.clamp(max=s - 1),
            "response_mask": mask, "rollout_experts": resp,
            "prompt_experts": prompt_experts_tensor(prompt_routes, list(prompt_lens))}


def test_every_position_up_to_the_last_response_token_gets_its_route():
    full = replay_positions(_batch([3, 5], [4, 2]))  # [b, S, layers, k]
    assert full[0, :6, 0, 0].tolist() == [0, 1, 2, 3, 4, 5]  # 2 prompt positions + 4 predicting response tokens
    assert (full[0, 6:] == -1).all()  # the last response token and the padding: the router's own choice
    assert full[1, :6, 1, 1].tolist() == [10, 11, 12, 13, 14, 15] and (full[1, 6:] == -1).all()


def test_a_masked_out_sample_needs_no_response_route():
    mb = _batch([3, 5], [4, 2])
    mb["response_mask"][1] = 0  # an empty micro-batch's stand-in sample (trainer/batch.py::_take)
    full = replay_positions(mb)
    assert full[1, :4, 0, 0].tolist() == [10, 11, 12, 13] and (full[1, 4:] == -1).all()


def test_packed_rows_place_each_sample_at_its_offset():
    mb = _batch([3, 2], [2, 3])
    starts = torch.tensor([0, 5])  # sample 0: 3 + 2 tokens, then sample 1
    mb["resp_index"] = starts[:, None] + mb["resp_index"]
    mb["resp_row"] = torch.zeros(2, dtype=torch.long)
    mb["tokens"] = torch.zeros(1, 16, dtype=torch.long)
    full = replay_positions(mb)
    assert full[0, :9, 0, 0].tolist() == [0, 1, 2, 3, -1, 10, 11, 12, 13]


def test_a_missing_route_is_a_one_line_error_never_a_fallback():
    mb = _batch([3, 5], [4, 2])
    with pytest.raises(InputError, match="rollout.routing_replay is on but the rollout samples carry no routed"):
        replay_positions({**mb, "prompt_experts": None})
    short = mb["rollout_experts"].clone()
    short[0, 2:] = -1  # the engine's routes stop before the response does
    with pytest.raises(InputError, match="sample 0 of a micro-batch has positions without a route"):
        replay_positions({**mb, "rollout_experts": short})
    with pytest.raises(InputError, match="returned routed experts for 1 prompt positions, its prompt has 3 tokens"):
        prompt_experts_tensor([[[[0, 1]] * 2]], [3])


def test_known_routes_replay_and_the_router_choice_elsewhere():
    from megatron.core.transformer.moe.moe_utils import topk_routing_with_score_function
    from megatron.core.transformer.moe.router_replay import RouterReplayAction

    from megatron_apo.models.routing import _replay_class

    known, _, _ = _replay_class()
    rr = known()
    logits = torch.tensor([[4.0, 3.0, 0.0, 0.0], [4.0, 3.0, 0.0, 0.0]])
    rr.target_topk_idx = torch.tensor([[2, 3], [-1, -1]])
    rr.set_router_replay_action(RouterReplayAction.REPLAY_FORWARD)
    probs, routing_map = topk_routing_with_score_function(logits, 2, router_replay=rr)
    assert routing_map.tolist() == [[False, False, True, True], [True, True, False, False]]
    assert probs[0, 2:].tolist() == pytest.approx([0.5, 0.5])  # the router's softmax over the replayed experts
    assert probs[1, :2].sum() == pytest.approx(1.0)
