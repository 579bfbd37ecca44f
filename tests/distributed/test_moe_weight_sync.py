"""Weight sync of a Qwen3-MoE trainer to a CPU engine (transformers' Qwen3MoeForCausalLM) over the real protocol:
each expert-parallel rank's experts go straight into their HF tensors (`mlp.experts.<e>.gate_proj/up_proj/
down_proj`), same plan, buckets and checksums as the dense model.

* PP=2 (each stage's experts): after an optimizer step and a sync, the engine's logits equal the trainer's (fp32,
  max abs diff <= 1e-5);
* EP=2 and TP=2 x EP=2: the engine's weights equal the trainer's global weights (gathered as a reference in the
  test only) bit for bit, before and after every weight moved.
"""

import pytest
import torch

from megatron_apo.models import load_model_config
from megatron_apo.models.hf_mapping import hf_config_from_model_config, hf_shapes
from megatron_apo.rollout.fleet import EngineSpec, RolloutFleet
from tests.helpers.rollout_helpers import random_hf_state

pytestmark = pytest.mark.slow  # Ray + three 2-/4-rank MoE trainers: about 2 minutes on a busy 2-core machine

MODEL = "tiny-qwen3-moe"
HF_CONFIG = hf_config_from_model_config(load_model_config(MODEL))
PROBE = [[3, 1, 4, 1, 5, 9, 2, 6], [2, 7, 1, 8, 2, 8, 1, 8]]


@pytest.fixture(scope="module")
def fleet(ray_cluster):
    f = RolloutFleet(EngineSpec("megatron_apo.rollout.cpu_engine:CPUEngine",
                                dict(hf_config=HF_CONFIG, named_tensors=random_hf_state(0, HF_CONFIG), version=0)),
                     num_engines=1)
    yield f
    f.shutdown()


def _run(fleet, tp, ep, v, step, pp=1):
    from megatron_apo.parallel import run_distributed
    from tests.helpers.rollout_helpers import trainer_sync_body

    endpoint = fleet.sync_endpoint("gloo", timeout_s=120, fresh=True)
    refs = [fleet.begin_weight_sync(v), fleet.begin_weight_sync(v + 1)]
    out = run_distributed(trainer_sync_body, tp * pp * ep, endpoint, tp, pp, PROBE, v, timeout=300, model=MODEL, ep=ep,
                          step=step, bucket_bytes=32 << 10)
    stats = out[0]["stats"]
    assert stats[0].num_tensors == len(hf_shapes(load_model_config(MODEL))) and stats[0].num_buckets > 1
    fleet.finish_weight_sync(refs[0], expected_checksum=stats[0].checksum)
    fleet.finish_weight_sync(refs[1], expected_checksum=stats[1].checksum)
    assert stats[0].checksum != stats[1].checksum and fleet.engine_versions() == [v + 1]
    return out


def test_pp2_trainer_syncs_experts_and_engine_logits_match_after_an_optimizer_step(fleet):
    out = _run(fleet, 1, 1, 10, "optimizer", pp=2)
    before, after = [next(r["logits"][i] for r in out if r["logits"][i] is not None) for i in (0, 1)]
    assert (after - before).abs().max() > 1e-3  # the optimizer step changed the model
    for got in fleet.logits(PROBE):
        assert (got - after).abs().max() <= 1e-5


@pytest.mark.parametrize("tp,ep", [(1, 2), (2, 2)])
def test_expert_parallel_trainer_syncs_each_ranks_experts_bit_exact(fleet, tp, ep):
    import ray

    out = _run(fleet, tp, ep, 100 * tp + 10 * ep, "perturb")
    want = {}
    for r in out:  # each EP rank reports its own experts (and DP rank 0 the dense weights)
        want.update({n: torch.from_numpy(a) for n, a in r["weights"][1].items()})
    assert set(want) == set(hf_shapes(load_model_config(MODEL)))
    # no gather across EP: expert e's pieces come from the TP ranks of the EP rank that holds it, and only them
    sources = out[0]["sources"]
    first, second = (sources[f"model.layers.1.mlp.experts.{e}.down_proj.weight"] for e in (0, 3))
    assert len(first) == len(second) == tp and not first & second and 0 in first
    for e in range(4):
        for w in ("gate_proj", "up_proj", "down_proj"):
            assert sources[f"model.layers.0.mlp.experts.{e}.{w}.weight"] == (first if e < 2 else second)
    got = dict(ray.get(fleet.actors[0].export_weights.remote()))
    assert set(got) == set(want)
    for name, t in want.items():
        assert torch.equal(got[name], t), name
    moved = out[0]["weights"][0]
    assert all(not torch.equal(torch.from_numpy(moved[n]), want[n]) for n in moved)  # the second sync: new values
