"""The Ray rollout fleet: ordering, determinism, engine deaths, and the gloo weight-sync transport + checksums.

All tests share one local Ray cluster (`ray_cluster` fixture, 2 CPUs) and, where possible, one fleet.
"""

import glob
import time

import pytest
import torch

from megatron_apo.rollout import SamplingParams
from megatron_apo.rollout.cpu_engine import CPUEngine
from megatron_apo.rollout.fleet import EngineSpec, RolloutFleet
from megatron_apo.rollout.weight_sync import WeightSyncError
from tests.helpers.rollout_helpers import TINY_HF_CONFIG, random_hf_state, reference_logits, sync_from_driver

PROMPTS = [[1 + i, 2 + i, 3 + (i % 5)] for i in range(10)]
PARAMS = SamplingParams(n=3, temperature=1.0, top_p=0.95, max_new_tokens=8, seed=21)
PROBE = [[3, 1, 4, 1, 5, 9, 2, 6], [2, 7, 1, 8, 2, 8, 1, 8]]


@pytest.fixture(scope="module")
def fleet(ray_cluster):
    f = RolloutFleet(EngineSpec("megatron_apo.rollout.cpu_engine:CPUEngine",
                                dict(hf_config=TINY_HF_CONFIG, named_tensors=random_hf_state(0), version=0)),
                     num_engines=2, chunk_size=3)
    yield f
    f.shutdown()


def _keys_and_tokens(out):
    return [[(s.prompt_index, s.sample_index, tuple(s.token_ids)) for s in samples] for samples in out]


def test_fleet_spreads_prompts_and_matches_one_local_engine(fleet):
    out = fleet.generate(PROMPTS, PARAMS)
    local = CPUEngine(TINY_HF_CONFIG, random_hf_state(0), version=0).generate(PROMPTS, PARAMS)
    # seeds depend on the global prompt index, so spreading over engines changes nothing
    assert _keys_and_tokens(out) == _keys_and_tokens(local)
    assert fleet.generate(PROMPTS, PARAMS)[4][2].token_ids == out[4][2].token_ids


_sync_from_driver = sync_from_driver


def test_gloo_sync_loads_weights_and_checksum_catches_corruption(fleet):
    new = random_hf_state(5)
    refs, total, nb = _sync_from_driver(fleet, 3, new)
    assert nb > 3  # several buckets
    results = fleet.finish_weight_sync(refs, expected_checksum=total)
    assert [r["version"] for r in results] == [3, 3] and fleet.engine_versions() == [3, 3]
    want = reference_logits(new, PROBE)
    for got in fleet.logits(PROBE):
        assert (got - want).abs().max() <= 1e-5

    # a corrupted bucket: every engine detects it, refuses the sync and stops serving
    bad = random_hf_state(6)
    refs, total, _ = _sync_from_driver(fleet, 4, bad, corrupt_bucket=2)
    with pytest.raises(WeightSyncError, match="bucket 2: checksum mismatch"):
        fleet.finish_weight_sync(refs, expected_checksum=total)
    assert fleet.engine_versions() == [3, 3]
    with pytest.raises(Exception, match="refuses to serve"):
        fleet.generate(PROMPTS[:2], PARAMS)

    # the next good sync (same group, reused) brings the fleet back
    refs, total, _ = _sync_from_driver(fleet, 5, bad)
    fleet.finish_weight_sync(refs, expected_checksum=total)
    assert fleet.engine_versions() == [5, 5]
    for got in fleet.logits(PROBE):
        assert (got - reference_logits(bad, PROBE)).abs().max() <= 1e-5
    assert len(fleet.generate(PROMPTS[:2], PARAMS)) == 2


