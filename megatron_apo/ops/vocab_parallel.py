"""Log-probs, entropy, global Top-K and gather-at-indices on vocab-sharded logits (tensor parallel).

`logits` is this rank's shard `[..., V/TP]`; rank r owns global ids `[r*V/TP, (r+1)*V/TP)` (Megatron's
`VocabParallelEmbedding`/`ColumnParallelLinear` layout). Every op:

* never all-gathers the vocabulary: per token, each rank reduces its shard to a few numbers (local max,
  sum of exps, sum of exp*x, the values it owns at the requested ids, or its local top-k candidates) and
  only those are exchanged (one or two `all_gather`s per chunk of tokens);
* works in fp32 internally (bf16/fp16 shards are upcast one tile at a time) and returns fp32 values;
* exchanges per chunk of `chunk_size` tokens (one all_gather, two with Top-K) and computes in tiles of
  ~1M elements (fp32 temporaries stay in cache); the backward recomputes the softmax tile by tile
  (nothing of size tokens x vocab is saved besides the caller's own logits), so peak memory beyond the
  logits and their gradient is a few MB plus O(chunk_size x k);
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

DEFAULT_CHUNK_SIZE = 4096  # tokens per exchange (bounds the small per-token buffers; compute runs in tiles)
_TILE_ELEMS = 1 << 20  # CPU: fp32 elements per compute tile (4 MB), so temporaries stay in cache
_TILE_ELEMS_GPU = 1 << 26  # GPU: 256 MB tiles; the point there is few kernel launches, not cache
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
                raise ValueError(f"{op}: mask shape {tuple(mask.shape)} "
                                 f"must equal logits.shape[:-1] = {self.lead_shape}")
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

    def tiles(self, sel, width: int):
        """Splits one chunk's selection into (rows within the chunk, rows of the tensor) tiles of about
        _TILE_ELEMS elements, so the elementwise passes over a tile run in cache, not DRAM."""
        elems = _TILE_ELEMS if self.logits.device.type == "cpu" else _TILE_ELEMS_GPU
        step = max(1, elems // max(1, width))
        n = sel.stop - sel.start if isinstance(sel, slice) else sel.numel()
        for a in range(0, n, step):
            b = min(a + step, n)
            yield slice(a, b), (slice(sel.start + a, sel.start + b) if isinstance(sel, slice) else sel[a:b])

    def read(self, sel) -> torch.Tensor:
        if self.flat is not None:
            return self.flat[sel] if isinstance(sel, slice) else self.flat.index_select(0, sel)
        if isinstance(sel, slice):
            sel = torch.arange(sel.start, sel.stop, device=self.logits.device)
        return self.logits[torch.unravel_index(sel, self.lead_shape)]


def _fp32_valid(chunk: torch.Tensor, sh: _Shard) -> torch.Tensor:
    """This tile's non-padded columns in fp32 (a copy for bf16/fp16; may be a view of the caller's fp32
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
    """Top-k of each row; among values equal to the k-th, the lowest column indices win.

    torch.topk breaks ties arbitrarily, so take up to 2k candidates: when the last candidate is smaller
    than the k-th value, every id tied with the k-th value is among them and ordering the candidates by
    (value desc, index asc) is exact. Rows with more ties than that (rare: near-constant rows) fall back
    to a stable full sort.
    """
    width = x.shape[1]
    extra = min(width, 2 * k)
    vals, idx = _order_candidates(*torch.topk(x, extra, dim=1, sorted=True))
    if extra < width:
        crowded = vals[:, extra - 1] >= vals[:, k - 1]
        if bool(crowded.any()):
            r = crowded.nonzero().squeeze(1)
            sv, si = torch.sort(x.index_select(0, r), dim=1, descending=True, stable=True)
            vals[r], idx[r] = sv[:, :extra], si[:, :extra]
    return vals[:, :k], idx[:, :k]


