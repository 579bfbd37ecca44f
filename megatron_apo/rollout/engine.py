"""The rollout engine interface every backend implements (vLLM on GPU, transformers on CPU), and `EngineSpec`.

`RolloutEngine` declares everything `RolloutFleet` calls on an engine actor: generation (`generate` with
`request_ids`), the weight version, weight updates from tensors or over the sync group (`join_sync_group`,
`receive_weights`), the probe `logits` and `close`. `EngineSpec` says how the fleet builds one engine actor;
`megatron_apo.rollout.engines` turns `rollout.engine` into one.

Log-prob semantics: `Sample.logprobs[i]` is log p(token_i) under the distribution the engine actually
sampled from, i.e. after temperature scaling and top-k/top-p truncation + renormalisation. The trainer
recomputes log pi_old with temperature applied and no truncation; the difference is reported as the
rollout/trainer mismatch metric. `SamplingParams.logprob_space()` names which distribution was used.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable, Sequence

if TYPE_CHECKING:  # torch is not imported here: `megatron-apo train`'s checks before any rank start stay quick
    import torch

    from megatron_apo.rollout.sync_group import SyncEndpoint


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
    def generate(self, prompt_token_ids: list[list[int]], params: SamplingParams,
                 request_ids: Sequence[int] | None = None) -> list[list[Sample]]:
        """Returns, for each prompt in order, its `params.n` samples in order.

        `request_ids` (default 0..P-1) seed each prompt's samples: the fleet passes global prompt indices, so a
        fixed `params.seed` gives the same samples however prompts are spread over engines. Each sample's
        `meta["weights_version"]` is the version of the weights that generated it.
        """

    @abstractmethod
    def update_weights(self, version: int, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Loads Hugging Face-named full tensors; afterwards `weights_version()` is `version`."""

    @abstractmethod
    def weights_version(self) -> int:
        """The version of the weights being served (-1 before any update)."""

    @abstractmethod
    def join_sync_group(self, endpoint: SyncEndpoint, rank: int) -> None:
        """Joins the trainer's weight-sync group as sync rank `rank` (an engine with k processes takes `rank` ..
        `rank + k - 1`, `EngineSpec.sync_ranks_per_engine`); blocks until every member has joined."""

    @abstractmethod
    def receive_weights(self, version: int) -> dict:
        """Receives one sync over the group; returns its summary (`version`, `checksum`, ...). A sync that does
        not verify raises and leaves the engine refusing to serve until a later one verifies."""

    def logits(self, token_ids: Sequence[Sequence[int]]) -> torch.Tensor:
        """fp32 logits [B, S, V] of equal-length sequences (a probe for parity checks); optional."""
        raise NotImplementedError(f"{type(self).__name__} has no probe logits; parity probes use rollout.engine=cpu")

    def close(self) -> None:
        """Releases what the engine started outside its own process (vLLM: the engine core); default: nothing."""


@dataclass
class EngineSpec:
    """How to build one engine actor. `engine_cls`: a RolloutEngine class or 'module:Class'."""

    engine_cls: Any
    kwargs: dict = field(default_factory=dict)
    num_cpus: float = 0.5
    num_gpus: float = 0.0
    sync_ranks_per_engine: int = 1  # processes per engine in the sync group (vLLM: its TP workers)
    env_vars: dict = field(default_factory=dict)
    placement_bundles: list[dict] | None = None  # one placement group per engine (vLLM TP>1: a GPU bundle per rank)

    def resolve_cls(self) -> type[RolloutEngine]:
        if isinstance(self.engine_cls, str):
            module, _, name = self.engine_cls.partition(":")
            return getattr(importlib.import_module(module), name)
        return self.engine_cls
