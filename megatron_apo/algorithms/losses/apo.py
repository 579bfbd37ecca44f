"""APO (`loss_mode: apo_ratio`): the paper's ratio rectification (default) or the split push + pull form, on the safe
manifold of the reference's Top-K (docs/algorithms.md). A >= 0 tokens keep the vanilla loss in both forms.

The knobs the published descriptions leave open: `apo_anchor_ratio` (the paper form's virtual anchor ratio, `old` by
default), `apo_all_wrong_pull` (the pull alone on groups with no correct response) and `apo_min_anchor_mass` (no pull
where the reference's mass on S is too small for its anchors to mean anything)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_apo.algorithms.losses.anchors import SafeManifold, old_anchor_logprobs, ref_anchor_logprobs, safe_manifold
from megatron_apo.algorithms.losses.common import LossContext, clipped_ratio_term, masked_logsumexp, masked_mean, ratio
from megatron_apo.algorithms.registry import LossInputs, register_policy_loss
from megatron_apo.config import ConfigError

JUNK_METRIC_MASS = 1e-3  # apo/junk_anchor_frac's threshold when apo_min_anchor_mass is 0 (off)


def _apo_inputs(cfg) -> LossInputs:
    # Z_ref and the anchor weights pi_ref/Z_ref from the reference pass's Top-K log-probs in both forms (the split
    # form needs Z_ref for the junk anchors and their metric; a free column of the reference pass). log pi_old at the
    # anchors: the split form's M_old and the paper form's `old` anchor ratio.
    old_at_ref = cfg.apo_rectification == "split" or cfg.apo_anchor_ratio == "old"
    return LossInputs(ref_topk=cfg.apo_topk, ref_topk_logprobs=True, old_at_ref_topk=old_at_ref)


@dataclass
class _Anchors:
    sm: SafeManifold
    log_z_ref: torch.Tensor  # [B, T] log Z_ref, the reference's mass on S (0 where S is empty)
    ref_lp: torch.Tensor  # [B, T, K] log pi_ref at the anchors
    pulled: torch.Tensor  # [B, T] S is not empty and Z_ref >= apo_min_anchor_mass: the pull acts here
    all_wrong: torch.Tensor  # [B, T] tokens of all-wrong groups that get the all-wrong pull (False when it is off)
    metrics: dict


@register_policy_loss("apo_ratio", _apo_inputs)
def apo_ratio_loss(ctx: LossContext):
    a = _anchors(ctx)
    if ctx.cfg.apo_rectification == "paper":
        loss, metrics = _apo_paper(ctx, a)
    else:
        loss, metrics = _apo_split(ctx, a)
    return loss, {**metrics, **a.metrics}


def _anchors(ctx: LossContext) -> _Anchors:
    cfg, sm = ctx.cfg, safe_manifold(ctx)
    ref_lp = ref_anchor_logprobs(ctx, sm)
    log_z_ref, _ = masked_logsumexp(ref_lp, sm.safe)
    z_ref = torch.where(sm.has_safe, log_z_ref.exp(), ctx.zeros)  # an empty S has no reference mass
    tau = cfg.apo_min_anchor_mass
    pulled = sm.has_safe & ~(z_ref < tau)
    all_wrong = torch.zeros_like(ctx.mask)
    if cfg.apo_all_wrong_pull > 0:
        if ctx.all_wrong is None:
            raise ConfigError("all_wrong: algorithm.apo_all_wrong_pull > 0 needs the all-wrong group mask [B, T] "
                              "(RLBatch.all_wrong, from the rewards and group_index)")
        all_wrong = ctx.all_wrong & pulled
    metrics = {
        "apo/safe_mass": masked_mean(sm.log_mass.exp(), ctx.neg & sm.has_safe),
        "apo/junk_anchor_frac": masked_mean(z_ref < (tau if tau > 0 else JUNK_METRIC_MASS), ctx.neg),
        "apo/pulled_frac": masked_mean((ctx.neg & pulled).float(), ctx.mask),
    }
    if cfg.apo_all_wrong_pull > 0:
        metrics["apo/all_wrong_frac"] = masked_mean(all_wrong.float(), ctx.mask)
    return _Anchors(sm, log_z_ref, ref_lp, pulled, all_wrong, metrics)


def _anchor_ratio(ctx: LossContext, a: _Anchors) -> torch.Tensor:
    """The virtual anchor's ratio (`apo_anchor_ratio`); 0 where S is empty.

    old: sum_S w_k pi(k)/pi_old(k) with w_k = pi_ref(k)/Z_ref, each anchor's ratio clamped in log space like r;
    ref: sum_S w_k pi(k)/pi_ref(k) = M / Z_ref."""
    sm = a.sm
    if ctx.cfg.apo_anchor_ratio == "ref":
        r_anchor = ratio(sm.log_mass, a.log_z_ref)
    else:
        w = torch.where(sm.safe, torch.exp(a.ref_lp - a.log_z_ref.unsqueeze(-1)), torch.zeros_like(a.ref_lp))
        r_anchor = (w * ratio(sm.anchor_lp, old_anchor_logprobs(ctx, sm))).sum(-1)
    return torch.where(sm.has_safe, r_anchor, ctx.zeros)


def _apo_paper(ctx: LossContext, a: _Anchors):
    """A < 0: r~ = push*r - pull*r_anchor replaces r in the dual-clipped surrogate; all-wrong tokens: gamma times the
    clipped anchor ratio alone."""
    cfg, adv, neg = ctx.cfg, ctx.adv, ctx.neg
    lo, hi = 1.0 - cfg.clip_ratio_low, 1.0 + cfg.clip_ratio_high
    r_anchor = _anchor_ratio(ctx, a)
    r_tilde = cfg.apo_push_coeff * ctx.ratio() - cfg.apo_pull_coeff * torch.where(a.pulled, r_anchor, ctx.zeros)
    rect = torch.maximum(-adv * r_tilde, -adv * torch.clamp(r_tilde, lo, hi))
    rect = torch.minimum(rect, -adv * cfg.clip_ratio_c)
    token = torch.where(neg, rect, ctx.pg)
    metrics = {}
    if cfg.apo_all_wrong_pull > 0:
        aw = cfg.apo_all_wrong_pull * clipped_ratio_term(torch.ones_like(r_anchor), r_anchor, cfg.clip_ratio_low,
                                                         cfg.clip_ratio_high)
        aw = torch.where(a.all_wrong, aw, ctx.zeros)
        token = token + aw  # part of the PG term: same aggregation and mask
        metrics["apo/all_wrong_loss"] = ctx.agg(aw).detach()
        # max(-r_a, -clip(r_a)) is constant once r_a > 1 + clip_ratio_high
        metrics["apo/all_wrong_grad_off_frac"] = masked_mean(r_anchor > hi, a.all_wrong)
    loss = ctx.agg(token)
    # a*max(r~, clip(r~)) is constant for r~ < lo, and min(., a*c) for r~ > c: no gradient at all (push and pull)
    grad_off = (r_tilde < lo) | (r_tilde > cfg.clip_ratio_c)
    ctx.grad_off = torch.where(neg, grad_off, ctx.grad_off)  # A > 0 tokens keep the vanilla clip's
    return loss, {
        "pg_loss": loss.detach(),
        "apo/rectified_loss": ctx.agg(torch.where(neg, rect, ctx.zeros)).detach(),
        "apo/neg_grad_off_frac": masked_mean(grad_off, neg),
        # the median over this micro-batch's A < 0 tokens; a step logs the mean of its micro-batches' medians
        "apo/anchor_ratio": _masked_median(r_anchor, neg & a.sm.has_safe),
        **metrics,
    }


def _apo_split(ctx: LossContext, a: _Anchors):
    """A < 0: push*PG + pull*Pull, Pull a (clipped) ratio of the safe-manifold mass M / M_old; all-wrong tokens:
    gamma times Pull with u = 1, in the PG term."""
    cfg, adv, neg, zeros, agg, sm = ctx.cfg, ctx.adv, ctx.neg, ctx.zeros, ctx.agg, a.sm
    log_mass_old, _ = masked_logsumexp(old_anchor_logprobs(ctx, sm), sm.safe)
    rho = ratio(sm.log_mass, log_mass_old)

    def pull_of(u: torch.Tensor) -> torch.Tensor:
        if cfg.apo_pull_form == "ratio_clip":
            return clipped_ratio_term(u, rho, cfg.clip_ratio_low, cfg.clip_ratio_high)
        if cfg.apo_pull_form == "ratio":
            return -u * rho
        return -u * sm.log_mass  # "log"

    pulled = neg & a.pulled
    pull = torch.where(pulled, pull_of(adv.abs() if cfg.apo_pull_weight == "abs_adv" else torch.ones_like(adv)),
                       zeros)
    token = torch.where(neg, cfg.apo_push_coeff * ctx.pg, ctx.pg)
    metrics = {}
    if cfg.apo_all_wrong_pull > 0:
        aw = torch.where(a.all_wrong, cfg.apo_all_wrong_pull * pull_of(torch.ones_like(adv)), zeros)
        token = token + aw  # part of the PG term: same aggregation and mask
        metrics["apo/all_wrong_loss"] = agg(aw).detach()
    pg_agg, pull_agg = agg(token), agg(pull)
    loss = pg_agg + cfg.apo_pull_coeff * pull_agg
    r = ctx.ratio()
    # the dual-clipped PG has no gradient for r < 1 - low or r > clip_ratio_c; the clipped pull none for rho > 1 + high
    pg_off = (r < 1.0 - cfg.clip_ratio_low) | (r > cfg.clip_ratio_c)
    pull_off = rho > 1.0 + cfg.clip_ratio_high if cfg.apo_pull_form == "ratio_clip" else torch.zeros_like(neg)
    # a token's whole gradient is off when its push is clipped and it has no pull or the pull's clip holds too
    ctx.grad_off = torch.where(neg, pg_off & (pull_off | ~pulled), ctx.grad_off)
    return loss, {
        "pg_loss": pg_agg.detach(),
        "apo/push_loss": agg(torch.where(neg, cfg.apo_push_coeff * ctx.pg, zeros)).detach(),
        "apo/pull_loss": (cfg.apo_pull_coeff * pull_agg).detach(),
        "apo/pull_ratio": masked_mean(rho, pulled),
        "apo/neg_grad_off_frac": masked_mean(pg_off, neg),
        "apo/pull_grad_off_frac": masked_mean(pull_off, pulled),
        **metrics,
    }


def _masked_median(values: torch.Tensor, select: torch.Tensor) -> torch.Tensor:
    """The (lower) median of `values` over `select`, detached fp32; 0 when nothing is selected."""
    v = values.detach().float()[select.bool()]
    return v.median() if v.numel() else torch.zeros((), dtype=torch.float32, device=values.device)

