"""`compute_policy_loss`: what every loss shares, around the registered function of the configured `loss_mode`.

Prologue: one fused vocab-parallel pass (`vocab_parallel_logprob_stats`) gives log pi at the sampled token and at the
ids the loss declared (the reference Top-K), the declared Top-N, the entropy and the top-1 probability; then the
vanilla dual-clipped PG. The mode's function (algorithms/losses/<mode>.py) turns them into its loss. Epilogue: the
KL and entropy terms and the common metrics. The loss is the same at any TP size and never all-gathers the vocabulary.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from megatron_apo.algorithms.losses.anchors import anchor_metrics
from megatron_apo.algorithms.losses.common import (
    LossContext,
    aggregate_loss,
    dual_clip_pg,
    kl_penalty,
    masked_mean,
    position_metrics,
)
from megatron_apo.algorithms.registry import get_policy_loss, resolve_algorithm_config
from megatron_apo.config import ConfigError
from megatron_apo.ops.vocab_parallel import vocab_parallel_logprob_stats


def compute_policy_loss(
    logits: torch.Tensor,
    response_ids: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    config: Any,
    ref_logprobs: Optional[torch.Tensor] = None,
    ref_topk_indices: Optional[torch.Tensor] = None,
    old_anchor_logprobs: Optional[torch.Tensor] = None,
    group=None,
    *,
    old_topk_logprobs: Optional[torch.Tensor] = None,
    ref_topk_logprobs: Optional[torch.Tensor] = None,
    is_weights: Optional[torch.Tensor] = None,
    all_wrong: Optional[torch.Tensor] = None,
    vocab_size: Optional[int] = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The policy loss of the configured `loss_mode` (docs/algorithms.md) on this rank's vocab shard;
    returns (loss, metrics), the metrics detached scalars.

    logits [B, T, V/TP] (grad flows); response_ids / old_logprobs / advantages / response_mask [B, T];
    config: an AlgorithmConfig or a mapping of its keys. Optional inputs, each required when the mode declares it
    (`registry.required_inputs`): ref_logprobs [B, T] (KL terms; the `ref_kl` metric whenever given);
    ref_topk_indices [B, T, >=K] global ids sorted by reference probability (also feeds the anchor metrics whenever
    given) and ref_topk_logprobs their log pi_ref; old_anchor_logprobs [B, T, K] log pi_old at those ids;
    old_topk_logprobs [B, T, N] log pi_old at pi_old's own Top-N (else the current values, detached: on-policy).
    is_weights [B, T]: per-token importance weights (one-step-off-policy's truncated pi_old / pi_rollout); they
    scale the advantage, hence every A-linear term; None = 1. all_wrong [B, T] bool: the token's group has no
    correct response (RLBatch.all_wrong; APO's `apo_all_wrong_pull` needs it). vocab_size: the true vocabulary
    (Megatron's padded ids beyond it carry no probability). group: the TP group (None = Megatron's).
    """
    cfg = resolve_algorithm_config(config)
    mode = get_policy_loss(cfg.loss_mode)
    needs = mode.needs(cfg)
    if logits.dim() != 3:
        raise ValueError("compute_policy_loss: logits must be [batch, seq, vocab/TP] "
                         f"(got shape {tuple(logits.shape)})")
    lead = tuple(logits.shape[:-1])
    for name, t in (("response_ids", response_ids), ("old_logprobs", old_logprobs), ("advantages", advantages),
                    ("response_mask", response_mask), ("ref_logprobs", ref_logprobs), ("is_weights", is_weights),
                    ("all_wrong", all_wrong)):
        if t is not None and tuple(t.shape) != lead:
            raise ValueError(f"compute_policy_loss: {name} has shape {tuple(t.shape)}, "
                             f"expected {lead} (= logits.shape[:-1])")
    _check_required(cfg, needs, ref_logprobs, ref_topk_indices, ref_topk_logprobs)

    mask = response_mask.bool()
    zeros = torch.zeros(lead, dtype=torch.float32, device=logits.device)
    adv = torch.where(mask, advantages.float(), zeros)  # padding never leaks NaN/inf into the graph
    if is_weights is not None:
        adv = adv * torch.where(mask, is_weights.float(), zeros)
    ids = torch.where(mask, response_ids.long(), torch.zeros_like(response_ids, dtype=torch.long))

    # one vocab pass: log pi at [y | reference Top-K], the declared Top-N, entropy, top-1
    columns, anchors = [ids.unsqueeze(-1)], None
    if ref_topk_indices is not None:
        k = needs.ref_topk or cfg.apo_topk  # the declared K; the anchor metrics use apo_topk
        _check_kdim("ref_topk_indices", ref_topk_indices, lead, k, "apo_topk")
        anchors = torch.where(mask.unsqueeze(-1), ref_topk_indices[..., :k].long(), 0)
        columns.append(anchors)
    stats = vocab_parallel_logprob_stats(
        logits, torch.cat(columns, dim=-1), group, topk=needs.topn, vocab_size=vocab_size,
        chunk_size=cfg.logprob_chunk_size, mask=mask, with_entropy=True,
    )
    logp = stats.logprobs[..., 0]
    old = torch.where(mask, old_logprobs.float(), logp.detach())
    pg, log_ratio, clipped, clipped_lower = dual_clip_pg(
        logp, old, adv, cfg.clip_ratio_low, cfg.clip_ratio_high, cfg.clip_ratio_c
    )
    ctx = LossContext(
        cfg=cfg, mask=mask, adv=adv, neg=(adv < 0) & mask, ids=ids, logp=logp, old=old, pg=pg, stats=stats,
        agg=lambda v: aggregate_loss(v, mask, cfg.loss_agg_mode),
        ref_topk_indices=anchors, ref_topk_lp=stats.logprobs[..., 1:] if anchors is not None else None,
        ref_topk_logprobs=ref_topk_logprobs, old_anchor_logprobs=old_anchor_logprobs,
        old_topk_logprobs=old_topk_logprobs,
        all_wrong=None if all_wrong is None else all_wrong.bool() & mask,
        grad_off=clipped | clipped_lower,
    )

    metrics = anchor_metrics(ctx) if anchors is not None else {}
    loss, mode_metrics = mode.fn(ctx)
    metrics.update(mode_metrics)
    if cfg.position_metrics:  # the mode's gradient-off tokens (the vanilla dual clip's unless it set its own)
        metrics.update(position_metrics(ctx.grad_off & mask, adv, mask, cfg.position_metrics))

    # KL to the reference (on every token, or only on wrong responses' tokens)
    if cfg.use_kl_loss or cfg.use_kl_loss_on_wrong:
        kl = kl_penalty(logp, torch.where(mask, ref_logprobs.float(), logp.detach()), cfg.kl_loss_type)
        if cfg.use_kl_loss_on_wrong:
            kl = torch.where(ctx.neg, kl, zeros)  # normalised over all response tokens, like PG
        kl_agg = ctx.agg(kl)
        loss = loss + cfg.kl_loss_coef * kl_agg
        metrics["kl_loss"] = kl_agg.detach()
    if ref_logprobs is not None:
        ref_m = torch.where(mask, ref_logprobs.float(), logp.detach())
        metrics["ref_kl"] = masked_mean(kl_penalty(logp.detach(), ref_m, "low_var_kl"), mask)

    # entropy bonus (the entropy's gradient is only built when it is in the loss)
    if cfg.entropy_coeff != 0:
        loss = loss - cfg.entropy_coeff * ctx.agg(stats.entropy)

    metrics["loss"] = loss.detach()
    metrics["pg_clipfrac"] = masked_mean(clipped.float(), mask)
    metrics["pg_clipfrac_lower"] = masked_mean(clipped_lower.float(), mask)
    metrics["ppo_kl"] = masked_mean(-log_ratio, mask)  # approx KL(pi_old || pi) from the sampled tokens
    metrics["entropy"] = masked_mean(stats.entropy, mask)
    metrics["top1_prob"] = masked_mean(stats.top1_logprob.exp(), mask)
    metrics["response_tokens"] = mask.sum().detach().float()
    return loss, metrics


