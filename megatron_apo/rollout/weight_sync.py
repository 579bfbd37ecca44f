"""Trainer -> fleet weight sync: TP/PP shards -> full HF-named tensors -> checksummed buckets -> broadcast.

Protocol over one sync group (sync rank 0 = the trainer's global rank 0, ranks 1.. = engine processes):

    for each bucket:  header {"type": "bucket", version, index, entries, nbytes, checksum}  (object broadcast)
                      payload: one flat uint8 buffer of `nbytes`                              (tensor broadcast)
    finally:          header {"type": "end", version, num_buckets, num_tensors, checksum}

Trainer side, every rank calls `TrainerWeightSender.sync` in lockstep. For each global parameter (in a
plan agreed once over the trainer world), the ranks of the owning pipeline stage (data-parallel rank 0)
all-gather its TP shards; the stage's TP-rank-0 sends the full tensor to global rank 0 over the trainer
world when the stage is not the first; rank 0 renames it with the HF mapping (fused QKV / gate-up split,
vocab padding stripped), packs buckets of `bucket_bytes` and broadcasts them. So there is ONE sender
and ONE sync group for the whole trainer, the same shape vLLM's NCCL weight transfer expects (src=0).

Engine side, `receive_weights` verifies each bucket's checksum before loading it; a bad bucket is not
loaded, the rest of the sync is still drained (the sender must not hang), and the engine refuses to
serve until a later sync verifies (`EngineSyncState`). The per-sync checksum (over the bucket
checksums) is reported back so the fleet can check that every engine got the same bytes.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

from megatron_apo.rollout.sync_group import SyncEndpoint, open_sync_group

__all__ = [
    "Bucket", "EngineSyncState", "SyncEndpoint", "SyncResult", "SyncStats", "TrainerWeightSender", "WeightSyncError",
    "bucket_checksum", "open_sync_group", "pack_bucket", "receive_weights", "send_bucket", "send_end", "unpack_bucket",
]

ALIGN = 512  # bytes: tensor offsets and bucket sizes, so every dtype view and the checksum's 64-word rows line up
DEFAULT_BUCKET_BYTES = 256 << 20


class WeightSyncError(RuntimeError):
    pass


# ---- buckets and checksums ------------------------------------------------------------------------------


def bucket_checksum(flat: torch.Tensor) -> str:
    """A position-sensitive checksum of a flat uint8 buffer (size a multiple of 512), on any device.

    The 64-bit words are summed per 512-byte row (one fast memory pass); the row sums are then combined
    with row-index weights and plainly, both as wrapping int64 sums. Not cryptographic: it catches
    corrupted, truncated, shifted or reordered rows (not a swap of two words inside one row), and gives
    the same value on CPU and GPU (integer sums wrap mod 2^64 in any order).
    """
    if flat.dtype != torch.uint8 or flat.dim() != 1 or flat.numel() % ALIGN:
        raise ValueError("bucket_checksum expects a 1-D uint8 buffer whose size is a multiple of 512")
    rows = flat.view(torch.int64).view(-1, 64).sum(dim=1)
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


class BufferRing:
    """Two reusable flat buffers: one is on the wire while the other is packed (sender) or checked (receiver)."""

    def __init__(self, slots: int = 2):
        self._bufs: list[torch.Tensor | None] = [None] * slots
        self._pending: list = [None] * slots
        self._next = 0

    def take(self, nbytes: int, device) -> tuple[int, torch.Tensor]:
        slot = self._next
        self._next = (slot + 1) % len(self._bufs)
        self.wait(slot)
        buf = self._bufs[slot]
        if buf is None or buf.numel() < nbytes or buf.device != torch.device(device):
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
                    expected_version: int | None = None, ring: BufferRing | None = None) -> SyncResult:
    """Receives one whole sync; loads each bucket whose checksum verifies, drains the rest on errors.

    Pipelined: bucket k+1 is already on the wire while bucket k is checked and loaded (two buffers).
    """
    if group is None:
        raise WeightSyncError("receive_weights: this engine has not joined a sync group (join_sync_group first)")
    ring = ring or BufferRing()
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
    ring: BufferRing = field(default_factory=BufferRing)  # receive buffers, reused across syncs

    def check_serving(self) -> None:
        if not self.serving:
            raise WeightSyncError(f"engine refuses to serve: the last weight sync failed verification ({self.failure}); "
                                  "it serves again after a sync that verifies")

    def check_complete(self, loaded: set[str], expected: set[str]) -> None:
        missing = sorted(expected - set(loaded))
        if missing:
            self.serving, self.failure = False, f"{len(missing)} parameters not updated, e.g. {missing[:3]}"
            raise WeightSyncError(f"weight update incomplete: {self.failure}")

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
    gather_s: float
    send_s: float


@dataclass(frozen=True)
class _PlanEntry:
    owner: int  # global rank that sends this tensor to rank 0 (its stage's TP-rank-0, DP-rank-0)
    stage: int  # the owner's pipeline stage: its TP group gathers the tensor
    global_name: str
    full_shape: tuple[int, ...]
    dtype: str


class TrainerWeightSender:
    """Run on EVERY trainer rank (lockstep); only global rank 0 owns a sync group and talks to the fleet.

    `to_hf(cfg, global_name, full_tensor) -> [(hf_name, tensor)]` defaults to the HF mapping of
    `megatron_apo.models.hf_mapping`. `dtype` casts what is sent (e.g. bf16 for vLLM; None keeps the
    trainer's dtype).
    """

    def __init__(self, model_chunks, model_cfg, bucket_bytes: int = DEFAULT_BUCKET_BYTES,
                 dtype: torch.dtype | None = None, to_hf=None):
        if bucket_bytes < ALIGN:
            raise ValueError(f"weight sync bucket_bytes must be >= {ALIGN}, got {bucket_bytes}")
        self.chunks = list(model_chunks) if isinstance(model_chunks, (list, tuple)) else [model_chunks]
        self.cfg = model_cfg
        self.bucket_bytes = bucket_bytes
        self.dtype = dtype
        if to_hf is None:
            from megatron_apo.models.hf_mapping import megatron_to_hf as to_hf
        self.to_hf = to_hf
        self._plan: list[_PlanEntry] | None = None
        self._ring = BufferRing()
        self._part_bufs: dict = {}

    def _local_params(self):
        from megatron_apo.models.sharding import iter_local_params

        out = {}
        for vp, chunk in enumerate(self.chunks):
            for lp in iter_local_params(chunk, vp_stage=vp if len(self.chunks) > 1 else None):
                out[lp.global_name] = lp
        return out

    def _build_plan(self) -> list[_PlanEntry]:
        """Agreed once over the trainer world: which rank sends which global parameter, in which order."""
        import torch.distributed as dist
        from megatron.core import parallel_state as ps

        tp = ps.get_tensor_model_parallel_world_size()
        is_owner = ps.get_tensor_model_parallel_rank() == 0 and ps.get_data_parallel_rank() == 0
        mine = []
        if is_owner:
            mine = [(n, lp.full_shape(tp), str(lp.tensor.dtype).removeprefix("torch."))
                    for n, lp in self._local_params().items()]
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, (ps.get_pipeline_model_parallel_rank(), dist.get_rank(), mine))
        plan, seen = [], set()
        for stage, rank, params in sorted(everyone, key=lambda x: (x[0], x[1])):
            for name, shape, dtype in params:
                if name in seen:  # e.g. a tied output layer held by the last stage: the first owner sends
                    continue
                seen.add(name)
                plan.append(_PlanEntry(rank, stage, name, tuple(shape), dtype))
        return plan

    def _gather_to_tp0(self, lp):
        return _gather_to_tp0_impl(lp, self._part_bufs)

    @torch.no_grad()
    def sync(self, group, version: int) -> SyncStats | None:
        """One sync. `group`: the sync group on global rank 0 (None elsewhere). Returns stats on rank 0."""
        import torch.distributed as dist
        from megatron.core import parallel_state as ps

        rank = dist.get_rank()
        if rank == 0 and group is None:
            raise WeightSyncError("TrainerWeightSender.sync: global rank 0 needs the sync group (open_sync_group(endpoint, 0))")
        if self._plan is None:
            self._plan = self._build_plan()
        local = self._local_params()
        my_stage = ps.get_pipeline_model_parallel_rank()
        dp0 = ps.get_data_parallel_rank() == 0
        t0 = time.perf_counter()
        gather_s = send_s = 0.0
        pending: list[tuple[str, torch.Tensor]] = []
        pending_bytes, checksums, total_bytes, num_tensors = 0, [], 0, 0

        def flush():
            nonlocal pending, pending_bytes, send_s, total_bytes, num_tensors
            if not pending:
                return
            ts = time.perf_counter()
            # pack bucket k+1 while bucket k is still on the wire (the ring waits before reusing a buffer)
            slot, buf = self._ring.take(bucket_layout(pending)[1], group.device)
            bucket = pack_bucket(pending, out=buf)
            self._ring.set_pending(slot, send_bucket(group, bucket, version, len(checksums), async_op=True))
            checksums.append(bucket.checksum)
            total_bytes += bucket.nbytes
            num_tensors += len(pending)
            pending, pending_bytes = [], 0
            send_s += time.perf_counter() - ts

        for entry in self._plan:
            lp = local.get(entry.global_name)
            full = None
            tg = time.perf_counter()
            if lp is not None and dp0 and entry.stage == my_stage:
                full = self._gather_to_tp0(lp)
            if entry.owner != 0:
                if rank == entry.owner:
                    dist.send(full.contiguous(), dst=0)
                elif rank == 0:
                    full = torch.empty(entry.full_shape, dtype=getattr(torch, entry.dtype), device=_device())
                    dist.recv(full, src=entry.owner)
            gather_s += time.perf_counter() - tg
            if rank != 0:
                continue
            for hf_name, tensor in self.to_hf(self.cfg, entry.global_name, full):
                if self.dtype is not None:
                    tensor = tensor.to(self.dtype)
                pending.append((hf_name, tensor))
                pending_bytes += _aligned(tensor.numel() * tensor.element_size())
                if pending_bytes >= self.bucket_bytes:
                    flush()
        if rank != 0:
            return None
        flush()
        self._ring.wait_all()
        checksum = send_end(group, version, checksums, num_tensors)
        return SyncStats(version, total_bytes, len(checksums), num_tensors, checksum,
                         time.perf_counter() - t0, gather_s, send_s)


def _gather_to_tp0_impl(lp, part_bufs: dict):
    """The full tensor on this TP group's rank 0 (None on the others): a gather, not an all-gather, since
    only the sender needs it; the receive buffers are reused across syncs (no page faults per sync)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_apo.models.sharding import merge_tp_shards

    tensor = lp.tensor.detach()
    tp = ps.get_tensor_model_parallel_world_size()
    if lp.partition_dim is None or tp == 1:
        return tensor
    group, dst = ps.get_tensor_model_parallel_group(), ps.get_tensor_model_parallel_src_rank()
    if ps.get_tensor_model_parallel_rank() != 0:
        dist.gather(tensor.contiguous(), dst=dst, group=group)
        return None
    key = (tuple(tensor.shape), tensor.dtype, tensor.device)
    if key not in part_bufs:
        part_bufs[key] = [torch.empty_like(tensor) for _ in range(tp)]
    parts = part_bufs[key]
    dist.gather(tensor.contiguous(), gather_list=parts, dst=dst, group=group)
    return merge_tp_shards(parts, lp.partition_dim, lp.gated)


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")

