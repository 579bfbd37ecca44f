"""The trainer <-> fleet collective group used only for weight sync.

It is separate from the trainer's torch.distributed world (Megatron's groups) and spans processes that
were not launched together: the trainer's sending rank (sync rank 0) and every engine process (Ray
actors, or vLLM's TP workers inside them). Members rendezvous over a TCP store at `SyncEndpoint`.

* gloo (CPU): a `ProcessGroupGloo` built directly on a `TCPStore`; nothing global in torch.distributed
  is touched, so a Ray actor with no default process group can join.
* nccl (GPU): vLLM's `StatelessProcessGroup` (store-based, for metadata) + `PyNcclCommunicator` (data),
  the pattern of vLLM's own RLHF examples; it never touches the trainer's NCCL communicators either.

Both expose the same two calls: `broadcast(tensor, src)` and `broadcast_object(obj, src)`.

The store listens on the sender's host at a routable address (`rendezvous_host`: `rollout.sync_host`, else
Ray's node IP), never 127.0.0.1 unless asked: engines on other nodes must reach it (docs/gpu.md).
"""

from __future__ import annotations

import datetime
import pickle
import socket
from dataclasses import dataclass

import torch

BACKENDS = ("gloo", "nccl")


@dataclass(frozen=True)
class SyncEndpoint:
    host: str
    port: int
    world_size: int  # 1 sender (the trainer's global rank 0) + every engine process
    backend: str = "gloo"
    timeout_s: float = 300.0

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise ValueError(f"weight sync backend {self.backend!r} is unknown; use one of {BACKENDS}")
        if self.world_size < 2:
            raise ValueError("weight sync group needs the sender and at least one engine, "
                             f"got world_size={self.world_size}")

    @classmethod
    def new(cls, world_size: int, backend: str = "gloo", host: str | None = None,
            timeout_s: float = 300.0) -> "SyncEndpoint":
        """A fresh endpoint on a free port of this host (the sender's host hosts the store).

        `host`: the address the engines connect to; None = `rendezvous_host()` (Ray's node IP of this process).
        """
        from megatron_apo.parallel.distributed import find_free_port

        host = host or rendezvous_host()
        return cls(host, find_free_port(host if host != "0.0.0.0" else ""), world_size, backend, timeout_s)


def rendezvous_host(configured: str | None = None) -> str:
    """The address engines reach this (sending) process at: `configured` if given, else Ray's IP for this
    node (the one Ray's other nodes already reach it at), else the address of this host's default route."""
    if configured:
        return configured
    try:
        import ray

        if ray.is_initialized():
            return ray.util.get_node_ip_address()
    except ImportError:  # pragma: no cover - ray is a dependency
        pass
    return _default_route_ip()


