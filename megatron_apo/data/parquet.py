"""Read and write verl-schema parquet files (DAPO-Math-17k and friends)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from megatron_apo.config import InputError, MissingInputError, OnInvalid
from megatron_apo.data.schema import (
    REQUIRED_COLUMNS,
    InvalidDataError,
    PromptRow,
    RowIssue,
    parse_row,
)

logger = logging.getLogger(__name__)
ON_INVALID = tuple(m.value for m in OnInvalid)  # config.OnInvalid
_MAX_LISTED = 20


@dataclass
class DataReport:
    """What loading did to the file: rows read, rows dropped and why."""

    path: str
    total_rows: int = 0
    issues: list[RowIssue] = field(default_factory=list)
    invalid_rows: list[int] = field(default_factory=list)
    too_long_rows: list[int] = field(default_factory=list)  # filled by PromptDataset

    @property
    def num_valid(self) -> int:
        return self.total_rows - len(self.invalid_rows)

    def summary(self) -> str:
        s = f"{self.path}: {self.total_rows} rows, {len(self.invalid_rows)} invalid"
        if self.too_long_rows:
            s += f", {len(self.too_long_rows)} over the max prompt length"
        return s


def _format_issues(issues: list[RowIssue]) -> str:
    listed = "; ".join(str(i) for i in issues[:_MAX_LISTED])
    more = f"; ... and {len(issues) - _MAX_LISTED} more" if len(issues) > _MAX_LISTED else ""
    return listed + more


def read_verl_parquet(path: str | Path, on_invalid: str = "error") -> tuple[list[PromptRow], DataReport]:
    """Rows of a verl-schema parquet file, validated.

    on_invalid='error' raises `InvalidDataError` listing every bad row (index and field); 'skip' drops those
    rows and logs them. A file missing a required column is an error either way (no row could be used).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    if on_invalid not in ON_INVALID:
        raise InputError(f"on_invalid must be one of {ON_INVALID}, got {on_invalid!r}")
    path = Path(path)
    if not path.is_file():
        raise MissingInputError(f"dataset file not found: {path}")
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as e:
        raise InvalidDataError(f"{path}: not a readable parquet file ({e})") from e
    missing = [c for c in REQUIRED_COLUMNS if c not in table.column_names]
    if missing:
        raise InvalidDataError(
            f"{path}: missing column(s) {missing}; found {table.column_names}. A verl-schema file needs "
            "prompt (chat messages), reward_model {ground_truth, style}, data_source, optionally extra_info, ability"
        )
    report = DataReport(str(path), total_rows=table.num_rows)
    rows: list[PromptRow] = []
    try:
        raws = table.to_pylist()
    except (UnicodeDecodeError, pa.ArrowException) as e:
        raise InvalidDataError(f"{path}: text that is not valid UTF-8 ({type(e).__name__}: {e})") from None
    for i, raw in enumerate(raws):
        row, issues = parse_row(i, raw)
        if issues:
            report.issues.extend(issues)
            report.invalid_rows.append(i)
        else:
            rows.append(row)
    if report.issues:
        msg = (f"{path}: {len(report.invalid_rows)} invalid row(s) of {report.total_rows}: "
               f"{_format_issues(report.issues)}")
        if on_invalid == "error":
            raise InvalidDataError(msg + " (pass on_invalid='skip' / --skip-invalid to drop them)")
        logger.warning("skipping " + msg)
    if not rows:
        raise InvalidDataError(f"{path}: no valid rows ({report.summary()})")
    return rows, report


def write_verl_parquet(rows: Iterable[PromptRow | dict], path: str | Path) -> Path:
    """Write rows (PromptRow or verl dicts) as a verl-schema parquet file that verl itself can read."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    records = [r.to_verl() if isinstance(r, PromptRow) else dict(r) for r in rows]
    if not records:
        raise ValueError(f"write_verl_parquet: no rows to write to {path}")
    for i, r in enumerate(records):
        _, issues = parse_row(i, r)
        if issues:
            raise InvalidDataError(f"write_verl_parquet: refusing to write an invalid row: {issues[0]}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(records), path)
    return path
