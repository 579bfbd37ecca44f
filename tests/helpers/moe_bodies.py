"""Rank bodies for the MoE parity tests (module level so spawned ranks can import them).

Every rank builds tiny-qwen3-moe with the same full weights (placed by global name, so each EP rank holds
its own experts), takes its data-parallel slice of one fixed batch, and runs one forward-backward through
Megatron's schedule, DDP and optimizer, as the trainer does.
"""

from __future__ import annotations

import torch

from megatron_apo.models import build_gpt_model, load_model_config
from megatron_apo.models.sharding import tp_gather
from megatron_apo.parallel import ParallelConfig, init_distributed
from tests.helpers.model_parity import fixed_tokens, full_grads, set_fixed_weights

MOE_MODEL = "tiny-qwen3-moe"
N_SEQ, SEQ, MBS = 4, 16, 2  # 4 sequences of 16 tokens; 2 per micro-batch


def as_numpy(t: torch.Tensor):
    """Results cross the process boundary pickled, not as shared-memory tensors (the rank exits right after)."""
    return t.detach().cpu().numpy().copy()


def moe_logits_grads_norm(tp: int, ep: int, distributed_optimizer: bool = False) -> dict:
    """This rank's logits (its DP slice, full vocab), TP-gathered grads by global name, and the optimizer's grad norm.

    Grads come from DDP's buffers after the schedule's finalize (DP all-reduce; expert grads over the
    expert-data-parallel group); with `distributed_optimizer` they are only valid in this rank's shard, so
    the caller then compares the grad norm and the logits only.
    """
    from megatron.core import parallel_state as ps

    from megatron_apo.trainer.optim import OptimConfig, build_optimizer, wrap_ddp
    from megatron_apo.trainer.schedule import forward_backward, lm_batches, lm_loss

    init_distributed(ParallelConfig(tp, 1, expert_model_parallel_size=ep))
    cfg = load_model_config(MOE_MODEL)
    model = build_gpt_model(cfg)
    set_fixed_weights(model)
    ddp = wrap_ddp(model, use_distributed_optimizer=distributed_optimizer)
    # lr 0 and no clipping: the step only measures the norm
    optimizer = build_optimizer([ddp], OptimConfig(lr=0.0, clip_grad=1e9,
                                                   use_distributed_optimizer=distributed_optimizer))

    tokens = fixed_tokens(cfg.vocab_size, N_SEQ, SEQ + 1)
    dp, dr = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    per = N_SEQ // dp
    rows = slice(dr * per, (dr + 1) * per)
    local = tokens[rows]

    with torch.no_grad():
        pos = torch.arange(SEQ).expand(per, -1)
        logits = ddp(local[:, :-1].contiguous(), pos, attention_mask=None)
    logits = tp_gather(logits, partition_dim=logits.dim() - 1, group=ps.get_tensor_model_parallel_group())

    out = forward_backward([ddp], list(lm_batches(local, MBS)), lm_loss, seq_length=SEQ, micro_batch_size=MBS)
    grads = full_grads(model, cfg.vocab_size)
    _ok, grad_norm, _ = optimizer.step()
    return {
        "rows": (rows.start, rows.stop),
        "logits": as_numpy(logits[..., : cfg.vocab_size]),
        "losses": [float(o["lm_loss"]) for o in out],
        "grads": {k: as_numpy(v) for k, v in grads.items()},
        "grad_norm": float(grad_norm),
        "tp_rank": ps.get_tensor_model_parallel_rank(),
        "ep_rank": ps.get_expert_model_parallel_rank(),
        "expert_offset": ps.get_expert_model_parallel_rank() * (cfg.num_moe_experts // ep),
    }


def routing_vs_transformers(router_noise: float = 0.0) -> dict:
    """Routing maps of tiny-qwen3-moe in Megatron and in transformers' Qwen3MoeForCausalLM with the same weights
    (the HF router weights optionally perturbed by `router_noise`), and their mismatch."""
    from megatron_apo.models.hf_mapping import hf_config_from_model_config, megatron_to_hf
    from megatron_apo.models.routing import capture_routing, hf_routing, megatron_routing, routing_mismatch
    from megatron_apo.models.sharding import iter_local_params
    from megatron_apo.rollout.cpu_engine import build_hf_model, hf_tensor_slots

    init_distributed(ParallelConfig(1, 1))
    cfg = load_model_config(MOE_MODEL)
    model = build_gpt_model(cfg)
    set_fixed_weights(model)
    model.eval()
    hf = build_hf_model(hf_config_from_model_config(cfg))
    slots = hf_tensor_slots(hf)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for lp in iter_local_params(model):
            for hf_name, t in megatron_to_hf(cfg, lp.global_name, lp.tensor.detach()):
                param, index = slots[hf_name]
                if router_noise and hf_name.endswith("mlp.gate.weight"):
                    t = t + router_noise * torch.randn(t.shape, generator=gen)
                (param.data if index is None else param.data[index]).copy_(t)
    tokens = fixed_tokens(cfg.vocab_size, 2, SEQ)
    pos = torch.arange(SEQ).expand(2, -1)
    with torch.no_grad(), capture_routing(model) as maps:
        model(tokens, pos, attention_mask=None)
    ours = megatron_routing(maps, 2, SEQ)
    theirs = hf_routing(hf, tokens, cfg.moe_router_topk)
    mask = torch.ones(2, SEQ)
    mask[:, : SEQ // 2] = 0  # e.g. only the response half
    return {"layers": len(maps), "per_token_experts": ours.sum(-1).unique().tolist(),
            "mismatch": routing_mismatch(ours, theirs), "masked_mismatch": routing_mismatch(ours, theirs, mask)}
