"""Run a function on N local processes that form one torch.distributed group (gloo on CPU).

Used by the tests for every distributed check, by the benchmarks, the CPU demo and conversion. Each child
gets RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT like torchrun would set; a failing child's traceback is
re-raised in the parent, and a hang ends at `timeout` with the ranks that did not finish named. A rank's
`UserError` (a bad config or input file found only once the ranks run, e.g. a checkpoint that does not fit) is
re-raised as itself, so the CLI prints it as one line.

`host_only=True` hides every GPU from the children (CUDA_VISIBLE_DEVICES=""), so they run the CPU path
(gloo, host tensors, no set_device) whatever the node has: conversion with TP x PP > GPUs needs that.
Otherwise LOCAL_RANK is the rank modulo the visible GPUs, like several ranks sharing a small node.

Ranks start as fresh interpreters ("spawn"): each imports torch and megatron-core again (about 8 s on two CPU
cores). A process that starts many short groups (the test suite) can call `use_forkserver()` once: ranks are
then forked from one server process that imported those modules already (about 0.05 s a group). A forked rank
gets the caller's environment as it is at `run_distributed` time, like a spawned one. The training launcher
(`forward_signals`) always spawns: its ranks must die with it, and a forked rank's parent is the server.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import queue
import signal
import sys
import time
import traceback
from typing import Any, Callable

from megatron_apo.config import UserError
from megatron_apo.launch_env import rank_env
from megatron_apo.logging_utils import get_logger
from megatron_apo.parallel.distributed import find_free_port


class DistributedError(RuntimeError):
    pass


class RanksStopped(DistributedError):
    """A stop signal forwarded to the ranks (`forward_signals`) ended them before they returned, e.g. one that came
    while they were still starting, before their own handler was installed. `signum`: the first signal forwarded."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


_start_method = "spawn"
_FORKSERVER_PRELOAD = ["torch", "megatron.core", "megatron.core.models.gpt", "megatron_apo.parallel",
                       "megatron_apo.models", "megatron_apo.algorithms.losses", "megatron_apo.trainer.rl_step"]


def use_forkserver(preload: list[str] | None = None) -> None:
    """Start later groups' ranks from a forkserver that imported `preload` (default: torch, megatron-core and this
    package's model and loss modules) once. For callers that start many short groups; see the module docstring."""
    global _start_method
    mp.set_forkserver_preload(list(preload if preload is not None else _FORKSERVER_PRELOAD))
    _start_method = "forkserver"


class _RankUserError:
    """A rank's `UserError` (config.UserError) on its way to the parent, with the rank's traceback for DEBUG logs."""

    def __init__(self, error: UserError, tb: str) -> None:
        self.error, self.tb = error, tb

    def __str__(self) -> str:
        return self.tb


def _same(obj):
    return obj


def _by_value(call: bytes):
    fn, args, kwargs = pickle.loads(call)  # noqa: S301 - bytes the calling process pickled for this rank
    return fn(*args, **kwargs)


class _InheritedFd:
    """This process's file descriptor `fd`, duplicated into a forked rank when the rank starts (pickled per rank
    while multiprocessing starts it; `.detach()` in the rank returns its copy)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __reduce__(self):
        from multiprocessing.reduction import DupFd

        return _same, (DupFd(self.fd),)


def _child(rank: int, world_size: int, port: int, fn: Callable, args: tuple, kwargs: dict, q, threads: int,
           host_only: bool = False, parent_death_signal: int = 0, parent_pid: int = 0,
           environ: dict[str, str] | None = None, stdio: tuple | None = None) -> None:
    if environ is not None:  # a forked rank: the caller's environment now, not the server's at its start
        os.environ.clear()
        os.environ.update(environ)
    if stdio is not None:  # ... and the caller's stdout/stderr now (a spawned rank inherits them)
        for target, dup in zip((1, 2), stdio):
            fd = dup.detach()
            os.dup2(fd, target)
            os.close(fd)
    if host_only:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before anything initialises CUDA in this process
    if parent_death_signal:
        _set_parent_death_signal(parent_death_signal, parent_pid)
    os.environ.update(rank_env(rank, world_size, port))
    try:
        import torch

        torch.set_num_threads(threads)
        result = fn(*args, **kwargs)
        # By value: the queue's own pickler would hand tensors over as shared-memory handles that the parent
        # opens through this process, which may have exited by then (EOFError in the parent).
        q.put((rank, True, pickle.dumps(result, protocol=pickle.HIGHEST_PROTOCOL)))
    except UserError as e:  # the user's mistake (a config, a file): the parent re-raises it as it is
        q.put((rank, False, _RankUserError(e, traceback.format_exc())))
    except BaseException:  # noqa: BLE001 - every failure must reach the parent
        q.put((rank, False, traceback.format_exc()))
    finally:
        try:
            from megatron_apo.parallel.distributed import destroy_distributed

            destroy_distributed()
        except Exception:  # noqa: BLE001
            pass


def _set_parent_death_signal(sig: int, parent_pid: int) -> None:
    """Linux: the kernel sends `sig` to this process when its parent dies (even by SIGKILL): no orphaned ranks."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, int(sig), 0, 0, 0)  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent_pid:  # the parent died before prctl took effect (we were re-parented)
        os.kill(os.getpid(), sig)