def _local_candidates(x: torch.Tensor, kk: int, sh: _Shard):
    """This rank's top-kk (value, global id); ranks with fewer valid ids pad with (-inf, _PAD_INDEX)."""
    n = x.shape[0]
    vals = torch.full((n, kk), -math.inf, dtype=torch.float32, device=x.device)
    gidx = torch.full((n, kk), _PAD_INDEX, dtype=torch.int64, device=x.device)
    take = min(kk, sh.valid)
    if take:
        v, i = _topk_lowest_index(x, take)
        vals[:, :take], gidx[:, :take] = v, i + sh.start
    return vals, gidx


# ----------------------------------------------------------------------------------------------------------
# the autograd Function: log-probs at ids, entropy, top-1, and (optionally) the global top-k, in one pass


class _VocabParallelStats(torch.autograd.Function):
    """Outputs: log p at `indices` [N, n], entropy [N], top-1 log-prob [N] (no grad), top-k ids [N, k]
    (no grad) and their log p [N, k]. N = the flattened leading dims of `logits`."""

    @staticmethod
    def forward(ctx, logits, indices, topk, shard, mask, chunk_size, want_entropy, op):
        rows = _Rows(logits, mask, chunk_size, op)
        n_idx = indices.shape[-1]
        idx_flat = indices.reshape(rows.n, n_idx)
        kk = min(topk, shard.width)  # candidates per rank (same on every rank); the global top-k needs <= k of each
        f32 = dict(dtype=torch.float32, device=logits.device)
        out_lp = torch.zeros(rows.n, n_idx, **f32)
        out_ent = torch.zeros(rows.n, **f32)
        out_top1 = torch.zeros(rows.n, **f32)
        out_tk_lp = torch.zeros(rows.n, topk, **f32)
        out_tk_idx = torch.arange(topk, device=logits.device).repeat(rows.n, 1)  # masked rows: any valid ids
        lse_all = torch.zeros(rows.n, **f32)
        for sel in rows.chunks():
            c = sel.stop - sel.start if isinstance(sel, slice) else sel.numel()
            local = torch.empty(c, 3 + n_idx + kk, **f32)  # [m, s, t | owned values at ids | candidate values]
            local_idx = torch.empty(c, kk, dtype=torch.int64, device=logits.device)
            for in_chunk, tile in rows.tiles(sel, shard.valid):
                x = _fp32_valid(rows.read(tile), shard)
                m, s, t = _local_stats(x, want_entropy)
                local[in_chunk, 0], local[in_chunk, 1], local[in_chunk, 2] = m, s, t
                local[in_chunk, 3 : 3 + n_idx] = _owned_values(x, idx_flat[tile], shard)
                if kk:
                    local[in_chunk, 3 + n_idx :], local_idx[in_chunk] = _local_candidates(x, kk, shard)
            packed = _all_gather(local, shard)  # [world, c, cols]: a few numbers per token and rank
            lse, ent, big_m = _combine_stats(packed[:, :, 0], packed[:, :, 1], packed[:, :, 2])
            out_lp[sel] = packed[:, :, 3 : 3 + n_idx].sum(dim=0) - lse.unsqueeze(1)
            if want_entropy:
                out_ent[sel] = ent
            out_top1[sel] = big_m - lse
            lse_all[sel] = lse
            if kk:
                cand_idx = _all_gather(local_idx, shard).permute(1, 0, 2).reshape(c, -1)
                cand_vals = packed[:, :, 3 + n_idx :].permute(1, 0, 2).reshape(c, -1)
                top_vals, top_idx = _order_candidates(cand_vals, cand_idx)
                out_tk_idx[sel] = top_idx[:, :topk]
                out_tk_lp[sel] = top_vals[:, :topk] - lse.unsqueeze(1)
        ctx.save_for_backward(logits, lse_all, out_ent, idx_flat, out_tk_idx)
        ctx.shard, ctx.mask, ctx.chunk_size, ctx.op = shard, mask, chunk_size, op
        ctx.set_materialize_grads(False)
        lead = tuple(logits.shape[:-1])
        outs = (out_lp.view(*lead, n_idx), out_ent.view(lead), out_top1.view(lead),
                out_tk_idx.view(*lead, topk), out_tk_lp.view(*lead, topk))
        ctx.mark_non_differentiable(*((outs[2], outs[3]) if want_entropy else (outs[1], outs[2], outs[3])))
        return outs

    @staticmethod
    def backward(ctx, grad_lp, grad_ent, _grad_top1, _grad_tk_idx, grad_tk_lp):
        logits, lse, ent, idx_flat, tk_idx = ctx.saved_tensors
        n = lse.shape[0]
        ids, grads = [], []
        if grad_lp is not None and idx_flat.shape[1]:
            ids.append(idx_flat), grads.append(grad_lp.reshape(n, -1))
        if grad_tk_lp is not None and tk_idx.shape[1]:
            ids.append(tk_idx), grads.append(grad_tk_lp.reshape(n, -1))
        if not ids and grad_ent is None:
            return (None,) * 8
        idx = torch.cat(ids, dim=1) if ids else None
        g = torch.cat(grads, dim=1) if grads else None
        g_ent = grad_ent.reshape(n) if grad_ent is not None else None
        return _backward(ctx, logits, lse, ent, idx, g, g_ent), None, None, None, None, None, None, None


