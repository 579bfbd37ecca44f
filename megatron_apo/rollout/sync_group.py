"""The trainer <-> fleet collective group used only for weight sync.

It is separate from the trainer's torch.distributed world (Megatron's groups) and spans processes that
were not launched together: the trainer's sending rank (sync rank 0) and every engine process (Ray
actors, or vLLM's TP workers inside them). Members rendezvous over a TCP store at `SyncEndpoint`.

* gloo (CPU): a `ProcessGroupGloo` built directly on the store; nothing global in torch.distributed
  is touched, so a Ray actor with no default process group can join.
* nccl (GPU): a `PyNcclCommunicator` built from an NCCL unique id that rank 0 hands out through the store
  (vLLM's `from_unique_id_bytes`); it never touches the trainer's NCCL communicators.

Both expose `broadcast(tensor, src)` (the data) and `broadcast_json(obj, src)` (headers).

Security (docs/reliability.md, "Weight-sync channel"): the store listens on the rendezvous address only
(`rendezvous_host`: `rollout.sync_host`, else loopback for a one-node Ray cluster, else Ray's address of this
node), never on every interface. Each group
has a secret (`SyncEndpoint.secret`, made per group, handed to the engines through Ray): rank 0 proves it
to the members before they join (a foreign store is refused), every member proves it to rank 0 before the
group opens (a foreign member is refused), the NCCL unique id is authenticated, and every header is JSON
with an HMAC-SHA256 over it and its sequence number (a forged, replayed or reordered header is refused).
Nothing received is ever unpickled. Every wait ends within `timeout_s` with a named error.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import json
import secrets
import socket
import time
from dataclasses import dataclass, field

import torch

BACKENDS = ("gloo", "nccl")
_MAC_BYTES = 32
_MAX_HEADER_BYTES = 256 << 20  # a header names every tensor of a bucket: far below this; more is not a header


class WeightSyncError(RuntimeError):
    pass


class WeightSyncAuthError(WeightSyncError):
    """A party without the group's secret: a foreign store, member, header or NCCL id."""


class WeightSyncTimeout(WeightSyncError):
    """A member stopped answering for longer than the group's `timeout_s` (rollout.sync_timeout_s)."""


@dataclass(frozen=True)
class SyncEndpoint:
    host: str
    port: int
    world_size: int  # 1 sender (the trainer's global rank 0) + every engine process
    backend: str = "gloo"
    timeout_s: float = 300.0
    secret: str = field(default="", repr=False)  # hex; SyncEndpoint.new makes a fresh one per group

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise ValueError(f"weight sync backend {self.backend!r} is unknown; use one of {BACKENDS}")
        if self.world_size < 2:
            raise ValueError("weight sync group needs the sender and at least one engine, "
                             f"got world_size={self.world_size}")
        if len(self.secret) < 32:
            raise ValueError("weight sync endpoint needs the group's secret (SyncEndpoint.new makes one)")

    @classmethod
    def new(cls, world_size: int, backend: str = "gloo", host: str | None = None,
            timeout_s: float = 300.0) -> "SyncEndpoint":
        """A fresh endpoint (new port, new secret) on this host (the sender's host hosts the store).

        `host`: the address the store listens on and the engines connect to; None = `rendezvous_host()`.
        """
        from megatron_apo.parallel.distributed import find_free_port

        host = host or rendezvous_host()
        return cls(host, find_free_port(host if host != "0.0.0.0" else ""), world_size, backend, timeout_s,
                   secrets.token_hex(32))


def rendezvous_host(configured: str | None = None) -> str:
    """The address engines reach this (sending) process at, and the only one its store listens on: `configured`
    if given, else, with Ray, 127.0.0.1 for a one-node cluster (a local run) or this node's address in the
    cluster (the one Ray's other nodes already reach it at), else the address of this host's default route."""
    if configured:
        return configured
    try:
        import ray

        if ray.is_initialized():
            return _ray_node_address(ray)
    except ImportError:  # pragma: no cover - ray is a dependency
        pass
    return _default_route_ip()


