"""The verl / DAPO prompt-row schema, validated row by row.

A row (as verl's RLHFDataset and the official APO recipe read it, e.g. DAPO-Math-17k):

    prompt       = [{"role": "user", "content": "..."}]          chat messages
    reward_model = {"ground_truth": "...", "style": "rule"}
    data_source  = "math_dapo"                                   selects the reward function
    extra_info   = {...}                                         passed to the reward function
    ability      = "MATH"                                        optional

Problems are collected as `RowIssue(row, field, problem)` so a bad file is reported by row index and
field, never as a KeyError from inside the trainer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from megatron_apo.config import UserError

REQUIRED_COLUMNS = ("prompt", "reward_model", "data_source")
OPTIONAL_COLUMNS = ("extra_info", "ability")


@dataclass
class PromptRow:
    index: int  # row index in the source file (stable across filtering, for reports)
    messages: list[dict[str, str]]
    ground_truth: str
    data_source: str
    extra_info: dict = field(default_factory=dict)
    ability: str | None = None
    reward_style: str = "rule"

    def to_verl(self) -> dict[str, Any]:
        row = {
            "data_source": self.data_source,
            "prompt": [dict(m) for m in self.messages],
            "reward_model": {"ground_truth": self.ground_truth, "style": self.reward_style},
            "extra_info": dict(self.extra_info),
        }
        if self.ability is not None:
            row["ability"] = self.ability
        return row


@dataclass(frozen=True)
class RowIssue:
    row: int
    field: str
    problem: str

    def __str__(self) -> str:
        return f"row {self.row}: {self.field}: {self.problem}"


class InvalidDataError(UserError, ValueError):
    """A dataset file that cannot be used as given; the message names the file, rows and fields."""


def _type_name(v: Any) -> str:
    return "null" if v is None else type(v).__name__


def parse_messages(value: Any) -> tuple[list[dict[str, str]] | None, str | None]:
    """(messages, None) or (None, problem). A plain string is taken as one user message."""
    if isinstance(value, str):
        value = [{"role": "user", "content": value}]
    if hasattr(value, "tolist"):  # numpy arrays from pandas-written files
        value = value.tolist()
    if not isinstance(value, (list, tuple)):
        return None, f"expected a list of chat messages, got {_type_name(value)}"
    if not value:
        return None, "empty list of messages"
    messages = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            return None, f"message {i} must be {{'role': str, 'content': str}}, got {m!r:.80}"
        messages.append({"role": m["role"], "content": m["content"]})
    if not any(m["role"] == "user" and m["content"].strip() for m in messages):
        return None, "no user message with non-empty content"
    return messages, None


def parse_row(index: int, raw: dict[str, Any]) -> tuple[PromptRow | None, list[RowIssue]]:
    """Validate one raw row (a dict as pyarrow returns it); returns the row or the issues found."""
    issues: list[RowIssue] = []
    messages, problem = parse_messages(raw.get("prompt"))
    if problem:
        issues.append(RowIssue(index, "prompt", problem))

    rm = raw.get("reward_model")
    ground_truth, style = None, "rule"
    if not isinstance(rm, dict):
        issues.append(RowIssue(index, "reward_model",
                               f"expected a struct/dict with 'ground_truth', got {_type_name(rm)}"))
    else:
        gt = rm.get("ground_truth")
        style = rm.get("style") or "rule"
        if gt is None:
            issues.append(RowIssue(index, "reward_model.ground_truth", "null (every row needs an answer to verify)"))
        elif isinstance(gt, bool) or not isinstance(gt, (str, int, float)):
            issues.append(RowIssue(index, "reward_model.ground_truth", f"expected a string, got {_type_name(gt)}"))
        elif isinstance(gt, str) and not gt.strip():
            issues.append(RowIssue(index, "reward_model.ground_truth", "empty string"))
        else:
            ground_truth = str(gt)

    data_source = raw.get("data_source")
    if not isinstance(data_source, str) or not data_source:
        issues.append(RowIssue(index, "data_source", f"expected a non-empty string, got {_type_name(data_source)}"))

    extra_info = raw.get("extra_info")
    if extra_info is None:
        extra_info = {}
    elif not isinstance(extra_info, dict):
        issues.append(RowIssue(index, "extra_info", f"expected a struct/dict or null, got {_type_name(extra_info)}"))
    ability = raw.get("ability")
    if ability is not None and not isinstance(ability, str):
        issues.append(RowIssue(index, "ability", f"expected a string or null, got {_type_name(ability)}"))

    if issues:
        return None, issues
    return PromptRow(index, messages, ground_truth, data_source, dict(extra_info), ability, str(style)), []
