"""The sync plan, agreed once over the trainer world: which HF tensors go in which bucket, and which
trainer rank holds which block of each.

A TP shard is a row or column block of the HF q/k/v, gate/up, embedding ... tensors
(`megatron_shard_to_hf`), so every HF tensor is a list of `Piece`s, each held by the DP-rank-0 rank of
one TP rank of the pipeline stage that owns the parameter.

MoE experts (docs/rollout.md, "Experts"): expert e lives on one expert-parallel rank only, TP-split over the
expert-TP group, so its pieces come from the expert-DP-rank-0 ranks of that EP rank, one per expert-TP rank.
Every EP rank thus sends its own experts straight into their HF tensors; no rank gathers all experts.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass

import torch

from megatron_apo.rollout.weight_sync.buckets import Entry, aligned, bucket_layout
from megatron_apo.rollout.weight_sync.buffers import can_share_memory


@dataclass(frozen=True)
class Piece:
    """A block of one HF tensor that one trainer rank holds (see megatron_shard_to_hf)."""

    src: int  # global trainer rank holding it: DP rank 0 (experts: expert-DP rank 0 of their EP rank), TP rank r
    # (experts: expert-TP rank r) of the stage that owns the parameter
    global_name: str
    index: int  # position in megatron_shard_to_hf's output on `src`
    hf_name: str
    dim: int  # the block starts at `start` along `dim` of the HF tensor and spans `length`
    start: int
    length: int


@dataclass
class BucketPlan:
    entries: list[Entry]  # the wire header's (hf_name, dtype, shape, offset, nbytes)
    pieces: list[Piece]
    nbytes: int


def local_params(chunks) -> dict:
    """This rank's parameters by global (unsharded, all-stage) Megatron name, over its model chunks."""
    from megatron_apo.models.sharding import iter_local_params

    out = {}
    for vp, chunk in enumerate(chunks):
        for lp in iter_local_params(chunk, vp_stage=vp if len(chunks) > 1 else None):
            out[lp.global_name] = lp
    return out


def split_group(global_name: str) -> tuple[int, int]:
    """(rank, size) of the group a parameter is TP-split over on this rank: the expert-TP group for experts."""
    from megatron.core import parallel_state as ps

    from megatron_apo.models.sharding import is_expert_param

    if is_expert_param(global_name):
        return ps.get_expert_tensor_parallel_rank(), ps.get_expert_tensor_parallel_world_size()
    return ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()


def _is_first_replica(global_name: str) -> bool:
    """This rank holds the copy of the parameter that is sent: DP rank 0 (expert-DP rank 0 for experts, which are
    replicated over expert-DP only; their EP ranks hold different experts)."""
    from megatron.core import parallel_state as ps

    from megatron_apo.models.sharding import is_expert_param

    if is_expert_param(global_name):
        return ps.get_expert_data_parallel_rank() == 0
    return ps.get_data_parallel_rank() == 0


def build_plan(chunks, model_cfg, dtype: torch.dtype | None,
               bucket_bytes: int) -> tuple[list[BucketPlan], dict[int, tuple[str, bool]]]:
    """Collective over the trainer world. Returns the buckets in send order, and per global rank its
    (hostname, can share memory), from which every rank takes the same shared-memory decision."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_apo.models.hf_mapping import megatron_shard_to_hf, megatron_to_hf

    # (name, shard shape, dtype, TP split dim, rank and size of the group it is split over) of every parameter
    # copy this rank sends
    mine = [(n, tuple(lp.tensor.shape), str(lp.tensor.dtype).removeprefix("torch."), lp.partition_dim,
             *split_group(n)) for n, lp in local_params(chunks).items() if _is_first_replica(n)]
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, (ps.get_pipeline_model_parallel_rank(), dist.get_rank(), mine,
                                      (socket.gethostname(), can_share_memory())))
    hosts = {rank: host for _, rank, _, host in everyone}
    owners: dict[str, dict] = {}  # global name -> the first stage holding it (a tied output copy is skipped)
    for stage, rank, params, _ in sorted(everyone, key=lambda x: (x[0], x[1])):
        for name, shape, pdtype, pdim, split_rank, split_size in params:
            owner = owners.setdefault(name, {"stage": stage, "ranks": {}, "shape": shape, "dtype": pdtype,
                                             "pdim": pdim, "split": split_size})
            if owner["stage"] == stage:
                owner["ranks"][split_rank] = rank
    # the send order: model order, whichever rank reported a name first (experts of EP rank 1 after rank 0's)
    owners = dict(sorted(owners.items(), key=lambda kv: _model_order(kv[0])))

    tensors = []  # (hf_name, dtype, shape, pieces) in send order
    for name, o in owners.items():
        shard = torch.empty(o["shape"], device="meta")
        full_shape = list(o["shape"])
        if o["pdim"] is not None:
            full_shape[o["pdim"]] *= o["split"]
        pieces: dict[str, list[Piece]] = {}
        for split_rank, rank in sorted(o["ranks"].items()):
            for i, (hf_name, piece, dim, start) in enumerate(
                    megatron_shard_to_hf(model_cfg, name, shard, o["pdim"], split_rank, o["split"])):
                pieces.setdefault(hf_name, []).append(Piece(rank, name, i, hf_name, dim, start, piece.shape[dim]))
        for hf_name, t in megatron_to_hf(model_cfg, name, torch.empty(full_shape, device="meta")):
            sent = str(dtype).removeprefix("torch.") if dtype is not None else o["dtype"]
            tensors.append((hf_name, sent, tuple(t.shape), pieces[hf_name]))

    plan, current, current_bytes = [], [], 0

    def close():
        nonlocal current, current_bytes
        if current:
            entries, nbytes = bucket_layout([(hf_name, torch.empty(shape, dtype=getattr(torch, dt), device="meta"))
                                             for hf_name, dt, shape, _ in current])
            plan.append(BucketPlan(entries, [p for *_, ps_ in current for p in ps_], nbytes))
        current, current_bytes = [], 0

    for t in tensors:
        nbytes = aligned(torch.Size(t[2]).numel() * getattr(torch, t[1]).itemsize)
        if current and nbytes >= bucket_bytes:
            close()  # a big tensor travels alone
        current.append(t)
        current_bytes += nbytes
        if current_bytes >= bucket_bytes:
            close()
    close()
    # Nothing is on the wire while the first bucket is built: big single-tensor buckets (the embedding)
    # go last so the pipeline starts with a small one. The engines load by name, in any order.
    plan.sort(key=lambda b: len(b.entries) == 1 and b.nbytes >= bucket_bytes)
    return plan, hosts


def _model_order(global_name: str) -> tuple:
    """Sort key: embedding, layers in order (experts by index after the layer's other tensors), final norm and
    output layer."""
    from megatron_apo.models.hf_mapping import EMBEDDING, expert_index, layer_index

    layer = layer_index(global_name)
    if layer is None:
        return (0 if global_name == EMBEDDING else 2, 0, 0, "")
    e = expert_index(global_name)
    # a stable sort: names with equal keys (a layer's non-expert tensors) keep the order the model lists them in
    return (1, layer, -1 if e is None else e, "" if e is None else global_name.rsplit(".", 2)[-2])
