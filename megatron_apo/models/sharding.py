"""Where each local Megatron parameter sits in the full (TP=1, PP=1) model.

The HF mapping, checkpoint conversion and weight sync all start from this: a local parameter's
*global* name (pipeline layer offset applied) and its tensor-parallel split dimension.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterator

import torch

_LAYER_RE = re.compile(r"^(.*?decoder\.layers\.)(\d+)(\..*)$")
_EXPERT_RE = re.compile(r"^(.*\.mlp\.experts\.local_experts\.)(\d+)(\..*)$")


@dataclass
class LocalParam:
    # name in the unsharded TP=1/PP=1/EP=1 model, e.g. "decoder.layers.17.mlp.linear_fc1.weight"; an expert's
    # weight carries its global expert index ("decoder.layers.3.mlp.experts.local_experts.42.linear_fc2.weight")
    global_name: str
    tensor: torch.nn.Parameter
    partition_dim: int | None  # TP split dimension, None if replicated across TP ranks
    gated: bool = False  # SwiGLU fc1: each TP shard is [gate_r; up_r], not a contiguous slice of [gate; up]

    def full_shape(self, tp_size: int) -> tuple[int, ...]:
        shape = list(self.tensor.shape)
        if self.partition_dim is not None:
            shape[self.partition_dim] *= tp_size
        return tuple(shape)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """Strips DDP / Float16Module wrappers."""
    while hasattr(model, "module") and not hasattr(model, "decoder") and not hasattr(model, "embedding"):
        model = model.module
    return model


def layer_offset(model: torch.nn.Module, vp_stage: int | None = None) -> int:
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    return get_transformer_layer_offset(unwrap(model).config, vp_stage=vp_stage)


def expert_offset(model: torch.nn.Module) -> int:
    """The global index of this rank's first local expert (0 for dense models and EP=1)."""
    from megatron.core import parallel_state

    cfg = unwrap(model).config
    if not cfg.num_moe_experts:
        return 0
    ep_rank = parallel_state.get_expert_model_parallel_rank()
    return ep_rank * (cfg.num_moe_experts // parallel_state.get_expert_model_parallel_world_size())


def global_param_name(local_name: str, offset: int, experts_offset: int = 0) -> str:
    """`local_name` with the pipeline layer offset (and the expert-parallel expert offset) applied."""
    m = _LAYER_RE.match(local_name)
    if not m:
        return local_name
    name = f"{m.group(1)}{int(m.group(2)) + offset}{m.group(3)}"
    e = _EXPERT_RE.match(name)
    if e and experts_offset:
        name = f"{e.group(1)}{int(e.group(2)) + experts_offset}{e.group(3)}"
    return name


def is_expert_param(global_name: str) -> bool:
    """Expert weights are split over the expert-parallel group (and TP'd over the expert-TP group)."""
    return _EXPERT_RE.match(global_name) is not None


# Megatron's tensor-parallel layout by a weight's role: a column-parallel layer (qkv, fc1, the vocab-parallel
# embedding and output layer) is split along its output dim 0, a row-parallel one (proj, fc2) along its input dim 1,
# and a row-parallel layer's bias is whole on every rank. The backend's own label is not trusted for these: TE 2.11
# labels a Linear built with parallel_mode=None "dim 0", and megatron-core builds every expert linear that way when
# EP > 1 or expert-TP > 1, the row-parallel expert fc2 included (docs/gpu.md).
_SPLIT_BY_ROLE = {
    "linear_qkv.weight": 0, "linear_qkv.bias": 0, "linear_fc1.weight": 0, "linear_fc1.bias": 0,
    "word_embeddings.weight": 0, "output_layer.weight": 0,
    "linear_proj.weight": 1, "linear_fc2.weight": 1, "linear_proj.bias": None, "linear_fc2.bias": None,
}


def tp_split_dim(global_name: str, param: torch.Tensor) -> int | None:
    """The TP split dim of a parameter: from its role (`_SPLIT_BY_ROLE`), else from the backend's label
    (`tensor_model_parallel` / `partition_dim`, e.g. a layer norm: replicated)."""
    role = ".".join(global_name.rsplit(".", 2)[-2:])
    if role in _SPLIT_BY_ROLE:
        return _SPLIT_BY_ROLE[role]
    split = getattr(param, "partition_dim", -1) if getattr(param, "tensor_model_parallel", False) else None
    return split if split is not None and split >= 0 else None


def iter_local_params(model: torch.nn.Module, vp_stage: int | None = None) -> Iterator[LocalParam]:
    """Every parameter of this rank's model chunk with its global name and TP split dim."""
    inner = unwrap(model)
    offset = layer_offset(inner, vp_stage)
    experts = expert_offset(inner)
    for name, p in inner.named_parameters():
        gname = global_param_name(name, offset, experts)
        gated = bool(inner.config.gated_linear_unit) and is_fc1(gname)
        yield LocalParam(gname, p, tp_split_dim(gname, p), gated)


def is_fc1(global_name: str) -> bool:
    return global_name.endswith("linear_fc1.weight") and ".mlp." in global_name


def tp_gather(tensor: torch.Tensor, partition_dim: int | None, group=None, gated: bool = False) -> torch.Tensor:
    """Concatenates a TP-sharded tensor along its split dim (identity when replicated or TP=1).

    `gated`: the shards are SwiGLU [gate_r; up_r] halves; the result is [gate; up] like at TP=1.
    """
    import torch.distributed as dist
    from megatron.core import parallel_state

    if partition_dim is None:
        return tensor
    group = group or parallel_state.get_tensor_model_parallel_group()
    world = dist.get_world_size(group)
    if world == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(world)]
    dist.all_gather(parts, tensor.contiguous(), group=group)
    return merge_tp_shards(parts, partition_dim, gated)


def merge_tp_shards(parts: list[torch.Tensor], partition_dim: int | None, gated: bool = False) -> torch.Tensor:
    """The full tensor from all TP shards in rank order (the inverse of tp_slice)."""
    if partition_dim is None or len(parts) == 1:
        return parts[0]
    if gated:
        halves = [p.chunk(2, dim=partition_dim) for p in parts]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=partition_dim)
    return torch.cat(parts, dim=partition_dim)


def tp_slice(full: torch.Tensor, partition_dim: int | None, tp_rank: int, tp_size: int,
             gated: bool = False) -> torch.Tensor:
    """This TP rank's slice of a full tensor (the inverse of tp_gather)."""
    if partition_dim is None or tp_size == 1:
        return full
    if gated:
        gate, up = full.chunk(2, dim=partition_dim)
        return torch.cat([gate.chunk(tp_size, dim=partition_dim)[tp_rank],
                          up.chunk(tp_size, dim=partition_dim)[tp_rank]],
                         dim=partition_dim)
    return full.chunk(tp_size, dim=partition_dim)[tp_rank]
