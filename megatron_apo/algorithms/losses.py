"""RL policy losses on vocab-sharded logits: vanilla PPO/GRPO (dual clip), APO (`apo_ratio`), CaSP, KL terms.

Formulas and sources: docs/algorithms.md (our specification built from the published descriptions of APO
and CaSP; not bit-parity with any official code). Each `loss_mode` is one function registered with
`@register_policy_loss(name, inputs)`, declaring the inputs it needs; adding a method adds one function.
Every per-token quantity that needs the vocabulary (log pi(y),
log pi at the reference Top-K, entropy, top-1 probability) comes from ONE fused vocab-parallel pass
(`vocab_parallel_logprob_stats`), so the loss is the same at any TP size and never all-gathers the
vocabulary.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from megatron_apo.algorithms.settings import KL_LOSS_TYPES, resolve_algorithm_config
from megatron_apo.config import ConfigError
from megatron_apo.ops.vocab_parallel import vocab_parallel_logprob_stats

_LOG_RATIO_CLAMP = 20.0


# ----------------------------------------------------------------------------------------------------------
# building blocks (public: the trainer and the tests use them)


def aggregate_loss(values: torch.Tensor, mask: torch.Tensor, mode: str) -> torch.Tensor:
    """Aggregates a per-token [B, T] term over the response mask (docs/algorithms.md, "Aggregation")."""
    m = mask.to(values.dtype)
    masked = torch.where(mask.bool(), values, torch.zeros_like(values))  # garbage at padding never leaks
    if mode == "token-mean":
        return masked.sum() / (m.sum() + 1e-8)
    if mode == "seq-mean-token-sum":
        return masked.sum(dim=-1).mean()
    if mode == "seq-mean-token-mean":
        return (masked.sum(dim=-1) / m.sum(dim=-1).clamp(min=1.0)).mean()
    if mode == "seq-mean-token-sum-norm":
        return masked.sum() / values.shape[-1]
    raise ConfigError(f"algorithm.loss_agg_mode={mode!r}: must be one of token-mean, seq-mean-token-sum, "
                      "seq-mean-token-mean, seq-mean-token-sum-norm")


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kl_type: str) -> torch.Tensor:
    """Per-token KL estimator of pi vs pi_ref from the sampled token's log-probs (k1, abs, k2, k3)."""
    kind = KL_LOSS_TYPES.get(kl_type)
    if kind is None:
        raise ConfigError(f"algorithm.kl_loss_type={kl_type!r}: must be one of {', '.join(KL_LOSS_TYPES)}")
    diff = logprobs - ref_logprobs
    if kind == "k1":
        return diff
    if kind == "abs":
        return diff.abs()
    if kind == "k2":
        return 0.5 * diff.square()
    d = torch.clamp(-diff, -_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)  # log pi_ref - log pi
    return torch.clamp(torch.exp(d) - d - 1.0, -10.0, 10.0)


def dual_clip_pg(logprobs, old_logprobs, advantages, clip_low: float, clip_high: float, clip_c: float):
    """The dual-clipped PPO token loss, and the per-token clip indicators (for the metrics)."""
    log_ratio = torch.clamp(logprobs - old_logprobs, -_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)
    ratio = torch.exp(log_ratio)
    pg1 = -advantages * ratio
    pg2 = -advantages * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    clip1 = torch.maximum(pg1, pg2)
    pg3 = -advantages * clip_c
    clip2 = torch.minimum(pg3, clip1)
    pg = torch.where(advantages < 0, clip2, clip1)
    clipped = pg2 > pg1
    clipped_lower = (clip1 > pg3) & (advantages < 0)
    return pg, log_ratio, clipped, clipped_lower


