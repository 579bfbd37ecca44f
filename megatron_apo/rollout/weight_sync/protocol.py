"""The send-receive protocol over one sync group (sync rank 0 sends, every engine process receives).

    once per sync:   plan {"type": "plan", version, sync_id, buckets: [{entries, nbytes}, ...]}  (JSON + HMAC)
    per bucket:      tag: 32 hex chars of the bucket's checksum + HMAC(sync_id, version, index, checksum)
                     (a fixed 64-byte broadcast), then the payload: one flat uint8 buffer of `nbytes`

The plan (every bucket's names, dtypes, shapes, offsets and size) is one authenticated header
(`sync_group.broadcast_json`, bound to the group's sequence number: a forged, altered or replayed plan is
refused with `WeightSyncAuthError`). Only what is not known before a bucket is packed travels per bucket:
its checksum, in a fixed-size tag MAC'd with the group's key over the sync's random id, the version and the
bucket's index, so a tag cannot be forged, moved to another bucket or replayed from another sync. Since the
sizes are known up front, a receiver posts the receive of bucket i+1 (tag and payload, asynchronously; on
CUDA on a stream of its own) before it verifies and loads bucket i.

`receive_weights` verifies each bucket's checksum against its tag before loading it: nothing unverified is
ever handed to the engine. A bad bucket is not loaded, and a bucket whose load raises stops loading; either
way the rest of the sync is still drained (the sender must not hang) and reported, and the engine refuses
to serve until a later sync verifies (`EngineSyncState`). The per-sync checksum (over the bucket checksums)
is reported back so the fleet can check that every engine got the same bytes.
"""

from __future__ import annotations

import contextlib
import hmac
import secrets
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

from megatron_apo.rollout.sync_group import WeightSyncAuthError, WeightSyncError, WeightSyncTimeout
from megatron_apo.rollout.weight_sync.buckets import (
    ALIGN,
    Bucket,
    Entry,
    bucket_checksum,
    combine_checksums,
    unpack_bucket,
)
from megatron_apo.rollout.weight_sync.buffers import BufferRing, ReceivePool, WeightStore

__all__ = ["EngineSyncState", "PlanSender", "SyncResult", "WeightLoadError", "WeightSyncAuthError",
           "WeightSyncError", "WeightSyncTimeout", "receive_weights", "send_buckets", "send_plan"]

_CHECKSUM_CHARS = 32  # bucket_checksum's hex digest
TAG_BYTES = _CHECKSUM_CHARS + 32  # + HMAC-SHA256


class WeightLoadError(WeightSyncError):
    """An engine received a sync but could not load it (e.g. a tensor of the wrong shape): the fleet treats
    that engine as dead (replaces it; the replacement gets the weights by the next sync)."""


def _bucket_mac(group, sync_id: str, version: int, index: int, checksum: str) -> bytes:
    """A bucket's tag: the fields sender and receiver sign, in one place so that both sign the same thing."""
    return group.tag("bucket", sync_id, version, index, checksum)


class PlanSender:
    """The sender's side of one sync whose plan went out (`send_plan`): `send` each bucket in plan order."""

    def __init__(self, group, version: int, sync_id: str, layouts: list[tuple[list[Entry], int]]):
        self.group, self.version, self.sync_id, self.layouts = group, version, sync_id, layouts
        self.checksums: list[str] = []

    def send(self, index: int, bucket: Bucket, async_op: bool = False):
        """Bucket `index`'s tag, then its payload; with `async_op` a handle is returned: keep `bucket.flat`
        until its `wait()`. `bucket.checksum` is what the receivers verify the bytes against."""
        if index != len(self.checksums) or bucket.nbytes != self.layouts[index][1]:
            raise WeightSyncError(f"weight sync: bucket {index} ({bucket.nbytes} bytes) does not follow the plan")
        checksum = bucket.checksum
        wire = checksum.encode() + _bucket_mac(self.group, self.sync_id, self.version, index, checksum)
        tag = torch.frombuffer(bytearray(wire), dtype=torch.uint8).to(self.group.device)
        self.checksums.append(checksum)
        tag_handle = self.group.broadcast(tag, src=0, async_op=async_op)
        handle = self.group.broadcast(bucket.flat, src=0, async_op=async_op)
        return _Both(tag_handle, handle, tag) if async_op else None

    @property
    def checksum(self) -> str:
        """The per-sync checksum (over the bucket checksums sent so far: all of them once the sync is sent)."""
        return combine_checksums(self.checksums)


