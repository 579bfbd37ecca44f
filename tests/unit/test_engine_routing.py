"""The CPU engine reports, per response token, the experts its decoding routed the predicting position to: the
same top-k sets as one full forward of prompt + response; dense models report nothing."""

import pytest
import torch

from megatron_apo.models.routing import hf_routing
from megatron_apo.rollout.cpu_engine import CPUEngine
from megatron_apo.rollout.engine import SamplingParams
from tests.helpers.hf_models import build_hf_model


def test_decoding_routing_equals_a_full_forward(tmp_path):
    model = build_hf_model("qwen3-moe")
    model.save_pretrained(tmp_path)
    engine = CPUEngine(model_path=str(tmp_path))
    prompts = [[5, 9, 11, 3], [7, 8]]  # different lengths: left padding in the engine's batch
    samples = engine.generate(prompts, SamplingParams(n=2, max_new_tokens=6, seed=1))
    checked = 0
    for prompt, group in zip(prompts, samples):
        for s in group:
            routed = torch.tensor(s.meta["routed_experts"])  # [T, layers, k]
            assert routed.shape == (len(s.token_ids), 2, 2)
            full = hf_routing(model, torch.tensor([prompt + s.token_ids]), top_k=2)[:, 0]  # [layers, S, E]
            for j in range(len(s.token_ids)):
                want = full[:, len(prompt) - 1 + j]  # the position whose logits sampled token j
                got = torch.zeros_like(want).scatter_(-1, routed[j], True)
                assert torch.equal(got, want), (j, got, want)
                checked += 1
    assert checked >= 4


def test_dense_models_report_no_routing(tmp_path):
    model = build_hf_model("qwen3")
    model.save_pretrained(tmp_path)
    s = CPUEngine(model_path=str(tmp_path)).generate([[5, 9]], SamplingParams(max_new_tokens=3, seed=1))[0][0]
    assert "routed_experts" not in s.meta


def test_response_routing_mismatch_counts_differing_token_layer_pairs():
    from megatron_apo.models.routing import response_routing_mismatch, routing_maps_from_ids

    b, s, layers, e = 2, 6, 2, 4
    gen = torch.Generator().manual_seed(0)
    ids = torch.stack([torch.randperm(e, generator=gen)[:2] for _ in range(layers * s * b)]).view(layers, s, b, 2)
    maps = [routing_maps_from_ids(ids[i], e).view(s * b, e) for i in range(layers)]  # Megatron's [s*b, E] order
    resp_index = torch.tensor([[2, 3, 4], [1, 2, 3]])
    rollout = torch.stack([ids[:, resp_index[i], i] for i in range(b)]).permute(0, 2, 1, 3).clone()  # [b,T,L,k]
    rollout[1, 2] = -1  # past the end of sample 1's response
    batch = {"tokens": torch.zeros(b, s, dtype=torch.long), "resp_index": resp_index, "rollout_experts": rollout,
             "response_mask": torch.tensor([[1.0, 1, 1], [1, 1, 0]])}
    assert response_routing_mismatch(list(maps), batch) == 0.0
    other = [x for x in range(e) if x not in rollout[0, 1, 1].tolist()]
    rollout[0, 1, 1] = torch.tensor(other[:2])  # token 1 of sample 0, layer 1: a different expert set
    assert response_routing_mismatch(list(maps), batch).item() == pytest.approx(1 / (5 * layers))
