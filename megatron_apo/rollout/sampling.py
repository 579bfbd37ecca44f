"""Token sampling shared by the CPU engine and the metrics: temperature, top-k, top-p, seeded generators.

The log-prob returned for a sampled token is taken from the distribution it was drawn from (after
temperature and top-k/top-p truncation + renormalisation, like vLLM's `processed_logprobs`). The
trainer's old log-probs use temperature only, over the full vocabulary; `logprob_mismatch` reports
how far the two are apart so truncation effects are visible in the metrics instead of silently
biasing the importance ratios; `rollout_correction` turns the per-token ratio into the loss's weights
(`algorithm.rollout_correction`, docs/training.md).
"""

from __future__ import annotations

import hashlib
import math

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
    The trainer logs these every step (its old-policy pass). With the token log-ratio r = log pi_trainer -
    log pi_engine (tokens drawn from the engine): `rollout/mismatch_k3_kl` the mean of exp(r) - 1 - r (k3, an
    estimate of KL(pi_engine || pi_trainer)); `..._abs_diff_mean` / `..._abs_diff_max` of |r|;
    `..._ratio_outside_frac` the share of tokens with exp(r) outside [0.5, 2]; `..._seq_log_ratio_std` the std
    over sequences of sum_t r (the spread of the sequence-level ratio). The `_mismatch/` keys are the moments
    `pool_mismatch` needs to combine the max and the std exactly over micro-batches and ranks.
    """
    m = mask.to(engine_logprobs.dtype)
    n = m.sum().clamp(min=1)
    diff = torch.where(mask.bool(), (engine_logprobs - trainer_logprobs).float(), 0.0)  # padding may hold junk
    r = -diff  # log pi_trainer / pi_engine, 0 at padding
    outside = (r < math.log(0.5)) | (r > math.log(2.0))
    has_tokens = m.sum(-1) > 0
    seq = r.sum(-1)[has_tokens]
    seq_n = float(seq.numel())
    seq_std = seq.std(unbiased=False) if seq.numel() else seq.new_zeros(())
    return {
        "rollout/logprob_abs_diff": (diff.abs().sum() / n).detach(),
        "rollout/logprob_diff_mean": (diff.sum() / n).detach(),
        "rollout/prob_ratio_mean": ((torch.exp(-diff) * m).sum() / n).detach(),  # E[pi_trainer / pi_engine]
        "rollout/mismatch_k3_kl": ((torch.expm1(r.clamp(max=20.0)) - r) * m).sum().div(n).detach(),
        "rollout/mismatch_abs_diff_mean": (r.abs().sum() / n).detach(),
        "rollout/mismatch_abs_diff_max": r.abs().max().detach() if r.numel() else r.new_zeros(()),
        "rollout/mismatch_ratio_outside_frac": ((outside.float() * m).sum() / n).detach(),
        "rollout/mismatch_seq_log_ratio_std": seq_std.detach(),
        "_mismatch/seq_n": torch.tensor(seq_n),
        "_mismatch/seq_sum": seq.sum().detach(),
        "_mismatch/seq_sumsq": seq.square().sum().detach(),
    }


def pool_mismatch(per_mb: list[dict]) -> dict:
    """The max |delta log-prob| and the sequence log-ratio std over all micro-batches' `logprob_mismatch` outputs
    (of every rank), from their maxima and moments; a mean of per-micro-batch values would be neither."""
    if not per_mb:
        return {}
    n = sum(float(m["_mismatch/seq_n"]) for m in per_mb)
    s1 = sum(float(m["_mismatch/seq_sum"]) for m in per_mb)
    s2 = sum(float(m["_mismatch/seq_sumsq"]) for m in per_mb)
    var = max(0.0, s2 / n - (s1 / n) ** 2) if n else 0.0
    return {"rollout/mismatch_abs_diff_max": max(float(m["rollout/mismatch_abs_diff_max"]) for m in per_mb),
            "rollout/mismatch_seq_log_ratio_std": math.sqrt(var)}


def rollout_correction(engine_logprobs: torch.Tensor, trainer_logprobs: torch.Tensor, mask: torch.Tensor,
                       mode: str, cap: float = 2.0, lower: float = 0.5, upper: float = 2.0):
    """The loss weights [B, T] that correct the rollout-vs-trainer mismatch, and their metrics.

    ratio = pi_trainer / pi_engine per token (pi_trainer: the old-policy pass, the policy the loss's PPO ratio
    starts from). tis_token: min(ratio, cap); tis_seq: min(prod_t ratio, cap), the sequence's product taken in log
    space and broadcast over its tokens; mask_token / mask_seq: 1 where the token's / the sequence's ratio is in
    [lower, upper], else 0. Padding gets 0. Returns (None, {}) for `none`. Metrics:
    `rollout/correction_weight_mean` over response tokens, and the share of response tokens whose weight was
    truncated (`rollout/correction_truncated_frac`, tis_*) or masked (`rollout/correction_masked_frac`, mask_*).
    """
    mode = str(mode)
    if mode == "none":
        return None, {}
    if mode not in ("tis_token", "tis_seq", "mask_token", "mask_seq"):
        raise ValueError(f"rollout_correction: unknown mode {mode!r}")
    m = mask.bool()
    log_ratio = torch.where(m, trainer_logprobs.float() - engine_logprobs.float(), 0.0)
    if mode.endswith("_seq"):  # one log-ratio per sequence: the sum over its response tokens
        log_ratio = log_ratio.sum(-1, keepdim=True).expand_as(log_ratio)
    if mode.startswith("tis"):
        hit = log_ratio > math.log(cap)
        weights = torch.exp(log_ratio.clamp(max=math.log(cap)))
        key = "rollout/correction_truncated_frac"
    else:
        lo = math.log(lower) if lower > 0 else float("-inf")
        hit = (log_ratio < lo) | (log_ratio > math.log(upper))
        weights = (~hit).float()
        key = "rollout/correction_masked_frac"
    weights = torch.where(m, weights, 0.0)
    n = m.sum().clamp(min=1)
    return weights, {"rollout/correction_weight_mean": (weights.sum() / n).detach(),
                     key: ((hit & m).float().sum() / n).detach()}
