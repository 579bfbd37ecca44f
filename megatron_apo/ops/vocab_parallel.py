"""Log-probs, entropy, global Top-K and gather-at-indices on vocab-sharded logits (tensor parallel).

`logits` is this rank's shard `[..., V/TP]`; rank r owns global ids `[r*V/TP, (r+1)*V/TP)` (Megatron's
`VocabParallelEmbedding`/`ColumnParallelLinear` layout). Every op:

* never all-gathers the vocabulary: per token, each rank reduces its shard to a few numbers (local max,
  sum of exps, sum of exp*x, the values it owns at the requested ids, or its local top-k candidates) and
  only those are exchanged (one or two `all_gather`s per chunk of tokens);
* works in fp32 internally (bf16/fp16 shards are upcast one chunk at a time) and returns fp32 values;
* processes tokens in chunks of `chunk_size` rows, and recomputes the softmax chunk by chunk in the
  backward (nothing of size tokens x vocab is saved besides the caller's own logits), so peak memory
  beyond the logits and their gradient is O(chunk_size x V/TP);
* masks Megatron's padded vocabulary tail: ids >= `vocab_size` (the true vocabulary) carry no probability
  and are never chosen by Top-K;
* skips positions where `mask` is False (outputs 0, gradient 0, no NaN whatever the logits hold there);
* is an autograd.Function whose backward needs no communication (the forward's global log-sum-exp and
  entropy are saved per token), and whose gradient w.r.t. each rank's shard is that slice of the dense
  gradient.

Results are bitwise identical on every TP rank (all ranks combine the same gathered numbers in rank
order). Inputs other than `logits` (targets, indices, mask) must be identical on every TP rank.

`group=None` means Megatron's tensor-model-parallel group when model parallel is initialised; with no
process group at all the ops run single-process (TP=1).
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import torch.distributed as dist

DEFAULT_CHUNK_SIZE = 1024  # tokens per chunk: 1024 x 76k fp32 = 311 MB per temporary at Qwen's vocab, TP=2
_PAD_INDEX = 2**62  # index of the filler candidates of a rank with fewer than k valid ids (sorts last)


# ----------------------------------------------------------------------------------------------------------
# process group and shard geometry


def resolve_tp_group(group=None):
    """The TP group to reduce over: `group`, else Megatron's TP group, else None (single process)."""
    if group is not None:
        return group
    if not (dist.is_available() and dist.is_initialized()):
        return None
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        return parallel_state.get_tensor_model_parallel_group()
    if dist.get_world_size() == 1:
        return None
    raise ValueError(
        "vocab-parallel op: group=None but Megatron model parallel is not initialised in this "
        f"{dist.get_world_size()}-process job; pass group= (the tensor-parallel group) explicitly"
    )


class _Shard(NamedTuple):
    group: object
    world: int
    rank: int
    start: int  # first global id of this shard
    width: int  # V/TP (padded)
    valid: int  # number of this shard's columns below the true vocab size


def _shard(logits: torch.Tensor, group, vocab_size: Optional[int], op: str) -> _Shard:
    group = resolve_tp_group(group)
    world = dist.get_world_size(group) if group is not None else 1
    rank = dist.get_rank(group) if group is not None else 0
    width = logits.shape[-1]
    padded = width * world
    if vocab_size is None:
        vocab_size = padded
    if not (1 <= int(vocab_size) <= padded):
        raise ValueError(f"{op}: vocab_size={vocab_size} must be in [1, {padded}] (shard width {width} x TP {world})")
    start = rank * width
    valid = max(0, min(width, int(vocab_size) - start))
    return _Shard(group, world, rank, start, width, valid)


def _all_gather(t: torch.Tensor, sh: _Shard) -> torch.Tensor:
    """[world, *t.shape]: every rank's `t`, in rank order."""
    if sh.world == 1:
        return t.unsqueeze(0)
    parts = [torch.empty_like(t) for _ in range(sh.world)]
    dist.all_gather(parts, t.contiguous(), group=sh.group)
    return torch.stack(parts)


