"""A fleet of rollout engines as Ray actors: spreads prompts, gathers results in order, survives engine deaths.

Fault tolerance: work goes out in chunks of prompts; when an actor dies (`RayActorError`) or its
inference process does (`EngineDied`, e.g. vLLM's engine core), it is replaced by a new actor and only
the chunks that had not returned are resubmitted. Results are keyed by (prompt index, sample index), so
no sample is lost or counted twice.

Weights for a replacement engine come from the trainer, by a weight sync; never from a peer engine and
never through Ray's object store (a peer may hold a rejected sync's weights, and the object store would
carry a whole model). Until that sync the replacement gets no work: the live engines that hold the
current weights take its chunks. When none is left (e.g. `num_engines=1`), `generate` raises
`FleetNeedsSync`; the trainer syncs (which opens a new sync group, the membership having changed) and
calls `generate` again with the same prompts, which resumes: samples already returned are kept, not
regenerated. An engine whose weights were loaded from files at construction (eval) is current at once.

Threads: with one-step-off-policy the trainer's prefetch thread runs `generate` while the main thread syncs
weights. One lock (`_lock`) covers every restart and the sync state (`_actors`, `_stale`, `_version`,
`_endpoint`), and a whole sync holds it (`sync_session`): an engine dies at most one restart, and no engine is
replaced between the opening of a sync group and the end of that sync. `generate` waits for engines without
the lock. Each sample carries the version of the weights that generated it (`meta["weights_version"]`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import threading
from typing import Sequence

from megatron_apo.rollout.engine import EngineDied, EngineSpec, Sample, SamplingParams
from megatron_apo.rollout.sync_group import SyncEndpoint
from megatron_apo.rollout.weight_sync import WeightLoadError, WeightSyncError


class FleetError(RuntimeError):
    pass


class SyncRefs(list):
    """`begin_weight_sync`'s refs (one per engine), with the version they receive."""

    def __init__(self, refs, version: int):
        super().__init__(refs)
        self.version = version


class FleetNeedsSync(FleetError):
    """No live engine holds the fleet's weights: run a weight sync, then call `generate` again (it resumes)."""


def init_ray(address: str | None = None, num_cpus: int | None = None, gpus: list[str] | None = None,
             **kwargs) -> bool:
    """ray.init once: a local cluster by default (no dashboard), or an existing one at `address`. Returns whether
    this call started a local cluster (its owner shuts it down: `shutdown_ray`).

    Workers get this checkout on PYTHONPATH so they import the same megatron_apo as the driver. `gpus` (a local
    cluster only): the GPUs, as `CUDA_VISIBLE_DEVICES` names them, the cluster may use (`rollout.placement`).
    A stop handler the caller installed for SIGTERM stays installed (ray.init would replace it with its own,
    which raises SystemExit wherever the process is, e.g. inside `ray.get`).
    """
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
    runtime_env = kwargs.pop("runtime_env", {}) or {}
    runtime_env.setdefault("env_vars", {}).setdefault("PYTHONPATH", path)
    # address=None would attach to any cluster already running on this machine; "local" starts our own,
    # bound to the loopback interface (a local fleet never needs another address).
    local = {} if address else {"_node_ip_address": "127.0.0.1"}
    if not address:
        # Ray turns token auth on for every new local cluster and logs a warning about it each time (RAY_AUTH_MODE
        # cannot be set here instead: Ray reads it when imported). Auth stays on; only the notice is dropped.
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    starts = not address or address == "local"  # a new cluster of our own
    if gpus is not None and starts:
        local["num_gpus"] = len(gpus)
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    with _keep_sigterm_handler():
        try:
            if "num_gpus" in local:  # Ray's node takes its GPU ids from the starting process's CUDA_VISIBLE_DEVICES
                os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(gpus)
            ray.init(address=address or "local", num_cpus=None if address else num_cpus, include_dashboard=False,
                     **local, runtime_env=runtime_env, **kwargs)
        finally:
            if "num_gpus" in local:
                _restore_env("CUDA_VISIBLE_DEVICES", visible)
    return starts


