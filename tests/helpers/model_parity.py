"""Test bodies for TP/PP model parity (module level so spawned ranks can import them)."""

from __future__ import annotations

import zlib

import torch

from megatron_apo.models import build_gpt_model, load_model_config
from megatron_apo.models.sharding import is_expert_param, iter_local_params, tp_gather, tp_slice
from megatron_apo.parallel import ParallelConfig, init_distributed

VOCAB_GLOBAL_NAMES = ("embedding.word_embeddings.weight", "output_layer.weight")


def full_tensor_for(name: str, shape: tuple[int, ...]) -> torch.Tensor:
    """Deterministic 'fixed weights': depends only on the global name and full shape."""
    gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    base = 1.0 if name.endswith("layernorm.weight") or name.endswith("final_layernorm.weight") else 0.0
    return base + 0.05 * torch.randn(shape, generator=gen)


def tp_group_of(global_name: str):
    """The group a parameter is tensor-parallel over: the expert-TP group for experts, the TP group otherwise."""
    from megatron.core import parallel_state as ps

    if is_expert_param(global_name):
        return ps.get_expert_tensor_parallel_group()
    return ps.get_tensor_model_parallel_group()


def set_fixed_weights(model) -> None:
    """Every rank's slice of the same full weights (EP ranks place their global experts by name)."""
    import torch.distributed as dist

    with torch.no_grad():
        for lp in iter_local_params(model):
            group = tp_group_of(lp.global_name)
            tp, r = dist.get_world_size(group), dist.get_rank(group)
            full = full_tensor_for(lp.global_name, lp.full_shape(tp))
            lp.tensor.copy_(tp_slice(full, lp.partition_dim, r, tp, lp.gated))


def full_grads(model, vocab_size: int) -> dict[str, torch.Tensor]:
    """This rank's gradients (DDP's main_grad when wrapped), TP-gathered, by global name (padded vocab rows cut)."""
    grads = {}
    for lp in iter_local_params(model):
        g = getattr(lp.tensor, "main_grad", None)
        g = lp.tensor.grad if g is None else g
        g = tp_gather(g, lp.partition_dim, group=tp_group_of(lp.global_name), gated=lp.gated)
        if lp.global_name in VOCAB_GLOBAL_NAMES:
            g = g[:vocab_size]  # padded rows differ in size between TP layouts
        grads[lp.global_name] = g.clone()
    return grads


def fixed_tokens(vocab: int, n: int, s: int) -> torch.Tensor:
    return torch.randint(0, vocab, (n, s), generator=torch.Generator().manual_seed(7))


def tp1_pp_logits(tp: int, model_name: str = "tiny") -> torch.Tensor:
    """Full-vocab logits (padding stripped) from a TP=tp, PP=1 model with fixed weights."""
    from megatron.core import parallel_state as ps

    init_distributed(ParallelConfig(tp, 1))
    cfg = load_model_config(model_name)
    model = build_gpt_model(cfg)
    set_fixed_weights(model)
    tokens = fixed_tokens(cfg.vocab_size, 2, 24)
    pos = torch.arange(tokens.shape[1]).expand_as(tokens)
    with torch.no_grad():
        logits = model(tokens, pos, attention_mask=None)
    full = tp_gather(logits, partition_dim=-1 % logits.dim(), group=ps.get_tensor_model_parallel_group())
    return full[..., : cfg.vocab_size]


def loss_and_grads(tp: int, pp: int, num_micro_batches: int = 4, model_name: str = "tiny") -> dict:
    """Loss and full (gathered) gradients after one forward-backward through Megatron's schedule."""
    from megatron.core import parallel_state as ps

    from megatron_apo.trainer.schedule import forward_backward, lm_batches, lm_loss

    init_distributed(ParallelConfig(tp, pp))
    cfg = load_model_config(model_name)
    model = build_gpt_model(cfg)
    set_fixed_weights(model)
    mbs, seq = 2, 16
    tokens = fixed_tokens(cfg.vocab_size, mbs * num_micro_batches, seq + 1)
    out = forward_backward([model], list(lm_batches(tokens, mbs)), lm_loss, seq_length=seq, micro_batch_size=mbs)
    losses = [float(o["lm_loss"]) for o in out]
    grads = full_grads(model, cfg.vocab_size)
    # every rank returns its stage's grads; the last stage also returns the loss
    return {"losses": losses, "grads": grads, "pp_rank": ps.get_pipeline_model_parallel_rank(),
            "tp_rank": ps.get_tensor_model_parallel_rank()}


def meta_param_counts() -> dict[str, int]:
    """Builds every model config on the meta device (no memory) and counts its parameters."""
    from megatron_apo.models import available_model_configs, count_parameters

    init_distributed(ParallelConfig(1, 1))
    counts = {}
    for name in available_model_configs():
        cfg = load_model_config(name)
        with torch.device("meta"):
            model = build_gpt_model(cfg, perform_initialization=False)
        assert all(p.is_meta for p in model.parameters())
        counts[name] = count_parameters(model)
    return counts
