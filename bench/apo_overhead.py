"""APO step time over GRPO step time on the same batch (TP=2, gloo, CPU by default).

A "step" here is the trainer's model work for one batch: reference forward (when the method needs it),
old-policy forward, one forward+backward with the loss, and the optimizer step. Rollout and weight sync
are identical for both methods and left out. Baselines measured in the same run:
  grpo_kl  : GRPO + k3 KL to the reference (the usual verl GRPO recipe; same model passes as APO)
  grpo     : GRPO without a reference model (no reference forward at all)
Prints a table and, last, one JSON line: {"apo_over_grpo_kl": ..., "apo_over_grpo": ..., ...}.

    python bench/apo_overhead.py [--vocab 32000 --hidden 256 --layers 4 --batch 16 --prompt 64 --response 192]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

MODES = {
    "grpo": {"loss_mode": "vanilla"},
    "grpo_kl": {"loss_mode": "vanilla", "use_kl_loss": True},
    "apo": {"loss_mode": "apo_ratio"},
}


def _bench(args) -> dict:
    from megatron_apo.config import AlgorithmConfig
    from megatron_apo.models import build_gpt_model
    from megatron_apo.models.config import ModelConfig
    from megatron_apo.parallel import ParallelConfig, init_distributed
    from megatron_apo.trainer.batch import RLBatch
    from megatron_apo.trainer.optim import OptimConfig, build_optimizer, wrap_ddp, zero_grads
    from megatron_apo.trainer.passes import OldPolicyPass, PassSettings, ReferencePass, TrainPass
    from megatron_apo.trainer.schedule import forward_backward

    init_distributed(ParallelConfig(args.tp, 1), seed=0)
    cfg = ModelConfig(name="bench", architecture="qwen2", num_layers=args.layers, hidden_size=args.hidden,
                      ffn_hidden_size=4 * args.hidden, num_attention_heads=8, num_query_groups=2,
                      vocab_size=args.vocab, max_position_embeddings=args.prompt + args.response, qkv_bias=True)
    policy = [wrap_ddp(build_gpt_model(cfg), use_distributed_optimizer=True)]
    opt = build_optimizer(policy, OptimConfig(lr=1e-6))
    ref = build_gpt_model(cfg).requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    n, s, t = args.batch, args.prompt + args.response, args.response
    batch = RLBatch(
        tokens=torch.randint(0, args.vocab, (n, s), generator=g),
        resp_index=(args.prompt - 1 + torch.arange(t)).expand(n, -1).contiguous(),
        response_ids=torch.randint(0, args.vocab, (n, t), generator=g),
        response_mask=torch.ones(n, t), rollout_logprobs=torch.zeros(n, t), rewards=torch.zeros(n),
        advantages=torch.randn(n, 1, generator=g).expand(n, t).contiguous(), group_index=torch.arange(n) // 4)
    batch.tokens[:, args.prompt:] = batch.response_ids
    mbs = args.micro_batch_size
    times: dict[str, list[float]] = {m: [] for m in MODES}
    for rep in range(args.warmup + args.repeats):
        for mode, keys in MODES.items():
            settings = PassSettings(AlgorithmConfig(**keys), vocab_size=cfg.vocab_size)
            micro = batch.micro_batches(mbs)
            torch.distributed.barrier()
            t0 = time.perf_counter()
            ref_pass = ReferencePass(settings, len(micro)) if mode != "grpo" else None
            with torch.no_grad():
                if ref_pass is not None:
                    forward_backward([ref], micro, ref_pass, s, mbs, forward_only=True)
                old_pass = OldPolicyPass(settings, ref_pass.outputs if ref_pass else [None] * len(micro))
                forward_backward(policy, micro, old_pass, s, mbs, forward_only=True)
            zero_grads(policy, opt)
            train = TrainPass(settings, ref_pass.outputs if ref_pass else None, old_pass.outputs)
            forward_backward(policy, micro, train, s, mbs)
            opt.step()
            torch.distributed.barrier()
            if rep >= args.warmup:
                times[mode].append(time.perf_counter() - t0)
    return {m: statistics.median(v) for m, v in times.items()}


def main() -> None:
    from megatron_apo.parallel import run_distributed

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--micro-batch-size", type=int, default=8)
    p.add_argument("--prompt", type=int, default=64)
    p.add_argument("--response", type=int, default=192)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    med = run_distributed(_bench, args.tp, args, timeout=1800)[0]
    print(f"{'method':10s} {'step s (median)':>16s}")
    for m, v in med.items():
        print(f"{m:10s} {v:16.3f}")
    out = {"apo_over_grpo_kl": med["apo"] / med["grpo_kl"], "apo_over_grpo": med["apo"] / med["grpo"],
           "apo_s": med["apo"], "grpo_kl_s": med["grpo_kl"], "grpo_s": med["grpo"], "tp": args.tp,
           "tokens": args.batch * (args.prompt + args.response), "vocab": args.vocab}
    print(f"APO step / GRPO+KL step = {out['apo_over_grpo_kl']:.3f}x;  "
          f"APO / GRPO (no reference) = {out['apo_over_grpo']:.3f}x")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
