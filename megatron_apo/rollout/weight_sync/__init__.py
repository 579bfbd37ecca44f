"""Trainer -> fleet weight sync: TP/PP shards -> HF-named tensors in checksummed buckets -> broadcast.

One sync group (sync rank 0 = the trainer's global rank 0, ranks 1.. = engine processes); see docs/rollout.md.

| module        | its one job                                                                        |
|---------------|------------------------------------------------------------------------------------|
| `buckets`     | the sent dtype, bucket layout, packing / unpacking, the checksum                   |
| `buffers`     | reusable send/receive buffers (`BufferRing`, `ReceivePool`, `WeightStore`), shm    |
| `protocol`    | one plan (JSON + HMAC) per sync, bucket tags and payloads, `receive_weights`, `EngineSyncState` |
| `plan`        | which trainer rank holds which block of which HF tensor, bucket by bucket          |
| `sender`      | `TrainerWeightSender`: every trainer rank in lockstep, rank 0 broadcasts            |

The group itself (gloo or NCCL over an authenticated TCP store, header MACs) is `megatron_apo.rollout.sync_group`.
"""

from megatron_apo.rollout.sync_group import SyncEndpoint, open_sync_group
from megatron_apo.rollout.weight_sync.buckets import (
    ALIGN,
    DEFAULT_BUCKET_BYTES,
    ENGINE_DTYPES,
    Bucket,
    bucket_checksum,
    bucket_layout,
    combine_checksums,
    pack_bucket,
    sync_bucket_bytes,
    sync_dtype,
    unpack_bucket,
)
from megatron_apo.rollout.weight_sync.buffers import BufferRing, ReceivePool, WeightStore
from megatron_apo.rollout.weight_sync.protocol import (
    EngineSyncState,
    PlanSender,
    SyncResult,
    WeightLoadError,
    WeightSyncAuthError,
    WeightSyncError,
    WeightSyncTimeout,
    receive_weights,
    send_buckets,
    send_plan,
)
from megatron_apo.rollout.weight_sync.sender import SyncStats, TrainerWeightSender

__all__ = [
    "ALIGN", "DEFAULT_BUCKET_BYTES", "ENGINE_DTYPES", "Bucket", "BufferRing", "EngineSyncState", "PlanSender",
    "ReceivePool", "SyncEndpoint", "SyncResult", "SyncStats", "TrainerWeightSender", "WeightLoadError", "WeightStore",
    "WeightSyncAuthError", "WeightSyncError", "WeightSyncTimeout", "bucket_checksum", "bucket_layout",
    "combine_checksums", "open_sync_group", "pack_bucket", "receive_weights", "send_buckets", "send_plan",
    "sync_bucket_bytes", "sync_dtype", "unpack_bucket",
]
