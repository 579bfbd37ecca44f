"""Per-step metrics: JSONL (always), TensorBoard and W&B (when configured), and a rich progress bar."""

from __future__ import annotations

import json
import time
from pathlib import Path


class MetricsLogger:
    """Rank-0 only. `log(step, metrics)` appends one JSON line per step to <out_dir>/metrics.jsonl."""

    def __init__(self, out_dir: str | Path, total_steps: int, start_step: int = 0, tensorboard: bool = True,
                 wandb_project: str | None = None, progress: bool = True, run_name: str = "megatron-apo"):
        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = open(self.dir / "metrics.jsonl", "a", buffering=1)
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
        record = {"step": step, "time": time.time(), **{k: _scalar(v) for k, v in metrics.items()}}
        self.jsonl.write(json.dumps(record) + "\n")
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
        self.jsonl.close()


def _scalar(v):
    if hasattr(v, "item"):
        return float(v.item())
    return v


def read_metrics(path: str | Path) -> list[dict]:
    """The metrics of the newest attempt at each step (a resumed run re-logs steps after its checkpoint)."""
    by_step: dict[int, dict] = {}
    with open(path) as f:
        for line in f:
            if line.strip():
                rec = json.loads(line)
                by_step[rec["step"]] = rec
    return [by_step[s] for s in sorted(by_step)]