def _ray_node_address(ray) -> str:
    """127.0.0.1 when this node is the cluster's only one (the local cluster a fleet starts: every engine runs on
    this host, so nothing needs to reach the store from outside); else this node's address in the cluster."""
    node_id = ray.get_runtime_context().get_node_id()
    alive = [node for node in ray.nodes() if node.get("Alive", True)]
    if [node.get("NodeID") for node in alive] == [node_id]:
        return "127.0.0.1"
    for node in alive:
        if node.get("NodeID") == node_id and node.get("NodeManagerAddress"):
            return node["NodeManagerAddress"]
    return ray.util.get_node_ip_address()


def _default_route_ip() -> str:
    """The local address the kernel would send from towards a public address (no packet is sent)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("10.255.255.255", 1))
            return s.getsockname()[0]
    except OSError:
        return "127.0.0.1"  # no network at all: only same-host engines exist


def _tag(key: bytes, *parts) -> str:
    return hmac.new(key, "|".join(map(str, parts)).encode(), hashlib.sha256).hexdigest()


def _signed_value(raw: bytes, field: str, tag_of) -> str | None:
    """`raw` is JSON {field: value, "tag": HMAC}: the value when its tag is `tag_of(value)`, else None (malformed
    messages included: a foreign writer cannot tell a parse failure from a bad tag)."""
    try:
        msg = json.loads(raw)
        value, tag = str(msg[field]), str(msg["tag"])
    except (ValueError, KeyError, TypeError):
        return None
    return value if hmac.compare_digest(tag, tag_of(value)) else None


def _listen_socket(host: str, port: int) -> socket.socket:
    """A socket listening on `host` only (TCPStore alone would listen on every interface)."""
    family, _, _, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(addr)
    sock.listen()
    return sock


def _store_get(store, key: str, what: str, timeout_s: float) -> bytes:
    try:
        return store.get(key)
    except RuntimeError as e:  # DistStoreError: nothing under `key` within the store's timeout
        raise WeightSyncTimeout(f"weight sync: {what} within {timeout_s:g}s (rollout.sync_timeout_s)") from e


def _rendezvous(endpoint: SyncEndpoint, rank: int):
    """(store, nonce, key): the authenticated store of one group, its id and its header key.

    Rank 0 hosts the store and publishes a fresh nonce with a tag only the secret's holders can make;
    a member checks it before anything else (so it never joins a foreign group), then publishes its
    own tag, which rank 0 checks for every member before the group is built.
    """
    import torch.distributed as dist

    secret = bytes.fromhex(endpoint.secret)
    timeout = datetime.timedelta(seconds=endpoint.timeout_s)
    where = f"{endpoint.host}:{endpoint.port}"
    if rank == 0:
        sock = _listen_socket(endpoint.host, endpoint.port)
        store = dist.TCPStore(endpoint.host, endpoint.port, endpoint.world_size, is_master=True, timeout=timeout,
                              wait_for_workers=False, master_listen_fd=sock.detach())
        nonce = secrets.token_hex(16)
        store.set("weight_sync/hello", json.dumps({"nonce": nonce, "tag": _tag(secret, "hello", nonce)}))
    else:
        try:
            store = dist.TCPStore(endpoint.host, endpoint.port, endpoint.world_size, is_master=False,
                                  timeout=timeout)
        except RuntimeError as e:
            raise WeightSyncTimeout(f"weight sync: no sync group at {where} within {endpoint.timeout_s:g}s "
                                    f"(rollout.sync_timeout_s): {str(e).splitlines()[0]}") from e
        raw = _store_get(store, "weight_sync/hello", f"the sync group at {where} did not open", endpoint.timeout_s)
        nonce = _signed_value(raw, "nonce", lambda v: _tag(secret, "hello", v))
        if nonce is None:
            raise WeightSyncAuthError(f"weight sync: the store at {where} is not this run's sync group (it does not "
                                      "hold the run's secret); refusing to join it")
        store.set(f"weight_sync/{nonce}/member/{rank}", _tag(secret, "member", nonce, rank))
    if rank == 0:
        for r in range(1, endpoint.world_size):
            got = _store_get(store, f"weight_sync/{nonce}/member/{r}", f"sync rank {r} did not join",
                             endpoint.timeout_s).decode(errors="replace")
            if not hmac.compare_digest(got, _tag(secret, "member", nonce, r)):
                raise WeightSyncAuthError(f"weight sync: the process that joined as sync rank {r} does not hold the "
                                          "run's secret (a foreign process?); the group is not opened")
    return store, nonce, hmac.new(secret, f"headers|{nonce}".encode(), hashlib.sha256).digest()


class _Headers:
    """`broadcast_json`: a JSON header + its HMAC, over the group's own data channel (never pickled)."""

    rank: int
    device: torch.device
    timeout_s: float

    def _init_headers(self, key: bytes) -> None:
        self._key, self._seq = key, 0

    def broadcast_json(self, obj=None, src: int = 0):
        """`obj` (JSON-able) from `src` to every member; receivers verify its MAC (bound to a per-group
        sequence number, so a header cannot be replayed or reordered) and raise WeightSyncAuthError if not."""
        self._seq += 1
        if self.rank == src:
            payload = json.dumps(obj, separators=(",", ":")).encode()
            wire = self._mac(payload) + payload
            length = torch.tensor([len(wire)], dtype=torch.int64, device=self.device)
        else:
            length = torch.zeros(1, dtype=torch.int64, device=self.device)
        self.broadcast(length, src)
        n = int(length)
        if not _MAC_BYTES < n <= _MAX_HEADER_BYTES:
            raise WeightSyncAuthError(f"weight sync: a header of {n} bytes is not one this group sends; "
                                      "the sync is refused")
        if self.rank == src:
            buf = torch.frombuffer(bytearray(wire), dtype=torch.uint8).to(self.device)
        else:
            buf = torch.empty(n, dtype=torch.uint8, device=self.device)
        self.broadcast(buf, src)
        if self.rank == src:
            return obj
        data = buf.cpu().numpy().tobytes()
        if not hmac.compare_digest(data[:_MAC_BYTES], self._mac(data[_MAC_BYTES:])):
            raise WeightSyncAuthError("weight sync: a header failed authentication (forged, replayed or sent "
                                      "without the run's secret); the sync is refused")
        return json.loads(data[_MAC_BYTES:])

    def _mac(self, payload: bytes) -> bytes:
        return hmac.new(self._key, self._seq.to_bytes(8, "little") + payload, hashlib.sha256).digest()

    def tag(self, *parts) -> bytes:
        """HMAC-SHA256 of `parts` under the group's key (a fixed-size tag: `weight_sync.protocol`'s bucket tags)."""
        return hmac.new(self._key, "|".join(map(str, parts)).encode(), hashlib.sha256).digest()


