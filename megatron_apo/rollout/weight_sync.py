"""Trainer -> fleet weight sync: TP/PP shards -> HF-named tensors in checksummed buckets -> broadcast.

Protocol over one sync group (sync rank 0 = the trainer's global rank 0, ranks 1.. = engine processes):

    for each bucket:  header {"type": "bucket", version, index, entries, nbytes, checksum}  (object broadcast)
                      payload: one flat uint8 buffer of `nbytes`                              (tensor broadcast)
    finally:          header {"type": "end", version, num_buckets, num_tensors, checksum}

Trainer side, every rank calls `TrainerWeightSender.sync` in lockstep. A plan agreed once over the
trainer world says, for every HF tensor, which block of it each rank holds (`megatron_shard_to_hf`: a TP
shard is a row or column block of the HF q/k/v, gate/up, embedding ... tensors). Per bucket, the ranks
holding pieces (DP rank 0 of the owning pipeline stage) send them point-to-point to global rank 0, which
receives them straight into their place in the bucket buffer, adds its own, checksums and broadcasts.
So there is ONE sender and ONE sync group for the whole trainer, the shape vLLM's NCCL weight transfer
expects (src=0), and no full Megatron tensor is ever assembled.

Engine side, `receive_weights` verifies each bucket's checksum before loading it; a bad bucket is not
loaded, the rest of the sync is still drained (the sender must not hang), and the engine refuses to
serve until a later sync verifies (`EngineSyncState`). The per-sync checksum (over the bucket
checksums) is reported back so the fleet can check that every engine got the same bytes.
"""

from __future__ import annotations

import hashlib
import os
import socket
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

from megatron_apo.rollout.sync_group import SyncEndpoint, open_sync_group

__all__ = [
    "Bucket", "BufferRing", "EngineSyncState", "SyncEndpoint", "SyncResult", "SyncStats", "TrainerWeightSender",
    "WeightStore", "WeightSyncError", "bucket_checksum", "open_sync_group", "pack_bucket", "receive_weights",
    "send_bucket", "send_end", "sync_dtype", "unpack_bucket",
]

# The dtype each engine serves in: weights are sent in it unless rollout.sync_dtype says otherwise (bf16 for
# vLLM halves the bytes of fp32 master weights; the CPU engine computes in fp32).
ENGINE_DTYPES = {"cpu": "float32", "vllm": "bfloat16"}
ALIGN = 4096  # bytes: tensor offsets and bucket sizes, so every dtype view and the checksum's 4 KiB rows line up
DEFAULT_BUCKET_BYTES = 256 << 20


class WeightSyncError(RuntimeError):
    pass


# ---- buckets and checksums ------------------------------------------------------------------------------


def sync_dtype(rollout) -> torch.dtype:
    """The dtype weights travel in: `rollout.sync_dtype`, else the engine's (ENGINE_DTYPES)."""
    from megatron_apo.trainer.validation import DTYPE_NAMES

    name = rollout.sync_dtype or ENGINE_DTYPES.get(rollout.engine, "float32")
    if name not in DTYPE_NAMES:
        raise ValueError(f"rollout.sync_dtype={name!r} is unknown; use one of {sorted(DTYPE_NAMES)}")
    return getattr(torch, DTYPE_NAMES[name])


