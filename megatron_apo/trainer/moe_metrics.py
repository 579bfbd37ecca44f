"""MoE training metrics: the router's load-balancing loss as megatron-core tracks it (docs/models.md).

The routers record, per layer, the load-balancing loss (without its coefficient) of every training forward
with gradients (the train pass only: the reference and old-policy forwards run without gradients). Once per
RL step `aux_loss_metrics` averages it over the micro-batches and the MoE layers, reduces it over the
pipeline, tensor and data-parallel ranks (megatron-core's own reduction) and clears the tracker.
Collective: every trainer rank calls it.
"""

from __future__ import annotations

import contextlib

TRACKED = "load_balancing_loss"  # megatron-core's name for the aux_loss load-balancing type


def aux_loss_metrics(model_cfg, aux_loss_coeff: float, num_micro_batches: int) -> dict[str, float]:
    """{"train/moe_aux_loss": mean over layers and micro-batches} when the aux loss is on, else {}.

    1.0 is perfectly balanced routing; larger means tokens crowd onto fewer experts.
    """
    if not (model_cfg.is_moe and aux_loss_coeff > 0):
        return {}
    from megatron.core.transformer.moe.moe_utils import track_moe_metrics

    totals: dict = {}
    # force_initialize: a rank whose stage ran no MoE forward still joins the reductions with zeros
    track_moe_metrics(loss_scale=1.0 / max(1, num_micro_batches), iteration=0, total_loss_dict=totals,
                      force_initialize=True, track_names=[TRACKED], num_layers=model_cfg.num_layers)
    return {"train/moe_aux_loss": float(totals[TRACKED])}


@contextlib.contextmanager
def routing_capture(policy_chunks: list, settings):
    """During the old-policy forward: records the policy's routing so the old pass can log
    rollout/routing_mismatch (docs/models.md). Only for one model chunk holding every layer (PP = 1)."""
    from megatron.core import parallel_state as ps

    from megatron_apo.models.routing import capture_routing

    cfg = policy_chunks[0].config
    if not cfg.num_moe_experts or len(policy_chunks) != 1 or ps.get_pipeline_model_parallel_world_size() != 1:
        yield
        return
    with capture_routing(policy_chunks[0]) as maps:
        settings.routing = maps
        try:
            yield
        finally:
            settings.routing = None
