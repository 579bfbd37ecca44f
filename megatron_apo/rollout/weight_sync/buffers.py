"""Buffers that buckets are packed into and received into, and how long they must live.

* `BufferRing`: two reusable flat buffers, one on the wire while the other is packed or checked.
* `ReceivePool`: receive buffers reused once nothing holds them (the engine may keep views: vLLM's reload).
* `WeightStore`: receive buffers that stay an engine's weights (loading is pointing parameters at them).
* `open_shared_slots`: the sender's two bucket buffers as shared memory that same-host trainer ranks map.
* `InFlight`: an async broadcast handle that keeps its bucket's memory alive until it is waited on.
"""

from __future__ import annotations

import os
import tempfile
import warnings

import torch


def trainer_device() -> torch.device:
    """Where this trainer rank's tensors live: its CUDA device, else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def can_share_memory() -> bool:
    """CPU ranks (gloo) with a /dev/shm; CUDA tensors move over NCCL instead."""
    return trainer_device().type == "cpu" and os.path.isdir("/dev/shm")


class InFlight:
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


def _storage_users(t: torch.Tensor) -> int:
    """How many tensors (views included) hold `t`'s memory (torch's storage use count)."""
    return torch._C._storage_Use_Count(t.untyped_storage()._cdata)


class ReceivePool:
    """Receive buffers that may be handed out as views and kept by their user: a buffer is reused only once
    nothing but the pool holds its memory any more, otherwise a new one is allocated.

    vLLM's layerwise reload keeps the tensors a layer was loaded from until the layer is complete (or, for a
    layer it could not complete, until the end of the sync), which may be buckets later: with a fixed ring
    it would read bytes the next receive overwrote, so a reused ring forced a copy of every tensor. Here a
    kept view simply keeps its buffer out of the rotation; the pool grows only by what the engine really
    holds (as the copies did), and `trim()` after the sync frees all but `keep` idle buffers.
    """

    def __init__(self, keep: int = 2):
        self._bufs: list[tuple[torch.Tensor, int]] = []  # (buffer, its use count when idle)
        self._keep = keep

    def begin_sync(self) -> None:
        pass

    def take(self, nbytes: int, device) -> tuple[int, torch.Tensor]:
        device = torch.device(device)
        idle = [i for i, (b, users) in enumerate(self._bufs)
                if _storage_users(b) == users and b.numel() >= nbytes and b.device.type == device.type]
        if idle:  # the smallest that fits: big buffers stay free for big buckets
            i = min(idle, key=lambda j: self._bufs[j][0].numel())
            return i, self._bufs[i][0][:nbytes]
        buf = torch.empty(nbytes, dtype=torch.uint8, device=device)
        self._bufs.append((buf, _storage_users(buf)))
        return len(self._bufs) - 1, buf[:nbytes]

    def trim(self) -> None:
        """Frees the idle buffers beyond the `keep` largest (after a sync whose loads held some for a while)."""
        idle = sorted((e for e in self._bufs if _storage_users(e[0]) == e[1]), key=lambda e: -e[0].numel())
        drop = {id(e[0]) for e in idle[self._keep:]}
        self._bufs = [e for e in self._bufs if id(e[0]) not in drop]

    def __len__(self) -> int:
        return len(self._bufs)


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


def open_shared_slots(capacity: int, attach: bool, slots: int = 2) -> list[torch.Tensor] | None:
    """Collective over the trainer world: rank 0 creates `slots` shared-memory files of `capacity` bytes in
    /dev/shm, the ranks with `attach` map them (rank 0 must be one), and the files are unlinked as soon as
    every rank has mapped them, so nothing is left behind even if a process dies later.

    Returns the mapped buffers ([] where `attach` is False), or None on every rank when /dev/shm had no room.
    """
    import torch.distributed as dist

    rank = dist.get_rank()
    paths = [None] * slots
    if rank == 0:
        try:  # fallocate, not ftruncate: a full /dev/shm (Docker's default is 64 MiB) fails here, not with SIGBUS later
            for i in range(slots):
                fd, paths[i] = tempfile.mkstemp(prefix="megatron-apo-weight-sync-", dir="/dev/shm")
                try:
                    os.posix_fallocate(fd, 0, capacity)
                finally:
                    os.close(fd)
        except OSError as e:
            warnings.warn(f"weight sync: no room for {slots} x {capacity / 2**20:.0f} MiB in /dev/shm ({e}); TP shards "
                          "go point-to-point instead (give the container a bigger --shm-size)")
            for path in paths:
                if path:
                    os.unlink(path)
            paths = [None] * slots
    dist.broadcast_object_list(paths, src=0)
    if paths[0] is None:
        return None
    mapped = [torch.from_file(path, shared=True, size=capacity, dtype=torch.uint8) for path in paths] if attach else []
    dist.barrier()
    if rank == 0:
        for path in paths:
            os.unlink(path)
    return mapped
