"""A per-sample soft time limit for reward functions, using `signal.setitimer`.

math-verify's own `timeout_seconds` uses `signal.alarm`, which only works in the main thread and cancels any
outer alarm when it returns (`alarm(0)`), so it cannot be nested inside a per-sample limit. We therefore
switch math-verify's timeouts off and put our own timer around the whole sample (extraction + parsing +
comparison). The timer raises `SampleTimeout`, a BaseException, so it passes through math-verify's and
sympy's `except Exception` handlers. `time_limit` blocks nest: an inner block never cancels an outer one.

Signals cannot interrupt a long C call (a regex, a big-int multiplication); `RewardPool` adds a hard limit
by killing the worker process. Outside the main thread no timer is possible: the limit is then skipped, and
callers that need it there must use `RewardPool`.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time


class SampleTimeout(BaseException):
    """A reward computation ran past its time limit."""


@contextlib.contextmanager
def time_limit(seconds: float | None):
    """Raise `SampleTimeout` inside the block after `seconds` (main thread only; no-op elsewhere / for None)."""
    if not seconds or seconds <= 0 or threading.current_thread() is not threading.main_thread():
        yield
        return
    outer_remaining, _ = signal.getitimer(signal.ITIMER_REAL)
    if 0 < outer_remaining <= seconds:  # an enclosing limit fires first anyway
        yield
        return

    def _on_alarm(signum, frame):
        raise SampleTimeout(f"reward computation exceeded {seconds:g}s")

    started = time.monotonic()
    previous = signal.signal(signal.SIGALRM, _on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if outer_remaining > 0:  # re-arm the enclosing limit with what is left of it
            left = outer_remaining - (time.monotonic() - started)
            signal.setitimer(signal.ITIMER_REAL, max(left, 1e-3))
