"""RL policy losses on vocab-sharded logits, one `loss_mode` per file, each registered with
`@register_policy_loss(name, inputs)` (algorithms/registry.py):

  core.py     compute_policy_loss: the shared prologue (one fused vocab pass, the dual-clipped PG) and epilogue
              (KL, entropy, common metrics) around the mode's function
  common.py   aggregation, KL estimators, ratios, LossContext (what a mode's function receives)
  anchors.py  APO's safe manifold (reference Top-K minus y) and the anchor metrics
  vanilla.py, apo.py, casp.py   the built-in modes

Formulas and sources: docs/algorithms.md (our specification built from the published descriptions of APO and CaSP;
not bit-parity with any official code). Adding a loss is one function in one file and one dense test.
"""

from megatron_apo.algorithms.losses import apo, casp, vanilla  # noqa: F401  (the built-ins register on import)
from megatron_apo.algorithms.losses.common import (
    KL_LOSS_TYPES,
    LossContext,
    aggregate_loss,
    clipped_ratio_term,
    dual_clip_pg,
    kl_penalty,
    ratio,
)
from megatron_apo.algorithms.losses.core import compute_policy_loss
from megatron_apo.algorithms.registry import (
    POLICY_LOSS_REGISTRY,
    LossInputs,
    get_policy_loss,
    loss_inputs,
    register_policy_loss,
    required_inputs,
)

__all__ = ["KL_LOSS_TYPES", "LossContext", "LossInputs", "POLICY_LOSS_REGISTRY", "aggregate_loss",
           "clipped_ratio_term", "compute_policy_loss", "dual_clip_pg", "get_policy_loss", "kl_penalty", "loss_inputs",
           "ratio", "register_policy_loss", "required_inputs"]