# ----------------------------------------------------------------------------------------------------------
# row access: the leading dims of logits are N rows; chunks of rows are read without copying the whole tensor


class _Rows:
    def __init__(self, logits: torch.Tensor, mask: Optional[torch.Tensor], chunk_size: Optional[int], op: str):
        self.lead_shape = tuple(logits.shape[:-1])
        self.n = math.prod(self.lead_shape)
        self.logits = logits
        try:
            self.flat = logits.view(self.n, logits.shape[-1])
        except RuntimeError:  # e.g. a [b, s0:s1, v] slice of a larger tensor: index rows instead of copying all
            self.flat = None
        chunk = DEFAULT_CHUNK_SIZE if chunk_size is None else int(chunk_size)
        if chunk < 1:
            raise ValueError(f"{op}: chunk_size must be >= 1 (got {chunk_size})")
        self.chunk = chunk
        if mask is not None:
            if tuple(mask.shape) != self.lead_shape:
                raise ValueError(f"{op}: mask shape {tuple(mask.shape)} must equal logits.shape[:-1] = {self.lead_shape}")
            m = mask.reshape(-1).to(torch.bool)
            self.ids = None if bool(m.all()) else m.nonzero().squeeze(1).to(logits.device)
        else:
            self.ids = None
        self.count = self.n if self.ids is None else self.ids.numel()

    def chunks(self):
        """Yields row selections: a slice (no mask) or an index tensor."""
        for s in range(0, self.count, self.chunk):
            e = min(s + self.chunk, self.count)
            yield slice(s, e) if self.ids is None else self.ids[s:e]

    def read(self, sel) -> torch.Tensor:
        if self.flat is not None:
            return self.flat[sel] if isinstance(sel, slice) else self.flat.index_select(0, sel)
        if isinstance(sel, slice):
            sel = torch.arange(sel.start, sel.stop, device=self.logits.device)
        return self.logits[torch.unravel_index(sel, self.lead_shape)]


def _fp32_valid(chunk: torch.Tensor, sh: _Shard) -> torch.Tensor:
    """This chunk's non-padded columns in fp32 (a copy for bf16/fp16; may be a view of the caller's fp32
    logits, so callers below never write into it)."""
    return chunk[:, : sh.valid].float()


def _check_indices(idx: torch.Tensor, rows: _Rows, vocab_size: int, op: str, name: str) -> None:
    sel = idx.reshape(rows.n, -1) if rows.ids is None else idx.reshape(rows.n, -1).index_select(0, rows.ids)
    if sel.numel() and (int(sel.min()) < 0 or int(sel.max()) >= vocab_size):
        raise ValueError(
            f"{op}: {name} must be global token ids in [0, {vocab_size}) at unmasked positions "
            f"(got min {int(sel.min())}, max {int(sel.max())})"
        )


# ----------------------------------------------------------------------------------------------------------
# per-chunk local statistics and their combination across ranks


def _local_stats(x: torch.Tensor, want_entropy: bool):
    """Per row: local max m, s = sum exp(x-m), t = sum exp(x-m)*(x-m) (0 when not wanted)."""
    if x.shape[1] == 0:  # this rank holds only padded ids
        z = x.new_zeros(x.shape[0])
        return torch.full_like(z, -math.inf), z, z
    m = x.amax(dim=1)
    shifted = x - m.unsqueeze(1)
    if want_entropy:
        e = shifted.exp()
        t = torch.einsum("ij,ij->i", e, shifted)
    else:
        e = shifted.exp_()  # `shifted` is our own temporary
        t = torch.zeros_like(m)
    s = e.sum(dim=1)
    return m, s, t


