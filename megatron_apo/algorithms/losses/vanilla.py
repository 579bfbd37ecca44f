"""Vanilla PPO/GRPO (`loss_mode: vanilla`): the dual-clipped surrogate every loss starts from (docs/algorithms.md).

The smallest registered loss, and the template for a new one: one function, its declared inputs (none here), one
dense test in tests/unit/test_losses.py."""

from __future__ import annotations

from megatron_apo.algorithms.losses.common import LossContext
from megatron_apo.algorithms.registry import register_policy_loss


@register_policy_loss("vanilla")
def vanilla_loss(ctx: LossContext):
    loss = ctx.agg(ctx.pg)
    return loss, {"pg_loss": loss.detach()}
