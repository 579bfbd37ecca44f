"""Prompt datasets: tokenized verl rows with over-length prompts filtered, and a resumable shuffled sampler."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

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
    """Rows with their prompt token ids; prompts longer than `max_prompt_length` tokens are dropped and counted."""

    def __init__(self, rows: list[PromptRow], tokenizer: Tokenizer, max_prompt_length: int | None = None,
                 report: DataReport | None = None):
        self.report = report or DataReport("<rows>", total_rows=len(rows))
        self.items: list[EncodedPrompt] = []
        for row in rows:
            ids = tokenizer.encode_prompt(row.messages)
            if max_prompt_length is not None and len(ids) > max_prompt_length:
                self.report.too_long_rows.append(row.index)
                continue
            self.items.append(EncodedPrompt(row, ids))
        if self.report.too_long_rows:
            logger.warning("%d prompt(s) longer than %d tokens dropped (rows %s%s)", len(self.report.too_long_rows),
                           max_prompt_length, self.report.too_long_rows[:10],
                           " ..." if len(self.report.too_long_rows) > 10 else "")
        if not self.items:
            raise InvalidDataError(f"no prompts left after filtering: {self.report.summary()}"
                                   + (f"; raise max_prompt_length (now {max_prompt_length})"
                                      if max_prompt_length else ""))

    @classmethod
    def from_parquet(cls, path: str | Path, tokenizer: Tokenizer, max_prompt_length: int | None = None,
                     on_invalid: str = "error") -> "PromptDataset":
        rows, report = read_verl_parquet(path, on_invalid=on_invalid)
        return cls(rows, tokenizer, max_prompt_length, report)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> EncodedPrompt:
        return self.items[i]


class PromptSampler:
    """Deterministic shuffled batches across epochs, resumable from `state_dict()`.

    Epoch e visits indices in the order `permutation(seed, e)`; a batch that reaches the end of an epoch is
    completed from the next one, so every batch is full and no prompt is repeated within an epoch.
    """

    def __init__(self, num_items: int, seed: int = 0, shuffle: bool = True):
        if num_items < 1:
            raise ValueError(f"PromptSampler needs at least one item, got {num_items}")
        self.num_items, self.seed, self.shuffle = num_items, int(seed), shuffle
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
        return {"seed": self.seed, "epoch": self.epoch, "position": self.position,
                "num_items": self.num_items, "shuffle": self.shuffle}

    def load_state_dict(self, state: dict) -> None:
        if state["num_items"] != self.num_items:
            raise InputError(f"the checkpoint's sampler state is for {state['num_items']} prompts but data.train_files "
                             f"has {self.num_items}; resume with the same data files and data.max_prompt_length, "
                             "or start afresh in a new out_dir")
        self.seed, self.shuffle = int(state["seed"]), bool(state["shuffle"])
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._order = self._epoch_order(self.epoch)