def _combine_stats(m_all: torch.Tensor, s_all: torch.Tensor, t_all: torch.Tensor):
    """[world, n] local stats -> global (lse, entropy, max logit); same arithmetic on every rank."""
    big_m = m_all.amax(dim=0)
    w = torch.exp(m_all - big_m)  # 0 for ranks that hold only padding (m = -inf)
    s = (s_all * w).sum(dim=0)
    lse = big_m + torch.log(s)
    # E[x - M] = sum_r w_r (t_r + (m_r - M) s_r) / S ; entropy = log S - E[x - M]  (shifted: no cancellation)
    dm = torch.where(torch.isfinite(m_all), m_all - big_m, torch.zeros_like(m_all))
    ex_shift = ((t_all + dm * s_all) * w).sum(dim=0) / s
    entropy = torch.log(s) - ex_shift
    return lse, entropy, big_m


def _owned_values(x: torch.Tensor, idx: torch.Tensor, sh: _Shard) -> torch.Tensor:
    """x at the global ids this rank owns (below the true vocab), 0 elsewhere."""
    local = idx - sh.start
    own = (local >= 0) & (local < sh.valid)
    if sh.valid == 0:
        return torch.zeros(idx.shape, dtype=x.dtype, device=x.device)
    vals = x.gather(1, local.clamp(0, sh.valid - 1))
    return torch.where(own, vals, torch.zeros_like(vals))


# ----------------------------------------------------------------------------------------------------------
# top-k with deterministic tie-breaking (higher value first, lower global index among equal values)


def _order_candidates(vals: torch.Tensor, idx: torch.Tensor):
    """Sorts each row by value descending, ties by index ascending."""
    idx_sorted, perm = idx.sort(dim=-1)
    vals = vals.gather(-1, perm)
    vals, perm = vals.sort(dim=-1, descending=True, stable=True)
    return vals, idx_sorted.gather(-1, perm)


def _topk_lowest_index(x: torch.Tensor, k: int):
    """Top-k of each row; among values equal to the k-th, the lowest column indices win."""
    vals, idx = torch.topk(x, k, dim=1, sorted=True)
    kth = vals[:, -1:]
    ties = (x >= kth).sum(dim=1) > k  # more candidates at the boundary value than slots left
    if bool(ties.any()):
        r = ties.nonzero().squeeze(1)
        xt, kt = x.index_select(0, r), kth.index_select(0, r)
        above = xt > kt
        at = xt == kt
        need = k - above.sum(dim=1, keepdim=True)
        take = above | (at & (at.cumsum(dim=1) <= need))  # exactly k per row, lowest indices among ties
        cols = take.nonzero()[:, 1].view(-1, k)  # row-major: ascending column order per row
        vals[r] = xt.gather(1, cols)
        idx[r] = cols
    return _order_candidates(vals, idx)


# ----------------------------------------------------------------------------------------------------------
# backward shared by gather / logprobs / entropy / top-k


