"""Methods added to every vLLM worker (`worker_extension_cls`), called through `LLM.collective_rpc`.

vLLM V1 runs its engine core (and, on CPU or with TP > 1, its workers) in other processes, and
`collective_rpc` arguments and results cross that boundary with msgpack, decoded WITHOUT type
information: a tensor arrives as a `[dtype, shape, data]` list, a dataclass as a dict. So every method
here takes and returns only small plain values (ints, floats, strings, lists/dicts of them); the weights
themselves travel over the weight-sync group (gloo on CPU, NCCL on GPU), never as RPC arguments.

One code path for both transports: `open_sync_group` picks gloo or NCCL from the endpoint's backend, and
`receive_weights` (the same bucket/checksum protocol the CPU engine uses, `weight_sync.py`) verifies
every bucket's checksum and the per-sync checksum before and after loading. `self.device`, `self.rank`
and `self.model_runner` come from the vLLM worker this class is mixed into.
"""

from __future__ import annotations

import contextlib
import time

import torch

from megatron_apo.rollout.sync_group import SyncEndpoint, measure_broadcast_bandwidth, open_sync_group
from megatron_apo.rollout.weight_sync import ReceivePool, receive_weights


def receive_buffers() -> ReceivePool:
    """A worker's receive buffers: vLLM's layerwise reload keeps a layer's tensors (views of them) until the
    layer is complete, so a buffer returns to use only once the reload let go of it (no copy per tensor)."""
    return ReceivePool()


@contextlib.contextmanager
def _timed_repack():
    """{"s": seconds} spent in vLLM's per-layer reprocessing (`layerwise._layerwise_process`) meanwhile (the
    benchmark's "engine repack"; timing only, behaviour unchanged)."""
    from vllm.model_executor.model_loader.reload import layerwise

    spent, original = {"s": 0.0}, getattr(layerwise, "_layerwise_process", None)
    if original is None:  # another vLLM: no split, all of it counts as load
        yield spent
        return

    def timed(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            spent["s"] += time.perf_counter() - t0

    layerwise._layerwise_process = timed
    try:
        yield spent
    finally:
        layerwise._layerwise_process = original


class SyncWorkerExtension:
    def join_sync_group(self, host: str, port: int, world_size: int, backend: str, timeout_s: float,
                        rank_offset: int, secret: str) -> int:
        """Joins as sync rank `rank_offset + this worker's vLLM rank`; blocks until the group is complete.
        `secret`: the group's (it crosses vLLM's RPC from the engine actor, which got it through Ray)."""
        endpoint = SyncEndpoint(str(host), int(port), int(world_size), str(backend), float(timeout_s), str(secret))
        self.close_sync_group()
        rank = int(rank_offset) + int(self.rank)
        self._weight_sync_group = open_sync_group(endpoint, rank, device=self.device)
        return rank

    def receive_weights(self, version: int) -> dict:
        """Receives one sync into the model (`load_weights` with HF names, each bucket once it verifies).

        Loading goes through vLLM's in-place reload (`initialize_layerwise_reload` ... `finalize_layerwise_reload`):
        after start-up vLLM may have repacked a layer's weights into kernel formats (the CPU backend does),
        which plain `load_weights` cannot write into; the reload restores each layer's loadable form, loads
        it, and re-runs that processing once the layer is complete (a layer that got nothing keeps its
        tensors). Returns the plain `SyncResult.as_dict()` plus `missing`: the model parameters no bucket
        updated (vLLM's own, fused names), so a partial sync cannot pass as a complete one.
        """
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload, initialize_layerwise_reload

        model = self.model_runner.model
        if not hasattr(self, "_weight_sync_ring"):
            self._weight_sync_ring = receive_buffers()  # reused across syncs
        updated: set[str] = set()

        def load(tensors):  # views of the receive buffer, no copy: the pool keeps a buffer the reload holds
            updated.update(model.load_weights(weights=tensors) or ())

        finalize_error = None
        with set_current_vllm_config(self.vllm_config), _timed_repack() as repack:
            initialize_layerwise_reload(model)
            try:
                result = receive_weights(getattr(self, "_weight_sync_group", None), load,
                                         expected_version=int(version), ring=self._weight_sync_ring)
            finally:
                in_load, t0 = repack["s"], time.perf_counter()
                try:  # a layer's loaders run once the layer is complete: a bad tensor may fail only here
                    finalize_layerwise_reload(model, self.model_runner.model_config)
                except Exception as e:  # noqa: BLE001 - reported as a failed load, like one inside receive_weights
                    finalize_error = e
                finalize_s = time.perf_counter() - t0
                self._weight_sync_ring.trim()  # the reload let go of every tensor: keep two buffers
        if finalize_error is not None and result.ok:
            text = str(finalize_error).strip().splitlines()
            result.ok, result.load_failed = False, True
            result.errors.append(f"loading failed: {type(finalize_error).__name__}: {text[0] if text else ''}")
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        out = result.as_dict()
        # engine repack: vLLM reprocessing each completed layer into its kernel formats (during loads and after)
        out["load_s"], out["repack_s"] = result.load_s - in_load, in_load + finalize_s
        out["missing"] = sorted(set(dict(model.named_parameters())) - updated)[:5] if result.ok else []
        return out

    def close_sync_group(self) -> None:
        """Frees the sync group (its NCCL communicator): on a new group and when the engine closes."""
        old, self._weight_sync_group = getattr(self, "_weight_sync_group", None), None
        if old is not None:
            old.close()

    def sync_group_bandwidth(self, nbytes: int) -> float:
        return float(measure_broadcast_bandwidth(self._weight_sync_group, int(nbytes)))

    def load_weights_file(self, path: str) -> int:
        """HF-named tensors from a safetensors file (a path crosses the RPC, the bytes are read here)."""
        from safetensors import safe_open

        with safe_open(str(path), framework="pt", device="cpu") as f:
            names = list(f.keys())
            self.reload_weights(weights_iterator=((n, f.get_tensor(n)) for n in names), is_checkpoint_format=True)
        return len(names)
