"""Exact pass@k on tasks whose valid answers can be listed: p(valid | prompt) by teacher forcing, no sampling.

For a prompt x with valid answers a_1..a_m (each the token ids the tokenizer gives it), the chance that one sample
is valid is

    p(valid | x) = sum_i  prod_t pi_T(a_i,t | x, a_i,<t) * pi_T(stop | x, a_i)

under the distribution the engine samples from (`rollout.sampling.processed_logprobs`: logits / temperature, then
top-k / top-p), with the stop-token term summed over the tokenizer's stop ids. Then pass@k = 1 - (1 - p)^k exactly
(k independent samples). An answer whose tokens and stop do not fit in `max_new_tokens` is left out (a sample of it
would be cut off). Only each answer's own tokenization counts (another token split of the same text is also
accepted by a string verifier, so p is a lower bound; for a policy trained on the canonical split the difference is
below the sampled estimate's noise, which tests/unit/test_exact_eval.py checks).

The logits come from a `RolloutEngine.logits` probe (the CPU engine reads the exported HF weights): the same
forward the engine samples with.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Callable, Sequence

import torch

from megatron_apo.rollout.engine import SamplingParams
from megatron_apo.rollout.sampling import processed_logprobs

EXACT_FORMAT = "megatron-apo/exact_pass_at_k/v1"

LogitsFn = Callable[[Sequence[Sequence[int]]], torch.Tensor]  # equal-length sequences -> [B, S, V] logits


def listed_answers(data_source: str, ground_truth: str) -> list[str]:
    """The valid answers of a row whose task lists them (the toy tasks' verifiers); InputError otherwise."""
    from megatron_apo.config import InputError
    from megatron_apo.rewards.codes import CODE_DATA_SOURCE, valid_codes
    from megatron_apo.rewards.squeeze import SQUEEZE_DATA_SOURCE, valid_sequences

    prefix = data_source.split("/", 1)[0]
    if prefix == CODE_DATA_SOURCE:
        return sorted(valid_codes(ground_truth))
    if prefix == SQUEEZE_DATA_SOURCE:
        return sorted(valid_sequences(ground_truth))
    raise InputError(f"exact evaluation: data source {data_source!r} does not list its valid answers "
                     f"(exact pass@k supports {CODE_DATA_SOURCE}/* and {SQUEEZE_DATA_SOURCE}/*; use sampled pass@k)")


@torch.no_grad()
def valid_probs(logits_fn: LogitsFn, prompts: Sequence[Sequence[int]], answers: Sequence[Sequence[Sequence[int]]],
                stop_ids: Sequence[int], params: SamplingParams, batch_size: int = 256) -> list[float]:
    """p(valid | prompt) for each prompt: the summed probability of its answers, each followed by a stop token."""
    stop = torch.tensor(list(stop_ids), dtype=torch.long)
    seqs = [(i, list(p), list(a)) for i, (p, ans) in enumerate(zip(prompts, answers)) for a in ans
            if len(a) + 1 <= params.max_new_tokens]
    # equal lengths per forward (the probe's contract): group by length, so no padding is needed at all
    by_len: dict[int, list] = defaultdict(list)
    for s in seqs:
        by_len[len(s[1]) + len(s[2])].append(s)
    total = [0.0] * len(prompts)
    for length, group in sorted(by_len.items()):
        for start in range(0, len(group), batch_size):
            chunk = group[start:start + batch_size]
            lp = processed_logprobs(logits_fn([p + a for _, p, a in chunk]), params)  # [B, S, V]
            for row, (i, p, a) in enumerate(chunk):
                # the logits at position j predict token j + 1: the answer's tokens, then a stop after the last
                pos = torch.arange(len(p) - 1, length - 1)
                ans_lp = lp[row, pos, torch.tensor(a)].sum() if a else torch.zeros(())
                stop_lp = torch.logsumexp(lp[row, length - 1, stop], dim=0)
                total[i] += float(torch.exp(ans_lp + stop_lp))
    return [min(1.0, t) for t in total]


def exact_pass_at_k(p: float, k: int) -> float:
    return 1.0 - (1.0 - p) ** k


def summarise(per_prompt: list[dict], ks: Sequence[int]) -> dict:
    n = max(len(per_prompt), 1)
    return {"num_prompts": len(per_prompt),
            **{f"pass@{k}": sum(exact_pass_at_k(r["p_valid"], k) for r in per_prompt) / n for k in ks}}


def evaluate_exact(logits_fn: LogitsFn, tokenizer, prompts, params: SamplingParams, ks: Sequence[int],
                   label: str = "run", meta: dict | None = None) -> dict:
    """Exact pass@k of `prompts` (data.dataset.EncodedPrompt) whose rows list their valid answers; JSON-ready,
    with `per_prompt` [{row, data_source, p_valid}] and pass@k overall and per data source."""
    answers = [[tokenizer.encode(a) for a in listed_answers(p.row.data_source, p.row.ground_truth)] for p in prompts]
    probs = valid_probs(logits_fn, [p.prompt_ids for p in prompts], answers, tokenizer.stop_token_ids, params)
    per_prompt = [{"row": p.row.index, "data_source": p.row.data_source, "p_valid": q}
                  for p, q in zip(prompts, probs)]
    by_source: dict[str, list[dict]] = defaultdict(list)
    for r in per_prompt:
        by_source[r["data_source"]].append(r)
    return {"format": EXACT_FORMAT, "label": label, "meta": dict(meta or {}), "k_values": list(ks),
            "sampling": {"temperature": params.temperature, "top_p": params.top_p, "top_k": params.top_k,
                         "max_new_tokens": params.max_new_tokens},
            "overall": summarise(per_prompt, ks),
            "per_data_source": {ds: summarise(rows, ks) for ds, rows in sorted(by_source.items())},
            "per_prompt": per_prompt}


def evaluate_checkpoint_exact(checkpoint: str, val_files: Sequence[str], tokenizer_path: str, params: SamplingParams,
                              ks: Sequence[int], scratch, max_prompt_length: int | None = None,
                              label: str = "run", meta: dict | None = None) -> dict:
    """Exact pass@k of a Megatron checkpoint (or an HF folder): exported with the converter, read by the CPU
    engine in this process, whose probe logits are teacher-forced."""
    from pathlib import Path

    from megatron_apo.data.dataset import PromptDataset
    from megatron_apo.data.tokenizer import load_tokenizer
    from megatron_apo.eval.engines import hf_folder_for

    tok = load_tokenizer(tokenizer_path)
    ds = PromptDataset.from_parquet(list(val_files), tok, max_prompt_length)
    prompts = [ds[i] for i in range(len(ds))]
    with hf_folder_for(Path(checkpoint), Path(scratch)) as hf:
        engine = _cpu_engine(hf)
        try:
            return evaluate_exact(engine.logits, tok, prompts, params, ks, label=label, meta=meta)
        finally:
            engine.close()


def _cpu_engine(hf_dir):
    """The CPU rollout engine on an HF folder (its checksummed shards are verified when it reads them)."""
    from megatron_apo.rollout.cpu_engine import CPUEngine

    return CPUEngine(model_path=str(hf_dir), max_batch_size=256)


__all__ = ["EXACT_FORMAT", "evaluate_checkpoint_exact", "evaluate_exact", "exact_pass_at_k", "listed_answers",
           "summarise", "valid_probs"]
