"""Score a batch of responses in worker processes, with a per-sample time limit that always holds.

Each sample gets a soft limit inside its worker (a timer signal, see deadline.py) and a hard limit in the
parent: a worker still busy `timeout_s + hard_grace_s` after it got a sample (stuck in C code the signal
cannot interrupt) is killed and replaced. Either way the sample scores 0.0 and is counted in
`RewardBatch.num_timeouts`. Workers start from a forkserver (no inherited threads/CUDA state, cheap
restarts) and load the custom reward function, if any, themselves.

A sample whose reward function raises, returns something that is not a finite number, or kills its worker
(`os._exit`, a crash in C code) is an error: it scores 0.0, its message is in `RewardBatch.errors`, and with
`max_error_frac` a batch where more than that share errors (or whose worker keeps dying) raises
`TooManyRewardErrors`, a one-line user error.
"""

from __future__ import annotations

import multiprocessing as mp
import signal
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Sequence

from megatron_apo.config import UserError
from megatron_apo.rewards.deadline import SampleTimeout, time_limit


class RewardFailed(UserError, ValueError):
    """on_error='raise': a sample's reward function failed (one line naming the sample and the error)."""


class TooManyRewardErrors(UserError, RuntimeError):
    """More than `max_error_frac` of a batch failed to score, or the reward worker keeps dying."""

    def __init__(self, message: str, num_errors: int = 0, num_items: int = 0, first_error: str | None = None):
        # defaults: an exception is pickled as its message alone (a rank's error travels to the launcher)
        super().__init__(message)
        self.num_errors, self.num_items, self.first_error = num_errors, num_items, first_error


class RewardWorkerError(UserError, RuntimeError):
    """A reward worker process could not start (its reward function's import failed or killed it)."""


@dataclass(frozen=True)
class RewardItem:
    data_source: str
    solution_str: str
    ground_truth: str
    extra_info: dict | None = None


@dataclass
class RewardBatch:
    """Per sample: score (0.0 when it timed out or errored), whether it timed out, its error message (None when
    it scored), whether that error was a NaN/inf score, and the final answer the reward read (None on failure)."""

    scores: list[float]
    timed_out: list[bool]
    errors: list[str | None]
    seconds: float = 0.0
    answers: list[str | None] = field(default_factory=list)
    nonfinite: list[bool] = field(default_factory=list)

    @property
    def num_timeouts(self) -> int:
        return sum(self.timed_out)

    @property
    def num_errors(self) -> int:
        return sum(e is not None for e in self.errors)

    @property
    def num_nonfinite(self) -> int:
        return sum(self.nonfinite)

    def metrics(self) -> dict[str, float]:
        n = max(len(self.scores), 1)
        return {"reward/mean": sum(self.scores) / n, "reward/timeouts": float(self.num_timeouts),
                "reward/errors": float(self.num_errors), "reward/nonfinite": float(self.num_nonfinite),
                "reward/seconds": self.seconds}


def score_item(item: RewardItem, reward_fn=None,
               timeout_s: float | None = None) -> tuple[float, str, str | None, str | None]:
    """(score, status, error, answer) of one item in this process; status is 'ok' | 'timeout' | 'error' |
    'nonfinite' (a NaN/inf score: an error too). `answer` is the final answer the reward read: the 'answer' of
    a dict return, else the registered extractor of the data_source (custom functions: `default_answer`)."""
    from megatron_apo.rewards.registry import BadRewardValue, answer_of, as_result, default_answer, get_reward_fn

    try:
        with time_limit(timeout_s):
            if reward_fn is not None:
                raw = reward_fn(data_source=item.data_source, solution_str=item.solution_str,
                                ground_truth=item.ground_truth, extra_info=item.extra_info)
            else:
                raw = get_reward_fn(item.data_source)(item.solution_str, item.ground_truth, item.extra_info)
            score, answer = as_result(raw)
            if answer is None:
                answer = (default_answer(item.solution_str) if reward_fn is not None
                          else answer_of(item.data_source, item.solution_str))
            return score, "ok", None, answer
    except SampleTimeout:
        return 0.0, "timeout", None, None
    except BadRewardValue as e:
        return 0.0, "nonfinite" if e.nonfinite else "error", str(e), None
    except Exception as e:  # reported with the sample's index by the caller
        return 0.0, "error", f"{type(e).__name__}: {e}", None


