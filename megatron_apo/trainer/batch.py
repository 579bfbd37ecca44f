"""Turns fleet samples into padded training tensors, split into micro-batches.

Sequences are right-padded: [prompt | response | pad]. Response token j of sample b sits at position
prompt_len_b + j and is predicted by the logits at position prompt_len_b + j - 1 (`resp_index`), so no
attention mask is needed (causal attention never sees the right padding) and positions are 0..S-1.

`plan_micro_batches` groups the samples into micro-batches: by count, padded to the step's longest sequence (the
default), or by a token budget (`trainer.micro_batch_tokens`), each padded to its own longest sequence or packed
into one row (`trainer.pack_sequences`: positions restart per sample, attention stays within it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_apo.models.routing import ROUTE_DTYPE
from megatron_apo.rollout.engine import Sample


@dataclass
class RLBatch:
    tokens: torch.Tensor  # [N, S] int64
    resp_index: torch.Tensor  # [N, T] int64: logit position predicting response token j
    response_ids: torch.Tensor  # [N, T] int64 (0 where masked)
    response_mask: torch.Tensor  # [N, T] float
    rollout_logprobs: torch.Tensor  # [N, T] float: the engine's log-probs (sampling distribution)
    rewards: torch.Tensor  # [N] float
    advantages: torch.Tensor  # [N, T] float
    group_index: torch.Tensor  # [N] int64: which prompt the sample answers
    # MoE with an engine that reports it: [N, T, layers, k] int16 experts the rollout routed response token j's
    # predicting position to (-1 past the response); None otherwise
    rollout_experts: torch.Tensor | None = None
    # [N, T] bool: response token of a sample whose group has no correct response (every reward <= 0, the test of
    # reward/pass_rate); APO's all-wrong pull acts there. None: not known (a batch built by hand)
    all_wrong: torch.Tensor | None = None
    # MoE, like rollout_experts: [N, P, layers, k] the experts of prompt positions 0..P_i-2 (-1 past them), which
    # rollout.routing_replay replays with them; None otherwise
    prompt_experts: torch.Tensor | None = None

    @property
    def size(self) -> int:
        return self.tokens.shape[0]

    def select(self, idx: torch.Tensor | slice) -> "RLBatch":
        return RLBatch(**{k: _rows(getattr(self, k), idx) for k in self.__dataclass_fields__})

    def micro_batches(self, micro_batch_size: int) -> list[dict]:
        """Micro-batch dicts for the Megatron schedule. The passes only read them; `mb_index` (the position in this
        list) keys each pass's outputs (trainer/passes.py)."""
        out = []
        s = self.tokens.shape[1]
        for i in range(0, self.size, micro_batch_size):
            mb = {k: _rows(getattr(self, k), slice(i, i + micro_batch_size)) for k in self.__dataclass_fields__}
            mb["position_ids"] = torch.arange(s).unsqueeze(0).expand(mb["tokens"].shape[0], -1).contiguous()
            mb["mb_index"] = len(out)
            out.append(mb)
        return out


