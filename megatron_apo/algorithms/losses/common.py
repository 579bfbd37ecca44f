"""The pieces every loss shares: aggregation, KL estimators, the dual-clipped PG, ratios, and `LossContext` (what a
registered loss function receives). Formulas: docs/algorithms.md."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from megatron_apo.config import ConfigError

LOG_RATIO_CLAMP = 20.0

# kl_loss_type's names (config.KlLossType) -> the estimator each stands for
KL_LOSS_TYPES = {"kl": "k1", "k1": "k1", "abs": "abs", "mse": "k2", "k2": "k2", "low_var_kl": "k3", "k3": "k3"}


@dataclass
class LossContext:
    """What a registered loss function gets: the shared prologue's results for one micro-batch. Tensors are
    [B, T] unless noted; padding positions are neutral (0 advantage, masked ids), so nothing NaN leaks."""

    cfg: Any  # the validated AlgorithmConfig
    mask: torch.Tensor  # response mask, bool
    adv: torch.Tensor  # advantages times the importance weights (is_weights), 0 at padding
    neg: torch.Tensor  # A < 0 on response tokens
    ids: torch.Tensor  # sampled ids, 0 at padding
    logp: torch.Tensor  # log pi(y) (grad flows)
    old: torch.Tensor  # log pi_old(y)
    pg: torch.Tensor  # the vanilla dual-clipped token loss
    stats: Any  # LogProbStats of the fused vocab pass: entropy, top1_logprob, topk_* (the declared Top-N)
    agg: Callable[[torch.Tensor], torch.Tensor]  # the configured aggregation over the mask
    ref_topk_indices: Optional[torch.Tensor] = None  # [B, T, K] the reference Top-K ids (0 at padding)
    ref_topk_lp: Optional[torch.Tensor] = None  # [B, T, K] log pi at them (grad flows)
    ref_topk_logprobs: Optional[torch.Tensor] = None  # [B, T, K] log pi_ref at them
    old_anchor_logprobs: Optional[torch.Tensor] = None  # [B, T, K] log pi_old at them
    old_topk_logprobs: Optional[torch.Tensor] = None  # [B, T, N] log pi_old at pi_old's own Top-N
    all_wrong: Optional[torch.Tensor] = None  # [B, T] bool: the token's group has no correct response (masked)
    # [B, T] bool: the A != 0 tokens whose whole gradient is zero; the vanilla dual clip's, replaced by a loss whose
    # clipping differs (surrogate and pull). Feeds the per-position metrics (algorithm.position_metrics).
    grad_off: Optional[torch.Tensor] = None

    @property
    def lead(self) -> tuple:
        return tuple(self.mask.shape)

    @property
    def zeros(self) -> torch.Tensor:
        return torch.zeros(self.lead, dtype=torch.float32, device=self.mask.device)

    def ratio(self) -> torch.Tensor:
        """r = pi(y) / pi_old(y), clamped in log space."""
        return ratio(self.logp, self.old)

    def given(self, name: str, width: int) -> Optional[torch.Tensor]:
        """An optional [B, T, >=width] input cut to `width` (fp32), or None; a wrong shape names the argument."""
        t = getattr(self, name)
        if t is None:
            return None
        if tuple(t.shape[:-1]) != self.lead or t.shape[-1] < width:
            raise ValueError(f"compute_policy_loss: {name} has shape {tuple(t.shape)}, expected "
                             f"{self.lead + (width,)}")
        return t[..., :width].float()


def aggregate_loss(values: torch.Tensor, mask: torch.Tensor, mode: str) -> torch.Tensor:
    """Aggregates a per-token [B, T] term over the response mask (docs/algorithms.md, "Aggregation")."""
    m = mask.to(values.dtype)
    masked = torch.where(mask.bool(), values, torch.zeros_like(values))  # garbage at padding never leaks
    if mode == "token-mean":
        return masked.sum() / (m.sum() + 1e-8)
    if mode == "seq-mean-token-sum":
        return masked.sum(dim=-1).mean()
    if mode == "seq-mean-token-mean":
        return (masked.sum(dim=-1) / m.sum(dim=-1).clamp(min=1.0)).mean()
    if mode == "seq-mean-token-sum-norm":
        return masked.sum() / values.shape[-1]
    raise ConfigError(f"algorithm.loss_agg_mode={mode!r}: must be one of token-mean, seq-mean-token-sum, "
                      "seq-mean-token-mean, seq-mean-token-sum-norm")


def aggregation_denominator(mask: torch.Tensor, mode: str) -> torch.Tensor:
    """What `aggregate_loss` divides this [B, T] mask's summed term by: response tokens (+1e-8), sequences
    (both seq-mean modes: each sums or means a sequence first), or the padded length T. Token-budget micro-batches
    swap it for the mini-batch's (trainer/batch.py::global_loss_scale)."""
    if mode == "token-mean":
        return mask.float().sum() + 1e-8
    if mode in ("seq-mean-token-sum", "seq-mean-token-mean"):
        return torch.tensor(float(mask.shape[0]), device=mask.device)
    if mode == "seq-mean-token-sum-norm":
        return torch.tensor(float(mask.shape[-1]), device=mask.device)
    return aggregate_loss(mask.float(), mask, mode)  # the one-line ConfigError naming the modes


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kl_type: str) -> torch.Tensor:
    """Per-token KL estimator of pi vs pi_ref from the sampled token's log-probs (k1, abs, k2, k3)."""
    kind = KL_LOSS_TYPES.get(kl_type)
    if kind is None:
        raise ConfigError(f"algorithm.kl_loss_type={kl_type!r}: must be one of {', '.join(KL_LOSS_TYPES)}")
    diff = logprobs - ref_logprobs
    if kind == "k1":
        return diff
    if kind == "abs":
        return diff.abs()
    if kind == "k2":
        return 0.5 * diff.square()
    d = torch.clamp(-diff, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)  # log pi_ref - log pi
    return torch.clamp(torch.exp(d) - d - 1.0, -10.0, 10.0)


