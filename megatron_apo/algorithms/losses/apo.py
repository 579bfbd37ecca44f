"""APO (`loss_mode: apo_ratio`): the paper's ratio rectification (default) or the split push + pull form, on the safe
manifold of the reference's Top-K (docs/algorithms.md). A >= 0 tokens keep the vanilla loss in both forms."""

from __future__ import annotations

import torch

from megatron_apo.algorithms.losses.anchors import SafeManifold, safe_manifold
from megatron_apo.algorithms.losses.common import LossContext, clipped_ratio_term, masked_logsumexp, masked_mean, ratio
from megatron_apo.algorithms.registry import LossInputs, register_policy_loss


def _apo_inputs(cfg) -> LossInputs:
    # paper: Z_ref from the reference pass's Top-K log-probs; split: M_old from the old pass's gather at those ids
    paper = cfg.apo_rectification == "paper"
    return LossInputs(ref_topk=cfg.apo_topk, ref_topk_logprobs=paper, old_at_ref_topk=not paper)


@register_policy_loss("apo_ratio", _apo_inputs)
def apo_ratio_loss(ctx: LossContext):
    sm = safe_manifold(ctx)
    if ctx.cfg.apo_rectification == "paper":
        return _apo_paper(ctx, sm)
    return _apo_split(ctx, sm)


def _anchor_ratio(ctx: LossContext, sm: SafeManifold) -> torch.Tensor:
    """The virtual anchor's ratio r_anchor = sum_S (pi_ref/Z_ref)(pi/pi_ref) = M / Z_ref; 0 where S is empty."""
    k = sm.anchor_lp.shape[-1]
    ref_lp = torch.where(ctx.mask.unsqueeze(-1), ctx.given("ref_topk_logprobs", k), torch.zeros_like(sm.anchor_lp))
    log_z_ref, _ = masked_logsumexp(ref_lp, sm.safe)
    return torch.where(sm.has_safe, ratio(sm.log_mass, log_z_ref), ctx.zeros)


def _apo_paper(ctx: LossContext, sm: SafeManifold):
    """A < 0: r~ = push*r - pull*r_anchor replaces r in the dual-clipped surrogate."""
    cfg, adv, neg = ctx.cfg, ctx.adv, ctx.neg
    r_anchor = _anchor_ratio(ctx, sm)
    r_tilde = cfg.apo_push_coeff * ctx.ratio() - cfg.apo_pull_coeff * r_anchor
    lo, hi = 1.0 - cfg.clip_ratio_low, 1.0 + cfg.clip_ratio_high
    rect = torch.maximum(-adv * r_tilde, -adv * torch.clamp(r_tilde, lo, hi))
    rect = torch.minimum(rect, -adv * cfg.clip_ratio_c)
    loss = ctx.agg(torch.where(neg, rect, ctx.pg))
    return loss, {
        "pg_loss": loss.detach(),
        "apo/rectified_loss": ctx.agg(torch.where(neg, rect, ctx.zeros)).detach(),
        "apo/rectified_clipfrac": masked_mean(((r_tilde < lo) | (r_tilde > hi)).float(), neg),
        "apo/anchor_ratio": masked_mean(r_anchor, neg & sm.has_safe),
        "apo/pulled_frac": masked_mean((neg & sm.has_safe).float(), ctx.mask),
    }


def _apo_split(ctx: LossContext, sm: SafeManifold):
    """A < 0: push*PG + pull*Pull, Pull a (clipped) ratio of the safe-manifold mass M / M_old."""
    cfg, adv, neg, zeros, agg = ctx.cfg, ctx.adv, ctx.neg, ctx.zeros, ctx.agg
    old_lp = ctx.given("old_anchor_logprobs", sm.anchor_lp.shape[-1])
    if old_lp is not None:
        old_lp = torch.where(ctx.mask.unsqueeze(-1), old_lp, sm.anchor_lp.detach())
        log_mass_old, _ = masked_logsumexp(old_lp, sm.safe)
    else:  # on-policy: M_old = sg(M)
        log_mass_old = sm.log_mass.detach()
    rho = ratio(sm.log_mass, log_mass_old)
    w = adv.abs() if cfg.apo_pull_weight == "abs_adv" else torch.ones_like(adv)
    if cfg.apo_pull_form == "ratio_clip":
        pull = clipped_ratio_term(w, rho, cfg.clip_ratio_low, cfg.clip_ratio_high)
    elif cfg.apo_pull_form == "ratio":
        pull = -w * rho
    else:  # "log"
        pull = -w * sm.log_mass
    pulled = neg & sm.has_safe
    pull = torch.where(pulled, pull, zeros)
    push = torch.where(neg, cfg.apo_push_coeff * ctx.pg, zeros)
    pg_agg, pull_agg = agg(torch.where(neg, cfg.apo_push_coeff * ctx.pg, ctx.pg)), agg(pull)
    loss = pg_agg + cfg.apo_pull_coeff * pull_agg
    return loss, {
        "pg_loss": pg_agg.detach(),
        "apo/push_loss": agg(push).detach(),
        "apo/pull_loss": (cfg.apo_pull_coeff * pull_agg).detach(),
        "apo/pull_ratio": masked_mean(rho, pulled),
        "apo/pull_clipfrac": masked_mean(((rho < 1 - cfg.clip_ratio_low) | (rho > 1 + cfg.clip_ratio_high)).float(),
                                         pulled),
        "apo/pulled_frac": masked_mean(pulled.float(), ctx.mask),
    }