def build_batch(
    prompts: list[list[int]],
    samples: list[list[Sample]],
    rewards: torch.Tensor,
    advantages: torch.Tensor,
    pad_id: int = 0,
    seq_multiple: int = 8,
) -> RLBatch:
    """`samples[p]` are the n samples of `prompts[p]`; `rewards`/`advantages` are per sample, flattened [P*n]."""
    flat = [(p, s) for p, group in enumerate(samples) for s in group]
    n = len(flat)
    t = max(1, max(len(s.token_ids) for _, s in flat))
    s_len = max(len(prompts[p]) + len(s.token_ids) for p, s in flat)
    s_len = ((s_len + seq_multiple - 1) // seq_multiple) * seq_multiple  # friendlier shapes; TP/SP need a multiple
    tokens = torch.full((n, s_len), pad_id, dtype=torch.long)
    resp_index = torch.zeros((n, t), dtype=torch.long)
    response_ids = torch.zeros((n, t), dtype=torch.long)
    mask = torch.zeros((n, t))
    rollout_lp = torch.zeros((n, t))
    group = torch.zeros(n, dtype=torch.long)
    for i, (p, smp) in enumerate(flat):
        pl, rl = len(prompts[p]), len(smp.token_ids)
        tokens[i, :pl] = torch.tensor(prompts[p])
        tokens[i, pl : pl + rl] = torch.tensor(smp.token_ids, dtype=torch.long)
        resp_index[i] = (pl - 1 + torch.arange(t)).clamp(max=s_len - 1)
        response_ids[i, :rl] = torch.tensor(smp.token_ids, dtype=torch.long)
        mask[i, :rl] = 1.0
        rollout_lp[i, :rl] = torch.tensor(smp.logprobs, dtype=torch.float32)
        group[i] = p
    adv = advantages.reshape(n, 1).float() * mask
    rewards = rewards.reshape(n).float()
    return RLBatch(tokens, resp_index, response_ids, mask, rollout_lp, rewards, adv, group,
                   _rollout_experts(flat, t), all_wrong_tokens(rewards, group, mask), _prompt_experts(flat, prompts))


def all_wrong_tokens(rewards: torch.Tensor, group_index: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """[N, T] bool: the response tokens of samples whose group (same `group_index`) has no reward > 0."""
    any_right = torch.zeros(int(group_index.max()) + 1 if group_index.numel() else 0, dtype=torch.bool)
    any_right = any_right.index_put((group_index,), rewards > 0, accumulate=True)
    return (~any_right[group_index]).unsqueeze(-1) & (response_mask > 0)


def _rows(t: torch.Tensor | None, idx):
    return None if t is None else t[idx]


def _rollout_experts(flat: list, t: int) -> torch.Tensor | None:
    routed = [s.meta.get("routed_experts") for _, s in flat]
    if not routed or not all(routed):  # a dense model, or an engine that does not report routing
        return None
    layers, k = len(routed[0][0]), len(routed[0][0][0])
    out = torch.full((len(flat), t, layers, k), -1, dtype=ROUTE_DTYPE)
    for i, r in enumerate(routed):
        out[i, : len(r)] = torch.tensor(r, dtype=ROUTE_DTYPE)
    return out


def _prompt_experts(flat: list, prompts: list[list[int]]) -> torch.Tensor | None:
    routed = [s.meta.get("prompt_routed_experts") for _, s in flat]
    if not routed or any(r is None for r in routed):  # an engine that does not report them
        return None
    from megatron_apo.models.routing import prompt_experts_tensor

    return prompt_experts_tensor(routed, [len(prompts[p]) for p, _ in flat])


def response_logits(logits: torch.Tensor, resp_index: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
    """[b, S, V/TP] vocab-sharded logits -> [n, T, V/TP] at the positions that predict response tokens; `rows` [n]:
    the row each sample sits in (packed micro-batches), None = row i holds sample i."""
    if rows is not None:
        return logits[rows.to(logits.device)[:, None], resp_index]
    return logits.gather(1, resp_index.unsqueeze(-1).expand(-1, -1, logits.shape[-1]))


# ---- token-budget micro-batches and packing (trainer.micro_batch_tokens, trainer.pack_sequences) ----

# aggregation modes -> the index of their normaliser in `agg_norm` (losses/common.py::aggregation_denominator)
_NORM_INDEX = {"token-mean": 0, "seq-mean-token-sum": 1, "seq-mean-token-mean": 1, "seq-mean-token-sum-norm": 2}


@dataclass
class MicroBatchPlan:
    """This rank's micro-batches of one RL step and which of them form each optimizer step (mini-batch).

    Every data-parallel rank gets the same number of micro-batches per mini-batch (the pipeline schedule and the
    gradient all-reduce run in lockstep). `variable`: the micro-batches differ in shape (Megatron's pipeline then
    exchanges each activation's shape: `variable_seq_lengths`).
    """

    micro: list[dict]
    mini: list[slice]
    seq_length: int
    micro_batch_size: int
    variable: bool = False


def sequence_lengths(batch: RLBatch) -> torch.Tensor:
    """[N] tokens each sample really has (prompt + response, no padding)."""
    return batch.resp_index[:, 0] + 1 + batch.response_mask.sum(-1).long()


def plan_micro_batches(batch: RLBatch, dp_rank: int, dp_size: int, micro_batch_size: int, mini_batch_size: int,
                       micro_batch_tokens: int = 0, pack: bool = False, seq_multiple: int = 8) -> MicroBatchPlan:
    """Micro-batches of this DP rank for `batch` (the whole step batch, the same on every rank).

    `micro_batch_tokens == 0` and no packing: today's layout (contiguous DP shards, `micro_batch_size` samples per
    micro-batch, every one padded to the step's longest sequence). Otherwise each mini-batch of `mini_batch_size`
    samples (0 = all) is spread over the DP ranks by tokens (longest first, to the lightest rank), bin-packed into
    micro-batches of at most `micro_batch_tokens` tokens (padded: samples x its own longest sequence; packed: the
    sum of the lengths) and every micro-batch carries the mini-batch's global loss normalisers (`agg_norm`).
    """
    if not micro_batch_tokens and not pack:
        return _padded_plan(batch, dp_rank, dp_size, micro_batch_size, mini_batch_size)
    lengths = sequence_lengths(batch).tolist()
    n = batch.size
    step = mini_batch_size or n
    micro, mini = [], []
    for start in range(0, n, step):
        idx = list(range(start, min(n, start + step)))
        per_rank = _balance([(i, lengths[i]) for i in idx], dp_size)
        bins = [_bin_pack(items, micro_batch_tokens, pack, seq_multiple) for items in per_rank]
        k = max(len(b) for b in bins)
        mine = _split_to(bins[dp_rank], k)
        norm = _global_norm(batch, idx, shares=k * dp_size)
        first = len(micro)
        for sample_ids in mine:
            mb = _packed_micro_batch(batch, sample_ids, seq_multiple) if pack else \
                _cropped_micro_batch(batch, sample_ids, seq_multiple)
            mb["agg_norm"] = norm
            mb["mb_index"] = len(micro)
            micro.append(mb)
        mini.append(slice(first, len(micro)))
    seq = max(mb["tokens"].shape[1] for mb in micro)
    shapes = {tuple(mb["tokens"].shape) for mb in micro}
    return MicroBatchPlan(micro, mini, seq, max(mb["tokens"].shape[0] for mb in micro), variable=len(shapes) > 1)


def _padded_plan(batch: RLBatch, dp_rank: int, dp_size: int, mbs: int, mini_batch_size: int) -> MicroBatchPlan:
    per = batch.size // dp_size
    local = batch.select(slice(dp_rank * per, (dp_rank + 1) * per))
    mbs = min(mbs, local.size)
    micro = local.micro_batches(mbs)
    mini = mini_batch_size // dp_size if mini_batch_size else len(micro) * mbs
    mini_mbs = max(1, mini // mbs)
    slices = [slice(i, min(len(micro), i + mini_mbs)) for i in range(0, len(micro), mini_mbs)]
    return MicroBatchPlan(micro, slices, local.tokens.shape[1], mbs)


def _balance(items: list[tuple[int, int]], dp_size: int) -> list[list[tuple[int, int]]]:
    """Longest-processing-time split over DP ranks: each sample (longest first) to the rank with fewest tokens."""
    ranks: list[list[tuple[int, int]]] = [[] for _ in range(dp_size)]
    load = [0] * dp_size
    for i, length in sorted(items, key=lambda x: (-x[1], x[0])):
        r = min(range(dp_size), key=lambda j: (load[j], len(ranks[j]), j))
        ranks[r].append((i, length))
        load[r] += length
    return ranks


def _round_up(x: int, m: int) -> int:
    return (x + m - 1) // m * m


def _bin_pack(items: list[tuple[int, int]], budget: int, pack: bool, seq_multiple: int) -> list[list[int]]:
    """First-fit decreasing into micro-batches of at most `budget` tokens (a longer sample gets one of its own).
    Padded cost: samples x the bin's longest (rounded up); packed: the sum of the lengths (rounded up once)."""
    bins: list[list[tuple[int, int]]] = []
    for i, length in sorted(items, key=lambda x: (-x[1], x[0])):  # longest first: a bin's first item is its longest
        for b in bins:
            cost = (_round_up(sum(x[1] for x in b) + length, seq_multiple) if pack
                    else (len(b) + 1) * _round_up(b[0][1], seq_multiple))
            if not budget or cost <= budget:
                b.append((i, length))
                break
        else:
            bins.append([(i, length)])
    return [[i for i, _ in b] for b in bins]


def _split_to(bins: list[list[int]], k: int) -> list[list[int]]:
    """Splits the fullest micro-batches until there are `k` (another DP rank needs that many); a rank with fewer
    samples than `k` gets empty micro-batches (a masked copy of one sample: no loss, no gradient)."""
    bins = [list(b) for b in bins]
    while len(bins) < k:
        big = max(range(len(bins)), key=lambda j: len(bins[j])) if bins else None
        if big is None or len(bins[big]) < 2:
            bins.append([])
            continue
        b = bins.pop(big)
        bins[big:big] = [b[0::2], b[1::2]]  # alternate: both halves keep a similar longest
    return bins


def _global_norm(batch: RLBatch, idx: list[int], shares: int) -> torch.Tensor:
    """The mini-batch's aggregation normalisers (response tokens, sequences, padded response length), each divided
    by the number of micro-batch losses that share it (micro-batches x DP ranks: Megatron's schedule divides each
    micro-batch loss by the micro-batch count and DDP averages the gradients over DP)."""
    m = batch.response_mask[idx]
    return torch.tensor([float(m.sum()) + 1e-8, float(len(idx)), float(m.shape[-1])], dtype=torch.float64) / shares


def _take(batch: RLBatch, sample_ids: list[int]) -> tuple[RLBatch, torch.Tensor]:
    """The samples (or, for an empty micro-batch, sample 0 masked out) and their real lengths."""
    if sample_ids:
        sub = batch.select(torch.tensor(sample_ids, dtype=torch.long))
        return sub, sequence_lengths(sub)
    sub = batch.select(torch.tensor([0], dtype=torch.long))
    sub.response_mask = torch.zeros_like(sub.response_mask)
    sub.advantages = torch.zeros_like(sub.advantages)
    return sub, torch.ones(1, dtype=torch.long)


def _response_fields(sub: RLBatch, t: int) -> dict:
    """Every per-sample field, response-shaped ones ([n, T, ...]) cut to `t` columns."""
    full_t = sub.response_mask.shape[1]
    out = {}
    for k in sub.__dataclass_fields__:
        v = getattr(sub, k)
        if k not in ("tokens", "prompt_experts") and torch.is_tensor(v) and v.dim() >= 2 and v.shape[1] == full_t:
            v = v[:, :t].contiguous()
        out[k] = v
    return out


def _cropped_micro_batch(batch: RLBatch, sample_ids: list[int], seq_multiple: int) -> dict:
    """Right-padded to this micro-batch's own longest sequence."""
    sub, lengths = _take(batch, sample_ids)
    s = min(sub.tokens.shape[1], _round_up(int(lengths.max()), seq_multiple))
    t = max(1, int(sub.response_mask.sum(-1).max()))
    mb = _response_fields(sub, t)
    mb["tokens"] = sub.tokens[:, :s].contiguous()
    mb["resp_index"] = mb["resp_index"].clamp(max=s - 1)
    mb["position_ids"] = torch.arange(s).unsqueeze(0).expand(sub.size, -1).contiguous()
    return mb


def _packed_micro_batch(batch: RLBatch, sample_ids: list[int], seq_multiple: int) -> dict:
    """The samples back to back in one row [1, S]: positions restart per sample, `cu_seqlens` [n+1] marks where
    each starts (the tail padding, if any, is one more segment that no response position reads)."""
    sub, lengths = _take(batch, sample_ids)
    t = max(1, int(sub.response_mask.sum(-1).max()))
    mb = _response_fields(sub, t)
    total = int(lengths.sum())
    s = _round_up(total, seq_multiple)
    starts = torch.cumsum(lengths, 0) - lengths
    tokens = torch.zeros((1, s), dtype=torch.long)
    positions = torch.zeros((1, s), dtype=torch.long)
    for i, (o, n) in enumerate(zip(starts.tolist(), lengths.tolist())):
        tokens[0, o : o + n] = sub.tokens[i, :n]
        positions[0, o : o + n] = torch.arange(n)
    if s > total:
        positions[0, total:] = torch.arange(s - total)
    bounds = torch.cat([starts, torch.tensor([total])] + ([torch.tensor([s])] if s > total else []))
    mb["tokens"], mb["position_ids"] = tokens, positions
    # a masked response position may point past its sample: clamp it into the sample (never read by the loss)
    mb["resp_index"] = (starts[:, None] + mb["resp_index"]).minimum((starts + lengths - 1)[:, None])
    mb["resp_row"] = torch.zeros(sub.size, dtype=torch.long)
    mb["cu_seqlens"] = bounds.to(torch.int32)
    return mb


def packed_attention_mask(cu_seqlens: torch.Tensor, s: int) -> torch.Tensor:
    """[1, 1, S, S] bool, True = masked: causal within each segment of `cu_seqlens`, nothing across segments."""
    seg = torch.zeros(s, dtype=torch.long, device=cu_seqlens.device)
    seg[cu_seqlens[1:-1].long()] = 1
    seg = seg.cumsum(0)
    pos = torch.arange(s, device=cu_seqlens.device)
    allowed = (seg[:, None] == seg[None, :]) & (pos[None, :] <= pos[:, None])
    return (~allowed)[None, None]


def global_loss_scale(mask: torch.Tensor, mode: str, agg_norm: torch.Tensor) -> torch.Tensor:
    """The factor that turns a micro-batch's `aggregate_loss` into its share of the mini-batch's loss under the
    mini-batch's global normaliser (every aggregation mode divides a sum by its normaliser: swap it)."""
    from megatron_apo.algorithms.losses.common import aggregation_denominator

    own = aggregation_denominator(mask, mode)
    return own / agg_norm[_NORM_INDEX[mode]].to(own.device, own.dtype)
