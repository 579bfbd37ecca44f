"""Token sampling shared by the CPU engine and the metrics: temperature, top-k, top-p, seeded generators.

The log-prob returned for a sampled token is taken from the distribution it was drawn from (after
temperature and top-k/top-p truncation + renormalisation, like vLLM's `processed_logprobs`). The
trainer's old log-probs use temperature only, over the full vocabulary; `logprob_mismatch` reports
how far the two are apart so truncation effects are visible in the metrics instead of silently
biasing the importance ratios.
"""

from __future__ import annotations

import hashlib

import torch

from megatron_apo.rollout.engine import SamplingParams


def request_seed(seed: int, prompt_index: int, sample_index: int) -> int:
    """A seed per (prompt, sample): results do not depend on how requests are batched or spread over engines."""
    digest = hashlib.blake2b(f"{seed}/{prompt_index}/{sample_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def processed_logprobs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """log-probs [..., V] of the distribution sampled from: logits / T, top-k, top-p, renormalised.

    Truncated tokens get -inf. Top-p keeps the smallest set of most likely tokens whose mass reaches top_p
    (the token that crosses the threshold is kept), as vLLM and HF do.
    """
    scores = logits.float() / params.temperature
    if params.top_k > 0 and params.top_k < scores.shape[-1]:
        kth = torch.topk(scores, params.top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, dim=-1, descending=True)
        probs = torch.softmax(sorted_scores, dim=-1)
        mass_before = torch.cumsum(probs, dim=-1) - probs  # mass of strictly more likely tokens
        drop_sorted = mass_before >= params.top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        scores = scores.masked_fill(drop, float("-inf"))
    return torch.log_softmax(scores, dim=-1)


def sample_tokens(
    logits: torch.Tensor, params: SamplingParams, generators: list[torch.Generator]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Samples one token per row of `logits` [B, V] with row b's own generator.

    Returns (token ids [B], their log-probs [B] under the processed distribution).
    """
    logp = processed_logprobs(logits, params)
    probs = logp.exp()
    # Inverse-CDF with one uniform per row: a row's draw depends only on its own generator and logits.
    u = torch.stack([torch.rand((), generator=g, dtype=torch.float64) for g in generators])
    cdf = torch.cumsum(probs.double(), dim=-1)
    tokens = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(-1), right=True).squeeze(-1)
    tokens = tokens.clamp_(max=probs.shape[-1] - 1)
    for b in torch.nonzero(probs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) == 0).flatten().tolist():
        # rounding at the cdf's flat tail can land on a truncated token: take the last kept one before it
        tokens[b] = int(torch.nonzero(probs[b, : tokens[b] + 1] > 0).max())
    return tokens, logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def logprob_mismatch(engine_logprobs: torch.Tensor, trainer_logprobs: torch.Tensor, mask: torch.Tensor) -> dict:
    """Rollout-vs-trainer log-prob mismatch over response tokens (metrics, not a loss), as 0-d tensors.

    `engine_logprobs` come from the sampled (processed) distribution, `trainer_logprobs` from the trainer's
    recomputation (temperature, no truncation). With top-k/top-p the engine's are >= the trainer's by the
    log of the kept mass; with neither, the gap is numerical noise (bf16 engines) plus weight staleness.
    The trainer logs these every step (its old-policy pass).
    """
    m = mask.to(engine_logprobs.dtype)
    n = m.sum().clamp(min=1)
    diff = (engine_logprobs - trainer_logprobs).float() * m
    return {
        "rollout/logprob_abs_diff": (diff.abs().sum() / n).detach(),
        "rollout/logprob_diff_mean": (diff.sum() / n).detach(),
        "rollout/prob_ratio_mean": ((torch.exp(-diff) * m).sum() / n).detach(),  # E[pi_trainer / pi_engine]
    }
