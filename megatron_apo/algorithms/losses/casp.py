"""CaSP (`loss_mode: casp`) as SimKO's public code: entropy-gated uniform Top-N smoothing of correct responses'
gradient and a stronger push on a wrong top-1 token, inside one PPO clip (docs/algorithms.md)."""

from __future__ import annotations

import torch

from megatron_apo.algorithms.losses.common import LossContext, masked_mean, ratio
from megatron_apo.algorithms.registry import LossInputs, register_policy_loss


@register_policy_loss("casp", lambda cfg: LossInputs(topn=cfg.casp_topn))
def casp_loss(ctx: LossContext):
    cfg, adv, agg, mask = ctx.cfg, ctx.adv, ctx.agg, ctx.mask
    # this pass's own Top-N (the fused vocab pass recomputes it); pi_old's Top-N log-probs rank by rank (SimKO)
    top_lp, top_idx = ctx.stats.topk_logprobs, ctx.stats.topk_indices
    n = top_lp.shape[-1]
    old_top = ctx.given("old_topk_logprobs", n)
    old_top = top_lp.detach() if old_top is None else torch.where(mask.unsqueeze(-1), old_top, top_lp.detach())
    r = ctx.ratio()
    r_i = ratio(top_lp, old_top)
    # value N*r, gradient r * sum_i grad log pi(c_i): the positive update spread uniformly over the Top-N
    topk_sum = ((r.detach().unsqueeze(-1) / r_i.detach()) * r_i).sum(-1)
    ent = ctx.stats.entropy.detach()
    q = torch.nanquantile(torch.where(mask, ent, torch.full_like(ent, float("nan"))), cfg.casp_entropy_quantile,
                          dim=-1, keepdim=True)  # per response, linear interpolation (torch.quantile's)
    w = (mask & (ent > q)).float()  # high-entropy ("forking") tokens; NaN rows (no token) compare False
    a_w = cfg.casp_alpha * w
    r_mix = torch.where(adv > 0, (1.0 - a_w) * r + (a_w / n) * topk_sum, r)
    top1 = ctx.neg & (ctx.ids == top_idx[..., 0])  # the sampled wrong token is pi's argmax
    adv_mix = torch.where(ctx.neg, adv * (1.0 + cfg.casp_top1_gamma * w * top1.float()), adv)
    token_loss = torch.maximum(-adv_mix * r_mix, -adv_mix * torch.clamp(r_mix, 1.0 - cfg.clip_ratio_low,
                                                                        1.0 + cfg.clip_ratio_high))
    loss = agg(token_loss)
    lo_r, hi_r = 1.0 - cfg.clip_ratio_low, 1.0 + cfg.clip_ratio_high
    ctx.grad_off = ((adv_mix > 0) & (r_mix.detach() > hi_r)) | ((adv_mix < 0) & (r_mix.detach() < lo_r))
    return loss, {
        "pg_loss": loss.detach(),
        "casp/forking_frac": masked_mean(w, mask),
        "casp/top1_wrong_frac": masked_mean((top1 & (w > 0)).float(), ctx.neg),
        "casp/topn_mass": masked_mean(top_lp.detach().exp().sum(-1), mask),
    }
