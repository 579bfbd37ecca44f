"""Which experts each token is routed to, in the trainer (Megatron) and in a transformers engine, and how often
the two disagree (docs/models.md, "Routing mismatch").

The same weights can route a token differently in the engine and in the training forward (different kernels,
dtypes, batch shapes flip near-tied router logits); the token's log-prob then comes from other experts. The
routing mismatch is the fraction of (token, MoE layer) pairs whose top-k expert SET differs.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch


@contextlib.contextmanager
def capture_routing(model: torch.nn.Module) -> Iterator[list[torch.Tensor]]:
    """Records, per MoE layer in forward order, the routing map [tokens, num_experts] (bool) of every router call.

    Tokens are this rank's in Megatron's [s, b] order, flattened (under sequence parallelism: this TP rank's
    slice of the sequence). Forwards inside the context append; the list is yielded to the caller.
    """
    from megatron.core.transformer.moe.router import TopKRouter

    maps: list[torch.Tensor] = []

    def hook(_module, _inputs, output):
        maps.append(output[1].detach().bool().clone())

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, TopKRouter)]
    try:
        yield maps
    finally:
        for h in handles:
            h.remove()


def megatron_routing(maps: list[torch.Tensor], batch: int, seq: int) -> torch.Tensor:
    """[layers, b, s, E] routing maps from `capture_routing`'s [s*b, E] maps (one forward, no sequence parallelism)."""
    return torch.stack([m.view(seq, batch, -1).transpose(0, 1) for m in maps])


@torch.no_grad()
def hf_routing(model: torch.nn.Module, input_ids: torch.Tensor, top_k: int) -> torch.Tensor:
    """[layers, b, s, E] top-k routing maps of a transformers MoE model (e.g. Qwen3MoeForCausalLM) on `input_ids`."""
    out = model(input_ids, output_router_logits=True)
    b, s = input_ids.shape
    maps = []
    for logits in out.router_logits:
        logits = logits.view(b, s, -1).float()
        idx = logits.topk(top_k, dim=-1).indices
        maps.append(torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, idx, True))
    return torch.stack(maps)


def routing_mismatch(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """Fraction of (token, layer) pairs whose expert sets differ; `a`, `b` [layers, b, s, E] bool, `mask` [b, s]."""
    if a.shape != b.shape:
        raise ValueError(f"routing maps of different shapes: {tuple(a.shape)} vs {tuple(b.shape)}")
    differs = (a != b).any(-1).float()  # [layers, b, s]
    if mask is None:
        return float(differs.mean())
    m = mask.float().unsqueeze(0).expand_as(differs)
    return float((differs * m).sum() / m.sum().clamp(min=1))


@contextlib.contextmanager
def capture_hf_routing(model: torch.nn.Module, top_k: int) -> Iterator[list[torch.Tensor]]:
    """Records the top-k expert ids [tokens, k] of every transformers MoE router call (modules `*.mlp.gate`:
    transformers 5 returns (logits, scores, indices), transformers 4 the logits), in call order.

    `top_k` 0 (a dense model): records nothing.
    """
    calls: list[torch.Tensor] = []

    def hook(_module, _inputs, output):
        logits = output[0] if isinstance(output, tuple) else output
        calls.append(logits.detach().float().reshape(-1, logits.shape[-1]).topk(top_k, dim=-1).indices)

    handles = ([m.register_forward_hook(hook) for n, m in model.named_modules() if n.endswith("mlp.gate")]
               if top_k else [])
    try:
        yield calls
    finally:
        for h in handles:
            h.remove()


def last_position_experts(calls: list[torch.Tensor], batch: int) -> torch.Tensor | None:
    """[b, layers, k] expert ids at the last position of the forward whose router calls are in `calls` (one per
    layer, [b*s, k] each); empties `calls`. None when nothing was recorded."""
    if not calls:
        return None
    out = torch.stack([c.view(batch, -1, c.shape[-1])[:, -1] for c in calls], dim=1)
    calls.clear()
    return out


def routing_maps_from_ids(ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[..., k] expert ids (-1: unknown) -> [..., E] bool maps (all False where unknown)."""
    maps = torch.zeros(*ids.shape[:-1], num_experts + 1, dtype=torch.bool, device=ids.device)
    maps.scatter_(-1, ids.clamp(min=-1) % (num_experts + 1), True)  # -1 lands in the extra column
    return maps[..., :num_experts]


def response_routing_mismatch(maps: list[torch.Tensor], batch: dict) -> torch.Tensor:
    """Fraction of (response token, MoE layer) pairs whose training top-k experts (`capture_routing`'s maps of
    this micro-batch's forward, every layer of the model) differ from the rollout's (`batch["rollout_experts"]`).

    Consumes `maps`. Under sequence parallelism each TP rank routed its slice of the sequence: the maps are
    gathered over the TP group first (collective over it).
    """
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    b, s = batch["tokens"].shape
    taken = list(maps)
    maps.clear()
    local = torch.stack([m.view(-1, b, m.shape[-1]) for m in taken])  # [layers, s_local, b, E]
    if local.shape[1] != s:  # sequence parallel: gather the TP ranks' slices of the sequence
        group = ps.get_tensor_model_parallel_group()
        parts = [torch.empty_like(local, dtype=torch.uint8) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, local.to(torch.uint8).contiguous(), group=group)
        local = torch.cat(parts, dim=1).bool()
    train = local.permute(0, 2, 1, 3)  # [layers, b, s, E]
    if "resp_row" in batch:  # a packed micro-batch: sample i sits in row resp_row[i] (trainer/batch.py)
        train = train[:, batch["resp_row"].to(train.device)]
    idx = batch["resp_index"]
    n_layers, _, _, n_experts = train.shape
    train = train.gather(2, idx[None, :, :, None].expand(n_layers, -1, -1, n_experts))  # [layers, b, T, E]
    ids = batch["rollout_experts"].to(train.device)  # [b, T, layers, k]
    rollout = routing_maps_from_ids(ids.permute(2, 0, 1, 3), n_experts)
    known = ((ids[..., 0, 0] >= 0) & (batch["response_mask"] > 0)).float()  # [b, T]
    differs = (train != rollout).any(-1).float() * known  # [layers, b, T]
    return differs.sum() / (known.sum() * n_layers).clamp(min=1)
