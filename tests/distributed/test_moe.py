"""Mixture of experts: TP x EP on gloo equals the single-process model (logits, gradients, grad norm), fp32.

Tolerances: 1e-5 absolute on logits (|logits| ~ 1), 1e-5 relative to the largest entry on each gradient,
1e-5 relative on the grad norm. The parallel runs reduce in a different order, so bitwise equality is not
expected; a wrong expert placement, a missing reduction or a double-counted norm is off by O(1).
"""

import pytest
import torch

from megatron_apo.parallel import run_distributed
from tests.helpers.moe_bodies import moe_logits_grads_norm

pytestmark = pytest.mark.slow  # spawns 4 gloo ranks building and running megatron-core MoE


def _run(world, **kw):
    results = run_distributed(moe_logits_grads_norm, world, **kw)
    for r in results:
        r["logits"] = torch.from_numpy(r["logits"])
        r["grads"] = {k: torch.from_numpy(v) for k, v in r["grads"].items()}
    return results


@pytest.fixture(scope="module")
def reference():
    return _run(1, tp=1, ep=1, timeout=180)[0]


def _check_logits(results, ref):
    for r in results:
        a, b = r["rows"]
        diff = (r["logits"] - ref["logits"][a:b]).abs().max().item()
        assert diff <= 1e-5, (r["tp_rank"], r["ep_rank"], diff)
    assert ref["logits"].abs().max() > 0.1  # the comparison is not between zeros


def _check_norm(results, ref):
    for r in results:  # every rank reports the same global norm
        assert r["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-5), (r["grad_norm"], ref["grad_norm"])
    assert ref["grad_norm"] > 0


def test_tp2_ep2_logits_grads_and_norm_equal_single_process(reference):
    results = _run(4, tp=2, ep=2, timeout=420)
    _check_logits(results, reference)
    assert sorted({r["expert_offset"] for r in results}) == [0, 2]  # two EP ranks, two experts each

    merged = {}
    for r in results:
        for name, g in r["grads"].items():
            if name in merged:  # replicas (other DP / TP ranks) hold the same reduced gradient
                assert (g - merged[name]).abs().max().item() <= 1e-6 * max(1.0, g.abs().max().item()), name
            merged[name] = g
    ref = reference["grads"]
    assert sorted(merged) == sorted(ref)
    assert any(".experts.local_experts.3." in n for n in merged)
    for name, g in ref.items():
        diff = (merged[name] - g).abs().max().item()
        assert diff <= 1e-5 * max(1.0, g.abs().max().item()), (name, diff)
    expert_grads = [g for n, g in ref.items() if ".local_experts." in n]
    assert all(g.abs().max() > 0 for g in expert_grads)  # every expert got tokens
    _check_norm(results, reference)


def test_ep2_distributed_optimizer_norm_and_logits(reference):
    # EP alone: two ranks are DP=2 for dense params and EP=2 (expert-DP=1) for experts; the distributed
    # optimizer's norm sums every rank's shard over the whole world.
    results = _run(2, tp=1, ep=2, distributed_optimizer=True, timeout=300)
    _check_logits(results, reference)
    _check_norm(results, reference)