def _check_required(cfg, needs, ref_logprobs, ref_topk_indices, ref_topk_logprobs) -> None:
    """A one-line error naming the argument the mode declared and did not get."""
    if needs.ref_topk and ref_topk_indices is None:
        raise ConfigError(f"ref_topk_indices: algorithm.loss_mode={cfg.loss_mode} needs the reference model's Top-K "
                          f"ids [B, T, {needs.ref_topk}] (vocab_parallel_topk on the reference logits)")
    if needs.ref_topk_logprobs and ref_topk_logprobs is None:
        raise ConfigError(f"ref_topk_logprobs: algorithm.loss_mode={cfg.loss_mode} needs log pi_ref at the reference "
                          "Top-K (the reference pass's vocab_parallel_topk returns them)")
    if (needs.ref_logprobs or cfg.use_kl_loss or cfg.use_kl_loss_on_wrong) and ref_logprobs is None:
        key = ("use_kl_loss_on_wrong" if cfg.use_kl_loss_on_wrong else "use_kl_loss" if cfg.use_kl_loss
               else f"loss_mode={cfg.loss_mode}")
        raise ConfigError(f"ref_logprobs: algorithm.{key} needs the reference model's log-probs [B, T]")


def _check_kdim(name: str, t: torch.Tensor, lead: tuple, need: int, key: str) -> None:
    if tuple(t.shape[:-1]) != lead or t.dim() != len(lead) + 1:
        raise ValueError(f"compute_policy_loss: {name} has shape {tuple(t.shape)}, expected {lead} + (k,)")
    if t.shape[-1] < need:
        raise ConfigError(f"algorithm.{key}={need}: {name} has only {t.shape[-1]} ids per position; "
                          f"compute it with k >= {need} or lower algorithm.{key}")
