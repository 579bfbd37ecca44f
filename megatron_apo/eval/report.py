"""pass@k results on disk (JSON) and as a plot (pass@k against log-scale k, several runs overlaid)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Mapping

from megatron_apo.config import InputError, MissingInputError
from megatron_apo.eval.runner import RESULTS_FORMAT


def write_results(results: dict, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2, sort_keys=False) + "\n")
    return path


def load_results(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise MissingInputError(f"results file not found: {path}")
    try:
        results = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: not a megatron-apo pass@k results file (not JSON: {e})") from e
    if not isinstance(results, dict) or results.get("format") != RESULTS_FORMAT:
        raise InputError(f"{path}: not a megatron-apo pass@k results file (expected format {RESULTS_FORMAT!r})")
    return results


def _curve(summary: dict, ks: list[int]) -> tuple[list[int], list[float]]:
    pts = [(k, summary.get(f"pass@{k}")) for k in ks]
    pts = [(k, v) for k, v in pts if v is not None and not math.isnan(v)]
    return [k for k, _ in pts], [v for _, v in pts]


def plot_pass_at_k(runs: Mapping[str, dict], path: str | Path, title: str | None = None) -> Path:
    """One curve per run (label -> results dict): overall pass@k, plus a panel per data source
    when there are several."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not runs:
        raise ValueError("plot_pass_at_k: no runs to plot")
    sources = sorted({ds for r in runs.values() for ds in r.get("per_data_source", {})})
    panels = [("overall", None)] + ([(ds, ds) for ds in sources] if len(sources) > 1 else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
    all_ks = sorted({k for r in runs.values() for k in r["k_values"]})
    for ax, (name, ds) in zip(axes[0], panels):
        for label, res in runs.items():
            summary = res["overall"] if ds is None else res.get("per_data_source", {}).get(ds)
            if not summary:
                continue
            ks, vals = _curve(summary, res["k_values"])
            ax.plot(ks, vals, marker="o", linewidth=1.8, label=f"{label} (n={res['config']['n']})")
        ax.set_xscale("log", base=2)
        ax.set_xticks(all_ks)
        ax.set_xticklabels([str(k) for k in all_ks])
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("k (samples drawn, log scale)")
        ax.set_ylabel("pass@k")
        n_prompts = max((res["overall"]["num_prompts"] if ds is None else
                         res.get("per_data_source", {}).get(ds, {}).get("num_prompts", 0)) for res in runs.values())
        ax.set_title(f"{name} ({n_prompts} prompts)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def format_table(runs: Mapping[str, dict]) -> str:
    """A plain-text pass@k table (rows: runs, columns: k), for logs and the CLI."""
    ks = sorted({k for r in runs.values() for k in r["k_values"]})
    width = max(8, max(len(label) for label in runs) + 2)
    lines = ["run".ljust(width) + "".join(f"pass@{k}".rjust(10) for k in ks)]
    for label, res in runs.items():
        cells = [res["overall"].get(f"pass@{k}") for k in ks]
        lines.append(label.ljust(width) + "".join(("-" if v is None else f"{v:.4f}").rjust(10) for v in cells))
    return "\n".join(lines)
