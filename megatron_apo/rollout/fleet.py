"""A fleet of rollout engines as Ray actors: spreads prompts, gathers results in order, survives engine deaths.

Fault tolerance: work goes out in chunks of prompts; when an actor dies (`RayActorError`), it is
replaced by a new actor, the new one is brought to the fleet's current weights, and only the chunks
that had not returned are resubmitted. Results are keyed by (prompt index, sample index), so no sample
is lost or counted twice.

Weights for a restarted engine: we re-request them from a live engine (`export_weights` -> Ray object
store -> `update_weights` on the new actor) instead of keeping a copy on the driver: the driver is the
trainer's rank 0 and must not hold a second full model; the live engines' weights are exactly the
verified current version. If no engine is alive the fleet raises and the trainer must sync again.
A restart also invalidates the weight-sync group (its membership changed): the next
`sync_endpoint()` opens a new one.
"""

from __future__ import annotations

import importlib
import math
import os
from dataclasses import dataclass, field
from typing import Any, Sequence

from megatron_apo.rollout.engine import Sample, SamplingParams
from megatron_apo.rollout.sync_group import SyncEndpoint
from megatron_apo.rollout.weight_sync import WeightSyncError


class FleetError(RuntimeError):
    pass


@dataclass
class EngineSpec:
    """How to build one engine actor. `engine_cls`: a RolloutEngine class or 'module:Class'."""

    engine_cls: Any
    kwargs: dict = field(default_factory=dict)
    num_cpus: float = 0.5
    num_gpus: float = 0.0
    sync_ranks_per_engine: int = 1  # processes per engine in the sync group (vLLM: its TP workers)
    env_vars: dict = field(default_factory=dict)
    placement_bundles: list[dict] | None = None  # one placement group per engine (vLLM TP>1: a GPU bundle per rank)
    restore_from_peer: bool = True  # a restarted engine copies a live engine's weights (CPU); else waits for a sync

    def resolve_cls(self):
        if isinstance(self.engine_cls, str):
            module, _, name = self.engine_cls.partition(":")
            return getattr(importlib.import_module(module), name)
        return self.engine_cls


def init_ray(address: str | None = None, num_cpus: int | None = None, **kwargs) -> None:
    """ray.init once: a local cluster by default (no dashboard), or an existing one at `address`.

    Workers get this checkout on PYTHONPATH so they import the same megatron_apo as the driver.
    """
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
    runtime_env = kwargs.pop("runtime_env", {}) or {}
    runtime_env.setdefault("env_vars", {}).setdefault("PYTHONPATH", path)
    # address=None would attach to any cluster already running on this machine; "local" starts our own,
    # bound to the loopback interface (a local fleet never needs another address).
    local = {} if address else {"_node_ip_address": "127.0.0.1"}
    ray.init(address=address or "local", num_cpus=None if address else num_cpus, include_dashboard=False, **local,
             runtime_env=runtime_env, **kwargs)


