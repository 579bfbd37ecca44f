"""The send-receive protocol over one sync group (sync rank 0 sends, every engine process receives).

    for each bucket:  header {"type": "bucket", version, index, entries, nbytes, checksum}  (JSON + HMAC)
                      payload: one flat uint8 buffer of `nbytes`                              (tensor broadcast)
    finally:          header {"type": "end", version, num_buckets, num_tensors, checksum}

Headers are JSON authenticated with the group's key (`sync_group.broadcast_json`): a forged header, and so
a forged bucket checksum, is refused with `WeightSyncAuthError`. `receive_weights` verifies each bucket's
checksum before loading it; a bad bucket is not loaded, and a bucket whose load raises stops loading; either
way the rest of the sync is still drained (the sender must not hang) and reported, and the engine refuses to
serve until a later sync verifies (`EngineSyncState`). The per-sync checksum (over the bucket checksums) is
reported back so the fleet can check that every engine got the same bytes.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

from megatron_apo.rollout.sync_group import WeightSyncAuthError, WeightSyncError, WeightSyncTimeout
from megatron_apo.rollout.weight_sync.buckets import Bucket, bucket_checksum, combine_checksums, unpack_bucket
from megatron_apo.rollout.weight_sync.buffers import BufferRing, WeightStore

__all__ = ["EngineSyncState", "SyncResult", "WeightLoadError", "WeightSyncAuthError", "WeightSyncError",
           "WeightSyncTimeout", "receive_weights", "send_bucket", "send_end"]


class WeightLoadError(WeightSyncError):
    """An engine received a sync but could not load it (e.g. a tensor of the wrong shape): the fleet treats
    that engine as dead (replaces it; the replacement gets the weights by the next sync)."""


def send_bucket(group, bucket: Bucket, version: int, index: int, async_op: bool = False):
    """Header, then payload; with `async_op` the payload's handle is returned (keep `bucket.flat` until it is done)."""
    group.broadcast_json({"type": "bucket", "version": version, "index": index, "entries": bucket.entries,
                          "nbytes": bucket.nbytes, "checksum": bucket.checksum}, src=0)
    return group.broadcast(bucket.flat, src=0, async_op=async_op)


def send_end(group, version: int, checksums: list[str], num_tensors: int) -> str:
    """The closing header; returns the per-sync checksum it carries."""
    total = combine_checksums(checksums)
    group.broadcast_json({"type": "end", "version": version, "num_buckets": len(checksums),
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
    load_failed: bool = False  # a bucket verified but the engine could not load it
    # where the receiver's time went: blocked on the wire, checksumming, in `load_fn` (engines may add their own)
    wait_s: float = 0.0
    check_s: float = 0.0
    load_s: float = 0.0

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

    A `load_fn` that raises is reported (in `errors`), and the rest of the sync is still received, checked
    and drained, without loading: the sender never waits on a receiver that gave up.
    """
    if group is None:
        raise WeightSyncError("receive_weights: this engine has not joined a sync group (join_sync_group first)")
    ring = ring or BufferRing()
    ring.begin_sync()
    checksums, loaded, errors = [], [], []
    counts = {"tensors": 0, "load_failed": False}
    times = {"wait_s": 0.0, "check_s": 0.0, "load_s": 0.0}

    def process(header, buf, handle):
        t0 = time.perf_counter()
        handle.wait()
        t1 = time.perf_counter()
        got = bucket_checksum(buf)
        times["wait_s"] += t1 - t0
        times["check_s"] += time.perf_counter() - t1
        checksums.append(got)
        counts["tensors"] += len(header["entries"])
        if expected_version is not None and header["version"] != expected_version:
            errors.append(f"bucket {header['index']}: version {header['version']} != expected {expected_version}")
        elif got != header["checksum"]:
            errors.append(f"bucket {header['index']}: checksum mismatch (received {got}, sender {header['checksum']})")
        elif not counts["load_failed"]:
            tensors = unpack_bucket(buf, header["entries"])
            t0 = time.perf_counter()
            try:
                load_fn(tensors)
                times["load_s"] += time.perf_counter() - t0
            except Exception as e:  # noqa: BLE001 - reported; the sync is drained so the sender is not left waiting
                counts["load_failed"] = True
                errors.append(f"bucket {header['index']}: loading failed: {type(e).__name__}: "
                              f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}")
                return
            loaded.extend(n for n, _ in tensors)

    prev = None
    while True:
        header = group.broadcast_json(None, src=0)
        if not isinstance(header, dict) or header.get("type") not in ("bucket", "end"):
            raise WeightSyncError(f"weight sync: unexpected header {str(header)[:80]!r}")
        if header["type"] == "end":
            break
        if header["index"] != len(checksums) + (prev is not None):
            raise WeightSyncError(f"weight sync: bucket {header['index']} arrived out of order")
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
    return SyncResult(header["version"], not errors, header["checksum"], len(checksums), num_tensors, loaded, errors,
                      counts["load_failed"], **times)


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