@pytest.mark.slow
def test_engine_killed_during_generate_loses_and_duplicates_nothing(ray_cluster, tmp_path):
    weights = random_hf_state(8)
    spec = EngineSpec("tests.helpers.rollout_helpers:CrashingCPUEngine",
                      dict(hf_config=TINY_HF_CONFIG, named_tensors=weights, version=2,
                           crash_marker=str(tmp_path / "crashed")))
    f = RolloutFleet(spec, num_engines=2, chunk_size=2)
    try:
        assert f.weights_version() == 2  # built with weights (like eval's engines reading files): current at once
        out = f.generate(PROMPTS, PARAMS)
        assert (tmp_path / "crashed").exists() and f.restarts == 1
        assert f.duplicates_dropped == 0
        keys = [(s.prompt_index, s.sample_index) for samples in out for s in samples]
        assert keys == [(p, i) for p in range(len(PROMPTS)) for i in range(PARAMS.n)]  # each exactly once, in order
        local = CPUEngine(TINY_HF_CONFIG, weights, version=2).generate(PROMPTS, PARAMS)
        assert _keys_and_tokens(out) == _keys_and_tokens(local)  # the resubmitted samples are the same samples
        assert f.engine_versions() == [2, 2]
        for got in f.logits(PROBE):
            assert (got - reference_logits(weights, PROBE)).abs().max() <= 1e-6
    finally:
        f.shutdown()


@pytest.mark.slow
def test_single_engine_lost_mid_generate_is_replaced_by_a_trainer_sync(ray_cluster, tmp_path):
    """num_engines=1: the replacement gets the trainer's weights by a sync (no peer, no object store), and
    the interrupted generate resumes: every sample exactly once, the same as an undisturbed run."""
    from megatron_apo.rollout.fleet import FleetNeedsSync

    spec = EngineSpec("tests.helpers.rollout_helpers:CrashingCPUEngine",
                      dict(hf_config=TINY_HF_CONFIG, named_tensors=random_hf_state(0), version=0,
                           crash_marker=str(tmp_path / "crashed")))
    f = RolloutFleet(spec, num_engines=1, chunk_size=3)
    try:
        current = random_hf_state(9)
        refs, total, _ = _sync_from_driver(f, 3, current)
        f.finish_weight_sync(refs, expected_checksum=total)
        with pytest.raises(FleetNeedsSync, match="run a weight sync"):
            f.generate(PROMPTS, PARAMS)  # the engine dies after its first chunk; its replacement holds v0
        assert (tmp_path / "crashed").exists() and f.restarts == 1 and f.needs_sync()
        assert f.engine_versions() == [0]  # the spec's weights, not served: it gets no work until the sync
        refs, total, _ = _sync_from_driver(f, 3, current)  # the trainer syncs its weights (a new group)
        f.finish_weight_sync(refs, expected_checksum=total)
        out = f.generate(PROMPTS, PARAMS)  # resumes: the chunks returned before the death are kept
        keys = [(s.prompt_index, s.sample_index) for samples in out for s in samples]
        assert keys == [(p, i) for p in range(len(PROMPTS)) for i in range(PARAMS.n)]
        assert f.duplicates_dropped == 0
        local = CPUEngine(TINY_HF_CONFIG, current, version=3).generate(PROMPTS, PARAMS)
        assert _keys_and_tokens(out) == _keys_and_tokens(local)
    finally:
        f.shutdown()


