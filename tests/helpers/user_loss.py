"""A user's loss outside the package, for `algorithm.loss_modules: [tests.helpers.user_loss]` (tests/unit/
test_loss_registry.py, tests/e2e/test_trainer.py): vanilla's loss, with the reference Top-K declared as an input and
a metric of its own computed from it."""

from megatron_apo.algorithms.losses import LossInputs, register_policy_loss
from megatron_apo.algorithms.losses.common import masked_mean


@register_policy_loss("test_user_loss_module", lambda cfg: LossInputs(ref_topk=cfg.apo_topk))
def user_loss(ctx):
    loss = ctx.agg(ctx.pg)
    mass = masked_mean(ctx.ref_topk_lp.detach().exp().sum(-1), ctx.mask)  # pi's mass on the reference Top-K
    return loss, {"pg_loss": loss.detach(), "user/ref_topk_mass": mass}