class _Both:
    """Waits on a bucket's tag and payload broadcasts; keeps the tag tensor alive until then."""

    def __init__(self, first, second, keep):
        self._handles, self._keep = [first, second], keep

    def wait(self) -> None:
        for h in self._handles:
            h.wait()
        self._handles, self._keep = [], None


def send_plan(group, version: int, layouts: list[tuple[list[Entry], int]]) -> PlanSender:
    """Broadcasts the sync's plan (every bucket's entries and size, in send order) as one authenticated header."""
    sync_id = secrets.token_hex(16)  # binds every bucket tag of this sync to it (a tag cannot be replayed)
    group.broadcast_json({"type": "plan", "version": version, "sync_id": sync_id,
                          "buckets": [{"entries": entries, "nbytes": nbytes} for entries, nbytes in layouts]}, src=0)
    return PlanSender(group, version, sync_id, layouts)


def send_buckets(group, version: int, buckets: list[Bucket]) -> str:
    """A whole sync of already packed buckets (tests, tools); returns the per-sync checksum."""
    tx = send_plan(group, version, [(b.entries, b.nbytes) for b in buckets])
    for i, bucket in enumerate(buckets):
        tx.send(i, bucket)
    return tx.checksum


@dataclass
class SyncResult:
    version: int
    ok: bool
    checksum: str  # the sender's per-sync checksum (over the authenticated bucket checksums)
    num_buckets: int
    num_tensors: int
    loaded: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    load_failed: bool = False  # a bucket verified but the engine could not load it
    # where the receiver's time went: blocked on the wire, checksumming, in `load_fn` (engines may add their own),
    # and the whole receive
    wait_s: float = 0.0
    check_s: float = 0.0
    load_s: float = 0.0
    receive_s: float = 0.0
    # per bucket, seconds since the plan arrived: when its receive was posted, when its load returned (the
    # overlap: bucket i+1 is posted before load(i) returns)
    posted_at: list[float] = field(default_factory=list)
    loaded_at: list[float] = field(default_factory=list)

    def as_dict(self) -> dict:
        d = asdict(self)
        d.pop("loaded")
        return d


def _check_plan(plan) -> list[dict]:
    """The plan's buckets, after the checks that keep a malformed (but authentic) plan from crashing a receiver."""
    if not isinstance(plan, dict) or plan.get("type") != "plan":
        raise WeightSyncError(f"weight sync: expected the sync plan, got {str(plan)[:80]!r}")
    buckets = plan.get("buckets")
    if (not isinstance(buckets, list) or not isinstance(plan.get("sync_id"), str)
            or not isinstance(plan.get("version"), int)
            or any(not isinstance(b, dict) or not isinstance(b.get("nbytes"), int) or b["nbytes"] <= 0
                   or b["nbytes"] % ALIGN or not isinstance(b.get("entries"), list) for b in buckets)):
        raise WeightSyncError("weight sync: a malformed sync plan (buckets need entries and an ALIGN-ed nbytes)")
    return buckets


