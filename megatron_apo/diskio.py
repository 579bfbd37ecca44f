"""Disk errors said plainly: which path, what happened ("No space left on device"), and what was cleaned up.

torch.distributed.checkpoint wraps a rank's OSError in a `CheckpointException` whose text names neither the
error nor the path (`CheckpointException ranks:dict_keys([])`); `find_os_error` digs the OSError back out of
the exception chain and the per-rank failures, and `disk_full` also recognises a full disk by its free space.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
from pathlib import Path

from megatron_apo.config import UserError

_DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
_ERRNO_TEXT = re.compile(r"\[Errno (\d+)\] ([^\n:]+)")  # a worker's OSError, re-raised as text by DCP


class DiskError(UserError, OSError):
    """A write failed; the message names the path, the cause and what was removed."""

    def __str__(self) -> str:
        return self.strerror or super().__str__()


def find_os_error(e: BaseException | None, _seen: set | None = None) -> OSError | None:
    """The first OSError with an errno in `e`, its causes, contexts and (torch DCP) per-rank failures."""
    seen = _seen if _seen is not None else set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno:
            return e
        m = _ERRNO_TEXT.search(str(e))
        if m:
            return OSError(int(m.group(1)), m.group(2).strip())
        for inner in (getattr(e, "failures", None) or {}).values():  # CheckpointException: {rank: exception}
            found = find_os_error(inner if isinstance(inner, BaseException) else None, seen)
            if found is not None:
                return found
        for arg in getattr(e, "args", ()):
            if isinstance(arg, BaseException):
                found = find_os_error(arg, seen)
                if found is not None:
                    return found
        e = e.__cause__ or e.__context__
    return None


def free_bytes(path: str | Path) -> int | None:
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


def disk_full(e: BaseException, path: str | Path) -> bool:
    os_err = find_os_error(e)
    if os_err is not None:
        return os_err.errno in _DISK_FULL
    free = free_bytes(path)
    return free is not None and free < (1 << 20)


def describe_os_error(e: BaseException, path: str | Path, doing: str) -> str:
    """One line: "<doing> <path>: No space left on device" (or the OSError's own text)."""
    os_err = find_os_error(e)
    if disk_full(e, path):
        why = os.strerror(errno.ENOSPC) if os_err is None or os_err.errno != errno.EFBIG else os_err.strerror
        free = free_bytes(path)
        if free is not None:
            why += f" ({free >> 20} MiB free)"
    elif os_err is not None:
        why = os_err.strerror or str(os_err)
    else:
        why = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
    return f"{doing} {path}: {why}"
