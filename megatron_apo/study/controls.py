"""The study's artifact control as a registered loss (`algorithm.loss_modules: [megatron_apo.study.controls]`).

`apo_neg_clipped`: the vanilla dual-clipped surrogate with every A < 0 token's gradient removed (its value is kept,
so the logged loss is comparable). It is what a clipped APO form degenerates to when the clip holds every negative
token constant: if a form "helps" only as much as this control, its effect is the switched-off negative gradient,
not the anchor pull. Without KL or entropy terms its gradient equals GRPO on positive samples only
(`algorithm.adv_sign_filter=positive`), which reaches the same update through the advantages instead of the loss.
"""

from __future__ import annotations

import torch

from megatron_apo.algorithms.losses.common import LossContext
from megatron_apo.algorithms.registry import register_policy_loss

NEG_CLIPPED = "apo_neg_clipped"


@register_policy_loss(NEG_CLIPPED)
def apo_neg_clipped_loss(ctx: LossContext):
    token = torch.where(ctx.neg, ctx.pg.detach(), ctx.pg)
    ctx.grad_off = ctx.neg | ctx.grad_off  # A > 0 tokens keep the vanilla clip's
    loss = ctx.agg(token)
    # by construction every A < 0 token's surrogate gradient is off (the metric APO's forms log as a share)
    off = torch.tensor(1.0 if bool((ctx.neg & ctx.mask).any()) else 0.0)
    return loss, {"pg_loss": loss.detach(), "apo/neg_grad_off_frac": off}