def _masked_logsumexp(values: torch.Tensor, select: torch.Tensor):
    """log sum_{select} exp(values) over the last dim, and whether any was selected. NaN-free (forward and
    backward) for empty selections, whose result is 0 and must be masked by the caller."""
    has = select.any(dim=-1)
    x = torch.where(select, values, torch.full_like(values, float("-inf")))
    x = torch.where(has.unsqueeze(-1), x, torch.zeros_like(x))
    return torch.where(has, torch.logsumexp(x, dim=-1), torch.zeros_like(has, dtype=values.dtype)), has


def _ratio(log_new: torch.Tensor, log_old: torch.Tensor) -> torch.Tensor:
    return torch.exp(torch.clamp(log_new - log_old, -_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP))


def _clipped_ratio_term(weight: torch.Tensor, rho: torch.Tensor, clip_low: float, clip_high: float) -> torch.Tensor:
    """max(-w rho, -w clip(rho, 1-low, 1+high)): PPO's pessimistic clip applied to a mass ratio."""
    return torch.maximum(-weight * rho, -weight * torch.clamp(rho, 1.0 - clip_low, 1.0 + clip_high))


def _mean(values: torch.Tensor, select: torch.Tensor) -> torch.Tensor:
    sel = select.bool()
    v = torch.where(sel, values.detach().float(), torch.zeros((), dtype=torch.float32, device=values.device))
    return v.sum() / sel.sum().clamp(min=1)


# ----------------------------------------------------------------------------------------------------------
# the registry: one function per loss_mode, each declaring the inputs it needs (as verl's core_algos.py)


@dataclass(frozen=True)
class LossInputs:
    """What a loss mode needs beyond the sampled tokens, old log-probs and advantages. The trainer's passes
    compute exactly these (`trainer/passes.py`), and `compute_policy_loss` checks they were given."""

    ref_logprobs: bool = False  # ref_logprobs [B, T]: log pi_ref(y) (also implied by the KL settings)
    ref_topk: bool = False  # ref_topk_indices [B, T, apo_topk]: the reference pass's vocab-parallel Top-K
    ref_topk_logprobs: bool = False  # log pi_ref at those ids (same pass, no extra cost)
    old_topn: bool = False  # pi_old's Top-N (old_topk_indices / old_topk_logprobs, N = casp_topn)


@dataclass
class LossContext:
    """The shared prologue's results, handed to the registered per-mode function."""

    cfg: Any
    mask: torch.Tensor  # [B, T] bool
    adv: torch.Tensor  # [B, T] advantages, 0 at padding
    neg: torch.Tensor  # A < 0 on response tokens
    ids: torch.Tensor  # sampled ids, 0 at padding
    logp: torch.Tensor  # log pi(y) (grad flows)
    old: torch.Tensor  # log pi_old(y)
    pg: torch.Tensor  # vanilla dual-clipped token loss
    stats: Any  # LogProbStats of the fused pass (entropy, top-1, Top-N when requested)
    zeros: torch.Tensor
    agg: Callable[[torch.Tensor], torch.Tensor]
    lead: tuple
    anchors: Optional[torch.Tensor] = None  # [B, T, K] reference Top-K ids
    anchor_lp: Optional[torch.Tensor] = None  # log pi at the anchors (grad flows)
    safe: Optional[torch.Tensor] = None  # [B, T, K] bool: the safe manifold S
    log_mass: Optional[torch.Tensor] = None  # log M = log sum_S pi
    has_safe: Optional[torch.Tensor] = None  # S non-empty
    ref_topk_logprobs: Optional[torch.Tensor] = None
    old_anchor_logprobs: Optional[torch.Tensor] = None
    old_topk_logprobs: Optional[torch.Tensor] = None


PolicyLossFn = Callable[[LossContext], "tuple[torch.Tensor, dict[str, torch.Tensor]]"]


@dataclass(frozen=True)
class PolicyLoss:
    name: str
    fn: PolicyLossFn
    inputs: Any  # LossInputs, or a function of the algorithm config returning one

    def needs(self, cfg) -> LossInputs:
        return self.inputs(cfg) if callable(self.inputs) else self.inputs


