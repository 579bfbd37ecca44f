"""CRC32 checksums of a checkpoint's files: recorded at save in `<iter>/checksums.json`, verified before a load.

A truncated or bit-flipped `.distcp` otherwise loads as a bare `EOFError` deep in torch.distributed.checkpoint,
or silently as wrong weights. Verification is shared out over the ranks when a process group is up.

Verification runs before any reader opens a file: torch's DCP reader unpickles `.metadata` (and the non-tensor
objects in `.distcp` files) and megatron-core `torch.load`s `common.pt`, so a file changed after the save must be
refused before it is read; so is a file the manifest does not list. A checkpoint without a manifest is refused too
(`UnverifiedCheckpoint`) unless the caller allows it. A CRC32 is not a signature: whoever can write the folder can
recompute the manifest, so a checkpoint must still come from someone you trust (docs/reliability.md, "Security").
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

from megatron_apo.config import UserError

CHECKSUM_FILE = "checksums.json"


class CheckpointCorrupt(UserError, ValueError):
    """A file of a checkpoint is missing or does not match the checksum recorded when it was saved."""


class UnverifiedCheckpoint(UserError, ValueError):
    """A checkpoint has no checksum manifest, and the caller did not allow loading it unverified."""


def crc32_file(path: Path) -> str:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            crc = zlib.crc32(chunk, crc)
    return f"{crc:08x}"


def _rank_world() -> tuple[int, int]:
    import torch.distributed as dist

    return (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)


def _gather(obj):
    import torch.distributed as dist

    rank, world = _rank_world()
    if world == 1:
        return [obj]
    every = [None] * world
    dist.all_gather_object(every, obj)
    return every


def checksum_files(folder: Path, only: list[str] | None = None, collective: bool = True) -> dict[str, str]:
    """{path relative to folder: crc32}; the files are shared out over the ranks when `collective`."""
    if only is not None:
        return {n: crc32_file(folder / n) for n in only if (folder / n).is_file()}
    names = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    rank, world = _rank_world() if collective else (0, 1)
    mine = {n: crc32_file(folder / n) for n in names[rank::world]}
    if world > 1:
        for d in _gather(mine):
            mine.update(d)
    return mine


def add_to_manifest(folder: Path) -> None:
    """Records the CRC32s of the files of `folder` that its manifest does not list yet (written after the model)."""
    manifest = folder / CHECKSUM_FILE
    data = json.loads(manifest.read_text())
    new = sorted(str(p.relative_to(folder)) for p in folder.rglob("*")
                 if p.is_file() and p != manifest and str(p.relative_to(folder)) not in data["files"])
    data["files"].update(checksum_files(folder, only=new, collective=False))
    manifest.write_text(json.dumps(data, indent=1) + "\n")


def verify_checkpoint(it: str | Path, prefix: str = "", collective: bool = True, allow_unverified: bool = False,
                      how_to_allow: str = "checkpoint.allow_unverified=true", refuse_unlisted: bool = True) -> bool:
    """Raises CheckpointCorrupt naming a file (under `prefix`, e.g. "model/") whose CRC32 differs from the one
    recorded at save, that is missing, or (`refuse_unlisted`) that the manifest does not list. A checkpoint without
    a manifest raises UnverifiedCheckpoint, or with `allow_unverified` passes unverified (returns False; True when
    it was verified)."""
    it = Path(it)
    manifest = it / CHECKSUM_FILE
    if not manifest.is_file():
        if allow_unverified:
            return False
        raise UnverifiedCheckpoint(
            f"{it} has no {CHECKSUM_FILE}, so its files cannot be verified before they are read (a Megatron "
            f"checkpoint runs code when it is loaded); set {how_to_allow} only for a checkpoint from a source you "
            "trust")
    try:
        recorded = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError, OSError):
        raise CheckpointCorrupt(f"{manifest} is damaged (not the JSON written at save)") from None
    names = sorted(n for n in recorded if n.startswith(prefix))
    rank, world = _rank_world() if collective else (0, 1)
    # a file the save did not write (a planted pickle) is refused like a changed one; JSON and tokenizer files
    # that an older conversion left out of the manifest are data, read by no unpickler
    root = it / prefix if prefix.endswith("/") else it
    on_disk = {str(p.relative_to(it)) for p in root.rglob("*") if p.is_file()} if root.is_dir() else set()
    unlisted = [n for n in sorted(on_disk - set(recorded) - {CHECKSUM_FILE})
                if n.startswith(prefix) and n != "megatron_apo.json" and not n.startswith("tokenizer/")]
    bad = [f"{it / n} is not in {CHECKSUM_FILE} (not written by the save)" for n in unlisted[:1]] \
        if rank == 0 and refuse_unlisted else []
    for name in names[rank::world]:
        f = it / name
        if not f.is_file():
            bad.append(f"{f} is missing")
        elif crc32_file(f) != recorded[name]:
            bad.append(f"{f} is damaged (its CRC32 differs from the one recorded at save)")
    if world > 1:
        bad = [b for lst in _gather(bad) for b in lst]
    if bad:
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise CheckpointCorrupt(f"{sorted(bad)[0]}{more}")
    return True