def _link_error(e: Exception, timeout_s: float) -> WeightSyncError:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if "timed out" in first.lower() or "timeout" in first.lower():
        return WeightSyncTimeout(f"weight sync: no progress within {timeout_s:g}s (rollout.sync_timeout_s): {first}")
    return WeightSyncError(f"weight sync: the link to a member broke: {first}")


class _GlooHandle:
    def __init__(self, work, timeout_s: float):
        self._work, self._timeout_s = work, timeout_s

    def wait(self) -> None:
        try:
            self._work.wait()
        except RuntimeError as e:  # gloo: a peer died or stopped reading past the timeout
            raise _link_error(e, self._timeout_s) from None


class GlooSyncGroup(_Headers):
    def __init__(self, endpoint: SyncEndpoint, rank: int):
        import torch.distributed as dist

        self.rank, self.world_size, self.device = rank, endpoint.world_size, torch.device("cpu")
        self.timeout_s = endpoint.timeout_s
        self._store, nonce, key = _rendezvous(endpoint, rank)
        self._init_headers(key)
        self._pg = dist.ProcessGroupGloo(dist.PrefixStore(f"weight_sync/{nonce}/gloo", self._store), rank,
                                         endpoint.world_size, datetime.timedelta(seconds=endpoint.timeout_s))

    def broadcast(self, tensor: torch.Tensor, src: int = 0, async_op: bool = False):
        """With `async_op`, returns a handle whose `wait()` completes it (gloo runs it on its own threads)."""
        import torch.distributed as dist

        if self._pg is None:
            raise WeightSyncError("weight sync: this sync group was closed")
        opts = dist.BroadcastOptions()
        opts.rootRank, opts.rootTensor = src, 0
        try:
            handle = _GlooHandle(self._pg.broadcast([tensor], opts), self.timeout_s)
        except RuntimeError as e:
            raise _link_error(e, self.timeout_s) from None
        if async_op:
            return handle
        handle.wait()
        return None

    def close(self) -> None:
        self._pg = None
        self._store = None


