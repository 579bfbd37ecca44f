"""Vocab-parallel ops on tensor-parallel (vocab-sharded) logits."""

from megatron_apo.ops.vocab_parallel import (
    vocab_parallel_entropy,
    vocab_parallel_gather_logprobs,
    vocab_parallel_logprob_stats,
    vocab_parallel_logprobs,
    vocab_parallel_topk,
)

__all__ = [
    "vocab_parallel_entropy",
    "vocab_parallel_gather_logprobs",
    "vocab_parallel_logprob_stats",
    "vocab_parallel_logprobs",
    "vocab_parallel_topk",
]
