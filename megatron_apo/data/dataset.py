"""Prompt datasets: tokenized verl rows with over-length prompts filtered, and a resumable shuffled sampler."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from megatron_apo.config import InputError
from megatron_apo.data.parquet import DataReport, read_verl_parquet
from megatron_apo.data.schema import InvalidDataError, PromptRow
from megatron_apo.data.tokenizer import Tokenizer

logger = logging.getLogger(__name__)


@dataclass
class EncodedPrompt:
    row: PromptRow
    prompt_ids: list[int]


class PromptDataset:
    """Rows with their prompt token ids; prompts longer than `max_prompt_length` tokens are dropped and counted.

    `from_parquet` takes one file or a list: the files' prompts are concatenated in the order given, and
    `sources` holds (file, prompts kept) per file (the sampler's resume check compares it).
    """

    def __init__(self, rows: list[PromptRow], tokenizer: Tokenizer, max_prompt_length: int | None = None,
                 report: DataReport | None = None):
        self.report = report or DataReport("<rows>", total_rows=len(rows))
        self.items = _encode(rows, tokenizer, max_prompt_length, self.report)
        self.sources: list[tuple[str, int]] = [(self.report.path, len(self.items))]
        if not self.items:
            raise InvalidDataError(_empty_message(self.report.summary(), max_prompt_length))

    @classmethod
    def from_parquet(cls, paths: str | Path | Sequence[str | Path], tokenizer: Tokenizer,
                     max_prompt_length: int | None = None, on_invalid: str = "error") -> "PromptDataset":
        paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
        if not paths:
            raise InputError("PromptDataset.from_parquet: no data files given")
        ds = cls.__new__(cls)
        ds.items, ds.sources, reports = [], [], []
        for path in paths:
            rows, report = read_verl_parquet(path, on_invalid=on_invalid)
            items = _encode(rows, tokenizer, max_prompt_length, report)
            ds.items.extend(items)
            ds.sources.append((str(path), len(items)))
            reports.append(report)
        ds.report = reports[0] if len(reports) == 1 else _merged(reports)
        if not ds.items:
            raise InvalidDataError(_empty_message("; ".join(r.summary() for r in reports), max_prompt_length))
        return ds

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> EncodedPrompt:
        return self.items[i]


def _encode(rows: list[PromptRow], tokenizer: Tokenizer, max_prompt_length: int | None,
            report: DataReport) -> list[EncodedPrompt]:
    items = []
    for row in rows:
        ids = tokenizer.encode_prompt(row.messages)
        if max_prompt_length is not None and len(ids) > max_prompt_length:
            report.too_long_rows.append(row.index)
            continue
        items.append(EncodedPrompt(row, ids))
    if report.too_long_rows:
        logger.warning("%s: %d prompt(s) longer than %d tokens dropped (rows %s%s)", report.path,
                       len(report.too_long_rows), max_prompt_length, report.too_long_rows[:10],
                       " ..." if len(report.too_long_rows) > 10 else "")
    return items


def _empty_message(summary: str, max_prompt_length: int | None) -> str:
    return (f"no prompts left after filtering: {summary}"
            + (f"; raise max_prompt_length (now {max_prompt_length})" if max_prompt_length else ""))


def _merged(reports: list[DataReport]) -> DataReport:
    """One report over several files (row indices stay per file: the counts are what is summed)."""
    return DataReport(", ".join(r.path for r in reports), total_rows=sum(r.total_rows for r in reports),
                      issues=[i for r in reports for i in r.issues],
                      invalid_rows=[i for r in reports for i in r.invalid_rows],
                      too_long_rows=[i for r in reports for i in r.too_long_rows])


class PromptSampler:
    """Deterministic shuffled batches across epochs, resumable from `state_dict()`.

    Epoch e visits indices in the order `permutation(seed, e)`; a batch that reaches the end of an epoch is
    completed from the next one, so every batch is full and no prompt is repeated within an epoch.
    `sources` ((file, prompts) per data file, `PromptDataset.sources`) goes into the state, so a resume whose
    files hold other prompt counts is refused instead of silently visiting other prompts.
    """

    def __init__(self, num_items: int, seed: int = 0, shuffle: bool = True,
                 sources: Sequence[tuple[str, int]] | None = None):
        if num_items < 1:
            raise ValueError(f"PromptSampler needs at least one item, got {num_items}")
        self.num_items, self.seed, self.shuffle = num_items, int(seed), shuffle
        self.sources = [(Path(f).name, int(n)) for f, n in sources] if sources else None
        self.epoch, self.position = 0, 0
        self._order = self._epoch_order(0)

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.num_items)
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_items)

    def next_indices(self, batch_size: int) -> list[int]:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        out: list[int] = []
        while len(out) < batch_size:
            if self.position == self.num_items:
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._epoch_order(self.epoch)
            take = min(batch_size - len(out), self.num_items - self.position)
            out.extend(int(i) for i in self._order[self.position : self.position + take])
            self.position += take
        return out

    def state_dict(self) -> dict:
        state = {"seed": self.seed, "epoch": self.epoch, "position": self.position,
                 "num_items": self.num_items, "shuffle": self.shuffle}
        if self.sources is not None:
            state["sources"] = [[f, n] for f, n in self.sources]
        return state

    def load_state_dict(self, state: dict) -> None:
        saved = state.get("sources")  # absent in checkpoints written before multi-file data
        both = saved is not None and self.sources is not None
        if state["num_items"] != self.num_items or (both and [n for _, n in saved] != [n for _, n in self.sources]):
            def files(src):
                return ", ".join(f"{f} ({n})" for f, n in src) if src else "?"
            raise InputError(f"the checkpoint's sampler state is for {state['num_items']} prompts "
                             f"[{files(saved)}] but data.train_files has {self.num_items} [{files(self.sources)}]; "
                             "resume with the same data files (same order) and data.max_prompt_length, "
                             "or start afresh in a new out_dir")
        if both and [f for f, _ in saved] != [f for f, _ in self.sources]:
            logger.warning("resuming with data files named %s where the checkpoint had %s (same prompt counts)",
                           [f for f, _ in self.sources], [f for f, _ in saved])
        self.seed, self.shuffle = int(state["seed"]), bool(state["shuffle"])
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._order = self._epoch_order(self.epoch)
