"""`megatron-apo demo`: APO vs GRPO end to end on a 2-core CPU, no downloads.

1. a toy verifiable task with MANY valid answers per prompt ("k=3 sum=14 :" -> any 3 digits summing to 14),
   written in the verl/DAPO parquet schema;
2. a sentencepiece tokenizer trained on the task's corpus;
3. SFT of a tiny Qwen2-shaped Megatron model (TP=2, gloo) on diverse correct answers -> the reference;
4. RL from that reference with GRPO and with APO (TP=2 trainer, Ray CPU rollout fleet, weight sync);
5. pass@k (k = 1..eval_n) of reference / GRPO / APO on held-out prompts: a table, results.json, pass_at_k.png.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from megatron_apo.config import load_config
from megatron_apo.data.toy import make_toy_dataset, sample_valid_answers
from megatron_apo.parallel import run_distributed


@dataclass
class DemoConfig:
    seed: int = 7
    tp: int = 2
    model: str = "tiny"
    k_values: tuple = (3,)
    num_train_prompts: int = 512
    num_val_prompts: int = 48
    sft_answers_per_prompt: int = 8
    sft_steps: int = 250
    rl_steps: int = 16
    prompts_per_step: int = 16
    samples_per_prompt: int = 8
    rl_lr: float = 2e-4
    eval_n: int = 32
    num_engines: int = 2
    methods: dict = field(default_factory=lambda: {
        "grpo": ["algorithm.loss_mode=vanilla"],
        "apo": ["algorithm.loss_mode=apo_ratio"],
    })

    @classmethod
    def quick(cls) -> "DemoConfig":
        return cls(num_train_prompts=64, num_val_prompts=8, sft_steps=30, rl_steps=2, prompts_per_step=4,
                   samples_per_prompt=4, eval_n=4, num_engines=1)


def _train_tokenizer(lines: list[str], prefix: Path) -> Path:
    import sentencepiece as spm

    # Character pieces: digits, '+', '=' and a few letters; specials at fixed ids (pad 0, unk 1, bos 2, eos 3).
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=str(prefix), model_type="char",
                                   vocab_size=40, hard_vocab_limit=False, character_coverage=1.0, pad_id=0,
                                   unk_id=1, bos_id=2, eos_id=3, minloglevel=2)
    return prefix.with_suffix(".model")


def prepare_data(cfg: DemoConfig, out: Path) -> dict:
    """Writes train/val parquet, the SFT pairs and the tokenizer; returns their paths."""
    from megatron_apo.data.parquet import write_verl_parquet
    from megatron_apo.data.tokenizer import load_tokenizer

    data = out / "data"
    data.mkdir(parents=True, exist_ok=True)
    train_rows = make_toy_dataset(cfg.num_train_prompts, cfg.seed, cfg.k_values, split="train")
    val_rows = make_toy_dataset(cfg.num_val_prompts, cfg.seed + 1, cfg.k_values, split="test")
    write_verl_parquet(train_rows, data / "train.parquet")
    write_verl_parquet(val_rows, data / "val.parquet")
    rng = random.Random(cfg.seed)
    pairs_text = []
    for row in train_rows:
        k, total = row["extra_info"]["k"], int(row["reward_model"]["ground_truth"])
        for ans in sample_valid_answers(total, k, rng, cfg.sft_answers_per_prompt):
            pairs_text.append((row["prompt"][0]["content"], ans))
    tok_file = _train_tokenizer([f"{p} {a}" for p, a in pairs_text], data / "toy_sp")
    tok = load_tokenizer(tok_file)
    eos = tok.stop_token_ids[0]
    pairs = [(tok.encode_prompt([{"role": "user", "content": p}]), tok.encode(a) + [eos]) for p, a in pairs_text]
    # The demo model: `cfg.model`'s shape with exactly the tokenizer's vocabulary.
    import yaml

    from megatron_apo.models import load_model_config

    model_cfg = dict(load_model_config(cfg.model).to_dict(), name=f"{cfg.model}-toy", vocab_size=tok.sp.get_piece_size())
    model_file = data / "model.yaml"
    model_file.write_text(yaml.safe_dump(model_cfg))
    return {"train": str(data / "train.parquet"), "val": str(data / "val.parquet"), "tokenizer": str(tok_file),
            "pairs": pairs, "pad_id": tok.pad_token_id or 0, "model": str(model_file)}


def _rl_overrides(cfg: DemoConfig, paths: dict, sft_ckpt: str, out_dir: Path) -> list[str]:
    return [
        f"model.config={paths['model']}", f"parallel.tensor_model_parallel_size={cfg.tp}", f"seed={cfg.seed}",
        f"out_dir={out_dir}", f"checkpoint.load={sft_ckpt}", "checkpoint.save_interval=0", "checkpoint.keep_last=1",
        f"data.train_files=[{paths['train']}]", f"data.val_files=[{paths['val']}]", f"data.tokenizer={paths['tokenizer']}",
        "data.max_prompt_length=32", "data.max_response_length=12", f"data.train_batch_size={cfg.prompts_per_step}",
        f"rollout.n={cfg.samples_per_prompt}", f"rollout.num_engines={cfg.num_engines}", "rollout.temperature=1.0",
        f"trainer.total_steps={cfg.rl_steps}", f"trainer.lr={cfg.rl_lr}", "trainer.micro_batch_size=32",
        f"trainer.eval_n={cfg.eval_n}", f"trainer.eval_max_prompts={cfg.num_val_prompts}", "trainer.tensorboard=false",
        "trainer.progress=false",
    ]


def run_demo(cfg: DemoConfig, out: str | Path) -> dict:
    from megatron_apo.trainer.sft import SFTConfig, make_sft_tensors, sft_train

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    print(f"demo: writing the toy task and training a tokenizer in {out}/data", flush=True)
    paths = prepare_data(cfg, out)
    tokens, mask = make_sft_tensors(paths["pairs"], paths["pad_id"])
    sft_dir = out / "sft"
    print(f"demo: SFT of a tiny Qwen2-shaped model on {len(paths['pairs'])} diverse correct answers (TP={cfg.tp})", flush=True)
    sft = SFTConfig(model=paths["model"], tp=cfg.tp, steps=cfg.sft_steps, seed=cfg.seed)
    run_distributed(sft_train, cfg.tp, sft, tokens, mask, str(sft_dir), timeout=1800)
    results: dict[str, dict] = {}
    for method, extra in cfg.methods.items():
        run_dir = out / method
        print(f"demo: RL with {method.upper()} for {cfg.rl_steps} steps (TP={cfg.tp} trainer, "
              f"{cfg.num_engines} Ray CPU engines)", flush=True)
        rcfg = load_config(None, _rl_overrides(cfg, paths, str(sft_dir), run_dir) + list(extra))
        run_distributed(_train_entry, cfg.tp, rcfg, timeout=3600)
        evals = sorted((run_dir / "eval").glob("step_*.json"))
        if "reference" not in results:
            results["reference"] = json.loads(evals[0].read_text())
        results[method] = json.loads(evals[-1].read_text())
    return _report(results, out, time.time() - t0)


def _train_entry(rcfg):
    from megatron_apo.trainer.train import train

    return train(rcfg)


def _report(results: dict, out: Path, seconds: float) -> dict:
    from megatron_apo.eval.report import format_table, plot_pass_at_k

    table = {m: {f"pass@{k}": r["overall"][f"pass@{k}"] for k in r["k_values"]} for m, r in results.items()}
    (out / "results.json").write_text(json.dumps(table, indent=2) + "\n")
    plot_pass_at_k(results, out / "pass_at_k.png", title="toy digit-sum: reference vs GRPO vs APO")
    print(format_table(results))
    print(f"demo: done in {seconds / 60:.1f} min; wrote {out}/results.json and {out}/pass_at_k.png", flush=True)
    return table
