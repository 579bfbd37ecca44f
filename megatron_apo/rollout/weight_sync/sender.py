"""The trainer side: `TrainerWeightSender`, run on every trainer rank in lockstep, one sender to the fleet.

Per bucket of the plan (`plan.py`), the ranks holding pieces send them point-to-point to global rank 0
(or write them into its shared-memory buffer), which receives them straight into their place in the
bucket buffer, adds its own, checksums and broadcasts it (`protocol.send_plan` once per sync, then
`PlanSender.send` per bucket). So there is ONE sender
and ONE sync group for the whole trainer, the shape vLLM's NCCL weight transfer expects (src=0), and no
full Megatron tensor is ever assembled.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from megatron_apo.rollout.weight_sync.buckets import ALIGN, DEFAULT_BUCKET_BYTES, Bucket, bucket_checksum, unpack_bucket
from megatron_apo.rollout.weight_sync.buffers import BufferRing, InFlight, open_shared_slots, trainer_device
from megatron_apo.rollout.weight_sync.plan import BucketPlan, build_plan, local_params, split_group
from megatron_apo.rollout.weight_sync.protocol import WeightSyncError, send_plan


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


class TrainerWeightSender:
    """Run on EVERY trainer rank (lockstep); only global rank 0 owns a sync group and talks to the fleet.

    A plan is agreed once over the trainer world (`all_gather_object` of every DP-rank-0 rank's local
    parameters, and every expert-DP-rank-0 rank's experts): the HF tensors in send order, packed into buckets
    of about `bucket_bytes` (a tensor that big travels alone), and for each HF tensor its pieces
    (`megatron_shard_to_hf`): which TP/PP rank holds which block (an expert's: the expert-TP ranks of the EP
    rank holding it). Per bucket, rank 0 takes a reusable buffer, posts a receive for every other
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
        self._plan: list[BucketPlan] | None = None
        self.shared_memory = shared_memory
        self._ring = BufferRing()
        self._scratch: dict[tuple, list[torch.Tensor]] = {}
        self._shm_sources: set[int] = set()  # ranks that write their pieces into rank 0's shared buffers
        self._shm_slots: list[torch.Tensor] = []

    def _pieces_of(self, local, global_name: str, cache: dict) -> list[torch.Tensor]:
        """This rank's pieces of one parameter (megatron_shard_to_hf), computed once per bucket."""
        from megatron_apo.models.hf_mapping import megatron_shard_to_hf

        if global_name not in cache:
            lp = local[global_name]
            cache[global_name] = [t for _, t, _, _ in megatron_shard_to_hf(
                self.cfg, global_name, lp.tensor.detach(), lp.partition_dim, *split_group(global_name))]
        return cache[global_name]

    @torch.no_grad()
    def sync(self, group, version: int) -> SyncStats | None:
        """One sync. `group`: the sync group on global rank 0 (None elsewhere). Returns stats on rank 0."""
        import torch.distributed as dist

        rank = dist.get_rank()
        if rank == 0 and group is None:
            raise WeightSyncError("TrainerWeightSender.sync: global rank 0 needs the sync group "
                                  "(open_sync_group(endpoint, 0))")
        if self._plan is None:
            self._plan, self._hosts = build_plan(self.chunks, self.cfg, self.dtype, self.bucket_bytes)
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

        local, in_flight = local_params(self.chunks), []
        for index, bucket in enumerate(self._plan):
            mine = [p for p in bucket.pieces if p.src == rank]
            if not mine:
                continue
            cache = {}
            if rank in self._shm_sources:
                go = torch.empty(2, dtype=torch.int64)
                dist.recv(go, src=0)
                if int(go[0]) != index:
                    raise WeightSyncError(f"weight sync: rank {rank} expected bucket {index}, "
                                          f"rank 0 is on {int(go[0])}")
                views = dict(unpack_bucket(self._shm_slots[int(go[1])], bucket.entries))
                for p in mine:
                    piece = self._pieces_of(local, p.global_name, cache)[p.index]
                    views[p.hf_name].narrow(p.dim, p.start, p.length).copy_(piece)
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
        """Collective, once: rank 0's two bucket buffers become shared memory mapped by its same-host sources."""
        import torch.distributed as dist

        sources = {p.src for b in self._plan for p in b.pieces if p.src != 0}
        if self.shared_memory:  # the same decision on every rank: it is made from the plan's gathered facts
            self._shm_sources = {r for r in sources if self._hosts[r] == self._hosts[0] and self._hosts[0][1]}
        if not self._shm_sources:
            return
        rank = dist.get_rank()
        slots = open_shared_slots(max(b.nbytes for b in self._plan), attach=rank == 0 or rank in self._shm_sources)
        if slots is None:
            self._shm_sources = set()
            return
        self._shm_slots = slots
        if rank == 0:
            self._ring = BufferRing(buffers=self._shm_slots)

    def _scratch_buffer(self, shape, dtype, uses: dict) -> torch.Tensor:
        """The n-th scratch buffer of this shape in the current bucket (reused across buckets and syncs)."""
        key = (tuple(shape), dtype)
        n = uses[key] = uses.get(key, -1) + 1
        bufs = self._scratch.setdefault(key, [])
        if n == len(bufs):
            bufs.append(torch.empty(shape, dtype=dtype, device=trainer_device()))
        return bufs[n]

    def _send_buckets(self, group, version: int) -> SyncStats:
        import torch.distributed as dist

        local = local_params(self.chunks)
        t0 = time.perf_counter()
        gather_s = 0.0
        total_bytes, num_tensors, zero_copy = 0, 0, []
        tx = send_plan(group, version, [(plan.entries, plan.nbytes) for plan in self._plan])  # once per sync
        for index, plan in enumerate(self._plan):
            cache = {}
            bucket, slot = self._zero_copy_bucket(plan, local, cache, group.device), None
            if bucket is None:
                # packed where the pieces live (the trainer ranks' p2p runs over their own, NCCL on GPU, group)
                slot, flat = self._ring.take(plan.nbytes, trainer_device())
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
                        piece = self._pieces_of(local, p.global_name, cache)[p.index]
                        views[p.hf_name].narrow(p.dim, p.start, p.length).copy_(piece)
                tg = time.perf_counter()
                for work, buf, dst in receives:
                    work.wait()
                    if buf is not dst:
                        dst.copy_(buf)
                gather_s += time.perf_counter() - tg
                bucket = Bucket(plan.entries, flat, bucket_checksum(flat))
                if flat.device != torch.device(group.device):  # a GPU trainer feeding CPU (gloo) engines
                    bucket = Bucket(plan.entries, flat.to(group.device), bucket.checksum)
            handle = InFlight(tx.send(index, bucket, async_op=True), bucket)
            if slot is None:
                zero_copy.append(handle)
            else:
                self._ring.set_pending(slot, handle)
            total_bytes += bucket.nbytes
            num_tensors += len(plan.entries)
        self._ring.wait_all()
        for handle in zero_copy:
            handle.wait()
        seconds = time.perf_counter() - t0
        return SyncStats(version, total_bytes, len(tx.checksums), num_tensors, tx.checksum, seconds, gather_s,
                         seconds - gather_s, len(self._shm_sources))

    def _zero_copy_bucket(self, plan: BucketPlan, local, cache: dict, device) -> Bucket | None:
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
