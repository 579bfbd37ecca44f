"""Process checks for the tests that kill launchers: is a pid still running, what is its command line."""

from __future__ import annotations

import time
from pathlib import Path


def cmdline(pid: str | int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:  # gone
        return ""


def alive(pid: str | int) -> bool:
    """Running (a zombie, exited but not yet reaped, counts as gone); False when it exits while we look."""
    try:
        return "zombie" not in Path(f"/proc/{pid}/status").read_text().lower()
    except OSError:
        return False


def survivors(pids, grace_s: float) -> list:
    """The pids still running after up to `grace_s` seconds of waiting for all of them to exit."""
    deadline = time.time() + grace_s
    while time.time() < deadline and any(alive(pid) for pid in pids):
        time.sleep(0.2)
    return [pid for pid in pids if alive(pid)]
