"""Trainer throughput with padded, token-budget and packed micro-batches on one long-tailed batch (CPU by default).

The batch: `--batch` samples, prompts of `--prompt` tokens, response lengths drawn from a lognormal distribution
(median `--median`, sigma `--sigma`) clipped to [4, `--max-response`]: most responses are short, a few are long,
as with reasoning rollouts. The model: the tiny test shape (4 layers, hidden 64), fp32, one rank. Each layout runs
the trainer's three passes on the whole batch (reference forward, old-policy forward, train forward+backward with
the vanilla loss), `--repeats` times alternating layouts; the best time of each counts (other jobs load the CPU):
  padded : today's default, `micro_batch_size` samples per micro-batch, every one padded to the longest sequence
  tokens : trainer.micro_batch_tokens, each micro-batch padded to its own longest sequence (bin-packed by length)
  packed : trainer.pack_sequences, samples back to back in rows of micro_batch_tokens (block-diagonal causal mask)
Reports the padding fraction (1 - real tokens / computed positions) and trainer tokens/s (real tokens / time),
ratios against padded, and, last, one JSON line.

    python bench/packing.py [--batch 64 --prompt 32 --median 40 --sigma 1.0 --max-response 224 --tokens 1024]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

LAYOUTS = ("padded", "tokens", "packed")


def long_tailed_batch(args, vocab: int):
    """The benchmark batch (see the module docstring); returns an RLBatch."""
    from megatron_apo.rollout.engine import Sample
    from megatron_apo.trainer.batch import build_batch

    g = torch.Generator().manual_seed(args.seed)
    lengths = torch.exp(torch.log(torch.tensor(float(args.median))) + args.sigma * torch.randn(args.batch, generator=g))
    lengths = lengths.round().clamp(4, args.max_response).long().tolist()
    prompts = [torch.randint(1, vocab, (args.prompt,), generator=g).tolist() for _ in lengths]
    samples = [[Sample(i, 0, torch.randint(1, vocab, (n,), generator=g).tolist(), [-2.0] * n, "stop")]
               for i, n in enumerate(lengths)]
    adv = torch.randn(args.batch, generator=g)
    return build_batch(prompts, samples, torch.zeros(args.batch), adv), lengths


def _bench(args) -> dict:
    from megatron_apo.config import AlgorithmConfig
    from megatron_apo.models import build_gpt_model, load_model_config
    from megatron_apo.parallel import init_distributed
    from megatron_apo.trainer.batch import plan_micro_batches
    from megatron_apo.trainer.passes import PassSettings
    from megatron_apo.trainer.rl_step import loss_and_gradients

    init_distributed(seed=0)
    cfg = load_model_config("tiny")
    policy, reference = build_gpt_model(cfg), build_gpt_model(cfg)
    batch, lengths = long_tailed_batch(args, cfg.vocab_size)
    real = sum(args.prompt + n for n in lengths)
    settings = PassSettings(AlgorithmConfig(loss_mode="vanilla"), vocab_size=cfg.vocab_size)
    plans = {
        "padded": plan_micro_batches(batch, 0, 1, args.micro_batch_size, 0),
        "tokens": plan_micro_batches(batch, 0, 1, args.micro_batch_size, 0, micro_batch_tokens=args.tokens),
        "packed": plan_micro_batches(batch, 0, 1, args.micro_batch_size, 0, micro_batch_tokens=args.pack_tokens,
                                     pack=True),
    }

    def step(plan) -> float:
        t0 = time.perf_counter()
        loss_and_gradients([policy], reference, plan, settings)
        return time.perf_counter() - t0

    best = {name: float("inf") for name in LAYOUTS}
    step(plans["padded"])  # warm-up
    for _ in range(args.repeats):
        for name in LAYOUTS:  # alternating: a burst of load from other jobs hits every layout
            best[name] = min(best[name], step(plans[name]))
    out = {"real_tokens": real, "samples": args.batch, "response_lengths": sorted(lengths)}
    for name, plan in plans.items():
        computed = sum(mb["tokens"].numel() for mb in plan.micro)
        out[name] = {"micro_batches": len(plan.micro), "computed_positions": computed,
                     "padding_frac": 1 - real / computed, "time_s": best[name], "tokens_per_s": real / best[name]}
    return out


def main() -> None:
    from megatron_apo.parallel import run_distributed

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--prompt", type=int, default=32)
    p.add_argument("--median", type=float, default=40.0, help="median response length (lognormal)")
    p.add_argument("--sigma", type=float, default=1.0, help="lognormal sigma of the response lengths")
    p.add_argument("--max-response", type=int, default=224)
    p.add_argument("--micro-batch-size", type=int, default=4, help="padded layout's samples per micro-batch")
    p.add_argument("--tokens", type=int, default=1024, help="token budget of the token-budget layout")
    p.add_argument("--pack-tokens", type=int, default=256, help="row length of the packed layout")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    r = run_distributed(_bench, 1, args, timeout=1800)[0]
    print(f"{args.batch} samples, prompt {args.prompt}, responses lognormal(median {args.median:g}, sigma "
          f"{args.sigma:g}) clipped to [4, {args.max_response}]: {r['real_tokens']} real tokens")
    print(f"{'layout':8} {'micro-batches':>13} {'positions':>10} {'padding':>8} {'time s':>8} {'tokens/s':>9} "
          f"{'vs padded':>9}")
    base = r["padded"]["tokens_per_s"]
    for name in LAYOUTS:
        x = r[name]
        print(f"{name:8} {x['micro_batches']:>13} {x['computed_positions']:>10} {x['padding_frac']:>8.1%} "
              f"{x['time_s']:>8.3f} {x['tokens_per_s']:>9.0f} {x['tokens_per_s'] / base:>8.2f}x")
    out = {f"{n}_padding_frac": round(r[n]["padding_frac"], 4) for n in LAYOUTS}
    out.update({f"{n}_tokens_per_s": round(r[n]["tokens_per_s"], 1) for n in LAYOUTS})
    out.update({f"{n}_over_padded": round(r[n]["tokens_per_s"] / base, 3) for n in LAYOUTS if n != "padded"})
    out["real_tokens"] = r["real_tokens"]
    print(json.dumps(out))


if __name__ == "__main__":
    main()
