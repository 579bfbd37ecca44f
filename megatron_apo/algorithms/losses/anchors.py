"""APO's safe manifold at each position: S = the reference's Top-K minus the sampled token (`apo_exclude_sampled`),
the policy's mass on it, M = sum_S pi, and the log-probs of pi_ref and pi_old at its anchors. The APO loss builds on
it; the anchor metrics log it for every mode (`algorithm.anchor_metrics`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_apo.algorithms.losses.common import LossContext, masked_logsumexp, masked_mean


@dataclass
class SafeManifold:
    anchor_lp: torch.Tensor  # [B, T, K] log pi at the reference Top-K (grad flows)
    in_topk: torch.Tensor  # [B, T, K] bool: the anchor is the sampled token
    safe: torch.Tensor  # [B, T, K] bool: the anchor belongs to S
    log_mass: torch.Tensor  # [B, T] log M (0 where S is empty)
    has_safe: torch.Tensor  # [B, T] S is not empty


def safe_manifold(ctx: LossContext) -> SafeManifold:
    anchors, anchor_lp = ctx.ref_topk_indices, ctx.ref_topk_lp
    in_topk = anchors == ctx.ids.unsqueeze(-1)
    safe = ~in_topk if ctx.cfg.apo_exclude_sampled else torch.ones_like(in_topk)
    log_mass, has_safe = masked_logsumexp(anchor_lp, safe)
    return SafeManifold(anchor_lp, in_topk, safe, log_mass, has_safe)


def ref_anchor_logprobs(ctx: LossContext, sm: SafeManifold) -> torch.Tensor:
    """log pi_ref at the anchors [B, T, K] (0 at padding)."""
    ref_lp = ctx.given("ref_topk_logprobs", sm.anchor_lp.shape[-1])
    return torch.where(ctx.mask.unsqueeze(-1), ref_lp, torch.zeros_like(sm.anchor_lp))


def old_anchor_logprobs(ctx: LossContext, sm: SafeManifold) -> torch.Tensor:
    """log pi_old at the anchors [B, T, K]; without them, exact on-policy: sg(log pi)."""
    old_lp = ctx.given("old_anchor_logprobs", sm.anchor_lp.shape[-1])
    if old_lp is None:
        return sm.anchor_lp.detach()
    return torch.where(ctx.mask.unsqueeze(-1), old_lp, sm.anchor_lp.detach())


def anchor_metrics(ctx: LossContext) -> dict[str, torch.Tensor]:
    sm = safe_manifold(ctx)
    return {
        "anchor/topk_mass": masked_mean(sm.anchor_lp.detach().exp().sum(-1), ctx.mask),
        "anchor/safe_mass": masked_mean(sm.log_mass.exp(), ctx.mask & sm.has_safe),
        "anchor/safe_mass_wrong": masked_mean(sm.log_mass.exp(), ctx.neg & sm.has_safe),
        "anchor/sampled_in_topk": masked_mean(sm.in_topk.any(-1).float(), ctx.mask),
    }