def _backward_chunks(ctx, grad_lp: Optional[torch.Tensor], grad_ent: Optional[torch.Tensor]) -> torch.Tensor:
    logits, lse, ent, idx = ctx.saved_tensors
    sh, rows = ctx.shard, _Rows(logits, ctx.mask, ctx.chunk_size, ctx.op)
    grad = (torch.zeros if rows.ids is not None else torch.empty)(logits.shape, dtype=logits.dtype, device=logits.device)
    gflat = grad.view(rows.n, sh.width)
    gflat_lp = grad_lp.reshape(rows.n, -1) if grad_lp is not None else None
    idx_flat = idx.reshape(rows.n, -1) if idx is not None else None
    gflat_ent = grad_ent.reshape(rows.n) if grad_ent is not None else None
    for sel in rows.chunks():
        if sh.valid < sh.width:
            gflat[sel, sh.valid :] = 0
        if sh.valid == 0:
            continue
        x = _fp32_valid(rows.read(sel), sh)
        logp = x - lse[sel].unsqueeze(1)  # own temporary
        p = logp.exp()
        g_sum = gflat_lp[sel].sum(dim=1, keepdim=True) if gflat_lp is not None else None
        if gflat_ent is not None:
            # dH/dx_j = -p_j (log p_j + H)
            coef = logp.add_(ent[sel].unsqueeze(1)).mul_(gflat_ent[sel].unsqueeze(1))
            if g_sum is not None:
                coef.add_(g_sum)
        else:
            coef = g_sum
        gx = p.mul_(coef).neg_()
        del logp
        if gflat_lp is not None:
            # d log p_i / dx_j = 1[j = idx_i] - p_j: scatter the upstream grads onto the ids this rank owns
            local = idx_flat[sel] - sh.start
            own = (local >= 0) & (local < sh.valid)
            gi = gflat_lp[sel].float()
            gx.scatter_add_(1, local.clamp(0, sh.valid - 1), torch.where(own, gi, torch.zeros_like(gi)))
        gflat[sel, : sh.valid] = gx.to(grad.dtype)
    return grad


def _save(ctx, logits, lse, ent, idx, shard, mask, chunk_size, op):
    ctx.save_for_backward(logits, lse, ent, idx)
    ctx.shard, ctx.mask, ctx.chunk_size, ctx.op = shard, mask, chunk_size, op
    ctx.set_materialize_grads(False)


# ----------------------------------------------------------------------------------------------------------
# autograd Functions


class _LogProbStats(torch.autograd.Function):
    """log p at given global ids [..., k], entropy [...], and the top-1 log-prob [...] (no grad)."""

    @staticmethod
    def forward(ctx, logits, indices, shard, mask, chunk_size, want_entropy, op):
        rows = _Rows(logits, mask, chunk_size, op)
        k = indices.shape[-1]
        idx_flat = indices.reshape(rows.n, k)
        out_lp = logits.new_zeros((rows.n, k), dtype=torch.float32)
        out_ent = logits.new_zeros(rows.n, dtype=torch.float32)
        out_top1 = logits.new_zeros(rows.n, dtype=torch.float32)
        lse_all = logits.new_zeros(rows.n, dtype=torch.float32)
        for sel in rows.chunks():
            x = _fp32_valid(rows.read(sel), shard)
            m, s, t = _local_stats(x, want_entropy)
            picked = _owned_values(x, idx_flat[sel], shard)
            del x
            packed = _all_gather(torch.cat([m[:, None], s[:, None], t[:, None], picked], dim=1), shard)
            lse, ent, big_m = _combine_stats(packed[:, :, 0], packed[:, :, 1], packed[:, :, 2])
            out_lp[sel] = packed[:, :, 3:].sum(dim=0) - lse.unsqueeze(1)
            out_ent[sel] = ent if want_entropy else 0.0
            out_top1[sel] = big_m - lse
            lse_all[sel] = lse
        _save(ctx, logits, lse_all, out_ent, idx_flat, shard, mask, chunk_size, op)
        lead = tuple(logits.shape[:-1])
        outs = out_lp.view(*lead, k), out_ent.view(lead), out_top1.view(lead)
        ctx.mark_non_differentiable(*((outs[2],) if want_entropy else (outs[1], outs[2])))
        return outs

    @staticmethod
    def backward(ctx, grad_lp, grad_ent, _grad_top1):
        if grad_lp is None and grad_ent is None:
            return (None,) * 7
        return _backward_chunks(ctx, grad_lp, grad_ent), None, None, None, None, None, None


