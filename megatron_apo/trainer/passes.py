"""The three model passes of an RL step, as loss functions for Megatron's forward-backward schedule.

Each pass runs on the last pipeline stage with this rank's vocab shard of the logits and writes its
results into the micro-batch dicts, so a later pass over the same micro-batches finds them there:

  reference pass (frozen reference model, forward only): ref_logprobs [b,T] and, when the loss mode
      declares it needs them, the vocab-parallel global Top-K of pi_ref, ref_topk_indices [b,T,K] and
      their log-probs ref_topk_logprobs  -- one pass gives all;
  old pass (policy before the update, forward only):    old_logprobs, old_anchor_logprobs = log pi_old at
      ref_topk_indices, and for CaSP old_topk_indices (Top-N of pi_old);
  train pass (policy, forward + backward):              compute_policy_loss(...).

Which optional inputs are computed follows the loss mode's registered declaration (`LossInputs`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_apo.algorithms.losses import LossInputs, compute_policy_loss, loss_inputs
from megatron_apo.config import AlgorithmConfig
from megatron_apo.models.routing import response_routing_mismatch
from megatron_apo.ops.vocab_parallel import vocab_parallel_logprob_stats
from megatron_apo.rollout.sampling import logprob_mismatch
from megatron_apo.trainer.batch import response_logits


@dataclass
class PassSettings:
    algorithm: AlgorithmConfig
    vocab_size: int  # the true vocabulary (Megatron's padded rows are excluded by the ops)
    temperature: float = 1.0  # the rollout temperature: log-probs are those of the sampling distribution
    tis_cap: float | None = None  # one-step-off-policy: truncated importance weights pi_old / pi_rollout
    routing: list | None = None  # MoE: router maps captured during the old-policy forward (moe_metrics.routing_capture)

    @property
    def inputs(self) -> LossInputs:
        """What the loss mode declared it needs (its `@register_policy_loss` inputs)."""
        return loss_inputs(self.algorithm)


def _scaled_response_logits(logits: torch.Tensor, batch: dict, temperature: float) -> torch.Tensor:
    rl = response_logits(logits, batch["resp_index"]).float()
    return rl / temperature if temperature != 1.0 else rl


def _stats(settings: PassSettings, rl: torch.Tensor, batch: dict, ids: torch.Tensor, topk: int = 0):
    """One pass over the vocabulary shard: log-probs at `ids` [b,T,n] and optionally the global Top-K."""
    return vocab_parallel_logprob_stats(rl, ids, topk=topk, vocab_size=settings.vocab_size,
                                        chunk_size=settings.algorithm.logprob_chunk_size,
                                        mask=batch["response_mask"], with_entropy=False)


def reference_pass(settings: PassSettings):
    def loss_fn(batch: dict, logits: torch.Tensor):
        rl = _scaled_response_logits(logits, batch, settings.temperature)
        k = settings.algorithm.apo_topk if settings.inputs.ref_topk or settings.algorithm.anchor_metrics else 0
        st = _stats(settings, rl, batch, batch["response_ids"].unsqueeze(-1), topk=k)
        batch["ref_logprobs"] = st.logprobs[..., 0].detach()
        if k:
            batch["ref_topk_indices"], batch["ref_topk_logprobs"] = st.topk_indices, st.topk_logprobs.detach()
        return rl.sum() * 0.0, {}

    return loss_fn


def old_policy_pass(settings: PassSettings):
    def loss_fn(batch: dict, logits: torch.Tensor):
        rl = _scaled_response_logits(logits, batch, settings.temperature)
        ids = batch["response_ids"].unsqueeze(-1)
        if "ref_topk_indices" in batch:  # log pi_old at the reference Top-K, for the APO pull ratio
            ids = torch.cat([ids, batch["ref_topk_indices"]], dim=-1)
        casp = settings.algorithm.casp_topn if settings.inputs.old_topn else 0
        st = _stats(settings, rl, batch, ids, topk=casp)
        batch["old_logprobs"] = st.logprobs[..., 0].detach()
        if "ref_topk_indices" in batch:
            batch["old_anchor_logprobs"] = st.logprobs[..., 1:].detach()
        if casp:
            batch["old_topk_indices"], batch["old_topk_logprobs"] = st.topk_indices, st.topk_logprobs.detach()
        m = batch["response_mask"]
        gap = batch["old_logprobs"] - batch["rollout_logprobs"]
        metrics = logprob_mismatch(batch["rollout_logprobs"], batch["old_logprobs"], m)
        if settings.routing is not None and batch.get("rollout_experts") is not None:
            metrics["rollout/routing_mismatch"] = response_routing_mismatch(settings.routing, batch)
        if settings.tis_cap is not None:
            # The rollouts came from the previous weights: scaling A by the truncated ratio scales every
            # A-linear loss term (the dual-clipped PG, its clip bound, the APO pull weight |A|) by it.
            w = torch.exp(gap.clamp(max=20.0)).clamp(max=settings.tis_cap) * m
            batch["advantages"] = batch["advantages"] * w
            metrics["rollout/tis_weight_mean"] = ((w * m).sum() / m.sum().clamp(min=1)).detach()
            metrics["rollout/tis_truncated_frac"] = (((gap.exp() > settings.tis_cap).float() * m).sum()
                                                     / m.sum().clamp(min=1)).detach()
        return rl.sum() * 0.0, metrics

    return loss_fn


def train_pass(settings: PassSettings):
    def loss_fn(batch: dict, logits: torch.Tensor):
        rl = _scaled_response_logits(logits, batch, settings.temperature)
        loss, metrics = compute_policy_loss(
            rl,
            batch["response_ids"],
            batch["old_logprobs"],
            batch["advantages"],
            batch["response_mask"],
            settings.algorithm,
            ref_logprobs=batch.get("ref_logprobs"),
            ref_topk_indices=batch.get("ref_topk_indices"),
            ref_topk_logprobs=batch.get("ref_topk_logprobs"),
            old_anchor_logprobs=batch.get("old_anchor_logprobs"),
            old_topk_indices=batch.get("old_topk_indices"),
            old_topk_logprobs=batch.get("old_topk_logprobs"),
            vocab_size=settings.vocab_size,
        )
        metrics = {k: (v.detach() if torch.is_tensor(v) else torch.tensor(float(v))) for k, v in metrics.items()}
        metrics["loss"] = loss.detach()
        return loss, metrics

    return loss_fn
