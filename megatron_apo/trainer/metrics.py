"""Per-step metrics: JSONL (always), TensorBoard and W&B (when configured), and a rich progress bar."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from megatron_apo.diskio import describe_os_error
from megatron_apo.logging_utils import get_logger

log = get_logger(__name__)


class MetricsLogger:
    """Rank-0 only. `log(step, metrics)` appends one JSON line per step to <out_dir>/metrics.jsonl.

    Each record goes to the file in one `write(2)` with O_APPEND, and a record the disk had no room for is cut
    back off, so the file only ever holds whole lines. A torn last line left by a crash in an older version
    (or a kill mid-write on a filesystem without atomic appends) is removed when the file is opened.
    """

    def __init__(self, out_dir: str | Path, total_steps: int, start_step: int = 0, tensorboard: bool = True,
                 wandb_project: str | None = None, progress: bool = True, run_name: str = "megatron-apo"):
        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / "metrics.jsonl"
        repair_torn_tail(self.path)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(self.dir / "tensorboard"))
            except ImportError:  # tensorboard is optional; JSONL is always written
                self.tb = None
        self.wandb = None
        if wandb_project:
            import wandb  # a configured project without wandb installed is an error worth seeing

            self.wandb = wandb.init(project=wandb_project, name=run_name, dir=str(self.dir))
        self.progress = None
        if progress:
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            self.progress = Progress(TextColumn("[bold]RL[/] {task.completed}/{task.total}"), BarColumn(),
                                     TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TextColumn("eta"),
                                     TimeRemainingColumn())
            self.task = self.progress.add_task("train", total=total_steps, completed=start_step, info="")
            self.progress.start()

    def log(self, step: int, metrics: dict) -> None:
        self.write(self.record(step, metrics))

    @staticmethod
    def record(step: int, metrics: dict) -> dict:
        """One step's record as it is written (plain JSON data: the checkpoint of the step keeps a copy)."""
        return {"step": step, "time": time.time(), **{k: _scalar(v) for k, v in metrics.items()}}

    def replay(self, record: dict | None) -> bool:
        """Appends a checkpoint's copy of its step's record when metrics.jsonl lacks that step (a kill between the
        checkpoint's rename and the metrics write). True when it did."""
        if not record or "step" not in record:
            return False
        if any(r["step"] == record["step"] for r in read_metrics(self.path)):
            return False
        self._append((json.dumps(record) + "\n").encode())
        log.info("metrics: step %d's record restored from its checkpoint (the run was killed before writing it)",
                 record["step"])
        return True

    def write(self, record: dict) -> None:
        step = record["step"]
        self._append((json.dumps(record) + "\n").encode())
        if self.tb is not None:
            for k, v in record.items():
                if k not in ("step", "time") and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(record, step=step)
        if self.progress is not None:
            info = f"loss {record.get('loss', float('nan')):.4f}  reward {record.get('reward/mean', float('nan')):.3f}"
            self.progress.update(self.task, completed=step, info=info)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
        os.close(self._fd)

    def _append(self, data: bytes) -> None:
        size = os.fstat(self._fd).st_size
        try:
            written = os.write(self._fd, data)
            if written != len(data):  # a short write: the disk filled up part-way
                raise OSError(28, os.strerror(28))
        except OSError as e:
            os.ftruncate(self._fd, size)  # never leave half a record behind
            raise OSError(e.errno, describe_os_error(e, self.path, "writing the metrics")) from None


def repair_torn_tail(path: str | Path) -> bool:
    """Cuts an unfinished last line (no newline, or not JSON) off a JSONL file; True when it did."""
    path = Path(path)
    if not path.is_file() or path.stat().st_size == 0:
        return False
    with open(path, "rb+") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        f.seek(max(0, size - (1 << 20)))
        tail = f.read()
        cut = tail.rfind(b"\n", 0, len(tail) - 1) + 1  # start of the last line within `tail`
        last = tail[cut:]
        try:
            whole = last.endswith(b"\n") and isinstance(json.loads(last), dict)
        except ValueError:
            whole = False
        if whole:
            return False
        f.truncate(size - len(tail) + cut)
    log.warning("metrics: removed a torn last record from %s (%d bytes, written by an interrupted run)",
                path, len(last))
    return True


def _scalar(v):
    if hasattr(v, "item"):
        return float(v.item())
    return v


def read_metrics(path: str | Path) -> list[dict]:
    """The metrics of the newest attempt at each step (a resumed run re-logs steps after its checkpoint)."""
    by_step: dict[int, dict] = {}
    with open(path) as f:
        lines = f.read().split("\n")
    for i, line in enumerate(lines):
        if line.strip():
            try:
                rec = json.loads(line)
            except ValueError:
                if i == len(lines) - 1:  # a torn last record (a run killed mid-write): the next run removes it
                    break
                raise ValueError(f"{path}: line {i + 1} is not JSON") from None
            by_step[rec["step"]] = rec
    return [by_step[s] for s in sorted(by_step)]