def _worker_main(conn: Connection, reward_fn_spec: str | None, timeout_s: float | None) -> None:
    # Slurm's SIGTERM/SIGUSR1 and a terminal's SIGINT reach the whole process group: the trainer handles them
    # (finishes the step, checkpoints) and closes the pool, so a worker must not die of them mid-batch. It still
    # ends when the parent does (EOF on its pipe) and on the pool's SIGKILL.
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)
    reward_fn = None
    try:
        if reward_fn_spec:
            from megatron_apo.rewards.loader import load_reward_fn

            reward_fn = load_reward_fn(reward_fn_spec)
        import math_verify  # noqa: F401  (imported before 'ready' so it does not eat into a sample's limit)
    except Exception as e:
        conn.send(("failed", f"{type(e).__name__}: {e}"))
        return
    conn.send(("ready", None))
    while True:
        try:
            msg = conn.recv()
        except EOFError:
            return
        if msg is None:
            return
        idx, item = msg
        conn.send((idx, *score_item(item, reward_fn, timeout_s)))


# consecutive worker deaths (no sample scored in between) after which a batch gives up: the reward function
# itself kills its process (os._exit, a crash in C code), and restarting workers forever would hide that
_MAX_DEATHS_IN_A_ROW = 3


@dataclass
class _Worker:
    process: mp.process.BaseProcess
    conn: Connection
    task: int | None = None
    started: float = 0.0