class _TopK(torch.autograd.Function):
    """Global top-k ids [..., k] (int64, no grad) and their log-probs [..., k]."""

    @staticmethod
    def forward(ctx, logits, k, shard, mask, chunk_size, op):
        rows = _Rows(logits, mask, chunk_size, op)
        kk = min(k, shard.width)  # candidates per rank: the same on every rank (the global top-k needs <= k of each)
        out_idx = torch.arange(k, device=logits.device).repeat(rows.n, 1)  # masked rows: any valid ids
        out_lp = logits.new_zeros((rows.n, k), dtype=torch.float32)
        lse_all = logits.new_zeros(rows.n, dtype=torch.float32)
        for sel in rows.chunks():
            x = _fp32_valid(rows.read(sel), shard)
            n = x.shape[0]
            m, s, _ = _local_stats(x, want_entropy=False)
            vals = torch.full((n, kk), -math.inf, dtype=torch.float32, device=x.device)
            gidx = torch.full((n, kk), _PAD_INDEX, dtype=torch.int64, device=x.device)
            take = min(kk, shard.valid)
            if take:
                v, i = _topk_lowest_index(x, take)
                vals[:, :take], gidx[:, :take] = v, i + shard.start
            del x
            packed = _all_gather(torch.cat([m[:, None], s[:, None], vals], dim=1), shard)
            cand_idx = _all_gather(gidx, shard)
            lse, _, _ = _combine_stats(packed[:, :, 0], packed[:, :, 1], torch.zeros_like(packed[:, :, 0]))
            cand_vals = packed[:, :, 2:].permute(1, 0, 2).reshape(n, -1)
            cand_idx = cand_idx.permute(1, 0, 2).reshape(n, -1)
            top_vals, top_idx = _order_candidates(cand_vals, cand_idx)
            out_idx[sel] = top_idx[:, :k]
            out_lp[sel] = top_vals[:, :k] - lse.unsqueeze(1)
            lse_all[sel] = lse
        _save(ctx, logits, lse_all, None, out_idx, shard, mask, chunk_size, op)
        lead = tuple(logits.shape[:-1])
        outs = out_idx.view(*lead, k), out_lp.view(*lead, k)
        ctx.mark_non_differentiable(outs[0])
        return outs

    @staticmethod
    def backward(ctx, _grad_idx, grad_lp):
        if grad_lp is None:
            return (None,) * 6
        return _backward_chunks(ctx, grad_lp, None), None, None, None, None, None


# ----------------------------------------------------------------------------------------------------------
# public ops


class LogProbStats(NamedTuple):
    logprobs: torch.Tensor  # [..., k] log p at the requested ids (grad flows)
    entropy: torch.Tensor  # [...] (grad flows; zeros when not requested)
    top1_logprob: torch.Tensor  # [...] log max_v p(v) (no grad)


def vocab_parallel_logprob_stats(
    logits: torch.Tensor,
    global_indices: torch.Tensor,
    group=None,
    *,
    vocab_size: Optional[int] = None,
    chunk_size: Optional[int] = None,
    mask: Optional[torch.Tensor] = None,
    with_entropy: bool = True,
) -> LogProbStats:
    """One pass over the vocabulary for log-probs at `global_indices` [..., k], entropy and top-1 log-prob.

    The losses use this fused form so the forward reads the logits once and the backward writes one gradient.
    """
    op = "vocab_parallel_logprob_stats"
    sh = _shard(logits, group, vocab_size, op)
    if tuple(global_indices.shape[:-1]) != tuple(logits.shape[:-1]):
        raise ValueError(f"{op}: indices shape {tuple(global_indices.shape)} must be logits.shape[:-1] + (k,)")
    rows = _Rows(logits, mask, chunk_size, op)
    _check_indices(global_indices, rows, sh.width * sh.world if vocab_size is None else vocab_size, op, "global_indices")
    lp, ent, top1 = _LogProbStats.apply(logits, global_indices.long(), sh, mask, chunk_size, with_entropy, op)
    return LogProbStats(lp, ent, top1)


