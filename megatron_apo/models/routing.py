"""Which experts each token is routed to, in the trainer (Megatron) and in a transformers engine, and how often
the two disagree (docs/models.md, "Routing mismatch").

The same weights can route a token differently in the engine and in the training forward (different kernels,
dtypes, batch shapes flip near-tied router logits); the token's log-prob then comes from other experts. The
routing mismatch is the fraction of (token, MoE layer) pairs whose top-k expert SET differs.
"""

from __future__ import annotations

import contextlib
import functools
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
    ids = batch["rollout_experts"].to(train.device).long()  # [b, T, layers, k]
    rollout = routing_maps_from_ids(ids.permute(2, 0, 1, 3), n_experts)
    known = ((ids[..., 0, 0] >= 0) & (batch["response_mask"] > 0)).float()  # [b, T]
    differs = (train != rollout).any(-1).float() * known  # [layers, b, T]
    return differs.sum() / (known.sum() * n_layers).clamp(min=1)


# ---- routing replay (rollout.routing_replay, docs/models.md "Routing replay") ----

# expert ids as the batch stores them (-1: no route): every rank holds the step's routes, layers x k per token
ROUTE_DTYPE = torch.int16


def prompt_position_experts(calls: list[torch.Tensor], prompt_lengths: list[int]) -> list[list]:
    """Per row, the expert ids [P_i - 1][layers][k] of a left-padded prefill's prompt positions 0..P_i-2 (the last
    prompt position predicts the first response token: it is the first of the response routes); `calls` as
    `capture_hf_routing` records them for that prefill (one per layer, [b*width, k]). Leaves `calls` as it is."""
    b = len(prompt_lengths)
    if not calls:
        return [[] for _ in range(b)]
    per_layer = torch.stack([c.view(b, -1, c.shape[-1]) for c in calls], dim=2)  # [b, width, layers, k]
    width = per_layer.shape[1]
    return [per_layer[i, width - p: width - 1].tolist() for i, p in enumerate(prompt_lengths)]


def prompt_experts_tensor(routes: list, lengths: list[int]) -> torch.Tensor:
    """[N, P, layers, k] ROUTE_DTYPE from per-sample prompt routes ([P_i - 1][layers][k], -1 past them); `lengths` are
    the prompt lengths, checked against the routes (an engine that skipped prompt positions is an error)."""
    from megatron_apo.config import InputError

    for i, (r, p) in enumerate(zip(routes, lengths)):
        if len(r) != max(0, p - 1):
            raise InputError(f"sample {i}: the engine returned routed experts for {len(r)} prompt positions, its "
                             f"prompt has {p} tokens (expected {max(0, p - 1)}); rollout.routing_replay needs all")
    layers, k = next((len(r[0]), len(r[0][0])) for r in routes if r) if any(routes) else (1, 1)
    out = torch.full((len(routes), max(1, max(lengths) - 1), layers, k), -1, dtype=ROUTE_DTYPE)
    for i, r in enumerate(routes):
        if r:
            out[i, : len(r)] = torch.tensor(r, dtype=ROUTE_DTYPE)
    return out


def replay_positions(batch: dict) -> torch.Tensor:
    """[b, S, layers, k] expert ids the engine routed each position of this micro-batch's rows to (-1 where it
    routed nothing that matters: the last response token, padding). Prompt position p of sample i sits at
    resp_index[i, 0] - (P_i - 1) + p in its row, response-predicting position j at resp_index[i, j].

    Raises InputError when a position the loss depends on (every one up to the last response token's) has no route.
    """
    from megatron_apo.config import InputError

    b, s = batch["tokens"].shape
    resp, prompt = batch.get("rollout_experts"), batch.get("prompt_experts")
    if resp is None or prompt is None:
        raise InputError("rollout.routing_replay is on but the rollout samples carry no routed experts: the engine "
                         "did not return them (an engine that cannot, or rollout.routing_replay was off there)")
    _, _, layers, k = resp.shape
    out = torch.full((b, s, layers, k), -1, dtype=ROUTE_DTYPE)
    rows = batch.get("resp_row")
    n_resp = batch["response_mask"].sum(-1).long().tolist()
    n_prompt = (prompt[:, :, 0, 0] >= 0).sum(-1).tolist()
    for i in range(resp.shape[0]):
        r = i if rows is None else int(rows[i])
        first = int(batch["resp_index"][i, 0])
        out[r, first - n_prompt[i]: first] = prompt[i, : n_prompt[i]].to(out.dtype)
        out[r, batch["resp_index"][i, : n_resp[i]]] = resp[i, : n_resp[i]].to(out.dtype)
        end = int(batch["resp_index"][i, n_resp[i] - 1]) + 1 if n_resp[i] else first  # a masked-out sample: none
        if (out[r, first - n_prompt[i]: end, :, 0] < 0).any():
            raise InputError(f"rollout.routing_replay: sample {i} of a micro-batch has positions without a route "
                             "from the engine (its routes are shorter than its response)")
    return out