@pytest.mark.slow
def test_rejected_sync_leaves_old_weights_and_a_refusing_engine_is_never_a_source(ray_cluster):
    """A corrupted sync: CPU engines keep every old tensor (all-old, not mixed) and refuse to serve; an engine
    lost then is replaced with its own construction weights (never a refusing peer's), and only the next
    verified sync brings the fleet back."""
    import ray

    from megatron_apo.rollout.fleet import FleetNeedsSync

    f = RolloutFleet(EngineSpec("megatron_apo.rollout.cpu_engine:CPUEngine",
                                dict(hf_config=TINY_HF_CONFIG, named_tensors=random_hf_state(0), version=0)),
                     num_engines=2, chunk_size=3)
    try:
        good = random_hf_state(11)
        refs, total, _ = _sync_from_driver(f, 3, good)
        f.finish_weight_sync(refs, expected_checksum=total)
        refs, total, _ = _sync_from_driver(f, 4, random_hf_state(12), corrupt_bucket=3)
        with pytest.raises(WeightSyncError, match="bucket 3: checksum mismatch"):
            f.finish_weight_sync(refs, expected_checksum=total)

        def served(engine):
            return [(n, p.detach().clone()) for n, p in engine.model.named_parameters()]

        for actor in f.actors:
            held = dict(ray.get(actor.__ray_call__.remote(served)))
            assert all(torch.equal(held[n], t) for n, t in good)  # every tensor still v3's, none from v4
            with pytest.raises(Exception, match="refuses to serve"):
                ray.get(actor.export_weights.remote())
        with pytest.raises(FleetNeedsSync, match="refuses to serve"):
            f.generate(PROMPTS, PARAMS)
        victim = f.actors[0]
        ray.kill(victim, no_restart=True)  # asynchronous: wait until the actor is really gone
        with pytest.raises(ray.exceptions.RayActorError):
            for _ in range(600):
                ray.get(victim.weights_version.remote())
                time.sleep(0.1)
        assert f.replace_dead_engines() == [0]  # (the next sync_endpoint() does this by itself)
        assert f.restarts == 1 and f.engine_versions() == [0, 3]  # the replacement: its own v0, not a peer's
        held = dict(ray.get(f.actors[0].__ray_call__.remote(served)))
        assert all(torch.equal(held[n], t) for n, t in random_hf_state(0))
        new = random_hf_state(13)
        refs, total, _ = _sync_from_driver(f, 5, new)
        f.finish_weight_sync(refs, expected_checksum=total)
        assert f.engine_versions() == [5, 5] and not f.needs_sync()
        for got in f.logits(PROBE):
            assert (got - reference_logits(new, PROBE)).abs().max() <= 1e-5
    finally:
        f.shutdown()


@pytest.mark.slow
@pytest.mark.parametrize("tp,pp,shm", [(2, 1, "on"), (2, 1, "off"), (2, 1, "full"), (1, 2, "on"), (2, 2, "on")])
def test_megatron_trainer_syncs_to_two_engines(fleet, tp, pp, shm):
    """TP=2 / PP=2 / both (gloo) trainer -> 2 CPUEngine actors: after an optimizer step and a sync, logits match.

    Same-host ranks hand rank 0 their pieces through shared memory; "off" (`shared_memory=False`) forces the
    point-to-point path (NCCL ranks and other hosts); "full": /dev/shm has no room, so point-to-point too."""
    from megatron_apo.parallel import run_distributed
    from tests.helpers.rollout_helpers import trainer_sync_body

    v = 10 * tp + 20 * pp + {"on": 0, "off": 100, "full": 200}[shm]  # versions unused by the other tests of this fleet
    endpoint = fleet.sync_endpoint("gloo", timeout_s=120, fresh=True)  # a new trainer process: a new group
    refs = [fleet.begin_weight_sync(v), fleet.begin_weight_sync(v + 1)]  # queued: one per trainer sync
    out = run_distributed(trainer_sync_body, tp * pp, endpoint, tp, pp, PROBE, v, timeout=300,
                          shared_memory=shm != "off", shm_full=shm == "full")
    stats = out[0]["stats"]
    assert all(r["stats"] == [None, None] for r in out[1:])  # only global rank 0 talks to the fleet
    from megatron_apo.models import load_model_config
    from megatron_apo.models.hf_mapping import hf_param_names

    assert stats[0].num_buckets > 1 and stats[0].num_tensors == len(hf_param_names(load_model_config("tiny")))
    assert stats[0].shared_memory_ranks == (tp * pp - 1 if shm == "on" else 0)
    assert not glob.glob("/dev/shm/megatron-apo-weight-sync-*")  # unlinked once mapped
    fleet.finish_weight_sync(refs[0], expected_checksum=stats[0].checksum)
    fleet.finish_weight_sync(refs[1], expected_checksum=stats[1].checksum)
    assert stats[0].checksum != stats[1].checksum
    assert fleet.engine_versions() == [v + 1, v + 1] and fleet.weights_version() == v + 1
    before, after = [next(r["logits"][i] for r in out if r["logits"][i] is not None) for i in (0, 1)]
    assert (after - before).abs().max() > 1e-3  # the optimizer step changed the model
    for got in fleet.logits(PROBE):
        assert got.shape == after.shape
        assert (got - after).abs().max() <= 1e-5