POLICY_LOSS_REGISTRY: dict[str, PolicyLoss] = {}


def register_policy_loss(name: str, inputs: Any = LossInputs()):
    """Decorator: `@register_policy_loss("vanilla")` makes `fn(ctx) -> (loss, metrics)` the `loss_mode=name`
    loss. `inputs` (a LossInputs, or a function of the config returning one) declares what it needs."""

    def deco(fn: PolicyLossFn) -> PolicyLossFn:
        if name in POLICY_LOSS_REGISTRY:
            raise ValueError(f"policy loss {name!r} is registered twice")
        POLICY_LOSS_REGISTRY[name] = PolicyLoss(name, fn, inputs)
        return fn

    return deco


def get_policy_loss(name: str) -> PolicyLoss:
    if name not in POLICY_LOSS_REGISTRY:
        raise ConfigError(f"algorithm.loss_mode={name!r}: must be one of {', '.join(POLICY_LOSS_REGISTRY)}")
    return POLICY_LOSS_REGISTRY[name]


def loss_inputs(config: Any) -> LossInputs:
    """The inputs the configured loss mode declares (what the reference and old passes must compute)."""
    cfg = resolve_algorithm_config(config)
    needs = get_policy_loss(cfg.loss_mode).needs(cfg)
    if cfg.use_kl_loss or cfg.use_kl_loss_on_wrong:
        needs = dataclasses.replace(needs, ref_logprobs=True)
    return needs


# ----------------------------------------------------------------------------------------------------------
# the losses


@register_policy_loss("vanilla")
def vanilla_loss(ctx: LossContext):
    loss = ctx.agg(ctx.pg)
    return loss, {"pg_loss": loss.detach()}


def _apo_inputs(cfg) -> LossInputs:
    return LossInputs(ref_topk=True, ref_topk_logprobs=cfg.apo_rectification == "paper")


@register_policy_loss("apo_ratio", _apo_inputs)
def apo_ratio_loss(ctx: LossContext):
    """APO: the paper's ratio rectification (default) or the split push + pull form (docs/algorithms.md)."""
    if ctx.cfg.apo_rectification == "paper":
        return _apo_paper(ctx)
    return _apo_split(ctx)


def _apo_paper(ctx: LossContext):
    """A < 0: r~ = push*r - pull*M/Z_ref replaces r in the dual-clipped surrogate; A >= 0: vanilla."""
    cfg, adv, neg, zeros, agg, k = ctx.cfg, ctx.adv, ctx.neg, ctx.zeros, ctx.agg, ctx.anchors.shape[-1]
    rtl = ctx.ref_topk_logprobs
    if tuple(rtl.shape[:-1]) != ctx.lead or rtl.shape[-1] < k:
        raise ValueError(f"compute_policy_loss: ref_topk_logprobs has shape {tuple(rtl.shape)}, "
                         f"expected {ctx.lead + (k,)} (log pi_ref at ref_topk_indices)")
    ref_lp = torch.where(ctx.mask.unsqueeze(-1), rtl[..., :k].float(), torch.zeros_like(ctx.anchor_lp))
    log_z_ref, _ = _masked_logsumexp(ref_lp, ctx.safe)
    # r_anchor = sum_S (pi_ref/Z_ref)(pi/pi_ref) = M/Z_ref; 0 where S is empty (no pull there)
    r_anchor = torch.where(ctx.has_safe, _ratio(ctx.log_mass, log_z_ref), zeros)
    ratio = torch.exp(torch.clamp(ctx.logp - ctx.old, -_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP))
    r_tilde = cfg.apo_push_coeff * ratio - cfg.apo_pull_coeff * r_anchor
    lo, hi = 1.0 - cfg.clip_ratio_low, 1.0 + cfg.clip_ratio_high
    rect = torch.maximum(-adv * r_tilde, -adv * torch.clamp(r_tilde, lo, hi))
    rect = torch.minimum(rect, -adv * cfg.clip_ratio_c)
    token_loss = torch.where(neg, rect, ctx.pg)
    loss = agg(token_loss)
    metrics = {
        "pg_loss": loss.detach(),
        "apo/rectified_loss": agg(torch.where(neg, rect, zeros)).detach(),
        "apo/rectified_clipfrac": _mean(((r_tilde < lo) | (r_tilde > hi)).float(), neg),
        "apo/anchor_ratio": _mean(r_anchor, neg & ctx.has_safe),
        "apo/pulled_frac": _mean((neg & ctx.has_safe).float(), ctx.mask),
    }
    return loss, metrics


