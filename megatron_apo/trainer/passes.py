"""The three model passes of an RL step, as loss functions for Megatron's forward-backward schedule.

Each pass's loss function runs on the last pipeline stage with this rank's vocab shard of the logits. The forward-only
passes return typed outputs, one per micro-batch (keyed by the micro-batch's `mb_index`), kept by the pass object;
nothing is written into the micro-batch dicts:

  ReferencePass (frozen reference, forward only) -> RefOutputs: log pi_ref(y), and the vocab-parallel global Top-K of
      pi_ref (ids and log-probs) when the loss or the anchor metrics ask -- one vocab pass gives all;
  OldPolicyPass (policy before the update, forward only; reads RefOutputs for the Top-K ids) -> OldOutputs: log
      pi_old(y), log pi_old at the reference Top-K and at pi_old's own Top-N when asked, the rollout correction's
      loss weights (algorithm.rollout_correction), the rollout-mismatch metrics;
  TrainPass (policy, forward + backward; reads both) -> compute_policy_loss(...).

What is computed follows `loss_inputs` (algorithms/registry.py): the loss mode's declaration, the KL settings and the
anchor metrics, and nothing else. On earlier pipeline stages no loss function runs and the outputs stay None: only
the last stage, where every loss function runs, needs them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from megatron_apo.algorithms.losses import compute_policy_loss
from megatron_apo.algorithms.registry import LossInputs, loss_inputs
from megatron_apo.config import AlgorithmConfig
from megatron_apo.models.routing import response_routing_mismatch
from megatron_apo.ops.vocab_parallel import vocab_parallel_logprob_stats
from megatron_apo.parallel import control_plane
from megatron_apo.rollout.sampling import logprob_mismatch, pool_mismatch, rollout_correction
from megatron_apo.trainer.batch import global_loss_scale, response_logits


@dataclass
class PassSettings:
    algorithm: AlgorithmConfig
    vocab_size: int  # the true vocabulary (Megatron's padded rows are excluded by the ops)
    temperature: float = 1.0  # the rollout temperature: log-probs are those of the sampling distribution
    tis_cap: float | None = None  # one-step-off-policy's rollout.tis_cap: tis_token when rollout_correction is none
    routing: list | None = None  # MoE: router maps captured during the old-policy forward (moe_metrics.routing_capture)

    @property
    def correction(self) -> tuple[str, float]:
        """The rollout correction mode and its cap; rollout.tis_cap (one-step-off) is the tis_token case."""
        a = self.algorithm
        if str(a.rollout_correction) == "none" and self.tis_cap is not None:
            return "tis_token", self.tis_cap
        return str(a.rollout_correction), a.rollout_correction_cap

    @property
    def inputs(self) -> LossInputs:
        """What the passes compute: the loss mode's declaration, the KL settings, the anchor metrics."""
        return loss_inputs(self.algorithm)


@dataclass
class RefOutputs:
    """The frozen reference's results for one micro-batch, [b, T] / [b, T, K]; detached."""

    logprobs: Optional[torch.Tensor]  # log pi_ref(y)
    topk_indices: Optional[torch.Tensor] = None  # the global Top-K ids of pi_ref, by probability
    topk_logprobs: Optional[torch.Tensor] = None  # log pi_ref at them


@dataclass
class OldOutputs:
    """The pre-update policy's results for one micro-batch, [b, T] / [b, T, K|N]; detached."""

    logprobs: torch.Tensor  # log pi_old(y)
    at_ref_topk: Optional[torch.Tensor] = None  # log pi_old at the reference Top-K (APO's M_old)
    topn_logprobs: Optional[torch.Tensor] = None  # log pi_old at its own Top-N (CaSP)
    is_weights: Optional[torch.Tensor] = None  # the rollout correction's loss weights (sampling.rollout_correction)
    metrics: dict = field(default_factory=dict)  # rollout mismatch (and MoE routing) diagnostics


def _scaled_response_logits(logits: torch.Tensor, batch: dict, temperature: float) -> torch.Tensor:
    rl = response_logits(logits, batch["resp_index"], batch.get("resp_row")).float()
    return rl / temperature if temperature != 1.0 else rl


def _stats(settings: PassSettings, rl: torch.Tensor, batch: dict, ids: torch.Tensor, topk: int = 0):
    """One pass over the vocabulary shard: log-probs at `ids` [b,T,n] and optionally the global Top-K."""
    return vocab_parallel_logprob_stats(rl, ids, topk=topk, vocab_size=settings.vocab_size,
                                        chunk_size=settings.algorithm.logprob_chunk_size,
                                        mask=batch["response_mask"], with_entropy=False)


