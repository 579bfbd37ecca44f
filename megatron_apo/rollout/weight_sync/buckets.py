"""What travels on the wire: the dtype weights are sent in, the bucket layout, packing and the checksum.

A bucket is one flat uint8 buffer holding several HF-named tensors, each at an ALIGN-ed offset, with a
checksum over all of its bytes. `entries` (hf_name, dtype name, shape, offset, nbytes) is the part of
the bucket header that lets a receiver view the tensors in place (`unpack_bucket`, no copy).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from megatron_apo.dtypes import DTYPE_NAMES

# The dtype each engine serves in: weights are sent in it unless rollout.sync_dtype says otherwise (bf16 for
# vLLM halves the bytes of fp32 master weights; the CPU engine computes in fp32).
ENGINE_DTYPES = {"cpu": "float32", "vllm": "bfloat16"}
ALIGN = 4096  # bytes: tensor offsets and bucket sizes, so every dtype view and the checksum's 4 KiB rows line up
DEFAULT_BUCKET_BYTES = 256 << 20

Entry = tuple[str, str, tuple[int, ...], int, int]  # (hf_name, dtype name, shape, offset, nbytes)


def sync_dtype(rollout) -> torch.dtype:
    """The dtype weights travel in: `rollout.sync_dtype`, else the engine's (ENGINE_DTYPES)."""
    name = rollout.sync_dtype or ENGINE_DTYPES.get(rollout.engine, "float32")
    if name not in DTYPE_NAMES:
        raise ValueError(f"rollout.sync_dtype={name!r} is unknown; use one of {sorted(DTYPE_NAMES)}")
    return getattr(torch, DTYPE_NAMES[name])


def sync_bucket_bytes(rollout) -> int:
    """The bucket size: `rollout.sync_bucket_mb`, else 512 MiB where the trainer has CUDA (NCCL: fewer, larger
    broadcasts keep the link busy) and 64 MiB on CPU (gloo: smaller buffers pipeline as well and cost less memory)."""
    mb = rollout.sync_bucket_mb
    if mb is None:
        mb = 512 if torch.cuda.is_available() else 64
    return int(mb) << 20


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
    """The per-sync checksum, over the bucket checksums in send order."""
    return hashlib.sha256("|".join(checksums).encode()).hexdigest()[:32]


@dataclass
class Bucket:
    entries: list[Entry]
    flat: torch.Tensor  # uint8 [nbytes]
    checksum: str

    @property
    def nbytes(self) -> int:
        return self.flat.numel()


def aligned(n: int) -> int:
    """`n` rounded up to a multiple of ALIGN."""
    return (n + ALIGN - 1) // ALIGN * ALIGN


def bucket_layout(named_tensors) -> tuple[list[Entry], int]:
    """(entries, total bytes): each tensor at an ALIGN-ed offset of one flat buffer."""
    entries, offset = [], 0
    for name, t in named_tensors:
        nbytes = t.numel() * t.element_size()
        entries.append((name, str(t.dtype).removeprefix("torch."), tuple(t.shape), offset, nbytes))
        offset = aligned(offset + nbytes)
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


def unpack_bucket(flat: torch.Tensor, entries) -> list[tuple[str, torch.Tensor]]:
    """Views into `flat` (no copy) by HF name."""
    out = []
    for name, dtype, shape, off, nbytes in entries:
        out.append((name, flat[off:off + nbytes].view(getattr(torch, dtype)).view(shape)))
    return out