def _default_route_ip() -> str:
    """The local address the kernel would send from towards a public address (no packet is sent)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("10.255.255.255", 1))
            return s.getsockname()[0]
    except OSError:
        return "127.0.0.1"  # no network at all: only same-host engines exist


class GlooSyncGroup:
    def __init__(self, endpoint: SyncEndpoint, rank: int):
        import torch.distributed as dist

        timeout = datetime.timedelta(seconds=endpoint.timeout_s)
        self.rank, self.world_size, self.device = rank, endpoint.world_size, torch.device("cpu")
        self._store = dist.TCPStore(endpoint.host, endpoint.port, endpoint.world_size, is_master=rank == 0,
                                    timeout=timeout, wait_for_workers=False)
        self._pg = dist.ProcessGroupGloo(dist.PrefixStore("weight_sync", self._store), rank, endpoint.world_size,
                                         timeout)

    def broadcast(self, tensor: torch.Tensor, src: int = 0, async_op: bool = False):
        """With `async_op`, returns a handle whose `wait()` completes it (gloo runs it on its own threads)."""
        import torch.distributed as dist

        opts = dist.BroadcastOptions()
        opts.rootRank, opts.rootTensor = src, 0
        work = self._pg.broadcast([tensor], opts)
        if async_op:
            return work
        work.wait()
        return None

    def broadcast_object(self, obj=None, src: int = 0):
        if self.rank == src:
            payload = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)
            length = torch.tensor([payload.numel()], dtype=torch.int64)
        else:
            length = torch.zeros(1, dtype=torch.int64)
        self.broadcast(length, src)
        if self.rank != src:
            payload = torch.empty(int(length), dtype=torch.uint8)
        self.broadcast(payload, src)
        return obj if self.rank == src else pickle.loads(payload.numpy().tobytes())

    def close(self) -> None:
        self._pg = None
        self._store = None


class NcclSyncGroup:
    """vLLM's StatelessProcessGroup + PyNcclCommunicator
    (see the pinned vLLM's examples/offline_inference/rlhf_utils.py)."""

    def __init__(self, endpoint: SyncEndpoint, rank: int, device: torch.device | int | None = None):
        from vllm.distributed.device_communicators.pynccl import PyNcclCommunicator
        from vllm.distributed.utils import StatelessProcessGroup

        self.rank, self.world_size = rank, endpoint.world_size
        self.device = torch.device("cuda",
                                   torch.cuda.current_device() if device is None else torch.device(device).index or 0)
        self._pg = StatelessProcessGroup.create(host=endpoint.host, port=endpoint.port, rank=rank,
                                                world_size=endpoint.world_size,
                                                store_timeout=int(endpoint.timeout_s))
        self._comm = PyNcclCommunicator(self._pg, device=self.device)
        # The sender's transfers run on a stream of their own, so packing (and checksumming) the next
        # bucket on the compute stream overlaps this bucket's broadcast; on one stream they serialise.
        self._comm_stream = torch.cuda.Stream(device=self.device) if rank == 0 else None

    def broadcast(self, tensor: torch.Tensor, src: int = 0, async_op: bool = False):
        """Sender (rank 0): on the comm stream, after the work already queued on the current stream (the
        packing of `tensor`); the caller must keep `tensor` until the handle's `wait()`. Receivers: on the
        current stream (later GPU work, e.g. loading, is ordered after it). The handle syncs that stream."""
        stream = self._comm_stream if self._comm_stream is not None and self.rank == src else None
        if stream is None:
            stream = torch.cuda.current_stream()
            self._comm.broadcast(tensor, src=src, stream=stream)
            return _StreamHandle(stream) if async_op else None
        stream.wait_stream(torch.cuda.current_stream())  # the bucket is packed before it is sent
        with torch.cuda.stream(stream):
            self._comm.broadcast(tensor, src=src, stream=stream)
        handle = _StreamHandle(stream)
        if async_op:
            return handle
        handle.wait()
        return None

    def broadcast_object(self, obj=None, src: int = 0):
        return self._pg.broadcast_obj(obj if self.rank == src else None, src=src)

    def close(self) -> None:
        self._comm = None
        self._pg = None


class _StreamHandle:
    def __init__(self, stream):
        self._event = torch.cuda.Event()
        self._event.record(stream)

    def wait(self) -> None:
        self._event.synchronize()


def open_sync_group(endpoint: SyncEndpoint, rank: int, device=None):
    """Joins the group as `rank` (0 = the trainer's sender); blocks until all `world_size` members joined."""
    if not 0 <= rank < endpoint.world_size:
        raise ValueError(f"weight sync rank {rank} outside [0, {endpoint.world_size})")
    if endpoint.backend == "nccl":
        return NcclSyncGroup(endpoint, rank, device)
    return GlooSyncGroup(endpoint, rank)


def measure_broadcast_bandwidth(group, nbytes: int, repeats: int = 5) -> float:
    """Bytes/s of a plain broadcast of `nbytes` from sync rank 0 (every member calls it; the weight-sync baseline)."""
    import time

    buf = torch.zeros(nbytes, dtype=torch.uint8, device=group.device)
    group.broadcast(buf, src=0)  # warm-up: connections and allocations
    _sync_device(group.device)
    best = float("inf")
    for _ in range(repeats):
        group.broadcast_object("probe", src=0)  # line the members up before timing
        t0 = time.perf_counter()
        group.broadcast(buf, src=0)
        _sync_device(group.device)
        best = min(best, time.perf_counter() - t0)
    return nbytes / best


def _sync_device(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