def bucket_checksum(flat: torch.Tensor) -> str:
    """A position-sensitive checksum of a flat uint8 buffer (size a multiple of ALIGN), on any device.

    The 64-bit words are summed per 4 KiB row (one memory pass; rows of 512 words sum about twice as
    fast as rows of 64 on CPU); the row sums are then combined with row-index weights and plainly, both as
    wrapping int64 sums. Not cryptographic: it catches corrupted, truncated, shifted or reordered rows
    (not a swap of two words inside one row), and gives the same value on CPU and GPU (integer sums
    wrap mod 2^64 in any order).
    """
    if flat.dtype != torch.uint8 or flat.dim() != 1 or flat.numel() % ALIGN:
        raise ValueError(f"bucket_checksum expects a 1-D uint8 buffer whose size is a multiple of {ALIGN}")
    rows = flat.view(torch.int64).view(-1, ALIGN // 8).sum(dim=1)
    weights = torch.arange(rows.numel(), dtype=torch.int64, device=flat.device) % 65521 + 1
    a, b = int((rows * weights).sum()), int(rows.sum())
    return f"{a & 0xFFFFFFFFFFFFFFFF:016x}{b & 0xFFFFFFFFFFFFFFFF:016x}"


def combine_checksums(checksums: list[str]) -> str:
    return hashlib.sha256("|".join(checksums).encode()).hexdigest()[:32]


@dataclass
class Bucket:
    entries: list[tuple[str, str, tuple[int, ...], int, int]]  # (hf_name, dtype name, shape, offset, nbytes)
    flat: torch.Tensor  # uint8 [nbytes]
    checksum: str

    @property
    def nbytes(self) -> int:
        return self.flat.numel()


def _aligned(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def bucket_layout(named_tensors) -> tuple[list[tuple[str, str, tuple[int, ...], int, int]], int]:
    """(entries, total bytes): each tensor at an ALIGN-ed offset of one flat buffer."""
    entries, offset = [], 0
    for name, t in named_tensors:
        nbytes = t.numel() * t.element_size()
        entries.append((name, str(t.dtype).removeprefix("torch."), tuple(t.shape), offset, nbytes))
        offset = _aligned(offset + nbytes)
    return entries, max(offset, ALIGN)


def pack_bucket(named_tensors: list[tuple[str, torch.Tensor]], device=None, out: torch.Tensor | None = None) -> Bucket:
    """Copies tensors into one aligned flat buffer and checksums it.

    `out`: a reusable uint8 buffer at least that big (freshly allocated memory costs page faults on
    every sync); otherwise a new one on `device` (default: the first tensor's). Padding bytes are left
    as they are: the receiver checksums exactly the bytes it got.
    """
    entries, total = bucket_layout(named_tensors)
    if out is None:
        device = device or (named_tensors[0][1].device if named_tensors else "cpu")
        flat = torch.zeros(total, dtype=torch.uint8, device=device)
    else:
        flat = out[:total]
    for (_, _, _, off, nbytes), (_, t) in zip(entries, named_tensors):
        flat[off:off + nbytes].copy_(t.detach().contiguous().view(-1).view(torch.uint8))
    return Bucket(entries, flat, bucket_checksum(flat))


class _Keep:
    """An in-flight broadcast handle that also keeps its bucket's memory alive until it is waited on."""

    def __init__(self, handle, bucket):
        self.handle, self.bucket = handle, bucket

    def wait(self) -> None:
        if self.handle is not None:
            self.handle.wait()
        self.bucket = None


class BufferRing:
    """Two reusable flat buffers: one is on the wire while the other is packed (sender) or checked (receiver)."""

    def __init__(self, slots: int = 2, buffers: list[torch.Tensor] | None = None):
        """`buffers`: preallocated ones (e.g. shared memory other ranks write into) instead of lazy ones."""
        self._bufs: list[torch.Tensor | None] = list(buffers) if buffers else [None] * slots
        self._pending: list = [None] * len(self._bufs)
        self._next = 0

    def begin_sync(self) -> None:
        pass  # the slots simply keep rotating

    def take(self, nbytes: int, device) -> tuple[int, torch.Tensor]:
        slot = self._next
        self._next = (slot + 1) % len(self._bufs)
        self.wait(slot)
        buf = self._bufs[slot]
        if buf is None or buf.numel() < nbytes or buf.device.type != torch.device(device).type:
            self._bufs[slot] = buf = torch.empty(nbytes, dtype=torch.uint8, device=device)
        return slot, buf[:nbytes]

    def set_pending(self, slot: int, handle) -> None:
        self._pending[slot] = handle

    def wait(self, slot: int) -> None:
        if self._pending[slot] is not None:
            self._pending[slot].wait()
            self._pending[slot] = None

    def wait_all(self) -> None:
        for slot in range(len(self._bufs)):
            self.wait(slot)


class WeightStore:
    """Receive buffers that stay an engine's weights: loading is pointing parameters at them, not a copy.

    Bucket i of a sync lands in buffer i of one of two sets: always the set that the served (last
    committed) weights do not use, so a sync that fails verification, or several in a row, never
    touches them; `commit()` after adopting a verified sync makes its set the served one. Costs one
    extra copy of the model's memory and saves copying every weight on every sync (the CPU engine uses
    it; vLLM copies in its own `load_weights`).
    """

    def __init__(self):
        self._sets: tuple[list[torch.Tensor], list[torch.Tensor]] = ([], [])
        self._served, self._active, self._next = 1, 0, 0

    def begin_sync(self) -> None:
        self._active, self._next = 1 - self._served, 0

    def commit(self) -> None:
        """The set this sync wrote now holds the served weights."""
        self._served = self._active

    def take(self, nbytes: int, device) -> tuple[int, torch.Tensor]:
        bufs, index = self._sets[self._active], self._next
        self._next += 1
        if index == len(bufs) or bufs[index].numel() < nbytes or bufs[index].device.type != torch.device(device).type:
            buf = torch.empty(nbytes, dtype=torch.uint8, device=device)
            bufs[index:index + 1] = [buf]
        return index, bufs[index][:nbytes]


def unpack_bucket(flat: torch.Tensor, entries) -> list[tuple[str, torch.Tensor]]:
    """Views into `flat` (no copy) by HF name."""
    out = []
    for name, dtype, shape, off, nbytes in entries:
        out.append((name, flat[off:off + nbytes].view(getattr(torch, dtype)).view(shape)))
    return out


# ---- the wire protocol ----------------------------------------------------------------------------------


def send_bucket(group, bucket: Bucket, version: int, index: int, async_op: bool = False):
    """Header, then payload; with `async_op` the payload's handle is returned (keep `bucket.flat` until it is done)."""
    group.broadcast_object({"type": "bucket", "version": version, "index": index, "entries": bucket.entries,
                            "nbytes": bucket.nbytes, "checksum": bucket.checksum}, src=0)
    return group.broadcast(bucket.flat, src=0, async_op=async_op)


def send_end(group, version: int, checksums: list[str], num_tensors: int) -> str:
    total = combine_checksums(checksums)
    group.broadcast_object({"type": "end", "version": version, "num_buckets": len(checksums),
                            "num_tensors": num_tensors, "checksum": total}, src=0)
    return total


@dataclass
class SyncResult:
    version: int
    ok: bool
    checksum: str  # the sender's per-sync checksum
    num_buckets: int
    num_tensors: int
    loaded: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        d = asdict(self)
        d.pop("loaded")
        return d


def receive_weights(group, load_fn: Callable[[list[tuple[str, torch.Tensor]]], object],
                    expected_version: int | None = None, ring: BufferRing | WeightStore | None = None) -> SyncResult:
    """Receives one whole sync; loads each bucket whose checksum verifies, drains the rest on errors.

    Pipelined: bucket k+1 is already on the wire while bucket k is checked and loaded. `ring` gives the
    receive buffers: a `BufferRing` (two, reused; `load_fn` must copy) or a `WeightStore` (`load_fn` may
    keep the tensors it gets, they are views of buffers this sync owns until the sync after next).
    """
    if group is None:
        raise WeightSyncError("receive_weights: this engine has not joined a sync group (join_sync_group first)")
    ring = ring or BufferRing()
    ring.begin_sync()
    checksums, loaded, errors = [], [], []
    counts = {"tensors": 0}

    def process(header, buf, handle):
        handle.wait()
        got = bucket_checksum(buf)
        checksums.append(got)
        counts["tensors"] += len(header["entries"])
        if expected_version is not None and header["version"] != expected_version:
            errors.append(f"bucket {header['index']}: version {header['version']} != expected {expected_version}")
        elif got != header["checksum"]:
            errors.append(f"bucket {header['index']}: checksum mismatch (received {got}, sender {header['checksum']})")
        else:
            tensors = unpack_bucket(buf, header["entries"])
            load_fn(tensors)
            loaded.extend(n for n, _ in tensors)

    prev = None
    while True:
        header = group.broadcast_object(None, src=0)
        if header["type"] == "end":
            break
        _, buf = ring.take(header["nbytes"], group.device)
        handle = group.broadcast(buf, src=0, async_op=True)
        if prev is not None:
            process(*prev)
        prev = (header, buf, handle)
    if prev is not None:
        process(*prev)
    num_tensors = counts["tensors"]
    if len(checksums) != header["num_buckets"] or num_tensors != header["num_tensors"]:
        errors.append(f"received {len(checksums)} buckets / {num_tensors} tensors, sender sent "
                      f"{header['num_buckets']} / {header['num_tensors']}")
    if not errors and combine_checksums(checksums) != header["checksum"]:
        errors.append("per-sync checksum mismatch")
    return SyncResult(header["version"], not errors, header["checksum"], len(checksums), num_tensors, loaded, errors)


@dataclass
class EngineSyncState:
    """What an engine knows about its weights: version, and whether it may serve rollouts."""

    version: int = -1
    serving: bool = True
    last_checksum: str = ""
    failure: str = ""
    group: object = None

    def check_serving(self) -> None:
        if not self.serving:
            raise WeightSyncError(f"engine refuses to serve: the last weight sync failed verification ({self.failure}); "
                                  "it serves again after a sync that verifies")

    def check_complete(self, loaded: set[str], expected: set[str], raise_error: bool = True) -> bool:
        missing = sorted(expected - set(loaded))
        if missing and not raise_error:
            return False
        if missing:
            self.serving, self.failure = False, f"{len(missing)} parameters not updated, e.g. {missing[:3]}"
            raise WeightSyncError(f"weight update incomplete: {self.failure}")
        return True

    def mark_loaded(self, version: int, checksum: str = "") -> None:
        self.version, self.serving, self.failure, self.last_checksum = version, True, "", checksum

    def apply(self, result: SyncResult, expected: set[str]) -> None:
        if not result.ok:
            self.serving, self.failure = False, "; ".join(result.errors)
            raise WeightSyncError(f"weight sync v{result.version} rejected: {self.failure}")
        self.check_complete(set(result.loaded), expected)
        self.mark_loaded(result.version, result.checksum)

    def as_dict(self) -> dict:
        return {"version": self.version, "serving": self.serving, "checksum": self.last_checksum, "failure": self.failure}


# ---- trainer side ---------------------------------------------------------------------------------------


@dataclass
class SyncStats:
    version: int
    bytes: int
    num_buckets: int
    num_tensors: int
    checksum: str
    seconds: float
    gather_s: float  # rank 0 waiting for the pieces other trainer ranks send it
    send_s: float  # rank 0 placing its own pieces, checksumming, waiting for a free buffer, posting broadcasts
    shared_memory_ranks: int = 0  # trainer ranks that wrote their pieces into rank 0's shared buffers


@dataclass(frozen=True)
class _Piece:
    """A block of one HF tensor that one trainer rank holds (see megatron_shard_to_hf)."""

    src: int  # global trainer rank holding it: DP rank 0, TP rank r of the stage that owns the parameter
    global_name: str
    index: int  # position in megatron_shard_to_hf's output on `src`
    hf_name: str
    dim: int  # the block starts at `start` along `dim` of the HF tensor and spans `length`
    start: int
    length: int


@dataclass
class _BucketPlan:
    entries: list[tuple[str, str, tuple[int, ...], int, int]]  # the wire header's (hf_name, dtype, shape, offset, nbytes)
    pieces: list[_Piece]
    nbytes: int


class TrainerWeightSender:
    """Run on EVERY trainer rank (lockstep); only global rank 0 owns a sync group and talks to the fleet.

    A plan is agreed once over the trainer world (`all_gather_object` of every DP-rank-0 rank's local
    parameters): the HF tensors in send order, packed into buckets of about `bucket_bytes` (a tensor that
    big travels alone), and for each HF tensor its pieces (`megatron_shard_to_hf`): which TP/PP rank
    holds which block. Per bucket, rank 0 takes a reusable buffer, posts a receive for every other
    rank's piece straight into its place (a column block goes through a reused scratch buffer), copies
    its own pieces in, checksums, and broadcasts the bucket asynchronously; it then builds the next
    bucket while that one is on the wire (two buffers). The other ranks send their pieces (cast to
    `dtype`, contiguous) to rank 0, at most two buckets ahead. So no rank ever assembles a full
    Megatron tensor, and nothing is allocated per sync on rank 0 after the first one.

    Same-host CPU ranks (gloo) skip the point-to-point transfer: rank 0's two bucket buffers are shared
    memory that they map, and each writes its pieces straight into the bucket when rank 0 says which
    buffer is free (a loopback TCP send costs two copies and the kernel's time; this costs one copy).
    `shared_memory=False` forces point-to-point (the path NCCL ranks and other hosts always take).

    `dtype` casts what is sent (e.g. bf16 for vLLM; None keeps the trainer's dtype).
    """

    def __init__(self, model_chunks, model_cfg, bucket_bytes: int = DEFAULT_BUCKET_BYTES,
                 dtype: torch.dtype | None = None, shared_memory: bool = True):
        if bucket_bytes < ALIGN:
            raise ValueError(f"weight sync bucket_bytes must be >= {ALIGN}, got {bucket_bytes}")
        self.chunks = list(model_chunks) if isinstance(model_chunks, (list, tuple)) else [model_chunks]
        self.cfg = model_cfg
        self.bucket_bytes = bucket_bytes
        self.dtype = dtype
        self._plan: list[_BucketPlan] | None = None
        self.shared_memory = shared_memory
        self._ring = BufferRing()
        self._scratch: dict[tuple, list[torch.Tensor]] = {}
        self._shm_sources: set[int] = set()  # ranks that write their pieces into rank 0's shared buffers
        self._shm_slots: list[torch.Tensor] = []

    def _local_params(self):
        from megatron_apo.models.sharding import iter_local_params

        out = {}
        for vp, chunk in enumerate(self.chunks):
            for lp in iter_local_params(chunk, vp_stage=vp if len(self.chunks) > 1 else None):
                out[lp.global_name] = lp
        return out

    def _build_plan(self) -> list[_BucketPlan]:
        import torch.distributed as dist
        from megatron.core import parallel_state as ps

        from megatron_apo.models.hf_mapping import megatron_shard_to_hf, megatron_to_hf

        tp = ps.get_tensor_model_parallel_world_size()
        mine = []
        if ps.get_data_parallel_rank() == 0:
            mine = [(n, tuple(lp.tensor.shape), str(lp.tensor.dtype).removeprefix("torch."), lp.partition_dim)
                    for n, lp in self._local_params().items()]
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, (ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank(),
                                          dist.get_rank(), mine, (socket.gethostname(), _can_share_memory())))
        self._hosts = {rank: host for _, _, rank, _, host in everyone}  # (hostname, can share memory)
        owners: dict[str, dict] = {}  # global name -> the first stage holding it (a tied output copy is skipped)
        for stage, tp_rank, rank, params, _ in sorted(everyone, key=lambda x: (x[0], x[1])):
            for name, shape, dtype, pdim in params:
                owner = owners.setdefault(name, {"stage": stage, "ranks": {}, "shape": shape, "dtype": dtype, "pdim": pdim})
                if owner["stage"] == stage:
                    owner["ranks"][tp_rank] = rank

        tensors = []  # (hf_name, dtype, shape, pieces) in send order
        for name, o in owners.items():
            shard = torch.empty(o["shape"], device="meta")
            full_shape = list(o["shape"])
            if o["pdim"] is not None:
                full_shape[o["pdim"]] *= tp
            pieces: dict[str, list[_Piece]] = {}
            for tp_rank, rank in sorted(o["ranks"].items()):
                for i, (hf_name, piece, dim, start) in enumerate(
                        megatron_shard_to_hf(self.cfg, name, shard, o["pdim"], tp_rank, tp)):
                    pieces.setdefault(hf_name, []).append(_Piece(rank, name, i, hf_name, dim, start, piece.shape[dim]))
            for hf_name, t in megatron_to_hf(self.cfg, name, torch.empty(full_shape, device="meta")):
                dtype = str(self.dtype).removeprefix("torch.") if self.dtype is not None else o["dtype"]
                tensors.append((hf_name, dtype, tuple(t.shape), pieces[hf_name]))

        plan, current, current_bytes = [], [], 0

        def close():
            nonlocal current, current_bytes
            if current:
                entries, nbytes = bucket_layout([(hf_name, torch.empty(shape, dtype=getattr(torch, dtype), device="meta"))
                                                 for hf_name, dtype, shape, _ in current])
                plan.append(_BucketPlan(entries, [p for *_, ps_ in current for p in ps_], nbytes))
            current, current_bytes = [], 0

        for t in tensors:
            nbytes = _aligned(torch.Size(t[2]).numel() * getattr(torch, t[1]).itemsize)
            if current and nbytes >= self.bucket_bytes:
                close()  # a big tensor travels alone
            current.append(t)
            current_bytes += nbytes
            if current_bytes >= self.bucket_bytes:
                close()
        close()
        # Nothing is on the wire while the first bucket is built: big single-tensor buckets (the embedding)
        # go last so the pipeline starts with a small one. The engines load by name, in any order.
        plan.sort(key=lambda b: len(b.entries) == 1 and b.nbytes >= self.bucket_bytes)
        return plan

    def _pieces_of(self, local, global_name: str, cache: dict) -> list[torch.Tensor]:
        """This rank's pieces of one parameter (megatron_shard_to_hf), computed once per bucket."""
        from megatron.core import parallel_state as ps

        from megatron_apo.models.hf_mapping import megatron_shard_to_hf

        if global_name not in cache:
            lp = local[global_name]
            cache[global_name] = [t for _, t, _, _ in megatron_shard_to_hf(
                self.cfg, global_name, lp.tensor.detach(), lp.partition_dim,
                ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size())]
        return cache[global_name]

    @torch.no_grad()
    def sync(self, group, version: int) -> SyncStats | None:
        """One sync. `group`: the sync group on global rank 0 (None elsewhere). Returns stats on rank 0."""
        import torch.distributed as dist

        rank = dist.get_rank()
        if rank == 0 and group is None:
            raise WeightSyncError("TrainerWeightSender.sync: global rank 0 needs the sync group (open_sync_group(endpoint, 0))")
        if self._plan is None:
            self._plan = self._build_plan()
            self._open_shared_buffers()
        if rank != 0:
            self._send_pieces(rank)
            return None
        return self._send_buckets(group, version)

    def _send_pieces(self, rank: int) -> None:
        """A non-zero rank: its pieces of every bucket to rank 0, in plan order.

        Point-to-point: at most two buckets in flight. Shared memory: wait for rank 0's go (bucket index,
        free buffer), write the pieces into their places in that buffer, report done.
        """
        import torch.distributed as dist

        local, in_flight = self._local_params(), []
        for index, bucket in enumerate(self._plan):
            mine = [p for p in bucket.pieces if p.src == rank]
            if not mine:
                continue
            cache = {}
            if rank in self._shm_sources:
                go = torch.empty(2, dtype=torch.int64)
                dist.recv(go, src=0)
                if int(go[0]) != index:
                    raise WeightSyncError(f"weight sync: rank {rank} expected bucket {index}, rank 0 is on {int(go[0])}")
                views = dict(unpack_bucket(self._shm_slots[int(go[1])], bucket.entries))
                for p in mine:
                    views[p.hf_name].narrow(p.dim, p.start, p.length).copy_(self._pieces_of(local, p.global_name, cache)[p.index])
                dist.send(go, dst=0)
                continue
            sends = []
            for p in mine:
                t = self._pieces_of(local, p.global_name, cache)[p.index]
                t = t.to(self.dtype or t.dtype).contiguous()
                sends.append((dist.isend(t, dst=0), t))  # keep `t` alive until its send is done
            in_flight.append(sends)
            if len(in_flight) > 2:
                for work, _ in in_flight.pop(0):
                    work.wait()
        for sends in in_flight:
            for work, _ in sends:
                work.wait()

    def _open_shared_buffers(self) -> None:
        """Collective, once: rank 0's two bucket buffers become shared memory mapped by its same-host sources.

        The files are unlinked as soon as every rank has mapped them, so nothing is left behind in
        /dev/shm even if a process dies later.
        """
        import torch.distributed as dist

        sources = {p.src for b in self._plan for p in b.pieces if p.src != 0}
        if self.shared_memory:  # the same decision on every rank: it is made from the plan's gathered facts
            self._shm_sources = {r for r in sources if self._hosts[r] == self._hosts[0] and self._hosts[0][1]}
        if not self._shm_sources:
            return
        rank, capacity = dist.get_rank(), max(b.nbytes for b in self._plan)
        paths = [None, None]
        if rank == 0:
            try:  # fallocate, not ftruncate: a full /dev/shm (Docker's default is 64 MiB) fails here, not with SIGBUS later
                for i in range(2):
                    fd, paths[i] = tempfile.mkstemp(prefix="megatron-apo-weight-sync-", dir="/dev/shm")
                    try:
                        os.posix_fallocate(fd, 0, capacity)
                    finally:
                        os.close(fd)
            except OSError as e:
                warnings.warn(f"weight sync: no room for 2 x {capacity / 2**20:.0f} MiB in /dev/shm ({e}); TP shards go "
                              "point-to-point instead (give the container a bigger --shm-size)")
                for path in paths:
                    if path:
                        os.unlink(path)
                paths = [None, None]
        dist.broadcast_object_list(paths, src=0)
        if paths[0] is None:
            self._shm_sources = set()
            return
        if rank == 0 or rank in self._shm_sources:
            self._shm_slots = [torch.from_file(path, shared=True, size=capacity, dtype=torch.uint8) for path in paths]
        dist.barrier()
        if rank == 0:
            for path in paths:
                os.unlink(path)
            self._ring = BufferRing(buffers=self._shm_slots)

    def _scratch_buffer(self, shape, dtype, uses: dict) -> torch.Tensor:
        """The n-th scratch buffer of this shape in the current bucket (reused across buckets and syncs)."""
        key = (tuple(shape), dtype)
        n = uses[key] = uses.get(key, -1) + 1
        bufs = self._scratch.setdefault(key, [])
        if n == len(bufs):
            bufs.append(torch.empty(shape, dtype=dtype, device=_device()))
        return bufs[n]

    def _send_buckets(self, group, version: int) -> SyncStats:
        import torch.distributed as dist

        local = self._local_params()
        t0 = time.perf_counter()
        gather_s = 0.0
        checksums, total_bytes, num_tensors, zero_copy = [], 0, 0, []
        for index, plan in enumerate(self._plan):
            cache = {}
            bucket, slot = self._zero_copy_bucket(plan, local, cache, group.device), None
            if bucket is None:
                # packed where the pieces live (the trainer ranks' p2p runs over their own, NCCL on GPU, group)
                slot, flat = self._ring.take(plan.nbytes, _device())
                views = dict(unpack_bucket(flat, plan.entries))
                receives, uses = [], {}
                for src in sorted({p.src for p in plan.pieces} & self._shm_sources):  # "write into `slot`"
                    go = torch.tensor([index, slot], dtype=torch.int64)
                    receives.append((dist.isend(go, dst=src), go, go))
                    done = torch.empty(2, dtype=torch.int64)
                    receives.append((dist.irecv(done, src=src), done, done))
                for p in plan.pieces:  # post every receive first: the transfers run while rank 0 copies its own
                    if p.src == 0 or p.src in self._shm_sources:
                        continue
                    dst = views[p.hf_name].narrow(p.dim, p.start, p.length)
                    buf = dst if dst.is_contiguous() else self._scratch_buffer(dst.shape, dst.dtype, uses)
                    receives.append((dist.irecv(buf, src=p.src), buf, dst))
                for p in plan.pieces:
                    if p.src == 0:
                        views[p.hf_name].narrow(p.dim, p.start, p.length).copy_(self._pieces_of(local, p.global_name, cache)[p.index])
                tg = time.perf_counter()
                for work, buf, dst in receives:
                    work.wait()
                    if buf is not dst:
                        dst.copy_(buf)
                gather_s += time.perf_counter() - tg
                bucket = Bucket(plan.entries, flat, bucket_checksum(flat))
                if flat.device != torch.device(group.device):  # a GPU trainer feeding CPU (gloo) engines
                    bucket = Bucket(plan.entries, flat.to(group.device), bucket.checksum)
            handle = _Keep(send_bucket(group, bucket, version, index, async_op=True), bucket)
            if slot is None:
                zero_copy.append(handle)
            else:
                self._ring.set_pending(slot, handle)
            checksums.append(bucket.checksum)
            total_bytes += bucket.nbytes
            num_tensors += len(plan.entries)
        self._ring.wait_all()
        for handle in zero_copy:
            handle.wait()
        checksum = send_end(group, version, checksums, num_tensors)
        seconds = time.perf_counter() - t0
        return SyncStats(version, total_bytes, len(checksums), num_tensors, checksum, seconds, gather_s,
                         seconds - gather_s, len(self._shm_sources))

    def _zero_copy_bucket(self, plan: _BucketPlan, local, cache: dict, device) -> Bucket | None:
        """A bucket that is exactly one of rank 0's own tensors, already contiguous in the sent dtype and of
        an ALIGN-ed size, is broadcast straight from its memory (no copy); None otherwise."""
        if len(plan.entries) != 1 or len(plan.pieces) != 1 or plan.pieces[0].src != 0:
            return None
        (_, dtype, shape, _, nbytes), piece = plan.entries[0], plan.pieces[0]
        t = self._pieces_of(local, piece.global_name, cache)[piece.index]
        if (nbytes % ALIGN or tuple(t.shape) != tuple(shape) or t.dtype != getattr(torch, dtype)
                or not t.is_contiguous() or t.device != torch.device(device)):
            return None
        flat = t.view(-1).view(torch.uint8)
        return Bucket(plan.entries, flat, bucket_checksum(flat))


def _can_share_memory() -> bool:
    """CPU ranks (gloo) with a /dev/shm; CUDA tensors move over NCCL instead."""
    return _device().type == "cpu" and os.path.isdir("/dev/shm")


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
