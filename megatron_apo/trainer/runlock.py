"""One live trainer per output folder: an advisory lock on `<out_dir>/.megatron-apo.lock`.

A second trainer in the same `out_dir` (a restart while orphaned ranks of the first still run, a job submitted
twice) would log every step twice and write checkpoints from two runs. The lock is `flock(2)`: the kernel drops it
when its holder dies, however it dies, so a lock left by a dead process is simply taken over. The file also
records the holder's pid and host for the error message. On a shared filesystem it holds across nodes where the
filesystem supports flock (Lustre with `-o flock`, NFSv4, GPFS).
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

from megatron_apo.config import UserError

LOCK_NAME = ".megatron-apo.lock"


class OutDirLocked(UserError, ValueError):
    """Another live trainer holds the output folder (one-line message naming it)."""


class OutDirLock:
    def __init__(self, out_dir: str | Path):
        self.path = Path(out_dir) / LOCK_NAME
        self._fd: int | None = None
        self.extra: OutDirLock | None = None  # a second lock released with this one (a separate checkpoint dir)

    def acquire(self) -> "OutDirLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise OutDirLocked(f"{self.path.parent} is in use by another trainer ({_holder(self.path)}); "
                               "stop it first, or give this run another out_dir") from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}).encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self.extra is not None:
            self.extra.release()
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    def __enter__(self) -> "OutDirLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def check_out_dir_free(out_dir: str | Path) -> None:
    """Raises OutDirLocked when a live trainer holds `out_dir` (the launcher's check before it spawns ranks).

    Creates nothing: a run that then fails validation leaves no lock file (nor an empty out_dir) behind.
    """
    path = Path(out_dir) / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return  # no trainer ever held it
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise OutDirLocked(f"{path.parent} is in use by another trainer ({_holder(path)}); "
                           "stop it first, or give this run another out_dir") from None
    finally:
        os.close(fd)


def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text() or "{}")
        return f"pid {info['pid']} on {info['host']}"
    except (OSError, ValueError, KeyError):
        return "holder unknown"


def claim_run_dirs(out_dir: str | Path, ckpt_dir: str | Path) -> OutDirLock:
    """Rank 0 at start: lock `out_dir` (and `ckpt_dir` when it lies elsewhere), then remove unfinished saves."""
    from megatron_apo.trainer.checkpoint import clean_stale_tmp

    lock = OutDirLock(out_dir).acquire()
    extra = None
    try:
        if not Path(ckpt_dir).resolve().is_relative_to(Path(out_dir).resolve()):
            extra = OutDirLock(ckpt_dir).acquire()
        clean_stale_tmp(ckpt_dir)
    except BaseException:
        lock.release()
        raise
    lock.extra = extra
    return lock
