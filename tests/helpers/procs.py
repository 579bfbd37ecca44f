"""Process checks for the tests that kill launchers: is a pid still running, what is its command line."""

from __future__ import annotations

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