def _apo_split(ctx: LossContext):
    """A < 0: push*PG + pull*Pull, Pull a (clipped) ratio of the safe-manifold mass M / M_old."""
    cfg, adv, neg, zeros, agg, k = ctx.cfg, ctx.adv, ctx.neg, ctx.zeros, ctx.agg, ctx.anchors.shape[-1]
    if ctx.old_anchor_logprobs is not None:
        oal = ctx.old_anchor_logprobs
        if tuple(oal.shape[:-1]) != ctx.lead or oal.shape[-1] < k:
            raise ValueError(f"compute_policy_loss: old_anchor_logprobs has shape {tuple(oal.shape)}, "
                             f"expected {ctx.lead + (k,)} (log pi_old at ref_topk_indices)")
        old_anchor = torch.where(ctx.mask.unsqueeze(-1), oal[..., :k].float(), ctx.anchor_lp.detach())
        log_mass_old, _ = _masked_logsumexp(old_anchor, ctx.safe)
    else:
        log_mass_old = ctx.log_mass.detach()
    rho = _ratio(ctx.log_mass, log_mass_old)
    w = adv.abs() if cfg.apo_pull_weight == "abs_adv" else torch.ones_like(adv)
    if cfg.apo_pull_form == "ratio_clip":
        pull = _clipped_ratio_term(w, rho, cfg.clip_ratio_low, cfg.clip_ratio_high)
    elif cfg.apo_pull_form == "ratio":
        pull = -w * rho
    else:  # "log"
        pull = -w * ctx.log_mass
    pulled = neg & ctx.has_safe
    pull = torch.where(pulled, pull, zeros)
    push = torch.where(neg, cfg.apo_push_coeff * ctx.pg, zeros)
    token_loss = torch.where(neg, cfg.apo_push_coeff * ctx.pg, ctx.pg)
    pg_agg, pull_agg = agg(token_loss), agg(pull)
    loss = pg_agg + cfg.apo_pull_coeff * pull_agg
    metrics = {
        "pg_loss": pg_agg.detach(),
        "apo/push_loss": agg(push).detach(),
        "apo/pull_loss": (cfg.apo_pull_coeff * pull_agg).detach(),
        "apo/pull_ratio": _mean(rho, pulled),
        "apo/pull_clipfrac": _mean(((rho < 1 - cfg.clip_ratio_low) | (rho > 1 + cfg.clip_ratio_high)).float(), pulled),
        "apo/pulled_frac": _mean(pulled.float(), ctx.mask),
    }
    return loss, metrics