@dataclass
class RewardPool:
    """`with RewardPool(num_workers=4, timeout_s=5) as pool: batch = pool.score(items)`.

    num_workers=0 scores in the calling process (soft limit, main thread); called from another thread, where
    no timer can interrupt the scoring, it uses one worker process instead, so the limit always holds. `reward_fn` is a
    'file.py:fn' spec with verl's signature used for every item instead of the data_source registry.
    on_error='raise' raises on the first failing sample (naming its index); 'zero' scores it 0.0 and counts it,
    and raises `TooManyRewardErrors` once more than `max_error_frac` of the batch has failed.
    """

    num_workers: int = 2
    timeout_s: float = 5.0
    reward_fn: str | None = None
    on_error: str = "raise"
    max_error_frac: float = 1.0
    hard_grace_s: float = 2.0
    startup_timeout_s: float = 300.0
    start_method: str = "forkserver"
    _workers: list[_Worker] = field(default_factory=list, init=False, repr=False)
    _ctx: object = field(default=None, init=False, repr=False)
    _local_fn: object = field(default=None, init=False, repr=False)

    def __post_init__(self):
        if self.on_error not in ("raise", "zero"):
            raise ValueError(f"RewardPool.on_error must be 'raise' or 'zero', got {self.on_error!r}")
        if self.num_workers < 0:
            raise ValueError(f"RewardPool.num_workers must be >= 0, got {self.num_workers}")
        if not 0.0 <= self.max_error_frac <= 1.0:
            raise ValueError(f"RewardPool.max_error_frac must be in [0, 1], got {self.max_error_frac}")
        if self.reward_fn:  # fail fast in the parent with a clear message, not in every worker
            from megatron_apo.rewards.loader import load_reward_fn

            self._local_fn = load_reward_fn(self.reward_fn)

    # -- lifecycle ---------------------------------------------------------------------------------------
    def __enter__(self) -> "RewardPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _spawn(self) -> _Worker:
        if self._ctx is None:
            self._ctx = mp.get_context(self.start_method)
            if self.start_method == "forkserver":
                self._ctx.set_forkserver_preload(["megatron_apo.rewards.pool", "math_verify"])
        parent, child = self._ctx.Pipe()
        proc = self._ctx.Process(target=_worker_main, args=(child, self.reward_fn, self.timeout_s), daemon=True)
        proc.start()
        child.close()
        # Wait until the worker can score: a sample's time limit must not include the worker's start-up.
        status, detail = "failed", f"no answer within {self.startup_timeout_s:g}s"
        try:
            if parent.poll(self.startup_timeout_s):
                status, detail = parent.recv()
        except (EOFError, OSError):
            proc.join(timeout=5)
            detail = f"the process exited during start-up (exit code {proc.exitcode})"
        if status != "ready":
            proc.kill()
            proc.join(timeout=5)
            parent.close()
            raise RewardWorkerError(f"reward worker failed to start"
                                    f"{f' with reward function {self.reward_fn}' if self.reward_fn else ''}: {detail}")
        return _Worker(proc, parent)

    def _kill(self, w: _Worker) -> None:
        w.process.kill()
        w.process.join(timeout=5)
        w.conn.close()

    def close(self) -> None:
        for w in self._workers:
            try:
                w.conn.send(None)
            except (BrokenPipeError, OSError):
                pass
        for w in self._workers:
            w.process.join(timeout=2)
            if w.process.is_alive():
                w.process.kill()
                w.process.join(timeout=5)
            w.conn.close()
        self._workers = []

    # -- scoring -----------------------------------------------------------------------------------------
    def score(self, items: Sequence[RewardItem]) -> RewardBatch:
        t0 = time.monotonic()
        n = len(items)
        scores, timed_out, errors, answers, nonfinite = [0.0] * n, [False] * n, [None] * n, [None] * n, [False] * n
        failed: list[int] = []

        def record(idx: int, score: float, status: str, err: str | None, answer: str | None = None) -> None:
            scores[idx], answers[idx] = score, answer
            timed_out[idx] = status == "timeout"
            if status in ("error", "nonfinite"):
                if self.on_error == "raise":
                    raise RewardFailed(f"reward of sample {idx} (data_source={items[idx].data_source!r}"
                                       f"{f', reward_fn={self.reward_fn}' if self.reward_fn else ''}) failed: {err}")
                errors[idx], nonfinite[idx] = err, status == "nonfinite"
                failed.append(idx)
                if len(failed) > self.max_error_frac * n:  # it can only grow: stop now, not after the whole batch
                    raise TooManyRewardErrors(
                        f"{len(failed)} of {n} samples failed to score (more than {self.max_error_frac:g} of the "
                        f"batch); first: {errors[failed[0]]}", len(failed), n, errors[failed[0]])

        def batch() -> RewardBatch:
            return RewardBatch(scores, timed_out, errors, time.monotonic() - t0, answers=answers, nonfinite=nonfinite)

        in_main = threading.current_thread() is threading.main_thread()
        num_workers = self.num_workers or (0 if in_main else 1)  # off the main thread only a process is limited
        if num_workers == 0 or n == 0:
            for i, item in enumerate(items):
                record(i, *score_item(item, self._local_fn, self.timeout_s))
            return batch()

        while len(self._workers) < num_workers:
            self._workers.append(self._spawn())
        pending = deque(range(n))
        busy: dict[Connection, _Worker] = {}
        hard_limit = self.timeout_s + self.hard_grace_s
        deaths_in_a_row = 0

        def died(w: _Worker, idx: int | None) -> None:
            """A worker process is gone: replace it; the sample it held (if any) is an error."""
            nonlocal deaths_in_a_row
            w.process.join(timeout=2)
            code = w.process.exitcode
            self._replace(w)
            deaths_in_a_row += 1
            why = f"exit code {code}: os._exit, a signal or a crash in C code"
            err = f"the reward worker process died while scoring ({why})"
            if deaths_in_a_row >= _MAX_DEATHS_IN_A_ROW:
                raise TooManyRewardErrors(f"the reward worker process died {deaths_in_a_row} times in a row "
                                          f"(last {why})", len(failed) + 1, n, err)
            if idx is not None:
                record(idx, 0.0, "error", err)

        try:
            while pending or busy:
                for w in self._workers[:num_workers]:
                    if w.task is None and pending:
                        w.task, w.started = pending.popleft(), time.monotonic()
                        try:
                            w.conn.send((w.task, items[w.task]))
                        except (BrokenPipeError, OSError):  # the worker died while idle: not this sample's fault
                            pending.appendleft(w.task)
                            w.task = None
                            died(w, None)
                            continue
                        busy[w.conn] = w
                if not busy:
                    continue
                now = time.monotonic()
                next_deadline = min(w.started + hard_limit for w in busy.values())
                for conn in wait(list(busy), timeout=max(0.0, next_deadline - now)):
                    w = busy.pop(conn)
                    try:
                        idx, score, status, err, answer = conn.recv()
                    except (EOFError, OSError):  # the worker died: os._exit, killed by the OS for memory, ...
                        idx, w.task = w.task, None
                        died(w, idx)
                        continue
                    w.task, deaths_in_a_row = None, 0
                    record(idx, score, status, err, answer)
                now = time.monotonic()
                for conn, w in list(busy.items()):
                    if now - w.started > hard_limit:  # stuck where the soft timer cannot reach: kill it
                        del busy[conn]
                        idx = w.task
                        self._replace(w)
                        record(idx, 0.0, "timeout", None)
        except BaseException:
            self.close()  # workers may hold half-finished tasks; start clean next time
            raise
        return batch()

    def _replace(self, w: _Worker) -> None:
        self._kill(w)
        fresh = self._spawn()
        self._workers[self._workers.index(w)] = fresh
