"""Benchmark: the vocab-parallel ops at TP=2 (2 gloo processes) vs the dense single-process computation.

Workload per run, on the same bf16 logits [tokens, vocab] (what one RL step does per micro-batch):
  reference pass (no grad): global Top-K (K=8) + log-prob of the sampled token;
  training pass: log-probs at [sampled token | the K anchors] + entropy, forward AND backward.
Dense baseline: the same on the full vocabulary in one process (log_softmax on fp32 upcast, torch.topk,
gather, entropy, autograd). Each measurement runs in a fresh process; peak memory is that process's peak
RSS (ru_maxrss) minus its RSS before the logits were created, so it counts the logits, their gradient and
every temporary. Time: best of `--repeats` (default 1) after a warm-up on 64 tokens; for TP=2 the
slower rank.

  python bench/vocab_parallel.py --tokens 2048           # about 1.5 min on a 2-core VM
The last line printed is one JSON object (time_ratio, peak_mem_ratio: TP=2 per rank / dense).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

import psutil
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_apo.parallel import run_distributed  # noqa: E402


def _rss_mb() -> float:
    return psutil.Process().memory_info().rss / 2**20


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


_GEN_ROWS, _GEN_COLS = 512, 64  # logits are generated per (row block, column block): any shard regenerates its part


def make_logits(tokens: int, vocab: int, col0: int, col1: int, seed: int = 0) -> torch.Tensor:
    """Columns [col0, col1) of deterministic bf16 logits [tokens, vocab]: each 512 x 64 block has its own seed,
    so a rank builds only its shard and the dense process the same values."""
    if col0 % _GEN_COLS or col1 % _GEN_COLS:
        raise ValueError(f"--vocab / --tp must be a multiple of {_GEN_COLS} (shard [{col0}, {col1}))")
    out = torch.empty(tokens, col1 - col0, dtype=torch.bfloat16)
    for r in range(0, tokens, _GEN_ROWS):
        rows = min(_GEN_ROWS, tokens - r)
        for c in range(col0, col1, _GEN_COLS):
            g = torch.Generator().manual_seed((seed * 1_000_003 + r) * 1_000_003 + c)
            block = torch.empty(rows, _GEN_COLS, dtype=torch.bfloat16).normal_(0.0, 3.0, generator=g)
            out[r : r + rows, c - col0 : c - col0 + _GEN_COLS] = block
    return out


def _targets(tokens: int, vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (tokens,), generator=torch.Generator().manual_seed(1))


def _time_runs(step, tokens: int, repeats: int, barrier=lambda: None) -> float:
    """Best wall time of `step(tokens)` over `repeats`, after a short warm-up on a few tokens (threads,
    kernels; big buffers are fresh pages on every run anyway since glibc returns them to the OS)."""
    step(min(tokens, 64))
    best = float("inf")
    for _ in range(repeats):
        barrier()
        t0 = time.perf_counter()
        step(tokens)
        barrier()
        best = min(best, time.perf_counter() - t0)
    return best


def dense_body(tokens: int, vocab: int, k: int, repeats: int, threads: int) -> dict:
    torch.set_num_threads(threads)
    base = _rss_mb()
    logits = make_logits(tokens, vocab, 0, vocab)
    y = _targets(tokens, vocab)
    result = {}

    def step(n):
        with torch.no_grad():  # reference pass
            lp = torch.log_softmax(logits[:n].float(), dim=-1)
            top_idx = torch.topk(lp, k, dim=-1).indices
            ref_lp = lp.gather(-1, y[:n, None])
            del lp
        x = logits[:n].detach().requires_grad_()  # training pass
        lp = torch.log_softmax(x.float(), dim=-1)
        picked = lp.gather(-1, torch.cat([y[:n, None], top_idx], dim=1))
        entropy = -(lp.exp() * lp).sum(-1)
        loss = picked.sum() + 0.1 * entropy.sum()
        loss.backward()
        result["checksum"] = float(loss) + float(ref_lp.sum())

    secs = _time_runs(step, tokens, repeats)
    return {"time_s": secs, "peak_mb": _peak_mb() - base, "checksum": result["checksum"]}


def tp_body(tokens: int, vocab: int, k: int, repeats: int, chunk_size) -> dict:
    import torch.distributed as dist

    from megatron_apo.ops.vocab_parallel import (
        vocab_parallel_logprob_stats,
        vocab_parallel_logprobs,
        vocab_parallel_topk,
    )

    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    rank, tp = dist.get_rank(), dist.get_world_size()
    group = dist.group.WORLD
    width = vocab // tp
    base = _rss_mb()
    logits = make_logits(tokens, vocab, rank * width, (rank + 1) * width)
    y = _targets(tokens, vocab)
    result = {}

    def step(n):
        kw = dict(vocab_size=vocab, chunk_size=chunk_size)
        with torch.no_grad():
            top_idx, _ = vocab_parallel_topk(logits[:n], k, group, **kw)
            ref_lp = vocab_parallel_logprobs(logits[:n], y[:n], group, **kw)
        x = logits[:n].detach().requires_grad_()
        stats = vocab_parallel_logprob_stats(x, torch.cat([y[:n, None], top_idx], dim=1), group, **kw)
        loss = stats.logprobs.sum() + 0.1 * stats.entropy.sum()
        loss.backward()
        result["checksum"] = float(loss) + float(ref_lp.sum())

    secs = _time_runs(step, tokens, repeats, barrier=dist.barrier)
    out = {"time_s": secs, "peak_mb": _peak_mb() - base, "checksum": result["checksum"]}
    dist.destroy_process_group()
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--vocab", type=int, default=152064, help="Qwen2.5's padded vocabulary (divisible by 2)")
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--chunk-size", type=int, default=None, help="tokens per chunk (default: the ops' default)")
    ap.add_argument("--dense-threads", type=int, default=2, help="threads of the dense process (default: as many "
                    "cores as the TP=2 run uses in total)")
    ap.add_argument("--repeats", type=int, default=1, help="timed runs after one warm-up (best is kept)")
    ap.add_argument("--with-tp1", action="store_true", help="also time the ops in one process (TP=1, 1 thread): "
                    "separates the gain of the implementation (tiles, fused passes) from that of the second rank")
    args = ap.parse_args(argv)
    if args.vocab % args.tp:
        ap.error(f"--vocab {args.vocab} must be divisible by --tp {args.tp}")

    dense = run_distributed(dense_body, 1, args.tokens, args.vocab, args.k, args.repeats, args.dense_threads,
                            timeout=600, threads_per_process=args.dense_threads)[0]
    ranks = run_distributed(tp_body, args.tp, args.tokens, args.vocab, args.k, args.repeats, args.chunk_size,
                            timeout=600, threads_per_process=1)
    tp1 = None
    if args.with_tp1:
        tp1 = run_distributed(tp_body, 1, args.tokens, args.vocab, args.k, args.repeats, args.chunk_size,
                              timeout=600, threads_per_process=1)[0]
    tp_time = max(r["time_s"] for r in ranks)
    tp_peak = max(r["peak_mb"] for r in ranks)
    rel_err = abs(ranks[0]["checksum"] - dense["checksum"]) / max(1.0, abs(dense["checksum"]))
    print(f"tokens={args.tokens} vocab={args.vocab} K={args.k} bf16 logits, machine: {os.cpu_count()} CPU cores")
    print(f"dense (1 process, {args.dense_threads} threads): {dense['time_s']:.3f} s, peak {dense['peak_mb']:.0f} MB")
    print(f"TP={args.tp} ({args.tp} gloo processes, 1 thread each): {tp_time:.3f} s, peak per rank {tp_peak:.0f} MB")
    if tp1 is not None:
        print(f"ops at TP=1 (1 process, 1 thread): {tp1['time_s']:.3f} s, peak {tp1['peak_mb']:.0f} MB")
    print(f"results agree: relative checksum difference {rel_err:.2e}")
    summary = {
        "tokens": args.tokens, "vocab": args.vocab, "k": args.k, "tp": args.tp,
        "dense_threads": args.dense_threads, "dense_time_s": round(dense["time_s"], 4), "tp_time_s": round(tp_time, 4),
        "dense_peak_mb": round(dense["peak_mb"], 1), "tp_peak_mb_per_rank": round(tp_peak, 1),
        "time_ratio": round(tp_time / dense["time_s"], 3),
        "peak_mem_ratio": round(tp_peak / dense["peak_mb"], 3),
        "checksum_rel_err": rel_err,
    }
    if tp1 is not None:
        summary.update(tp1_time_s=round(tp1["time_s"], 4), tp1_peak_mb=round(tp1["peak_mb"], 1))
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