@register_policy_loss("casp", LossInputs(old_topn=True))
def casp_loss(ctx: LossContext):
    """CaSP as SimKO's public code: entropy-gated uniform Top-N smoothing of correct responses' gradient and a
    stronger push on a wrong top-1 token, inside one PPO clip (docs/algorithms.md)."""
    cfg, adv, agg, mask = ctx.cfg, ctx.adv, ctx.agg, ctx.mask
    # this pass's own Top-N (recomputed from these logits); pi_old's Top-N log-probs rank by rank (SimKO)
    top_lp, top_idx = ctx.stats.topk_logprobs, ctx.stats.topk_indices
    n = top_lp.shape[-1]
    if ctx.old_topk_logprobs is not None:
        otl = ctx.old_topk_logprobs
        if tuple(otl.shape[:-1]) != ctx.lead or otl.shape[-1] < n:
            raise ValueError(f"compute_policy_loss: old_topk_logprobs has shape {tuple(otl.shape)}, "
                             f"expected {ctx.lead + (n,)} (pi_old's own Top-N log-probs)")
        old_top = torch.where(mask.unsqueeze(-1), otl[..., :n].float(), top_lp.detach())
    else:
        old_top = top_lp.detach()
    ratio = torch.exp(torch.clamp(ctx.logp - ctx.old, -_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP))
    r_i = torch.exp(torch.clamp(top_lp - old_top, -_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP))
    # value N*r, gradient r * sum_i grad log pi(c_i): the positive update spread uniformly over the Top-N
    topk_sum = ((ratio.detach().unsqueeze(-1) / r_i.detach()) * r_i).sum(-1)
    ent = ctx.stats.entropy.detach()
    q = torch.nanquantile(torch.where(mask, ent, torch.full_like(ent, float("nan"))), cfg.casp_entropy_quantile,
                          dim=-1, keepdim=True)  # per response, linear interpolation (torch.quantile's)
    w = (mask & (ent > q)).float()  # high-entropy ("forking") tokens; NaN rows (no token) compare False
    pos = adv > 0
    a_w = cfg.casp_alpha * w
    r_mix = torch.where(pos, (1.0 - a_w) * ratio + (a_w / n) * topk_sum, ratio)
    top1 = ctx.neg & (ctx.ids == top_idx[..., 0])  # the sampled wrong token is pi's argmax
    adv_mix = torch.where(ctx.neg, adv * (1.0 + cfg.casp_top1_gamma * w * top1.float()), adv)
    token_loss = torch.maximum(-adv_mix * r_mix, -adv_mix * torch.clamp(r_mix, 1.0 - cfg.clip_ratio_low,
                                                                        1.0 + cfg.clip_ratio_high))
    loss = agg(token_loss)
    metrics = {
        "pg_loss": loss.detach(),
        "casp/forking_frac": _mean(w, mask),
        "casp/top1_wrong_frac": _mean((top1 & (w > 0)).float(), ctx.neg),
        "casp/topn_mass": _mean(top_lp.detach().exp().sum(-1), mask),
    }
    return loss, metrics