class NcclSyncGroup(_Headers):
    """vLLM's `PyNcclCommunicator`, built from a unique id handed out through the authenticated store."""

    def __init__(self, endpoint: SyncEndpoint, rank: int, device: torch.device | int | None = None):
        from vllm.distributed.device_communicators.pynccl import PyNcclCommunicator

        self.rank, self.world_size = rank, endpoint.world_size
        self.timeout_s = endpoint.timeout_s
        self.device = torch.device("cuda",
                                   torch.cuda.current_device() if device is None else torch.device(device).index or 0)
        self._store, nonce, key = _rendezvous(endpoint, rank)
        self._init_headers(key)
        uid_key = f"weight_sync/{nonce}/nccl_id"
        if rank == 0:
            from vllm.distributed.device_communicators.pynccl_wrapper import NCCLLibrary

            uid = bytes(NCCLLibrary().ncclGetUniqueId().internal)
            self._store.set(uid_key, json.dumps({"id": uid.hex(), "tag": _tag(key, "nccl", uid.hex())}))
        else:
            raw = _store_get(self._store, uid_key, "the sender did not publish its NCCL id", self.timeout_s)
            uid_hex = _signed_value(raw, "id", lambda v: _tag(key, "nccl", v))
            if uid_hex is None:
                raise WeightSyncAuthError("weight sync: the NCCL id in the store failed authentication; "
                                          "refusing to connect")
            uid = bytes.fromhex(uid_hex)
        self._comm = PyNcclCommunicator.from_unique_id_bytes(uid, rank, endpoint.world_size, self.device)
        # The sender's transfers run on a stream of their own, so packing (and checksumming) the next
        # bucket on the compute stream overlaps this bucket's broadcast; on one stream they serialise.
        self._comm_stream = torch.cuda.Stream(device=self.device) if rank == 0 else None

    def broadcast(self, tensor: torch.Tensor, src: int = 0, async_op: bool = False):
        """Sender (rank 0): on the comm stream, after the work already queued on the current stream (the
        packing of `tensor`); the caller must keep `tensor` until the handle's `wait()`. Receivers: on the
        current stream (later GPU work, e.g. loading, is ordered after it). The handle syncs that stream,
        waiting at most `timeout_s` (PyNccl has no watchdog: without this a dead peer hangs us for good)."""
        if self._comm is None:
            raise WeightSyncError("weight sync: this sync group was closed")
        stream = self._comm_stream if self._comm_stream is not None and self.rank == src else None
        if stream is None:
            stream = torch.cuda.current_stream()
            self._comm.broadcast(tensor, src=src, stream=stream)
            handle = _StreamHandle(stream, self.timeout_s)
        else:
            stream.wait_stream(torch.cuda.current_stream())  # the bucket is packed before it is sent
            with torch.cuda.stream(stream):
                self._comm.broadcast(tensor, src=src, stream=stream)
            handle = _StreamHandle(stream, self.timeout_s)
        if async_op:
            return handle
        handle.wait()
        return None

    def close(self) -> None:
        """Frees the NCCL communicator (an engine restart would otherwise leak one per group)."""
        comm, self._comm = self._comm, None
        if comm is not None:
            comm.destroy()
        self._store = None


class _StreamHandle:
    def __init__(self, stream, timeout_s: float):
        self._event = torch.cuda.Event()
        self._event.record(stream)
        self._timeout_s = timeout_s

    def wait(self) -> None:
        deadline = time.monotonic() + self._timeout_s
        while not self._event.query():
            if time.monotonic() > deadline:
                raise WeightSyncTimeout(f"weight sync: an NCCL transfer made no progress within {self._timeout_s:g}s "
                                        "(rollout.sync_timeout_s): a member died or stopped receiving")
            time.sleep(0.0005)


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
        group.broadcast_json("probe", src=0)  # line the members up before timing
        t0 = time.perf_counter()
        group.broadcast(buf, src=0)
        _sync_device(group.device)
        best = min(best, time.perf_counter() - t0)
    return nbytes / best


def _sync_device(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