@pytest.fixture
def control_plane_of_one():
    """A one-rank trainer's control plane in this process (in-memory store): what FleetWeights.sync needs."""
    import torch.distributed as dist

    from megatron_apo.parallel import control_plane

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    control_plane.init(timeout_minutes=2)
    yield
    control_plane.destroy()
    dist.destroy_process_group()


@pytest.mark.slow
def test_engine_death_while_a_prefetch_and_a_sync_overlap(ray_cluster, control_plane_of_one):
    """One-step-off-policy's two threads: the prefetch's `generate` and the main thread's weight sync both find
    an engine dead, round after round. One restart per death, every sample exactly once, and each made by the
    weights of the version it reports (compared token by token with a local engine holding that version)."""
    import concurrent.futures

    import ray

    from megatron_apo.trainer.rollout_source import FleetWeights
    from tests.helpers.rollout_helpers import DriverController, DriverSender

    rounds = 4
    weights = {v: random_hf_state(40 + v) for v in range(rounds + 1)}
    f = RolloutFleet(EngineSpec("megatron_apo.rollout.cpu_engine:CPUEngine",
                                dict(hf_config=TINY_HF_CONFIG, named_tensors=weights[0], version=0)),
                     num_engines=2, chunk_size=1, max_restarts=2 * rounds)
    sync = FleetWeights(DriverController(f, timeout_s=60), DriverSender(weights)).sync
    prefetch = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="rollout")
    try:
        sync(0)
        for r in range(rounds):
            params = SamplingParams(n=2, temperature=1.0, max_new_tokens=6, seed=100 + r)
            future = prefetch.submit(f.generate, PROMPTS, params)  # step r+1's rollout while step r "trains"
            time.sleep(0.3 * (r % 3))  # the death lands at a different point of the generation each round
            victim = f.actors[r % 2]
            ray.kill(victim, no_restart=True)
            with pytest.raises(ray.exceptions.RayActorError):
                for _ in range(300):
                    ray.get(victim.weights_version.remote())
                    time.sleep(0.05)
            sync(r + 1)  # the main thread's sync, racing the prefetch's restart of the same engine
            out = future.result(timeout=120)
            assert f.restarts == r + 1  # exactly one restart per death, whichever thread saw it first
            assert f.engine_versions() == [r + 1, r + 1] and not f.needs_sync()
            keys = [(s.prompt_index, s.sample_index) for samples in out for s in samples]
            assert keys == [(p, i) for p in range(len(PROMPTS)) for i in range(params.n)]
            versions = {s.meta["weights_version"] for samples in out for s in samples}
            assert versions <= {r, r + 1}, versions
            local = {v: CPUEngine(TINY_HF_CONFIG, weights[v], version=v).generate(PROMPTS, params) for v in versions}
            for p, samples in enumerate(out):
                for s in samples:
                    want = local[s.meta["weights_version"]][p][s.sample_index]
                    assert s.token_ids == want.token_ids and s.logprobs == pytest.approx(want.logprobs, abs=1e-5)
    finally:
        prefetch.shutdown(wait=True, cancel_futures=True)
        f.shutdown()
