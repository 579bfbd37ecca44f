"""`megatron-apo eval`: a checkpoint + a verl parquet -> pass@k JSON and plot (optionally overlaying earlier runs)."""

from __future__ import annotations

import contextlib
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from megatron_apo.config import InputError, MissingInputError
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
    engines: int = 0  # 0: one engine in this process; N: a Ray rollout fleet of N engines
    engine: str = "cpu"  # cpu | vllm, as rollout.engine in training
    engine_tp: int = 1  # tensor parallel inside each vLLM engine
    ray_address: str | None = None  # an existing Ray cluster for the fleet (default: a new local one)
    allow_unverified: bool = False  # export a Megatron checkpoint without checksums.json (trusted sources only)
    config: EvalConfig = field(default_factory=EvalConfig)


def run_eval(job: EvalJob) -> dict[str, dict]:
    """Evaluate (if a model is given), then write JSON + PNG into job.out; returns label -> results of every run."""

    runs: dict[str, dict] = {}
    for p in job.overlay:
        res = load_results(p)
        runs[res.get("label") or Path(p).stem] = res
    if job.model is None and not runs:
        raise InputError("eval: give --model and --data to evaluate, and/or --overlay results.json ... to plot")
    created = not job.out.exists()
    job.out.mkdir(parents=True, exist_ok=True)
    try:
        return _evaluate_into(job, runs)
    except BaseException:
        if created:  # an error leaves no empty (or half-written) output folder behind
            shutil.rmtree(job.out, ignore_errors=True)
        raise


def _check_architecture(hf_dir: Path) -> None:
    """One line naming config.json for a model the engines cannot load (instead of a weight-sync traceback)."""
    import json

    from megatron_apo.models.hf_mapping import model_config_from_hf_config

    config = hf_dir / "config.json"
    if not config.is_file():
        raise MissingInputError(f"{hf_dir}: no config.json (a Hugging Face model folder has one)")
    model_config_from_hf_config(json.loads(config.read_text()), source=str(config))


def _evaluate_into(job: EvalJob, runs: dict[str, dict]) -> dict[str, dict]:
    from megatron_apo.data import PromptDataset, load_tokenizer
    from megatron_apo.rewards import RewardPool

    if job.model is not None:
        if job.data is None:
            raise InputError("eval: --data FILE.parquet is required with --model")
        from megatron_apo.eval.engines import hf_folder_for, open_engine

        with contextlib.ExitStack() as stack:
            hf_dir = stack.enter_context(hf_folder_for(Path(job.model), job.out,
                                                          allow_unverified=job.allow_unverified))
            _check_architecture(Path(hf_dir))
            tokenizer = load_tokenizer(job.tokenizer or hf_dir, job.template)
            dataset = PromptDataset.from_parquet(job.data, tokenizer, job.max_prompt_length,
                                                 on_invalid="skip" if job.skip_invalid else "error")
            prompts = dataset.items[: job.limit] if job.limit else dataset.items
            pool = stack.enter_context(RewardPool(num_workers=job.reward_workers, timeout_s=job.reward_timeout_s,
                                                  reward_fn=job.reward_fn))
            engine = stack.enter_context(open_engine(hf_dir, job.engines, job.ray_address, job.engine, job.engine_tp))
            label = job.label or Path(job.model).name
            meta = {"model": str(job.model), "data": str(job.data), "template": tokenizer.template,
                    "engine": (f"ray fleet of {job.engines} {job.engine} engine(s)" if job.engines
                               else f"{job.engine} engine (in-process)"),
                    "data_report": {"rows": dataset.report.total_rows, "invalid": len(dataset.report.invalid_rows),
                                    "too_long": len(dataset.report.too_long_rows), "evaluated": len(prompts)}}
            results = evaluate(engine, tokenizer, prompts, job.config, pool, label=label, meta=meta)
        write_results(results, job.out / "pass_at_k.json")
        runs[label] = results
    plot_pass_at_k(runs, job.out / "pass_at_k.png", title="pass@k")
    print(format_table(runs))
    print(f"wrote {job.out / 'pass_at_k.png'}" + (f" and {job.out / 'pass_at_k.json'}" if job.model else ""))
    return runs
