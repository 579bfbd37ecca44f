"""The train loop's pure pieces: the checkpoint decision, the lr schedule, the package logger's format and ranks."""

from __future__ import annotations

import logging
import re
from types import SimpleNamespace

import pytest

from megatron_apo.logging_utils import VERBOSE_ENV, get_logger
from megatron_apo.trainer.lifecycle import checkpoint_due
from megatron_apo.trainer.rl_step import lr_at


@pytest.mark.parametrize("step,total,interval,stopping,due", [
    (20, 100, 20, False, True),    # on the interval
    (21, 100, 20, False, False),
    (100, 100, 0, False, True),    # the last step always saves
    (7, 100, 0, False, False),     # interval 0: only at the end and on a signal
    (7, 100, 0, True, True),       # a stop signal
    (7, 100, 20, True, True),
])
def test_checkpoint_due(step, total, interval, stopping, due):
    assert checkpoint_due(step, total, interval, stopping) is due


def test_lr_schedule_warmup_then_decay():
    t = SimpleNamespace(lr=1.0, min_lr=0.1, lr_warmup_steps=2, total_steps=12, lr_decay_style="linear")
    assert [lr_at(s, t) for s in (0, 1)] == [0.5, 1.0]
    assert lr_at(2, t) == pytest.approx(1.0) and lr_at(12, t) == pytest.approx(0.1)
    assert lr_at(7, t) == pytest.approx(0.1 + 0.9 * 0.5)
    t.lr_decay_style = "cosine"
    assert lr_at(7, t) == pytest.approx(0.55) and lr_at(12, t) == pytest.approx(0.1)
    t.lr_decay_style = "constant"
    assert lr_at(11, t) == 1.0


def _emit(capsys, monkeypatch, rank: str, level: int, verbose: bool = False) -> str:
    monkeypatch.setenv("RANK", rank)
    monkeypatch.setenv(VERBOSE_ENV, "1" if verbose else "0")
    get_logger("megatron_apo.test_train_loop").log(level, "hello %s", "world")
    return capsys.readouterr().err


def test_logger_format_and_rank_filter(capsys, monkeypatch):
    line = _emit(capsys, monkeypatch, "0", logging.INFO)
    assert re.fullmatch(r"\[megatron-apo rank0 \d\d:\d\d:\d\d\] hello world\n", line), line
    assert _emit(capsys, monkeypatch, "3", logging.INFO) == ""  # other ranks: warnings only
    assert "rank3" in _emit(capsys, monkeypatch, "3", logging.WARNING)
    assert _emit(capsys, monkeypatch, "0", logging.DEBUG) == ""
    assert "rank3" in _emit(capsys, monkeypatch, "3", logging.DEBUG, verbose=True)  # --verbose: every rank, DEBUG
