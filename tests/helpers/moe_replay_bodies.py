"""Rank bodies for the MoE routing-replay tests (module level so spawned ranks can import them).

`engine_samples` rolls out tiny-qwen3-moe on the CPU engine (transformers) with the trainer's fixed weights but a
perturbed router, so the engine routes some tokens to other experts than Megatron would; `replay_step` runs one
real RL step (trainer/rl_step.py: reference, old-policy and train passes through Megatron's schedule, DDP and
optimizer) on those samples, with or without rollout.routing_replay, and reports what each pass routed.
"""

from __future__ import annotations

import torch

from megatron_apo.models import build_gpt_model, load_model_config
from megatron_apo.parallel import ParallelConfig, init_distributed
from tests.helpers.model_parity import set_fixed_weights

MOE_MODEL = "tiny-qwen3-moe"
PROMPT_LENGTHS = (5, 9, 3, 7)


def engine_samples(router_noise: float, n: int = 2, max_new_tokens: int = 6) -> tuple[list, list]:
    """(prompts, samples as (token_ids, logprobs, finish_reason, meta)) from the CPU engine."""
    from megatron_apo.models.hf_mapping import hf_config_from_model_config, megatron_to_hf
    from megatron_apo.models.sharding import iter_local_params
    from megatron_apo.rollout.cpu_engine import CPUEngine
    from megatron_apo.rollout.engine import SamplingParams

    init_distributed(ParallelConfig(1, 1))
    cfg = load_model_config(MOE_MODEL)
    model = build_gpt_model(cfg)
    set_fixed_weights(model)
    gen = torch.Generator().manual_seed(3)
    tensors = []
    for lp in iter_local_params(model):
        for name, t in megatron_to_hf(cfg, lp.global_name, lp.tensor.detach()):
            if name.endswith("mlp.gate.weight"):
                t = t + router_noise * torch.randn(t.shape, generator=gen)
            tensors.append((name, t.clone()))
    engine = CPUEngine(hf_config_from_model_config(cfg), named_tensors=tensors, version=0)
    g = torch.Generator().manual_seed(11)
    prompts = [torch.randint(1, cfg.vocab_size, (p,), generator=g).tolist() for p in PROMPT_LENGTHS]
    out = engine.generate(prompts, SamplingParams(n=n, max_new_tokens=max_new_tokens, seed=5))
    return prompts, [[(s.token_ids, s.logprobs, s.finish_reason, s.meta) for s in group] for group in out]


def replay_step(prompts: list, raw: list, replay: bool, tp: int = 1, pp: int = 1, ep: int = 1,
                pack: bool = False) -> dict:
    """One RL step on the engine's samples (`pack`: in packed micro-batches); the step's metrics, and (PP = 1,
    padded) the fraction of response tokens the train pass routed unlike the engine."""
    from megatron_apo.config import AlgorithmConfig, TrainerSection
    from megatron_apo.models.routing import capture_routing, response_routing_mismatch
    from megatron_apo.rollout.engine import Sample
    from megatron_apo.trainer.batch import build_batch
    from megatron_apo.trainer.optim import build_optimizer, wrap_ddp
    from megatron_apo.trainer.passes import PassSettings
    from megatron_apo.trainer.rl_step import RLModels, rl_step

    init_distributed(ParallelConfig(tp, pp, expert_model_parallel_size=ep))
    cfg = load_model_config(MOE_MODEL)
    policy = build_gpt_model(cfg, routing_replay=replay, ddp=True, sequence_parallel=tp > 1)
    set_fixed_weights(policy)
    t = TrainerSection(lr=0.0, micro_batch_size=8, clip_grad=1e9, use_distributed_optimizer=False,
                       pack_sequences=pack)
    ddp = wrap_ddp(policy, use_distributed_optimizer=False)
    optimizer = build_optimizer([ddp], t)
    reference = build_gpt_model(cfg, sequence_parallel=tp > 1)
    set_fixed_weights(reference)
    samples = [[Sample(p, s, *fields) for s, fields in enumerate(group)] for p, group in enumerate(raw)]
    n = sum(len(g) for g in samples)
    batch = build_batch(prompts, samples, torch.zeros(n), torch.linspace(-1, 1, n))
    settings = PassSettings(AlgorithmConfig(loss_mode="vanilla"), vocab_size=cfg.vocab_size)
    models = RLModels([ddp], optimizer, reference, cfg)
    from megatron.core import parallel_state as ps

    if ps.get_pipeline_model_parallel_world_size() > 1 or pack:
        return {"metrics": {k: float(v) for k, v in rl_step(0, batch, models, settings, t).items()}}
    with capture_routing(ddp) as maps:
        metrics = rl_step(0, batch, models, settings, t)
    # the policy's router calls: the old-policy forward, then the train forward (one micro-batch per DP rank)
    train_maps = maps[len(maps) // 2:]
    dp, r = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    mb = batch.select(slice(r * n // dp, (r + 1) * n // dp)).micro_batches(n)[0]
    return {"metrics": {k: float(v) for k, v in metrics.items()},
            "train_routing_mismatch": float(response_routing_mismatch(train_maps, mb))}
