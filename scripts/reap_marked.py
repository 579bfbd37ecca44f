"""Stops every process whose environment carries NAME=VALUE (what scripts/test.sh's tests left running).

Usage: python scripts/reap_marked.py NAME VALUE. Linux only (reads /proc); stdlib only. Prints one line per
process it stops, so a test that leaks a process shows up in the CI log by name.
"""

from __future__ import annotations

import os
import signal
import sys
import time


def _marked(name: str, value: str) -> dict[int, str]:
    mark = f"{name}={value}".encode()
    spared = {os.getpid(), os.getppid()}
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) in spared:
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if mark not in f.read().split(b"\0"):
                    continue
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                found[int(entry)] = f.read().replace(b"\0", b" ").decode(errors="replace")[:160]
        except OSError:  # gone, or not ours to read
            continue
    return found


def main(name: str, value: str) -> int:
    procs = _marked(name, value)
    for pid, cmd in sorted(procs.items()):
        print(f"reap_marked: stopping pid {pid} left by the tests: {cmd}", file=sys.stderr)
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 10
    while procs and time.monotonic() < deadline:
        time.sleep(0.5)
        procs = {p: c for p, c in procs.items() if os.path.exists(f"/proc/{p}")}
    for pid in procs:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