# ----------------------------------------------------------------------------------------------------------


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
    old_topk_indices: Optional[torch.Tensor] = None,
    group=None,
    *,
    old_topk_logprobs: Optional[torch.Tensor] = None,
    ref_topk_logprobs: Optional[torch.Tensor] = None,
    vocab_size: Optional[int] = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The policy loss of the configured `loss_mode` (docs/algorithms.md) on this rank's vocab shard;
    returns (loss, metrics).

    A shared prologue runs one fused vocab-parallel pass (log pi at y, at the reference Top-K and at the old
    Top-N; entropy; top-1) and the vanilla dual-clipped PG; the registered function of the loss mode
    combines them; KL and entropy terms and the common metrics follow.

    logits [B, T, V/TP] (grad flows), response_ids / old_logprobs / advantages / response_mask [B, T];
    ref_logprobs [B, T] (KL terms); ref_topk_indices [B, T, >=apo_topk] global ids sorted by reference
    probability (apo_ratio; also feeds the anchor metrics whenever given) and ref_topk_logprobs their log
    pi_ref; old_anchor_logprobs [B, T, K] log pi_old at those ids (else M_old = sg(M), exact on-policy);
    old_topk_indices [B, T, >=casp_topn] pi_old's Top-N sorted by probability (casp; computed from `logits`
    when None, i.e. on-policy) and old_topk_logprobs their log pi_old (else sg of the current values).
    vocab_size: the true vocabulary (Megatron's padded ids beyond it carry no probability). Metrics are
    detached scalars.
    """
    cfg = resolve_algorithm_config(config)
    mode = get_policy_loss(cfg.loss_mode)
    needs = mode.needs(cfg)
    lead = tuple(logits.shape[:-1])
    if logits.dim() != 3:
        raise ValueError("compute_policy_loss: logits must be [batch, seq, vocab/TP] "
                         f"(got shape {tuple(logits.shape)})")
    for name, t in (("response_ids", response_ids), ("old_logprobs", old_logprobs), ("advantages", advantages),
                    ("response_mask", response_mask), ("ref_logprobs", ref_logprobs)):
        if t is not None and tuple(t.shape) != lead:
            raise ValueError(f"compute_policy_loss: {name} has shape {tuple(t.shape)}, "
                             f"expected {lead} (= logits.shape[:-1])")

    mask = response_mask.bool()
    zeros = torch.zeros(lead, dtype=torch.float32, device=logits.device)
    adv = torch.where(mask, advantages.float(), zeros)  # padding never leaks NaN/inf into the graph
    neg = (adv < 0) & mask
    ids = torch.where(mask, response_ids.long(), torch.zeros_like(response_ids, dtype=torch.long))

    # --- which global ids to gather log-probs at: [y | reference Top-K | pi_old Top-N]
    columns = [ids.unsqueeze(-1)]
    anchors = None
    if needs.ref_topk and ref_topk_indices is None:
        raise ConfigError(f"ref_topk_indices: algorithm.loss_mode={cfg.loss_mode} needs the reference model's Top-K "
                          "ids [B, T, apo_topk] (vocab_parallel_topk on the reference logits)")
    if needs.ref_logprobs and ref_logprobs is None:
        raise ConfigError(f"ref_logprobs: algorithm.loss_mode={cfg.loss_mode} "
                          "needs the reference model's log-probs [B, T]")
    if needs.ref_topk_logprobs and ref_topk_logprobs is None:
        raise ConfigError(f"ref_topk_logprobs: algorithm.loss_mode={cfg.loss_mode} needs log pi_ref at the reference "
                          "Top-K [B, T, apo_topk] (the reference pass's vocab_parallel_topk returns them)")
    if ref_topk_indices is not None:
        _check_kdim("ref_topk_indices", ref_topk_indices, lead, cfg.apo_topk, "apo_topk")
        anchors = torch.where(mask.unsqueeze(-1), ref_topk_indices[..., : cfg.apo_topk].long(), 0)
        columns.append(anchors)
    # Top-N of this pass's own pi (CaSP recomputes it in every pass, as SimKO does)
    topn = cfg.casp_topn if needs.old_topn else 0
    if topn and old_topk_indices is not None:
        _check_kdim("old_topk_indices", old_topk_indices, lead, topn, "casp_topn")

    stats = vocab_parallel_logprob_stats(
        logits, torch.cat(columns, dim=-1), group, topk=topn, vocab_size=vocab_size,
        chunk_size=cfg.logprob_chunk_size, mask=mask, with_entropy=True,
    )
    logp = stats.logprobs[..., 0]
    old = torch.where(mask, old_logprobs.float(), logp.detach())

    # --- vanilla dual-clip PG
    pg, log_ratio, clipped, clipped_lower = dual_clip_pg(
        logp, old, adv, cfg.clip_ratio_low, cfg.clip_ratio_high, cfg.clip_ratio_c
    )
    agg = lambda v: aggregate_loss(v, mask, cfg.loss_agg_mode)  # noqa: E731
    metrics: dict[str, torch.Tensor] = {}
    ctx = LossContext(cfg=cfg, mask=mask, adv=adv, neg=neg, ids=ids, logp=logp, old=old, pg=pg, stats=stats,
                      zeros=zeros, agg=agg, lead=lead, ref_topk_logprobs=ref_topk_logprobs,
                      old_anchor_logprobs=old_anchor_logprobs, old_topk_logprobs=old_topk_logprobs)
    k = anchors.shape[-1] if anchors is not None else 0

    # --- anchors: safe manifold S = ref Top-K minus y (apo_exclude_sampled), mass M = sum_S pi
    if anchors is not None:
        anchor_lp = stats.logprobs[..., 1 : 1 + k]
        in_topk = (anchors == ids.unsqueeze(-1))
        safe = ~in_topk if cfg.apo_exclude_sampled else torch.ones_like(in_topk)
        log_mass, has_safe = _masked_logsumexp(anchor_lp, safe)
        metrics["anchor/topk_mass"] = _mean(anchor_lp.detach().exp().sum(-1), mask)
        metrics["anchor/safe_mass"] = _mean(log_mass.exp(), mask & has_safe)
        metrics["anchor/safe_mass_wrong"] = _mean(log_mass.exp(), neg & has_safe)
        metrics["anchor/sampled_in_topk"] = _mean(in_topk.any(-1).float(), mask)
        ctx.anchors, ctx.anchor_lp, ctx.safe, ctx.log_mass, ctx.has_safe = anchors, anchor_lp, safe, log_mass, has_safe

    loss, mode_metrics = mode.fn(ctx)
    metrics.update(mode_metrics)

    # --- KL to the reference (on every token, or only on wrong responses' tokens)
    if cfg.use_kl_loss or cfg.use_kl_loss_on_wrong:
        if ref_logprobs is None:
            key = "use_kl_loss_on_wrong" if cfg.use_kl_loss_on_wrong else "use_kl_loss"
            raise ConfigError(f"ref_logprobs: algorithm.{key}=true needs the reference model's log-probs [B, T]")
        ref = torch.where(mask, ref_logprobs.float(), logp.detach())
        kl = kl_penalty(logp, ref, cfg.kl_loss_type)
        if cfg.use_kl_loss_on_wrong:
            kl = torch.where(neg, kl, zeros)  # normalised over all response tokens, like PG
        kl_agg = agg(kl)
        loss = loss + cfg.kl_loss_coef * kl_agg
        metrics["kl_loss"] = kl_agg.detach()
    if ref_logprobs is not None:
        ref_m = torch.where(mask, ref_logprobs.float(), logp.detach())
        metrics["ref_kl"] = _mean(kl_penalty(logp.detach(), ref_m, "low_var_kl"), mask)

    # --- entropy bonus (the entropy's gradient is only built when it is in the loss)
    entropy = stats.entropy
    if cfg.entropy_coeff != 0:
        ent_agg = agg(entropy)
        loss = loss - cfg.entropy_coeff * ent_agg

    metrics["loss"] = loss.detach()
    metrics["pg_clipfrac"] = _mean(clipped.float(), mask)
    metrics["pg_clipfrac_lower"] = _mean(clipped_lower.float(), mask)
    metrics["ppo_kl"] = _mean(-log_ratio, mask)  # approx KL(pi_old || pi) from the sampled tokens
    metrics["entropy"] = _mean(entropy, mask)
    metrics["top1_prob"] = _mean(stats.top1_logprob.exp(), mask)
    metrics["response_tokens"] = mask.sum().detach().float()
    return loss, metrics


def _check_kdim(name: str, t: torch.Tensor, lead: tuple, need: int, key: str) -> None:
    if tuple(t.shape[:-1]) != lead or t.dim() != len(lead) + 1:
        raise ValueError(f"compute_policy_loss: {name} has shape {tuple(t.shape)}, expected {lead} + (k,)")
    if t.shape[-1] < need:
        raise ConfigError(f"algorithm.{key}={need}: {name} has only {t.shape[-1]} ids per position; "
                          f"compute it with k >= {need} or lower algorithm.{key}")


__all__ = ["LossContext", "LossInputs", "POLICY_LOSS_REGISTRY", "aggregate_loss", "compute_policy_loss", "dual_clip_pg",
           "get_policy_loss", "kl_penalty", "loss_inputs", "register_policy_loss"]
