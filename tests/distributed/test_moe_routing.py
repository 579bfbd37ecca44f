"""Routing mismatch: Megatron's and transformers' top-k expert sets for the same tiny Qwen3-MoE weights."""

import pytest

from megatron_apo.parallel import run_distributed
from tests.helpers.moe_bodies import routing_vs_transformers


@pytest.mark.slow
def test_same_weights_route_every_token_alike_and_a_perturbed_router_does_not():
    same = run_distributed(routing_vs_transformers, 1, timeout=180)[0]
    assert same["layers"] == 2 and same["per_token_experts"] == [2]  # top-2 in both MoE layers
    assert same["mismatch"] == 0.0 and same["masked_mismatch"] == 0.0
    noisy = run_distributed(routing_vs_transformers, 1, router_noise=0.05, timeout=180)[0]
    assert 0.0 < noisy["mismatch"] < 1.0