@functools.cache  # one class: megatron-core is imported lazily, so the subclass is made on first use
def _replay_class():
    from megatron.core.transformer.moe.router_replay import RouterReplay, RouterReplayAction

    class KnownRoutesReplay(RouterReplay):
        """megatron-core's replay hook, replaying the engine's top-k where it routed the position (ids >= 0) and
        the router's own top-k elsewhere (padding, the last response token: no loss term reads them). The
        probabilities are the router's scores at the replayed experts (gate weights and aux loss stay live)."""

        def get_replay_topk(self, scores, topk, num_groups=None, group_topk=None, default_compute_topk=None):
            if self.router_replay_action != RouterReplayAction.REPLAY_FORWARD or self.target_topk_idx is None:
                return super().get_replay_topk(scores, topk, num_groups, group_topk, default_compute_topk)
            _, own = default_compute_topk(scores, topk, num_groups=num_groups, group_topk=group_topk)
            target = self.target_topk_idx.to(scores.device)
            idx = torch.where(target[:, :1] >= 0, target, own)
            return scores.gather(1, idx), idx

    return KnownRoutesReplay, RouterReplay, RouterReplayAction


def install_routing_replay(model: torch.nn.Module) -> None:
    """Swaps megatron-core's per-router replay objects (`moe_enable_routing_replay`) for KnownRoutesReplay."""
    known, base, _ = _replay_class()
    for m in model.modules():
        rr = getattr(m, "router_replay", None)
        if isinstance(rr, base) and not isinstance(rr, known):
            if rr in base.global_router_replay_instances:  # megatron-core's global list: keep one per router
                base.global_router_replay_instances.remove(rr)
            m.router_replay = known()


def _replay_routers(chunk: torch.nn.Module) -> list[tuple[int, object]]:
    """(global 0-based layer, its router's replay object) for every MoE layer of a model chunk with replay on."""
    from megatron.core.transformer.transformer_layer import TransformerLayer

    out = []
    for m in chunk.modules():
        router = getattr(getattr(m, "mlp", None), "router", None)
        if isinstance(m, TransformerLayer) and getattr(router, "router_replay", None) is not None:
            out.append((m.layer_number - 1, router.router_replay))
    return out


def replays_routing(chunks: list) -> bool:
    return any(_replay_routers(c) for c in chunks)


def _set_targets(chunk: torch.nn.Module, routers: list, batch: dict) -> None:
    """Hands this micro-batch's routes to the chunk's routers in Megatron's token order ([s, b] flattened; under
    sequence parallelism this TP rank's slice of the sequence)."""
    from megatron.core import parallel_state as ps
    from megatron.core.utils import get_model_config

    _, _, action = _replay_class()
    full = replay_positions(batch)  # [b, S, layers, k]
    n_layers = get_model_config(chunk).num_layers
    if full.shape[2] != n_layers:
        from megatron_apo.config import InputError

        raise InputError(f"rollout.routing_replay: the engine's routes cover {full.shape[2]} MoE layers, the model "
                         f"has {n_layers}")
    sbk = full.transpose(0, 1)  # [S, b, layers, k]
    tp = ps.get_tensor_model_parallel_world_size()
    if get_model_config(chunk).sequence_parallel and tp > 1:
        sbk = sbk.chunk(tp, dim=0)[ps.get_tensor_model_parallel_rank()]
    for layer, rr in routers:
        rr.clear_indices()
        rr.target_topk_idx = sbk[:, :, layer].reshape(-1, sbk.shape[-1]).long()  # gather indices
        rr.set_router_replay_action(action.REPLAY_FORWARD)


@contextlib.contextmanager
def replay_routing(chunks: list, micro_batches: list[dict]) -> Iterator[None]:
    """Every forward of `chunks` inside routes as the rollout engine did: micro-batch i's routes are handed to a
    chunk's routers just before its i-th forward (Megatron's schedules run each chunk's forwards in micro-batch
    order; a full-recompute backward re-runs the last forward's routes, right without pipelining).
    Nothing happens for a model built without replay."""
    per_chunk = [(c, _replay_routers(c)) for c in chunks]
    handles = []
    for chunk, routers in per_chunk:
        if not routers:
            continue
        pending = iter(micro_batches)

        def hook(_module, _args, chunk=chunk, routers=routers, pending=pending):
            _set_targets(chunk, routers, next(pending))

        handles.append(chunk.register_forward_pre_hook(hook))
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        for _, routers in per_chunk:
            for _, rr in routers:
                rr.clear_indices()
                rr.clear_router_replay_action()