@contextlib.contextmanager
def _keep_sigterm_handler():
    """ray.init installs SIGTERM handlers of its own (the driver's raises SystemExit wherever the process is: in
    the middle of ray.init or of a ray.get). A process with a stop handler of its own (the trainer's StopFlag, which
    checkpoints and exits 75) keeps it: Ray's handler setter does nothing meanwhile, and the handler is put back."""
    import ray._private.utils as ray_utils

    handler = signal.getsignal(signal.SIGTERM) if threading.current_thread() is threading.main_thread() else None
    setter = getattr(ray_utils, "set_sigterm_handler", None)
    if not callable(handler) or setter is None:  # nothing of ours to keep: Ray's handlers apply
        yield
        return
    ray_utils.set_sigterm_handler = lambda _handler: None
    try:
        yield
    finally:
        ray_utils.set_sigterm_handler = setter
        signal.signal(signal.SIGTERM, handler)


def _restore_env(key: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(key, None)
    else:
        os.environ[key] = value


def shutdown_ray(grace_s: float = 0.5) -> None:
    """Shuts down the local Ray cluster this process started, and reaps every Ray process it left behind.

    `ray.shutdown()` stops the GCS and raylet; the raylet's agents (dashboard agent, runtime-env agent) and
    workers can outlive them (for ten seconds and more), and in a spawned trainer rank no atexit hook runs to
    catch up. The cluster is gone by then, so they are asked to stop at once, and killed after `grace_s`.
    """
    import psutil
    import ray

    ours = [p for p in psutil.Process().children(recursive=True) if _is_ray_process(p)]
    ray.shutdown()
    for p in ours:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.terminate()
    _, alive = psutil.wait_procs(ours, timeout=grace_s)
    for p in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    psutil.wait_procs(alive, timeout=5.0)


def _is_ray_process(p) -> bool:
    import psutil

    try:
        return p.name().startswith("ray") or "/ray/" in " ".join(p.cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


class RolloutFleet:
    def __init__(self, spec: EngineSpec, num_engines: int, ray_address: str | None = None,
                 chunk_size: int | None = None, max_restarts: int = 8, ray_gpus: list[str] | None = None):
        """`ray_gpus`: the GPUs a local Ray cluster started here may use (`rollout.placement.engine_gpus`)."""
        if num_engines < 1:
            raise ValueError(f"RolloutFleet: num_engines must be >= 1, got {num_engines}")
        self._owns_ray = init_ray(ray_address, gpus=ray_gpus)
        self._lock = threading.RLock()  # restarts and sync state; see the module docstring
        self.spec = spec
        self.num_engines = num_engines
        self.chunk_size = chunk_size
        self.max_restarts = max_restarts
        self.restarts = 0
        self._version = -1
        self._pgs: dict = {}
        self._actors = [self._new_actor(i) for i in range(num_engines)]
        self._incarnation = [0] * num_engines
        self._stale = [False] * num_engines  # restarted but not yet at the fleet's weights: gets no work
        self._endpoint: SyncEndpoint | None = None
        self._join_refs: list = []
        self._partial: tuple | None = None  # (request key, results so far) of a generate cut short by FleetNeedsSync
        self.duplicates_dropped = 0
        self.wait_ready()
        versions = self.engine_versions()
        self._version = versions[0] if len(set(versions)) == 1 else -1  # engines built with weights (files)

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
            pg = placement_group(self.spec.placement_bundles, strategy="STRICT_PACK")  # one engine, one node
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
        """A new actor in `slot`; it gets work once it holds the fleet's weights (from files or the next sync).
        Called with `_lock` held."""
        import ray

        if self.restarts >= self.max_restarts:
            raise FleetError(f"rollout fleet: more than {self.max_restarts} engine restarts; giving up")
        self.restarts += 1
        ray.wait([self._actors[slot].close.remote()], timeout=30)  # a live actor whose engine core died
        try:
            ray.kill(self._actors[slot], no_restart=True)
        except Exception:  # noqa: BLE001 - it is already dead
            pass
        new = self._new_actor(slot)
        version = ray.get(new.weights_version.remote())
        self._stale[slot] = self._version >= 0 and version != self._version
        self._actors[slot] = new
        self._incarnation[slot] += 1
        self._endpoint = None  # the sync group's membership changed: the next sync opens a new group

    def replace_dead_engines(self) -> list[int]:
        """Replaces every engine actor that has died since it was last used; returns their slots."""
        import ray

        with self._lock:
            dead = []
            for slot, ref in enumerate([a.weights_version.remote() for a in self._actors]):
                try:
                    ray.get(ref)
                except ray.exceptions.RayActorError:
                    dead.append(slot)
            for slot in dead:
                self._restart(slot)
            return dead

    # ---- generation -------------------------------------------------------------------------------------

    def generate(self, prompt_token_ids: Sequence[Sequence[int]], params: SamplingParams) -> list[list[Sample]]:
        """Every prompt's `params.n` samples, in prompt order, each exactly once (engine deaths included).

        Raises `FleetNeedsSync` when no live engine holds the fleet's weights; after a sync, the same call
        resumes where it stopped.
        """
        import ray

        prompts = [list(p) for p in prompt_token_ids]
        if not prompts:
            return []
        chunk = self.chunk_size or math.ceil(len(prompts) / self.num_engines)
        chunks = [(a, min(a + chunk, len(prompts))) for a in range(0, len(prompts), chunk)]
        key = (repr(prompts), repr(params), chunk)
        results: dict[tuple[int, int], Sample] = {}
        if self._partial is not None and self._partial[0] == key:
            results = self._partial[1]
        else:
            self.duplicates_dropped = 0
        self._partial = None
        done = {ci for ci, (a, b) in enumerate(chunks)
                if all((p, s) in results for p in range(a, b) for s in range(params.n))}
        inflight: dict = {}
        queued: list[int] = []  # chunks waiting for an engine that holds the current weights

        def submit(ci: int, slot: int) -> None:  # with _lock held
            if self._stale[slot]:
                live = [i for i in range(self.num_engines) if not self._stale[i]]
                if not live:
                    queued.append(ci)
                    return
                slot = min(live, key=lambda i: sum(s == i for _, s, _ in inflight.values()))
            a, b = chunks[ci]
            ref = self._actors[slot].generate.remote(prompts[a:b], params, request_ids=list(range(a, b)))
            inflight[ref] = (ci, slot, self._incarnation[slot])

        with self._lock:
            for ci in range(len(chunks)):
                if ci not in done:
                    submit(ci, ci % self.num_engines)
        while inflight:
            ready, _ = ray.wait(list(inflight), num_returns=1)
            ref = ready[0]
            ci, slot, incarnation = inflight.pop(ref)
            try:
                out = ray.get(ref)
            except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError) as e:
                dead = isinstance(e, ray.exceptions.RayActorError) or isinstance(getattr(e, "cause", None), EngineDied)
                if not dead:
                    raise
                with self._lock:  # waits for a sync in progress; that sync may have replaced the engine already
                    if incarnation == self._incarnation[slot]:
                        self._restart(slot)
                    submit(ci, slot)  # only this unfinished chunk goes again
                continue
            a, _ = chunks[ci]
            for i, samples in enumerate(out):
                for s in samples:
                    key_ps = (a + i, s.sample_index)
                    if key_ps in results:
                        self.duplicates_dropped += 1
                        continue
                    s.prompt_index = a + i
                    results[key_ps] = s
        if queued:
            self._partial = (key, results)
            raise FleetNeedsSync(f"rollout fleet: {len(queued)} chunk(s) wait for an engine that serves weights "
                                 f"v{self._version}: every engine was replaced or refuses to serve after a rejected "
                                 "sync; run a weight sync")
        missing = [(p, s) for p in range(len(prompts)) for s in range(params.n) if (p, s) not in results]
        if missing:
            raise FleetError(f"rollout fleet: {len(missing)} samples missing, e.g. {missing[:3]}")
        return [[results[(p, s)] for s in range(params.n)] for p in range(len(prompts))]

    # ---- weights ----------------------------------------------------------------------------------------

    def weights_version(self) -> int:
        return self._version

    @contextlib.contextmanager
    def sync_session(self):
        """Holds the fleet's lock for one whole weight sync (`sync_endpoint`, `begin_weight_sync`, the trainer's
        send, `finish_weight_sync`): a `generate` on another thread cannot replace an engine in the middle of it
        (it waits, then finds the engine replaced and synced). Engines keep generating meanwhile."""
        with self._lock:
            yield

    def engine_versions(self) -> list[int]:
        import ray

        return ray.get([a.weights_version.remote() for a in self._actors])

    def needs_sync(self) -> bool:
        """Some engine was replaced and does not hold the fleet's weights yet."""
        return any(self._stale)

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
        with self._lock:
            self.replace_dead_engines()  # a dead member would fail the sync; its replacement joins the new group
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
        with self._lock:
            if self._endpoint is None:
                raise WeightSyncError("begin_weight_sync: no sync group; call sync_endpoint() and join it first")
            return SyncRefs([a.receive_weights.remote(version) for a in self._actors], version)

    def finish_weight_sync(self, refs: list, expected_checksum: str | None = None) -> list[dict]:
        """Waits for every engine; raises WeightSyncError naming the engines that rejected the sync."""
        import ray

        with self._lock:
            ray.get(self._join_refs)
            results, errors, failed_loads = [], [], []
            for i, ref in enumerate(refs):
                try:
                    results.append(ray.get(ref))
                except ray.exceptions.RayTaskError as e:
                    errors.append(f"engine {i}: {e.cause if getattr(e, 'cause', None) else e}")
                    results.append(None)
                    if isinstance(getattr(e, "cause", None), WeightLoadError):
                        failed_loads.append(i)
            if errors and len(failed_loads) == len(errors):  # engines that could not load it: treated as dead
                return self._replace_failed_loads(failed_loads, results, errors, expected_checksum,
                                                  getattr(refs, "version", None))
            if not errors and expected_checksum is not None:
                errors += [f"engine {i}: checksum {r['checksum']} != trainer's {expected_checksum}"
                           for i, r in enumerate(results) if r["checksum"] != expected_checksum]
            if errors:
                # every engine refuses to serve until a sync verifies: none gets work, none is a source of weights
                self._stale = [True] * self.num_engines
                raise WeightSyncError("weight sync rejected: " + "; ".join(errors))
            self._version = results[0]["version"]
            self._stale = [False] * self.num_engines
            return results

    def _replace_failed_loads(self, failed: list[int], results: list, errors: list[str],
                              expected_checksum: str | None, version: int | None) -> list:
        """Engines that received a sync but could not load it (WeightLoadError) are replaced, like a dead engine;
        each replacement gets the weights by the next sync. The engines that loaded it serve this version."""
        wrong = [f"engine {i}: checksum {r['checksum']} != trainer's {expected_checksum}" for i, r in enumerate(results)
                 if r is not None and expected_checksum is not None and r["checksum"] != expected_checksum]
        if wrong:
            self._stale = [True] * self.num_engines
            raise WeightSyncError("weight sync rejected: " + "; ".join(errors + wrong))
        logging.getLogger(__name__).warning("weight sync: %s; replacing engine(s) %s", "; ".join(errors), failed)
        loaded = [r for r in results if r is not None]
        if loaded or version is not None:  # the trainer's weights are this version now, loaded or not
            self._version = loaded[0]["version"] if loaded else version
        self._stale = [r is None for r in results]
        for slot in failed:
            self._restart(slot)
        return results

    def shutdown(self) -> None:
        """Closes every engine; a local Ray cluster the fleet started goes too, with all its processes."""
        import ray

        with self._lock:
            if self._actors:
                ray.wait([a.close.remote() for a in self._actors], num_returns=len(self._actors), timeout=60)
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
            if self._owns_ray and ray.is_initialized():
                shutdown_ray()
            self._owns_ray = False