def _backward(ctx, logits, lse, ent, idx, g, g_ent) -> torch.Tensor:
    """d/dx_j of sum_i g_i log p(idx_i) + g_ent H = scatter(g)_j - p_j (sum_i g_i + g_ent (log p_j + H)).
    Needs no communication: the global log-sum-exp and entropy were saved per token."""
    sh, rows = ctx.shard, _Rows(logits, ctx.mask, ctx.chunk_size, ctx.op)
    alloc = torch.zeros if rows.ids is not None else torch.empty  # masked rows keep a zero gradient
    grad = alloc(logits.shape, dtype=logits.dtype, device=logits.device)
    gflat = grad.view(rows.n, sh.width)
    g_sum = g.sum(dim=1, keepdim=True) if g is not None else None
    for sel in rows.chunks():
        for _, tile in rows.tiles(sel, sh.valid):
            if sh.valid < sh.width:
                gflat[tile, sh.valid :] = 0  # padded ids: no probability, no gradient
            if sh.valid == 0:
                continue
            x = _fp32_valid(rows.read(tile), sh)
            logp = x - lse[tile].unsqueeze(1)  # our own temporary
            p = logp.exp()
            if g_ent is not None:  # dH/dx_j = -p_j (log p_j + H)
                coef = logp.add_(ent[tile].unsqueeze(1)).mul_(g_ent[tile].unsqueeze(1))
                if g_sum is not None:
                    coef.add_(g_sum[tile])
            else:
                coef = g_sum[tile]
            gx = p.mul_(coef).neg_()
            if g is not None:
                local = idx[tile] - sh.start
                own = (local >= 0) & (local < sh.valid)
                gi = g[tile].float()
                gx.scatter_add_(1, local.clamp(0, sh.valid - 1), torch.where(own, gi, torch.zeros_like(gi)))
            gflat[tile, : sh.valid] = gx.to(grad.dtype)
    return grad


# ----------------------------------------------------------------------------------------------------------
# public ops


class LogProbStats(NamedTuple):
    logprobs: torch.Tensor  # [..., n] log p at the requested ids (grad flows)
    entropy: torch.Tensor  # [...] (grad flows; zeros when with_entropy=False)
    top1_logprob: torch.Tensor  # [...] log max_v p(v) (no grad)
    topk_indices: torch.Tensor  # [..., topk] global ids, by probability, ties by lower id (no grad)
    topk_logprobs: torch.Tensor  # [..., topk] (grad flows)


