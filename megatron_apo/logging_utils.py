"""The package's one logger format: `[megatron-apo rank0 12:00:01] message`, on stderr.

Rank 0 logs at INFO and above; the other ranks only WARNING and above (every rank runs the same code, and N copies
of a progress line say nothing more than one). `--verbose` (or MEGATRON_APO_VERBOSE=1, which spawned ranks inherit)
shows DEBUG lines from every rank. The rank is read when a line is written: the process group may start after the
logger is made. Torch-free: the CLI's config checks log before torch is imported.
"""

from __future__ import annotations

import logging
import os
import sys

from megatron_apo.launch_env import launch_env

ROOT = "megatron_apo"
VERBOSE_ENV = "MEGATRON_APO_VERBOSE"
FORMAT = "[megatron-apo rank%(rank)s %(asctime)s] %(message)s"
DATEFMT = "%H:%M:%S"


def current_rank() -> int:
    """This process's trainer rank: torch.distributed's when it is initialized, else RANK / SLURM_PROCID, else 0."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return launch_env().rank


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


class _RankFilter(logging.Filter):
    """Stamps the rank on each record; drops INFO (and DEBUG) lines of ranks other than 0 unless verbose."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.rank = current_rank()
        if verbose():
            return True
        return record.levelno >= logging.WARNING or (record.rank == 0 and record.levelno >= logging.INFO)


class _StderrHandler(logging.StreamHandler):
    """Writes to the current `sys.stderr` (pytest and callers may swap it after the handler is made)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value):
        pass


def _configure() -> logging.Logger:
    root = logging.getLogger(ROOT)
    if not any(isinstance(h, _StderrHandler) for h in root.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter(FORMAT, DATEFMT))
        handler.addFilter(_RankFilter())
        root.addHandler(handler)
        root.propagate = False  # one line per message, whatever the application configured on the root logger
    root.setLevel(logging.DEBUG if verbose() else logging.INFO)
    return root


def set_verbose(on: bool = True) -> None:
    """`--verbose`: DEBUG lines from every rank, here and in the ranks this process starts."""
    if on:
        os.environ[VERBOSE_ENV] = "1"
    _configure()


def get_logger(name: str) -> logging.Logger:
    """The logger for a module of the package (`get_logger(__name__)`), with the package's format."""
    _configure()
    return logging.getLogger(name if name.startswith(ROOT) else f"{ROOT}.{name}")
