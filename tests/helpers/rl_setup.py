"""Shared set-up for the RL trainer tests: toy data, a sentencepiece tokenizer, a tiny model config, overrides."""

from __future__ import annotations

from pathlib import Path


def toy_env(root: Path, num_train_prompts: int = 32, num_val_prompts: int = 4, answers_per_prompt: int = 1,
            seed: int = 7, model: str = "tiny") -> dict:
    """The digit-sum toy task (data/toy.py) as parquet, a character tokenizer trained on it, SFT pairs, and the
    `model` shape with the tokenizer's vocabulary."""
    import random

    import yaml

    from megatron_apo.data.parquet import write_verl_parquet
    from megatron_apo.data.tokenizer import load_tokenizer
    from megatron_apo.data.toy import make_toy_dataset, sample_valid_answers
    from megatron_apo.models import load_model_config
    from megatron_apo.study.runner import train_char_tokenizer

    data = root / "data"
    data.mkdir(parents=True, exist_ok=True)
    train_rows = make_toy_dataset(num_train_prompts, seed, (2,), split="train")
    write_verl_parquet(train_rows, data / "train.parquet")
    write_verl_parquet(make_toy_dataset(num_val_prompts, seed + 1, (2,), split="test"), data / "val.parquet")
    rng = random.Random(seed)
    pairs_text = [(row["prompt"][0]["content"], ans) for row in train_rows
                  for ans in sample_valid_answers(int(row["reward_model"]["ground_truth"]), 2, rng, answers_per_prompt)]
    tok_file = train_char_tokenizer([f"{p} {a}" for p, a in pairs_text], data / "toy_sp")
    tok = load_tokenizer(tok_file)
    eos = tok.stop_token_ids[0]
    pairs = [(tok.encode_prompt([{"role": "user", "content": p}]), tok.encode(a) + [eos]) for p, a in pairs_text]
    model_cfg = dict(load_model_config(model).to_dict(), name=f"{model}-toy", vocab_size=tok.sp.get_piece_size())
    (data / "model.yaml").write_text(yaml.safe_dump(model_cfg))
    return {"train": str(data / "train.parquet"), "val": str(data / "val.parquet"), "tokenizer": str(tok_file),
            "pairs": pairs, "pad_id": tok.pad_token_id or 0, "model": str(data / "model.yaml")}


def overrides(env: dict, out_dir: Path, tp: int = 2, pp: int = 1, steps: int = 3, extra: list[str] = ()) -> list[str]:
    return [
        f"model.config={env['model']}", f"parallel.tensor_model_parallel_size={tp}",
        f"parallel.pipeline_model_parallel_size={pp}", "seed=11", f"out_dir={out_dir}",
        f"data.train_files=[{env['train']}]", f"data.tokenizer={env['tokenizer']}", "data.max_prompt_length=32",
        "data.max_response_length=8", "data.train_batch_size=4", "rollout.n=4", "rollout.num_engines=1",
        f"trainer.total_steps={steps}", "trainer.lr=1e-3", "trainer.micro_batch_size=8", "trainer.progress=false",
        "trainer.tensorboard=true", *extra,
    ]
