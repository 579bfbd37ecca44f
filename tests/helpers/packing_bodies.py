"""Test bodies for token-budget and packed micro-batches (module level so spawned ranks can import them)."""

from __future__ import annotations

import torch

from megatron_apo.models import build_gpt_model, load_model_config
from megatron_apo.parallel import ParallelConfig, init_distributed
from tests.helpers.model_parity import full_grads, set_fixed_weights

AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")
LAYOUTS = {"padded": dict(micro_batch_tokens=0), "tokens": dict(micro_batch_tokens=48),
           "packed": dict(micro_batch_tokens=48, pack=True)}


def long_tailed_batch(vocab: int, n: int = 8, seed: int = 5):
    """Prompts of 3-6 tokens, responses of 1-20 (most short, a few long), mixed-sign advantages."""
    from megatron_apo.trainer.batch import RLBatch

    g = torch.Generator().manual_seed(seed)
    plens = torch.randint(3, 7, (n,), generator=g).tolist()
    rlens = [1, 20, 3, 2, 14, 5, 1, 4][:n]
    t, s = max(rlens), ((max(p + r for p, r in zip(plens, rlens)) + 7) // 8) * 8
    tokens = torch.zeros(n, s, dtype=torch.long)
    ids, mask = torch.zeros(n, t, dtype=torch.long), torch.zeros(n, t)
    resp_index = torch.zeros(n, t, dtype=torch.long)
    for i, (p, r) in enumerate(zip(plens, rlens)):
        seq = torch.randint(1, vocab, (p + r,), generator=g)
        tokens[i, : p + r] = seq
        ids[i, :r], mask[i, :r] = seq[p:], 1.0
        resp_index[i] = (p - 1 + torch.arange(t)).clamp(max=s - 1)
    adv = torch.randn(n, generator=g)[:, None] * mask
    return RLBatch(tokens, resp_index, ids, mask, torch.full((n, t), -2.0) * mask, torch.zeros(n), adv,
                   torch.arange(n) // 4)


def losses_and_grads(tp: int, pp: int) -> dict:
    """For every aggregation mode and layout: the mini-batch loss (mean of the micro-batch losses, as Megatron
    applies them) and the full gradients after the reference, old-policy and train passes of one mini-batch."""
    from megatron.core import parallel_state as ps

    from megatron_apo.config import AlgorithmConfig
    from megatron_apo.trainer.batch import plan_micro_batches
    from megatron_apo.trainer.passes import PassSettings
    from megatron_apo.trainer.rl_step import loss_and_gradients

    init_distributed(ParallelConfig(tp, pp))
    cfg = load_model_config("tiny")
    policy, reference = build_gpt_model(cfg), build_gpt_model(cfg)
    set_fixed_weights(policy)
    set_fixed_weights(reference)
    with torch.no_grad():  # a reference a little off the policy: the KL term has a gradient
        for p in reference.parameters():
            p.mul_(1.05)
    batch = long_tailed_batch(cfg.vocab_size)
    out = {"pp_rank": ps.get_pipeline_model_parallel_rank(), "tp_rank": ps.get_tensor_model_parallel_rank()}
    for mode in AGG_MODES:
        algo = AlgorithmConfig(loss_agg_mode=mode, use_kl_loss=True, kl_loss_coef=0.1, entropy_coeff=0.01)
        settings = PassSettings(algo, vocab_size=cfg.vocab_size, temperature=0.9)
        for name, kw in LAYOUTS.items():
            plan = plan_micro_batches(batch, 0, 1, micro_batch_size=batch.size, mini_batch_size=0, **kw)
            res = loss_and_gradients([policy], reference, plan, settings)
            loss = sum(float(m["loss"]) for m in res) / len(plan.micro) if res else None
            grads = {k: g.numpy() for k, g in full_grads(policy, cfg.vocab_size).items()}  # by value, not shared fds
            out[(mode, name)] = {"loss": loss, "grads": grads,
                                 "micro": len(plan.micro), "shapes": [tuple(mb["tokens"].shape) for mb in plan.micro]}
    return out


def packed_row_logits() -> dict:
    """Max |logit difference| between each sample run alone and the same samples packed in one row, through
    `model_forward` (block mask + per-sample RoPE positions) and with no mask at all."""
    from megatron_apo.trainer.batch import plan_micro_batches, sequence_lengths
    from megatron_apo.trainer.schedule import model_forward

    init_distributed()
    cfg = load_model_config("tiny")
    model = build_gpt_model(cfg)
    set_fixed_weights(model)
    batch = long_tailed_batch(cfg.vocab_size, n=4)
    mb = plan_micro_batches(batch, 0, 1, 4, 0, micro_batch_tokens=256, pack=True).micro[0]
    lengths = sequence_lengths(batch).tolist()
    out = {}
    with torch.no_grad():
        packed = model_forward(model, mb)
        unmasked = model(mb["tokens"], mb["position_ids"], attention_mask=None)
        for name, row in (("masked", packed), ("unmasked", unmasked)):
            worst, start = 0.0, 0
            order = [next(j for j in range(batch.size) if torch.equal(batch.response_ids[j, : r.shape[0]], r))
                     for r in mb["response_ids"]]
            for j in order:
                n = lengths[j]
                alone = model(batch.tokens[j : j + 1, :n], torch.arange(n)[None], attention_mask=None)
                worst = max(worst, float((row[0, start : start + n] - alone[0]).abs().max()))
                start += n
            out[name] = worst
    return out


def packed_row_logits_cuda() -> dict:
    """On a GPU with Transformer Engine (bf16): a packed row through Megatron's THD path (PackedSeqParams,
    cu_seqlens) against each sample alone; also whether the model really is TE (else the mask path ran)."""
    from megatron_apo.parallel.devices import to_device
    from megatron_apo.trainer.batch import plan_micro_batches, sequence_lengths
    from megatron_apo.trainer.schedule import _uses_transformer_engine, model_forward

    init_distributed()
    cfg = load_model_config("tiny")
    model = build_gpt_model(cfg, params_dtype=torch.bfloat16).cuda()
    set_fixed_weights(model)
    batch = long_tailed_batch(cfg.vocab_size, n=4)
    mb = to_device(plan_micro_batches(batch, 0, 1, 4, 0, micro_batch_tokens=256, pack=True).micro[0], "cuda")
    lengths = sequence_lengths(batch).tolist()
    worst, start = 0.0, 0
    with torch.no_grad():
        row = model_forward(model, mb).float()
        for r in mb["response_ids"].cpu():
            j = next(j for j in range(batch.size) if torch.equal(batch.response_ids[j, : r.shape[0]], r))
            n = lengths[j]
            alone = model(batch.tokens[j : j + 1, :n].cuda(), torch.arange(n, device="cuda")[None],
                          attention_mask=None).float()
            worst = max(worst, float((row[0, start : start + n] - alone[0]).abs().max()))
            start += n
    return {"te": _uses_transformer_engine(model), "worst": worst, "scale": float(row.abs().max())}