class RolloutFleet:
    def __init__(self, spec: EngineSpec, num_engines: int, ray_address: str | None = None,
                 chunk_size: int | None = None, max_restarts: int = 8):
        if num_engines < 1:
            raise ValueError(f"RolloutFleet: num_engines must be >= 1, got {num_engines}")
        init_ray(ray_address)
        self.spec = spec
        self.num_engines = num_engines
        self.chunk_size = chunk_size
        self.max_restarts = max_restarts
        self.restarts = 0
        self._version = spec.kwargs.get("version", -1) if spec.kwargs.get("named_tensors") is not None else -1
        self._pgs: dict = {}
        self._actors = [self._new_actor(i) for i in range(num_engines)]
        self._incarnation = [0] * num_engines
        self._stale = [False] * num_engines  # restarted but not yet at the fleet's weights: gets no work
        self._endpoint: SyncEndpoint | None = None
        self._join_refs: list = []
        self.wait_ready()

    # ---- actors -----------------------------------------------------------------------------------------

    def _new_actor(self, slot: int):
        import ray

        opts = dict(num_cpus=self.spec.num_cpus, num_gpus=self.spec.num_gpus, max_concurrency=1)
        if self.spec.env_vars:
            opts["runtime_env"] = {"env_vars": dict(self.spec.env_vars)}
        if self.spec.placement_bundles:
            from ray.util.placement_group import placement_group, remove_placement_group
            from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

            if self._pgs.get(slot) is not None:
                remove_placement_group(self._pgs[slot])
            pg = placement_group(self.spec.placement_bundles, strategy="PACK")
            ray.get(pg.ready())
            self._pgs[slot] = pg
            opts["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                placement_group=pg, placement_group_capture_child_tasks=True, placement_group_bundle_index=0)
        return ray.remote(self.spec.resolve_cls()).options(**opts).remote(**self.spec.kwargs)

    def wait_ready(self) -> None:
        import ray

        ray.get([a.weights_version.remote() for a in self._actors])

    @property
    def actors(self) -> list:
        return list(self._actors)

    def _restart(self, slot: int) -> None:
        import ray

        if self.restarts >= self.max_restarts:
            raise FleetError(f"rollout fleet: more than {self.max_restarts} engine restarts; giving up")
        self.restarts += 1
        try:
            ray.kill(self._actors[slot], no_restart=True)
        except Exception:  # noqa: BLE001 - it is already dead
            pass
        new = self._new_actor(slot)
        source = self._live_actor(exclude=slot) if self._version >= 0 else None
        if self._version >= 0 and source is None:
            raise FleetError("rollout fleet: an engine died and no live engine holds the current weights; "
                             "run a weight sync to bring the fleet back")
        if self._version >= 0 and self.spec.restore_from_peer:
            ray.get(new.update_weights.remote(self._version, source.export_weights.remote()))
        else:
            ray.get(new.weights_version.remote())
            # vLLM: weights are sharded and fused inside the engine; it serves again after the next sync
            self._stale[slot] = self._version >= 0
        self._actors[slot] = new
        self._incarnation[slot] += 1
        self._endpoint = None  # the sync group's membership changed: the next sync opens a new group

    def _live_actor(self, exclude: int):
        import ray

        for i, a in enumerate(self._actors):
            if i == exclude:
                continue
            try:
                ray.get(a.weights_version.remote(), timeout=60)
                return a
            except ray.exceptions.RayActorError:
                continue
        return None

    # ---- generation -------------------------------------------------------------------------------------

    def generate(self, prompt_token_ids: Sequence[Sequence[int]], params: SamplingParams) -> list[list[Sample]]:
        """Every prompt's `params.n` samples, in prompt order, each exactly once (engine deaths included)."""
        import ray

        prompts = [list(p) for p in prompt_token_ids]
        if not prompts:
            return []
        chunk = self.chunk_size or math.ceil(len(prompts) / self.num_engines)
        chunks = [(a, min(a + chunk, len(prompts))) for a in range(0, len(prompts), chunk)]
        inflight: dict = {}

        def submit(ci: int, slot: int) -> None:
            if self._stale[slot]:
                slot = next(i for i in range(self.num_engines) if not self._stale[i])
            a, b = chunks[ci]
            ref = self._actors[slot].generate.remote(prompts[a:b], params, request_ids=list(range(a, b)))
            inflight[ref] = (ci, slot, self._incarnation[slot])

        for ci in range(len(chunks)):
            submit(ci, ci % self.num_engines)
        results: dict[tuple[int, int], Sample] = {}
        self.duplicates_dropped = 0
        while inflight:
            ready, _ = ray.wait(list(inflight), num_returns=1)
            ref = ready[0]
            ci, slot, incarnation = inflight.pop(ref)
            try:
                out = ray.get(ref)
            except ray.exceptions.RayActorError:
                if incarnation == self._incarnation[slot]:
                    self._restart(slot)
                submit(ci, slot)  # only this unfinished chunk goes again
                continue
            a, _ = chunks[ci]
            for i, samples in enumerate(out):
                for s in samples:
                    key = (a + i, s.sample_index)
                    if key in results:
                        self.duplicates_dropped += 1
                        continue
                    s.prompt_index = a + i
                    results[key] = s
        missing = [(p, s) for p in range(len(prompts)) for s in range(params.n) if (p, s) not in results]
        if missing:
            raise FleetError(f"rollout fleet: {len(missing)} samples missing, e.g. {missing[:3]}")
        return [[results[(p, s)] for s in range(params.n)] for p in range(len(prompts))]

    # ---- weights ----------------------------------------------------------------------------------------

    def weights_version(self) -> int:
        return self._version

    def engine_versions(self) -> list[int]:
        import ray

        return ray.get([a.weights_version.remote() for a in self._actors])

    def sync_states(self) -> list[dict]:
        import ray

        return ray.get([a.sync_state.remote() for a in self._actors])

    def update_weights(self, version: int, named_tensors) -> None:
        """Loads HF-named tensors into every engine through Ray's object store (no collective group)."""
        import ray

        ref = ray.put([(n, t.detach().cpu()) for n, t in named_tensors])
        ray.get([a.update_weights.remote(version, ref) for a in self._actors])
        self._version = version

    def logits(self, token_ids) -> list:
        """Every engine's probe logits (parity checks)."""
        import ray

        return ray.get([a.logits.remote(token_ids) for a in self._actors])

    def sync_endpoint(self, backend: str = "gloo", host: str | None = None, timeout_s: float = 300.0,
                      fresh: bool = False) -> SyncEndpoint:
        """The sync group's endpoint; opens a new group when there is none, the fleet changed, or `fresh`
        (a new trainer process, e.g. after a trainer restart: the old group died with its rank 0).

        The engines start joining at once (asynchronously); the trainer's rank 0 joins as sync rank 0
        with `open_sync_group(endpoint, 0)`, which completes the rendezvous.
        """
        if self._endpoint is not None and self._endpoint.backend == backend and not fresh:
            return self._endpoint
        world = 1 + self.num_engines * self.spec.sync_ranks_per_engine
        ep = SyncEndpoint.new(world, backend, host, timeout_s)
        self._join_refs = [a.join_sync_group.remote(ep, 1 + i * self.spec.sync_ranks_per_engine)
                           for i, a in enumerate(self._actors)]
        self._endpoint = ep
        return ep

    def begin_weight_sync(self, version: int) -> list:
        """Every engine starts receiving sync `version` (call before the trainer's `TrainerWeightSender.sync`)."""
        if self._endpoint is None:
            raise WeightSyncError("begin_weight_sync: no sync group; call sync_endpoint() and join it first")
        return [a.receive_weights.remote(version) for a in self._actors]

    def finish_weight_sync(self, refs: list, expected_checksum: str | None = None) -> list[dict]:
        """Waits for every engine; raises WeightSyncError naming the engines that rejected the sync."""
        import ray

        ray.get(self._join_refs)
        results, errors = [], []
        for i, ref in enumerate(refs):
            try:
                results.append(ray.get(ref))
            except ray.exceptions.RayTaskError as e:
                errors.append(f"engine {i}: {e.cause if getattr(e, 'cause', None) else e}")
                results.append(None)
        if not errors and expected_checksum is not None:
            errors += [f"engine {i}: checksum {r['checksum']} != trainer's {expected_checksum}"
                       for i, r in enumerate(results) if r["checksum"] != expected_checksum]
        if errors:
            raise WeightSyncError("weight sync rejected: " + "; ".join(errors))
        self._version = results[0]["version"]
        self._stale = [False] * self.num_engines
        return results

    def shutdown(self) -> None:
        import ray

        for a in self._actors:
            try:
                ray.kill(a, no_restart=True)
            except Exception:  # noqa: BLE001
                pass
        self._actors = []
        if self._pgs:
            from ray.util.placement_group import remove_placement_group

            for pg in self._pgs.values():
                remove_placement_group(pg)
            self._pgs = {}