def vocab_parallel_gather_logprobs(
    logits: torch.Tensor,
    global_indices: torch.Tensor,
    group=None,
    *,
    vocab_size: Optional[int] = None,
    chunk_size: Optional[int] = None,
    mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """log p(v) at global ids `global_indices` [..., k] -> [..., k] fp32; each value from the shard owning v."""
    op = "vocab_parallel_gather_logprobs"
    sh = _shard(logits, group, vocab_size, op)
    if tuple(global_indices.shape[:-1]) != tuple(logits.shape[:-1]):
        raise ValueError(f"{op}: indices shape {tuple(global_indices.shape)} must be logits.shape[:-1] + (k,)")
    rows = _Rows(logits, mask, chunk_size, op)
    _check_indices(global_indices, rows, sh.width * sh.world if vocab_size is None else vocab_size, op, "global_indices")
    return _LogProbStats.apply(logits, global_indices.long(), sh, mask, chunk_size, False, op)[0]


def vocab_parallel_logprobs(
    logits: torch.Tensor,
    targets: torch.Tensor,
    group=None,
    *,
    vocab_size: Optional[int] = None,
    chunk_size: Optional[int] = None,
    mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """log p(target) per position: logits [..., V/TP], targets [...] (global ids) -> [...] fp32."""
    op = "vocab_parallel_logprobs"
    if tuple(targets.shape) != tuple(logits.shape[:-1]):
        raise ValueError(f"{op}: targets shape {tuple(targets.shape)} must equal logits.shape[:-1] = {tuple(logits.shape[:-1])}")
    sh = _shard(logits, group, vocab_size, op)
    rows = _Rows(logits, mask, chunk_size, op)
    _check_indices(targets, rows, sh.width * sh.world if vocab_size is None else vocab_size, op, "targets")
    idx = targets.long().unsqueeze(-1)
    if mask is not None:  # targets at masked positions may be anything (-100, pad ids)
        idx = torch.where(mask.bool().unsqueeze(-1), idx, torch.zeros_like(idx))
    return _LogProbStats.apply(logits, idx, sh, mask, chunk_size, False, op)[0].squeeze(-1)


def vocab_parallel_entropy(
    logits: torch.Tensor,
    group=None,
    *,
    vocab_size: Optional[int] = None,
    chunk_size: Optional[int] = None,
    mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Entropy of softmax(logits) over the (true) vocabulary per position -> [...] fp32."""
    op = "vocab_parallel_entropy"
    sh = _shard(logits, group, vocab_size, op)
    idx = torch.zeros((*logits.shape[:-1], 0), dtype=torch.long, device=logits.device)
    return _LogProbStats.apply(logits, idx, sh, mask, chunk_size, True, op)[1]


def vocab_parallel_topk(
    logits: torch.Tensor,
    k: int,
    group=None,
    *,
    vocab_size: Optional[int] = None,
    chunk_size: Optional[int] = None,
    mask: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Global top-k over the sharded vocabulary -> (global ids [..., k] int64, log-probs [..., k] fp32).

    Sorted by probability (descending); equal values are ordered by the lower global id, on every rank.
    Each rank proposes its local top-min(k, V/TP) candidates; only those are exchanged. Masked positions
    return ids 0..k-1 and log-probs 0.
    """
    op = "vocab_parallel_topk"
    if isinstance(k, bool) or not isinstance(k, int) or k <= 0:
        raise ValueError(f"{op}: k must be a positive integer (got {k!r})")
    sh = _shard(logits, group, vocab_size, op)
    true_vocab = sh.width * sh.world if vocab_size is None else int(vocab_size)
    if k > true_vocab:
        raise ValueError(f"{op}: k={k} exceeds the vocabulary size {true_vocab}")
    return _TopK.apply(logits, k, sh, mask, chunk_size, op)


__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "LogProbStats",
    "resolve_tp_group",
    "vocab_parallel_entropy",
    "vocab_parallel_gather_logprobs",
    "vocab_parallel_logprob_stats",
    "vocab_parallel_logprobs",
    "vocab_parallel_topk",
]