def ratio(log_new: torch.Tensor, log_old: torch.Tensor) -> torch.Tensor:
    """exp(clamp(log_new - log_old, -20, 20)): every ratio of the losses, sampled token or mass."""
    return torch.exp(torch.clamp(log_new - log_old, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))


def clipped_ratio_term(weight: torch.Tensor, rho: torch.Tensor, clip_low: float, clip_high: float) -> torch.Tensor:
    """max(-w rho, -w clip(rho, 1-low, 1+high)): PPO's pessimistic clip of a weighted ratio."""
    return torch.maximum(-weight * rho, -weight * torch.clamp(rho, 1.0 - clip_low, 1.0 + clip_high))


def dual_clip_pg(logprobs, old_logprobs, advantages, clip_low: float, clip_high: float, clip_c: float):
    """The dual-clipped PPO token loss, and the per-token clip indicators (for the metrics)."""
    log_ratio = torch.clamp(logprobs - old_logprobs, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    r = torch.exp(log_ratio)
    pg1 = -advantages * r
    pg2 = -advantages * torch.clamp(r, 1.0 - clip_low, 1.0 + clip_high)
    clip1 = torch.maximum(pg1, pg2)
    pg3 = -advantages * clip_c
    clip2 = torch.minimum(pg3, clip1)
    pg = torch.where(advantages < 0, clip2, clip1)
    clipped = pg2 > pg1
    clipped_lower = (clip1 > pg3) & (advantages < 0)
    return pg, log_ratio, clipped, clipped_lower


def masked_logsumexp(values: torch.Tensor, select: torch.Tensor):
    """log sum_{select} exp(values) over the last dim, and whether any was selected. NaN-free (forward and
    backward) for empty selections, whose result is 0 and must be masked by the caller."""
    has = select.any(dim=-1)
    x = torch.where(select, values, torch.full_like(values, float("-inf")))
    x = torch.where(has.unsqueeze(-1), x, torch.zeros_like(x))
    return torch.where(has, torch.logsumexp(x, dim=-1), torch.zeros_like(has, dtype=values.dtype)), has


def masked_mean(values: torch.Tensor, select: torch.Tensor) -> torch.Tensor:
    """Mean of `values` over `select` (detached, fp32; 0 when nothing is selected): the metrics."""
    sel = select.bool()
    v = torch.where(sel, values.detach().float(), torch.zeros((), dtype=torch.float32, device=values.device))
    return v.sum() / sel.sum().clamp(min=1)


def position_metrics(grad_off: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor, n: int) -> dict:
    """Per response position i < n: the share of tokens with A != 0 whose gradient is off (`pos/grad_off_frac_<i>`)
    and of A < 0 tokens (`pos/neg_grad_off_frac_<i>`); 0 where a position has no such token. Where along the answer
    the clip acts (a branch position, the stop token) is what these tell apart."""
    out = {}
    for i in range(n):
        at = torch.zeros_like(mask)
        if i < mask.shape[-1]:
            at[..., i] = mask[..., i]
        out[f"pos/grad_off_frac_{i}"] = masked_mean(grad_off, at & (adv != 0))
        out[f"pos/neg_grad_off_frac_{i}"] = masked_mean(grad_off, at & (adv < 0))
    return out
