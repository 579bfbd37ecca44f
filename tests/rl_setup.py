"""Shared set-up for the RL trainer tests: toy data, a sentencepiece tokenizer, a tiny model config, overrides."""

from __future__ import annotations

from pathlib import Path

from megatron_apo.trainer.demo import DemoConfig, prepare_data


def toy_env(root: Path) -> dict:
    cfg = DemoConfig(num_train_prompts=32, num_val_prompts=4, sft_answers_per_prompt=1)
    return prepare_data(cfg, root)


def overrides(env: dict, out_dir: Path, tp: int = 2, pp: int = 1, steps: int = 3, extra: list[str] = ()) -> list[str]:
    return [
        f"model.config={env['model']}", f"parallel.tensor_model_parallel_size={tp}",
        f"parallel.pipeline_model_parallel_size={pp}", "seed=11", f"out_dir={out_dir}",
        f"data.train_files=[{env['train']}]", f"data.tokenizer={env['tokenizer']}", "data.max_prompt_length=32",
        "data.max_response_length=8", "data.train_batch_size=4", "rollout.n=4", "rollout.num_engines=1",
        f"trainer.total_steps={steps}", "trainer.lr=1e-3", "trainer.micro_batch_size=8", "trainer.progress=false",
        "trainer.tensorboard=true", *extra,
    ]