def receive_weights(group, load_fn: Callable[[list[tuple[str, torch.Tensor]]], object],
                    expected_version: int | None = None,
                    ring: BufferRing | ReceivePool | WeightStore | None = None) -> SyncResult:
    """Receives one whole sync; loads each bucket whose checksum verifies, drains the rest on errors.

    Pipelined: the receive of bucket i+1 is posted before bucket i is checked and loaded. `ring` gives the
    receive buffers: a `ReceivePool` (reused once nothing references them: `load_fn` may keep the tensors
    it gets, as vLLM's layerwise reload does until a layer is complete), a `WeightStore` (`load_fn` may keep
    them: they are buffers this sync owns until the sync after next), or a `BufferRing` (two, reused at once:
    `load_fn` must copy).

    A `load_fn` that raises is reported (in `errors`), and the rest of the sync is still received, checked
    and drained, without loading: the sender never waits on a receiver that gave up. A bucket whose tag fails
    authentication is not loaded either; the sync is drained and then refused with `WeightSyncAuthError`.
    """
    if group is None:
        raise WeightSyncError("receive_weights: this engine has not joined a sync group (join_sync_group first)")
    t_start = time.perf_counter()
    plan = group.broadcast_json(None, src=0)
    buckets = _check_plan(plan)
    version, sync_id = plan["version"], plan["sync_id"]
    ring = ring or ReceivePool()
    ring.begin_sync()
    device = torch.device(group.device)
    stream = torch.cuda.Stream(device=device) if device.type == "cuda" else None
    result = SyncResult(version, False, "", len(buckets), sum(len(b["entries"]) for b in buckets))
    checksums, auth_failed = [], False
    t0 = time.perf_counter()
    if expected_version is not None and version != expected_version:
        result.errors.append(f"sync version {version} != expected {expected_version}")

    def post(index: int):
        """Posts bucket `index`'s tag and payload receives (on CUDA: on the side stream, after the work already
        queued on the current one, e.g. loads still reading the buffer this receive reuses)."""
        _, buf = ring.take(buckets[index]["nbytes"], device)
        tag = torch.empty(TAG_BYTES, dtype=torch.uint8, device=device)
        ctx = contextlib.nullcontext()
        if stream is not None:
            stream.wait_stream(torch.cuda.current_stream(device))
            ctx = torch.cuda.stream(stream)
        with ctx:
            handles = (group.broadcast(tag, src=0, async_op=True), group.broadcast(buf, src=0, async_op=True))
        result.posted_at.append(time.perf_counter() - t0)
        return tag, buf, handles

    def process(index: int, tag, buf, handles) -> None:
        nonlocal auth_failed
        t1 = time.perf_counter()
        for h in handles:
            h.wait()
        t2 = time.perf_counter()
        result.wait_s += t2 - t1
        wire = tag.cpu().numpy().tobytes()
        claimed = wire[:_CHECKSUM_CHARS].decode("ascii", errors="replace")
        if not hmac.compare_digest(wire[_CHECKSUM_CHARS:], _bucket_mac(group, sync_id, version, index, claimed)):
            auth_failed = True
            result.errors.append(f"bucket {index}: its checksum tag failed authentication")
            return
        checksums.append(claimed)
        if result.errors:
            return  # a rejected sync loads nothing more: drained only
        got = bucket_checksum(buf)
        result.check_s += time.perf_counter() - t2
        if got != claimed:
            result.errors.append(f"bucket {index}: checksum mismatch (received {got}, sender {claimed})")
            return
        t3, tensors = time.perf_counter(), []
        try:
            tensors = unpack_bucket(buf, buckets[index]["entries"])
            load_fn(tensors)
        except Exception as e:  # noqa: BLE001 - reported; the sync is drained so the sender is not left waiting
            result.load_failed = True
            text = str(e).strip().splitlines()
            result.errors.append(f"bucket {index}: loading failed: {type(e).__name__}: {text[0] if text else ''}")
            return
        finally:
            result.load_s += time.perf_counter() - t3
        result.loaded.extend(n for n, _ in tensors)

    pending = post(0) if buckets else None
    for index in range(len(buckets)):
        current, pending = pending, post(index + 1) if index + 1 < len(buckets) else None
        process(index, *current)
        current = None  # drop this sync's references to the buffer: a ReceivePool may reuse it
        result.loaded_at.append(time.perf_counter() - t0)
    if auth_failed:
        raise WeightSyncAuthError("weight sync: a bucket's checksum tag failed authentication (forged, replayed or "
                                  "sent without the run's secret); the sync is refused")
    result.checksum = combine_checksums(checksums)
    result.ok = not result.errors
    result.receive_s = time.perf_counter() - t_start
    return result


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
            raise WeightSyncError("engine refuses to serve: the last weight sync failed verification "
                                  f"({self.failure}); "
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
            failed = WeightLoadError if result.load_failed else WeightSyncError
            raise failed(f"weight sync v{result.version} rejected: {self.failure}")
        self.check_complete(set(result.loaded), expected)
        self.mark_loaded(result.version, result.checksum)
