"""The three model passes of an RL step, as loss functions for Megatron's forward-backward schedule.

Each pass runs on the last pipeline stage with this rank's vocab shard of the logits and writes its
results into the micro-batch dicts, so a later pass over the same micro-batches finds them there:

  reference pass (frozen reference model, forward only): ref_logprobs [b,T] and the vocab-parallel global
      Top-K of pi_ref, ref_topk_indices [b,T,K]  -- one pass gives both;
  old pass (policy before the update, forward only):    old_logprobs, old_anchor_logprobs = log pi_old at
      ref_topk_indices, and for CaSP old_topk_indices (Top-N of pi_old);
  train pass (policy, forward + backward):              compute_policy_loss(...).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_apo.algorithms.losses import compute_policy_loss
from megatron_apo.config import AlgorithmConfig
from megatron_apo.ops.vocab_parallel import (
    vocab_parallel_gather_logprobs,
    vocab_parallel_logprobs,
    vocab_parallel_topk,
)
from megatron_apo.trainer.batch import response_logits


@dataclass
class PassSettings:
    algorithm: AlgorithmConfig
    vocab_size: int  # the true vocabulary (Megatron's padded rows are excluded by the ops)
    temperature: float = 1.0  # the rollout temperature: log-probs are those of the sampling distribution

    @property
    def needs_ref_topk(self) -> bool:
        return self.algorithm.loss_mode == "apo_ratio"

    @property
    def needs_ref_logprobs(self) -> bool:
        return self.algorithm.use_kl_loss or self.algorithm.use_kl_loss_on_wrong


def _scaled_response_logits(logits: torch.Tensor, batch: dict, temperature: float) -> torch.Tensor:
    rl = response_logits(logits, batch["resp_index"]).float()
    return rl / temperature if temperature != 1.0 else rl


def _ops_kwargs(s: PassSettings) -> dict:
    return {"vocab_size": s.vocab_size, "chunk_size": s.algorithm.logprob_chunk_size}


def reference_pass(settings: PassSettings):
    def loss_fn(batch: dict, logits: torch.Tensor):
        rl = _scaled_response_logits(logits, batch, settings.temperature)
        batch["ref_logprobs"] = vocab_parallel_logprobs(rl, batch["response_ids"], **_ops_kwargs(settings)).detach()
        if settings.needs_ref_topk:
            idx, _ = vocab_parallel_topk(rl, settings.algorithm.apo_topk, **_ops_kwargs(settings))
            batch["ref_topk_indices"] = idx
        return rl.sum() * 0.0, {}

    return loss_fn


def old_policy_pass(settings: PassSettings):
    def loss_fn(batch: dict, logits: torch.Tensor):
        rl = _scaled_response_logits(logits, batch, settings.temperature)
        kw = _ops_kwargs(settings)
        batch["old_logprobs"] = vocab_parallel_logprobs(rl, batch["response_ids"], **kw).detach()
        if "ref_topk_indices" in batch:
            batch["old_anchor_logprobs"] = vocab_parallel_gather_logprobs(rl, batch["ref_topk_indices"], **kw).detach()
        if settings.algorithm.loss_mode == "casp":
            idx, lp = vocab_parallel_topk(rl, settings.algorithm.casp_topn, **kw)
            batch["old_topk_indices"], batch["old_topk_logprobs"] = idx, lp.detach()
        m = batch["response_mask"]
        mismatch = ((batch["old_logprobs"] - batch["rollout_logprobs"]).abs() * m).sum() / m.sum().clamp(min=1)
        return rl.sum() * 0.0, {"rollout/logprob_abs_diff": mismatch.detach()}

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
            old_anchor_logprobs=batch.get("old_anchor_logprobs"),
            old_topk_indices=batch.get("old_topk_indices"),
            old_topk_logprobs=batch.get("old_topk_logprobs"),
            vocab_size=settings.vocab_size,
        )
        metrics = {k: (v.detach() if torch.is_tensor(v) else torch.tensor(float(v))) for k, v in metrics.items()}
        metrics["loss"] = loss.detach()
        return loss, metrics

    return loss_fn