class ReferencePass:
    """Forward-only loss function of the reference model; `outputs[i]` is micro-batch i's RefOutputs."""

    def __init__(self, settings: PassSettings, num_micro_batches: int):
        self.settings, self.inputs = settings, settings.inputs
        self.outputs: list[Optional[RefOutputs]] = [None] * num_micro_batches

    def __call__(self, batch: dict, logits: torch.Tensor):
        rl = _scaled_response_logits(logits, batch, self.settings.temperature)
        k = self.inputs.ref_topk
        st = _stats(self.settings, rl, batch, batch["response_ids"].unsqueeze(-1), topk=k)
        self.outputs[batch["mb_index"]] = RefOutputs(
            st.logprobs[..., 0].detach(),
            st.topk_indices if k else None,
            st.topk_logprobs.detach() if k and self.inputs.ref_topk_logprobs else None,
        )
        return rl.sum() * 0.0, {}


class OldPolicyPass:
    """Forward-only loss function of the policy before the update; `outputs[i]` is micro-batch i's OldOutputs."""

    def __init__(self, settings: PassSettings, ref: list[Optional[RefOutputs]]):
        self.settings, self.inputs, self.ref = settings, settings.inputs, ref
        self.outputs: list[Optional[OldOutputs]] = [None] * len(ref)

    def __call__(self, batch: dict, logits: torch.Tensor):
        s = self.settings
        rl = _scaled_response_logits(logits, batch, s.temperature)
        ids = batch["response_ids"].unsqueeze(-1)
        at_ref = self.inputs.old_at_ref_topk
        if at_ref:  # log pi_old at the reference Top-K: one more column of the same vocab pass
            ids = torch.cat([ids, self.ref[batch["mb_index"]].topk_indices], dim=-1)
        st = _stats(s, rl, batch, ids, topk=self.inputs.topn)
        old = st.logprobs[..., 0].detach()
        m, rollout = batch["response_mask"], batch["rollout_logprobs"]
        metrics = logprob_mismatch(rollout, old, m)
        if s.routing is not None and batch.get("rollout_experts") is not None:
            metrics["rollout/routing_mismatch"] = response_routing_mismatch(s.routing, batch)
        # The engine sampled from pi_rollout, the loss's ratio starts at pi_old: weigh each token by the (truncated
        # or masked) ratio pi_old / pi_rollout (the loss scales the advantage by it, hence every A-linear term).
        mode, cap = s.correction
        a = s.algorithm
        is_weights, corr = rollout_correction(rollout, old, m, mode, cap, a.rollout_correction_lower,
                                              a.rollout_correction_upper)
        metrics.update(corr)
        self.outputs[batch["mb_index"]] = OldOutputs(
            old,
            st.logprobs[..., 1:].detach() if at_ref else None,
            st.topk_logprobs.detach() if self.inputs.topn else None,
            is_weights,
            metrics,
        )
        return rl.sum() * 0.0, {}


def gather_old_metrics(outputs: list[Optional[OldOutputs]]) -> dict:
    """The old-policy pass's metrics on every rank: means over the last stage's micro-batches, except the mismatch's
    max and sequence-level std, which are combined exactly (sampling.pool_mismatch)."""
    per_mb = [o.metrics for o in outputs if o is not None]
    out = control_plane.mean_over_reporting_ranks([{k: v for k, v in d.items() if not k.startswith("_mismatch/")}
                                                   for d in per_mb])
    pooled = [{k: float(v) for k, v in d.items() if k.startswith("_mismatch/") or k.endswith("_abs_diff_max")}
              for d in per_mb if "_mismatch/seq_n" in d]
    out.update(pool_mismatch([d for part in control_plane.all_gather_object(pooled) for d in part]))
    return out


class TrainPass:
    """The training loss function: the policy loss from the micro-batch and its reference / old-policy outputs."""

    def __init__(self, settings: PassSettings, ref: Optional[list[Optional[RefOutputs]]],
                 old: list[Optional[OldOutputs]]):
        self.settings, self.ref, self.old = settings, ref, old  # ref None: no reference pass ran (a loss without one)

    def __call__(self, batch: dict, logits: torch.Tensor):
        rl = _scaled_response_logits(logits, batch, self.settings.temperature)
        old = self.old[batch["mb_index"]]
        ref = self.ref[batch["mb_index"]] if self.ref is not None else RefOutputs(None)
        loss, metrics = compute_policy_loss(
            rl,
            batch["response_ids"],
            old.logprobs,
            batch["advantages"],
            batch["response_mask"],
            self.settings.algorithm,
            ref_logprobs=ref.logprobs,
            ref_topk_indices=ref.topk_indices,
            ref_topk_logprobs=ref.topk_logprobs,
            old_anchor_logprobs=old.at_ref_topk,
            old_topk_logprobs=old.topn_logprobs,
            is_weights=old.is_weights,
            all_wrong=batch.get("all_wrong"),
            vocab_size=self.settings.vocab_size,
        )
        if "agg_norm" in batch:  # token-budget micro-batches: the mini-batch's global normaliser, not this one's
            loss = loss * global_loss_scale(batch["response_mask"], str(self.settings.algorithm.loss_agg_mode),
                                            batch["agg_norm"])
        metrics = {k: (v.detach() if torch.is_tensor(v) else torch.tensor(float(v))) for k, v in metrics.items()}
        metrics["loss"] = loss.detach()
        return loss, metrics