def _apply(op, logits, indices, topk, group, vocab_size, chunk_size, mask, with_entropy) -> LogProbStats:
    sh = _shard(logits, group, vocab_size, op)
    rows = _Rows(logits, mask, chunk_size, op)  # validates mask and chunk_size before any communication
    true_vocab = sh.width * sh.world if vocab_size is None else int(vocab_size)
    if indices is None:
        indices = torch.zeros((*logits.shape[:-1], 0), dtype=torch.long, device=logits.device)
    if tuple(indices.shape[:-1]) != tuple(logits.shape[:-1]):
        raise ValueError(f"{op}: indices shape {tuple(indices.shape)} must be logits.shape[:-1] + (k,) "
                         f"= {tuple(logits.shape[:-1])} + (k,)")
    _check_indices(indices, rows, true_vocab, op, "global_indices")
    if isinstance(topk, bool) or not isinstance(topk, int) or topk < 0:
        raise ValueError(f"{op}: k must be a positive integer (got {topk!r})")
    if topk > true_vocab:
        raise ValueError(f"{op}: k={topk} exceeds the vocabulary size {true_vocab}")
    out = _VocabParallelStats.apply(logits, indices.long(), topk, sh, mask, chunk_size, with_entropy, op)
    return LogProbStats(*out)


def vocab_parallel_logprob_stats(
    logits: torch.Tensor,
    global_indices: Optional[torch.Tensor] = None,
    group=None,
    *,
    topk: int = 0,
    vocab_size: Optional[int] = None,
    chunk_size: Optional[int] = None,
    mask: Optional[torch.Tensor] = None,
    with_entropy: bool = True,
) -> LogProbStats:
    """One pass over the vocabulary for everything a step needs per token: log-probs at `global_indices`
    [..., n], entropy, top-1 log-prob and, with `topk` > 0, the global Top-K (ids and log-probs).

    The losses use it so the forward reads the logits once and the backward writes one gradient; the
    reference pass can take its Top-K and the sampled token's log-prob from a single call.
    """
    return _apply("vocab_parallel_logprob_stats", logits, global_indices, topk, group, vocab_size, chunk_size,
                  mask, with_entropy)


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
    return _apply("vocab_parallel_gather_logprobs", logits, global_indices, 0, group, vocab_size, chunk_size,
                  mask, False).logprobs


def vocab_parallel_logprobs(
    logits: torch.Tensor,
    targets: torch.Tensor,
    group=None,
    *,
    vocab_size: Optional[int] = None,
    chunk_size: Optional[int] = None,
    mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """log p(target) per position: logits [..., V/TP], targets [...] (global ids) -> [...] fp32.
    Targets at masked positions may be anything (-100, pad ids)."""
    op = "vocab_parallel_logprobs"
    if tuple(targets.shape) != tuple(logits.shape[:-1]):
        raise ValueError(f"{op}: targets shape {tuple(targets.shape)} "
                         f"must equal logits.shape[:-1] = {tuple(logits.shape[:-1])}")
    idx = targets.long().unsqueeze(-1)
    if mask is not None and tuple(mask.shape) == tuple(targets.shape):
        idx = torch.where(mask.bool().unsqueeze(-1), idx, torch.zeros_like(idx))
    try:
        return _apply(op, logits, idx, 0, group, vocab_size, chunk_size, mask, False).logprobs.squeeze(-1)
    except ValueError as e:
        raise ValueError(str(e).replace("global_indices", "targets")) from None


def vocab_parallel_entropy(
    logits: torch.Tensor,
    group=None,
    *,
    vocab_size: Optional[int] = None,
    chunk_size: Optional[int] = None,
    mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Entropy of softmax(logits) over the (true) vocabulary per position -> [...] fp32."""
    return _apply("vocab_parallel_entropy", logits, None, 0, group, vocab_size, chunk_size, mask, True).entropy


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
    if isinstance(k, bool) or not isinstance(k, int) or k <= 0:
        raise ValueError(f"vocab_parallel_topk: k must be a positive integer (got {k!r})")
    out = _apply("vocab_parallel_topk", logits, None, k, group, vocab_size, chunk_size, mask, False)
    return out.topk_indices, out.topk_logprobs


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
