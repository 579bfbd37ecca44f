"""Rollout engines (vLLM on GPU, transformers on CPU), the Ray fleet, and trainer -> fleet weight sync."""

from megatron_apo.rollout.engine import RolloutEngine, Sample, SamplingParams

__all__ = ["RolloutEngine", "Sample", "SamplingParams"]
