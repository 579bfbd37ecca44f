"""Per-rank bodies of the vocab-parallel op and loss tests (module level so spawned ranks can import them).

Each body receives the FULL (dense) inputs, takes this rank's vocab shard of the logits, runs the package
code, and returns values plus the gradient w.r.t. its own shard; the tests compare those against dense
references written in the test files. The same functions run in-process at TP=1 with no process group.
"""

from __future__ import annotations

import torch

from megatron_apo.parallel import ParallelConfig, init_distributed


def tp_rank_and_size() -> tuple[int, int]:
    from megatron.core import parallel_state as ps

    return ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()


def local_shard(full: torch.Tensor, rank: int, tp: int) -> torch.Tensor:
    width = full.shape[-1] // tp
    return full[..., rank * width : (rank + 1) * width].clone()


def _leaf(shard: torch.Tensor, dtype: torch.dtype, strided: bool):
    """A leaf holding the shard and the tensor the op sees (a non-viewable [:, 1:-1] slice when strided)."""
    if not strided:
        leaf = shard.to(dtype, copy=True).requires_grad_()
        return leaf, leaf, lambda g: g
    b, t, v = shard.shape
    base = torch.zeros(b, t + 2, v, dtype=dtype)
    base[:, 1:-1] = shard.to(dtype)
    base.requires_grad_()
    return base, base[:, 1:-1], lambda g: g[:, 1:-1]


def run_ops_case(case: dict, rank: int, tp: int, group=None) -> dict:
    """All four ops on one case; per op its values and the gradient of sum(weights * values) w.r.t. the shard."""
    shard = local_shard(case["logits"], rank, tp)
    dtype, strided = case.get("dtype", torch.float32), case.get("strided", False)
    kw = dict(group=group, vocab_size=case["vocab_size"], chunk_size=case.get("chunk_size"), mask=case.get("mask"))
    out = {}

    def run(name, fn, weights):
        leaf, x, pick = _leaf(shard, dtype, strided)
        before = x.detach().clone()
        res = fn(x)
        vals = res[1] if isinstance(res, tuple) else res
        (vals * weights).sum().backward()
        assert torch.allclose(x.detach(), before, rtol=0, atol=0, equal_nan=True), \
            f"{name} modified the caller's logits"
        out[name] = {"values": vals.detach(), "grad": pick(leaf.grad).float()}
        if isinstance(res, tuple):
            out[name]["indices"] = res[0]

    from megatron_apo.ops import vocab_parallel as vp

    saved_tile = vp._TILE_ELEMS
    vp._TILE_ELEMS = case.get("tile_elems", saved_tile)  # tiny tiles: several tiles per chunk at test sizes
    try:
        _run_all(case, run, kw)
    finally:
        vp._TILE_ELEMS = saved_tile
    return out


def _run_all(case, run, kw):
    from megatron_apo.ops.vocab_parallel import (
        vocab_parallel_entropy,
        vocab_parallel_gather_logprobs,
        vocab_parallel_logprobs,
        vocab_parallel_topk,
    )

    run("logprobs", lambda x: vocab_parallel_logprobs(x, case["targets"], **kw), case["w_logprobs"])
    run("entropy", lambda x: vocab_parallel_entropy(x, **kw), case["w_entropy"])
    run("topk", lambda x: vocab_parallel_topk(x, case["k"], **kw), case["w_topk"])
    run("gather", lambda x: vocab_parallel_gather_logprobs(x, case["gather_idx"], **kw), case["w_gather"])


def ops_body(tp: int, cases: list[dict]) -> dict:
    init_distributed(ParallelConfig(tp, 1))
    rank, size = tp_rank_and_size()
    assert size == tp
    return {"rank": rank, "results": [run_ops_case(c, rank, tp) for c in cases]}


def run_loss_case(case: dict, rank: int, tp: int) -> dict:
    from megatron_apo.algorithms.losses import compute_policy_loss

    x = local_shard(case["logits"], rank, tp).requires_grad_()
    loss, metrics = compute_policy_loss(
        x, case["ids"], case["old_logprobs"], case["advantages"], case["mask"], case["config"],
        ref_logprobs=case.get("ref_logprobs"), ref_topk_indices=case.get("ref_topk_indices"),
        ref_topk_logprobs=case.get("ref_topk_logprobs"), old_anchor_logprobs=case.get("old_anchor_logprobs"),
        old_topk_logprobs=case.get("old_topk_logprobs"), all_wrong=case.get("all_wrong"), vocab_size=case["vocab_size"],
    )
    loss.backward()
    return {"loss": loss.detach(), "metrics": {k: float(v) for k, v in metrics.items()}, "grad": x.grad}


def loss_body(tp: int, cases: list[dict]) -> dict:
    init_distributed(ParallelConfig(tp, 1))
    rank, _ = tp_rank_and_size()
    return {"rank": rank, "results": [run_loss_case(c, rank, tp) for c in cases]}


def ops_body_explicit_group(cases: list[dict]) -> dict:
    """The ops with an explicit process group (the whole world as the TP group) and no Megatron state:
    covers `group=` and keeps the 4-process test light (no megatron-core import in the ranks)."""
    import torch.distributed as dist

    dist.init_process_group("gloo")
    try:
        rank, tp = dist.get_rank(), dist.get_world_size()
        return {"rank": rank, "results": [run_ops_case(c, rank, tp, group=dist.group.WORLD) for c in cases]}
    finally:
        dist.destroy_process_group()
