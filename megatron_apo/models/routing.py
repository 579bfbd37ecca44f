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
