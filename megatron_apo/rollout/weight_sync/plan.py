"""The sync plan, agreed once over the trainer world: which HF tensors go in which bucket, and which
trainer rank holds which block of each.

A TP shard is a row or column block of the HF q/k/v, gate/up, embedding ... tensors
(`megatron_shard_to_hf`), so every HF tensor is a list of `Piece`s, each held by the DP-rank-0 rank of
one TP rank of the pipeline stage that owns the parameter.
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

    src: int  # global trainer rank holding it: DP rank 0, TP rank r of the stage that owns the parameter
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


def build_plan(chunks, model_cfg, dtype: torch.dtype | None,
               bucket_bytes: int) -> tuple[list[BucketPlan], dict[int, tuple[str, bool]]]:
    """Collective over the trainer world. Returns the buckets in send order, and per global rank its
    (hostname, can share memory), from which every rank takes the same shared-memory decision."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_apo.models.hf_mapping import megatron_shard_to_hf, megatron_to_hf

    tp = ps.get_tensor_model_parallel_world_size()
    mine = []
    if ps.get_data_parallel_rank() == 0:
        mine = [(n, tuple(lp.tensor.shape), str(lp.tensor.dtype).removeprefix("torch."), lp.partition_dim)
                for n, lp in local_params(chunks).items()]
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, (ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank(),
                                      dist.get_rank(), mine, (socket.gethostname(), can_share_memory())))
    hosts = {rank: host for _, _, rank, _, host in everyone}
    owners: dict[str, dict] = {}  # global name -> the first stage holding it (a tied output copy is skipped)
    for stage, tp_rank, rank, params, _ in sorted(everyone, key=lambda x: (x[0], x[1])):
        for name, shape, pdtype, pdim in params:
            owner = owners.setdefault(name, {"stage": stage, "ranks": {}, "shape": shape, "dtype": pdtype,
                                             "pdim": pdim})
            if owner["stage"] == stage:
                owner["ranks"][tp_rank] = rank

    tensors = []  # (hf_name, dtype, shape, pieces) in send order
    for name, o in owners.items():
        shard = torch.empty(o["shape"], device="meta")
        full_shape = list(o["shape"])
        if o["pdim"] is not None:
            full_shape[o["pdim"]] *= tp
        pieces: dict[str, list[Piece]] = {}
        for tp_rank, rank in sorted(o["ranks"].items()):
            for i, (hf_name, piece, dim, start) in enumerate(
                    megatron_shard_to_hf(model_cfg, name, shard, o["pdim"], tp_rank, tp)):
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
