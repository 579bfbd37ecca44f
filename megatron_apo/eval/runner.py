"""pass@k evaluation over any RolloutEngine: n samples per prompt, rewards, pass@k per data source and overall."""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass
from typing import Sequence

from megatron_apo.config import InputError
from megatron_apo.data.dataset import EncodedPrompt
from megatron_apo.data.tokenizer import Tokenizer
from megatron_apo.eval.pass_at_k import mean_pass_at_k, powers_of_two_up_to
from megatron_apo.rewards.pool import RewardItem, RewardPool
from megatron_apo.rollout.engine import RolloutEngine, SamplingParams

RESULTS_FORMAT = "megatron-apo/pass_at_k/v1"


@dataclass
class EvalConfig:
    n: int = 16  # samples per prompt
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_new_tokens: int = 256
    seed: int = 0
    prompts_per_call: int = 8  # prompts sent to the engine at once (x n sequences)
    correct_threshold: float = 1.0  # a sample counts as correct when its reward >= this
    num_examples: int = 3  # first responses kept in the results, to eyeball

    def __post_init__(self):
        if self.n < 1:
            raise InputError(f"eval n must be >= 1, got {self.n}")
        if self.prompts_per_call < 1:
            raise InputError(f"prompts_per_call must be >= 1, got {self.prompts_per_call}")


def _summarise(counts: list[tuple[int, int]], rewards: list[float], ks: Sequence[int]) -> dict:
    return {"num_prompts": len(counts), "num_samples": sum(n for n, _ in counts),
            "mean_reward": sum(rewards) / max(len(rewards), 1), **mean_pass_at_k(counts, ks)}


def evaluate(engine: RolloutEngine, tokenizer: Tokenizer, prompts: Sequence[EncodedPrompt], config: EvalConfig,
             reward_pool: RewardPool | None = None, label: str = "run", meta: dict | None = None,
             progress: bool = True) -> dict:
    """Sample `config.n` responses per prompt, score them, and return the results dict (JSON-ready)."""
    if not prompts:
        raise ValueError("evaluate: no prompts")
    pool = reward_pool or RewardPool(num_workers=0)
    params = SamplingParams(n=config.n, temperature=config.temperature, top_p=config.top_p, top_k=config.top_k,
                            max_new_tokens=config.max_new_tokens, stop_token_ids=tokenizer.stop_token_ids,
                            seed=config.seed)
    ks = powers_of_two_up_to(config.n)
    per_prompt, examples = [], []
    finish, timeouts, errors, response_tokens = Counter(), 0, 0, 0
    t_gen = t_reward = 0.0
    t0 = time.monotonic()

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn(f"eval {label}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, disable=not progress, transient=False) as bar:
        task = bar.add_task("prompts", total=len(prompts))
        for start in range(0, len(prompts), config.prompts_per_call):
            chunk = prompts[start : start + config.prompts_per_call]
            # Distinct seeds per chunk keep the run reproducible without repeating the same noise per chunk.
            chunk_params = SamplingParams(**{**asdict(params), "seed": config.seed + start})
            t = time.monotonic()
            samples = engine.generate([p.prompt_ids for p in chunk], chunk_params)
            t_gen += time.monotonic() - t
            items, texts = [], []
            for p, group in zip(chunk, samples):
                if len(group) != config.n:
                    raise RuntimeError(f"engine returned {len(group)} samples for a prompt, expected {config.n}")
                for s in group:
                    text = tokenizer.decode(s.token_ids)
                    texts.append(text)
                    finish[s.finish_reason] += 1
                    response_tokens += len(s.token_ids)
                    items.append(RewardItem(p.row.data_source, text, p.row.ground_truth, p.row.extra_info))
            t = time.monotonic()
            batch = pool.score(items)
            t_reward += time.monotonic() - t
            timeouts += batch.num_timeouts
            errors += batch.num_errors
            for j, p in enumerate(chunk):
                scores = batch.scores[j * config.n : (j + 1) * config.n]
                correct = sum(s >= config.correct_threshold for s in scores)
                per_prompt.append({"row": p.row.index, "data_source": p.row.data_source, "n": config.n,
                                   "correct": int(correct), "mean_reward": sum(scores) / config.n})
                if len(examples) < config.num_examples:
                    examples.append({"row": p.row.index, "prompt": tokenizer.decode(p.prompt_ids),
                                     "response": texts[j * config.n], "reward": scores[0]})
            bar.advance(task, len(chunk))

    by_source: dict[str, list[dict]] = defaultdict(list)
    for r in per_prompt:
        by_source[r["data_source"]].append(r)

    def summary(rows: list[dict]) -> dict:
        return _summarise([(r["n"], r["correct"]) for r in rows], [r["mean_reward"] for r in rows], ks)

    num_samples = len(prompts) * config.n
    return {
        "format": RESULTS_FORMAT,
        "label": label,
        "meta": dict(meta or {}),
        "config": asdict(config),
        "k_values": ks,
        "overall": summary(per_prompt),
        "per_data_source": {ds: summary(rows) for ds, rows in sorted(by_source.items())},
        "reward": {"timeouts": timeouts, "errors": errors},
        "generation": {"finish_reasons": dict(finish), "mean_response_tokens": response_tokens / num_samples},
        "timing_s": {"total": time.monotonic() - t0, "generate": t_gen, "reward": t_reward},
        "examples": examples,
        "per_prompt": per_prompt,
    }
