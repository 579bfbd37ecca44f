"""`megatron-apo eval`: a checkpoint + a verl parquet -> pass@k JSON and plot (optionally overlaying earlier runs)."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path

from megatron_apo.eval.report import format_table, load_results, plot_pass_at_k, write_results
from megatron_apo.eval.runner import EvalConfig, evaluate


@dataclass
class EvalJob:
    out: Path
    model: Path | None = None
    data: Path | None = None
    tokenizer: Path | None = None  # default: the model folder
    template: str = "auto"
    label: str | None = None
    overlay: list[Path] = field(default_factory=list)
    max_prompt_length: int | None = None
    skip_invalid: bool = False
    limit: int | None = None  # evaluate only the first N prompts
    reward_fn: str | None = None
    reward_workers: int = 2
    reward_timeout_s: float = 5.0
    config: EvalConfig = field(default_factory=EvalConfig)


def _is_megatron_checkpoint(path: Path) -> bool:
    return (path / "latest_checkpointed_iteration.txt").is_file() or any(path.glob("iter_*"))


def _check_model_folder(model: Path) -> None:
    if not model.is_dir():
        raise FileNotFoundError(f"model folder not found: {model}")
    if _is_megatron_checkpoint(model):
        if importlib.util.find_spec("megatron_apo.models.convert") is None:
            raise ValueError(f"{model} is a Megatron checkpoint; evaluating one needs the HF exporter, which is not "
                             "built yet: export it to a Hugging Face folder first and pass that folder to --model")
        raise ValueError(f"{model} is a Megatron checkpoint: export it with `megatron-apo convert` and pass the "
                         "Hugging Face folder to --model")


def run_eval(job: EvalJob) -> dict[str, dict]:
    """Evaluate (if a model is given), then write JSON + PNG into job.out; returns label -> results of every run."""
    from megatron_apo.data import PromptDataset, load_tokenizer
    from megatron_apo.rewards import RewardPool

    runs: dict[str, dict] = {}
    for p in job.overlay:
        res = load_results(p)
        runs[res.get("label") or Path(p).stem] = res
    if job.model is None and not runs:
        raise ValueError("eval: give --model and --data to evaluate, and/or --overlay results.json ... to plot")
    job.out.mkdir(parents=True, exist_ok=True)
    if job.model is not None:
        if job.data is None:
            raise ValueError("eval: --data FILE.parquet is required with --model")
        from megatron_apo.eval.hf_engine import HFEngine

        _check_model_folder(Path(job.model))  # before anything slow: the cheap checks first
        tokenizer = load_tokenizer(job.tokenizer or job.model, job.template)
        dataset = PromptDataset.from_parquet(job.data, tokenizer, job.max_prompt_length,
                                             on_invalid="skip" if job.skip_invalid else "error")
        prompts = dataset.items[: job.limit] if job.limit else dataset.items
        engine = HFEngine.from_pretrained(Path(job.model))
        label = job.label or Path(job.model).name
        meta = {"model": str(job.model), "data": str(job.data), "template": tokenizer.template,
                "data_report": {"rows": dataset.report.total_rows, "invalid": len(dataset.report.invalid_rows),
                                "too_long": len(dataset.report.too_long_rows), "evaluated": len(prompts)}}
        with RewardPool(num_workers=job.reward_workers, timeout_s=job.reward_timeout_s, reward_fn=job.reward_fn) as pool:
            results = evaluate(engine, tokenizer, prompts, job.config, pool, label=label, meta=meta)
        write_results(results, job.out / "pass_at_k.json")
        runs[label] = results
    plot_pass_at_k(runs, job.out / "pass_at_k.png", title="pass@k")
    print(format_table(runs))
    print(f"wrote {job.out / 'pass_at_k.png'}" + (f" and {job.out / 'pass_at_k.json'}" if job.model else ""))
    return runs