def run_distributed(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout: float = 300.0,
    threads_per_process: int | None = None,
    host_only: bool = False,
    forward_signals: tuple[int, ...] = (),
    **kwargs: Any,
) -> list[Any]:
    """Calls `fn(*args, **kwargs)` on `world_size` spawned processes; returns the results by rank.

    `fn` must be importable (module level). It calls `init_distributed(...)` itself with the layout it needs.
    The rendezvous port is picked free, but another process can take it before rank 0 binds it: that
    failure (EADDRINUSE) is retried with a new port, twice at most.

    `forward_signals` (the `megatron-apo train` launcher: SIGTERM, SIGUSR1): while the ranks run, those signals
    sent to this process are passed on to every rank, and the ranks get the first of them if this process dies.
    """
    for attempt in range(3):
        try:
            return _run_once(fn, world_size, args, kwargs, timeout, threads_per_process, host_only, forward_signals)
        except DistributedError as e:
            if "EADDRINUSE" not in str(e) or attempt == 2:
                raise
    raise AssertionError("unreachable")


def _run_once(fn, world_size, args, kwargs, timeout, threads_per_process, host_only=False,
              forward_signals=()) -> list[Any]:
    method = "spawn" if forward_signals else _start_method
    ctx = mp.get_context(method)
    q = ctx.Queue()
    port = find_free_port()
    threads = threads_per_process or max(1, (os.cpu_count() or 1) // world_size)
    name = getattr(fn, "__name__", fn)
    environ = stdio = None
    if method != "spawn":  # a forked rank gets the caller's environment and streams now, as a spawned one does
        environ = dict(os.environ)
        sys.stdout.flush()
        sys.stderr.flush()
        stdio = (_InheritedFd(1), _InheritedFd(2))
        # The forkserver passes a rank at most 256 file descriptors, and torch hands tensors to a rank as one
        # shared-memory descriptor each: send the call by value instead (a spawned rank inherits descriptors).
        try:
            fn, args, kwargs = _by_value, (pickle.dumps((fn, args, kwargs), protocol=pickle.HIGHEST_PROTOCOL),), {}
        except (pickle.PicklingError, TypeError, AttributeError):
            pass  # something only multiprocessing can hand over (a queue, an event): as it is
    procs = [
        ctx.Process(target=_child, args=(r, world_size, port, fn, args, kwargs, q, threads, host_only,
                                         forward_signals[0] if forward_signals else 0, os.getpid(), environ, stdio),
                    daemon=False)
        for r in range(world_size)
    ]
    previous = {}
    forwarded: list[int] = []

    def _forward(signum, frame):
        forwarded.append(signum)
        for p in procs:
            if p.pid is not None and p.exitcode is None:
                try:
                    os.kill(p.pid, signum)
                except ProcessLookupError:
                    pass

    for sig in forward_signals:
        previous[sig] = signal.signal(sig, _forward)
    hidden = os.environ.get("CUDA_VISIBLE_DEVICES")
    try:
        if host_only:  # the spawned interpreter inherits it before its first import of torch
            os.environ["CUDA_VISIBLE_DEVICES"] = ""
        for p in procs:
            p.start()
    finally:
        if host_only:
            if hidden is None:
                os.environ.pop("CUDA_VISIBLE_DEVICES", None)
            else:
                os.environ["CUDA_VISIBLE_DEVICES"] = hidden
    results: dict[int, Any] = {}
    failures: dict[int, str] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(results) + len(failures) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                missing = sorted(set(range(world_size)) - set(results) - set(failures))
                raise DistributedError(
                    f"{name}: ranks {missing} did not finish within {timeout:.0f}s"
                    + _format_failures(failures)
                )
            try:
                rank, ok, payload = q.get(timeout=min(remaining, 1.0))
            except queue.Empty:
                dead = [r for r, p in enumerate(procs)
                        if p.exitcode not in (None, 0) and r not in results and r not in failures]
                if dead:
                    time.sleep(0.5)  # a message may still be in flight
                    if q.empty():
                        for r in dead:
                            failures[r] = f"process exited with code {procs[r].exitcode} without a result"
                continue
            if ok:
                results[rank] = pickle.loads(payload)  # noqa: S301 - bytes our own rank process wrote
            else:
                failures[rank] = payload
            if failures:
                break  # the others are probably stuck in a collective with the failed rank
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for p in procs:
            p.join(timeout=5 if not failures else 0.5)
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
    if failures and forwarded:
        raise RanksStopped(f"{name}: stopped by {signal.Signals(forwarded[0]).name}" + _format_failures(failures),
                           forwarded[0])
    if failures:
        first = failures[min(failures)]
        if isinstance(first, _RankUserError):  # one line at the CLI, like the same mistake caught before the ranks
            get_logger(__name__).debug("rank %d raised:\n%s", min(failures), first.tb)
            raise first.error
        raise DistributedError(f"{name} failed" + _format_failures(failures))
    return [results[r] for r in range(world_size)]


def _format_failures(failures: dict[int, str]) -> str:
    return "".join(f"\n--- rank {r} ---\n{tb}" for r, tb in sorted(failures.items()))
