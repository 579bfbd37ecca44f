"""The policy-loss registry: one function per `algorithm.loss_mode`, each declaring the inputs it needs.

Torch-free on purpose: the CLI checks `algorithm.loss_mode` and imports the user's loss modules
(`algorithm.loss_modules`) before any rank starts, in well under a second. The built-in losses live in
`algorithms/losses/` (one file each) and register themselves when that package is imported.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable

from megatron_apo.config import AlgorithmConfig, ConfigError

BUILTIN_LOSS_MODES = ("vanilla", "apo_ratio", "casp")  # registered by algorithms/losses/ when it is imported
_LOSSES_PACKAGE = "megatron_apo.algorithms.losses"


@dataclass(frozen=True)
class LossInputs:
    """What a loss mode needs beyond the sampled tokens, the old log-probs and the advantages.

    The trainer's passes compute exactly the union of these over the loss, the KL settings and the anchor
    metrics (`loss_inputs`); `compute_policy_loss` checks that the required ones were given.
    """

    ref_logprobs: bool = False
    """log pi_ref(y) [B, T] (also implied by `use_kl_loss` / `use_kl_loss_on_wrong`)."""

    ref_topk: int = 0
    """K > 0: the reference pass's vocab-parallel Top-K ids [B, T, K]; the train pass gathers log pi at them in its
    fused vocab pass (`ctx.ref_topk_lp`)."""

    ref_topk_logprobs: bool = False
    """log pi_ref at the reference Top-K [B, T, K] (the same reference pass, no extra cost)."""

    old_at_ref_topk: bool = False
    """log pi_old at the reference Top-K [B, T, K] (`old_anchor_logprobs`, one more gather in the old pass)."""

    topn: int = 0
    """N > 0: the policy's own Top-N, recomputed in each pass: the old pass keeps log pi_old at its Top-N
    (`old_topk_logprobs`), the train pass's fused vocab pass gives this policy's (`ctx.stats.topk_*`)."""

    def union(self, other: "LossInputs") -> "LossInputs":
        return LossInputs(**{f.name: max(getattr(self, f.name), getattr(other, f.name))
                             for f in dataclasses.fields(self)})


PolicyLossFn = Callable[..., "tuple[Any, dict]"]  # fn(ctx: losses.LossContext) -> (loss, metrics)


@dataclass(frozen=True)
class PolicyLoss:
    name: str
    fn: PolicyLossFn
    inputs: Any  # LossInputs, or a function of the AlgorithmConfig returning one

    def needs(self, cfg: AlgorithmConfig) -> LossInputs:
        return self.inputs(cfg) if callable(self.inputs) else self.inputs


POLICY_LOSS_REGISTRY: dict[str, PolicyLoss] = {}


def register_policy_loss(name: str, inputs: Any = LossInputs()):
    """Decorator: `@register_policy_loss("my_loss", LossInputs(...))` makes `fn(ctx) -> (loss, metrics)` the
    `loss_mode: my_loss` loss. `inputs` (a LossInputs, or a function of the config returning one) declares what it
    needs; a name is registered once."""

    def deco(fn: PolicyLossFn) -> PolicyLossFn:
        if name in POLICY_LOSS_REGISTRY:
            raise ValueError(f"policy loss {name!r} is registered twice")
        POLICY_LOSS_REGISTRY[name] = PolicyLoss(name, fn, inputs)
        return fn

    return deco


def registered_loss_modes() -> tuple[str, ...]:
    """The built-in modes (registered when the losses package loads) and every mode registered so far."""
    return tuple(dict.fromkeys((*BUILTIN_LOSS_MODES, *POLICY_LOSS_REGISTRY)))


def check_loss_mode(cfg: AlgorithmConfig) -> None:
    """`algorithm.loss_mode` names a registered loss (import `algorithm.loss_modules` first)."""
    if cfg.loss_mode not in registered_loss_modes():
        hint = "" if cfg.loss_modules else "; a loss of your own: name its module in algorithm.loss_modules"
        raise ConfigError(f"algorithm.loss_mode={cfg.loss_mode!r}: must be one of "
                          f"{', '.join(registered_loss_modes())}{hint}")


def get_policy_loss(name: str) -> PolicyLoss:
    if name in BUILTIN_LOSS_MODES and name not in POLICY_LOSS_REGISTRY:
        importlib.import_module(_LOSSES_PACKAGE)  # the built-ins register on import
    if name not in POLICY_LOSS_REGISTRY:
        raise ConfigError(f"algorithm.loss_mode={name!r}: must be one of {', '.join(registered_loss_modes())}")
    return POLICY_LOSS_REGISTRY[name]


def required_inputs(config: Any) -> LossInputs:
    """What the loss cannot run without: the mode's declaration, plus log pi_ref(y) when a KL term is on."""
    cfg = resolve_algorithm_config(config)
    needs = get_policy_loss(cfg.loss_mode).needs(cfg)
    if cfg.use_kl_loss or cfg.use_kl_loss_on_wrong:
        needs = needs.union(LossInputs(ref_logprobs=True))
    return needs


def loss_inputs(config: Any) -> LossInputs:
    """What the reference and old passes compute: `required_inputs`, log pi_ref(y) always (the `ref_kl` metric of
    every mode costs nothing: it is a column of the reference pass's one vocab pass), and the reference Top-K when
    `anchor_metrics` asks for the anchor metrics."""
    cfg = resolve_algorithm_config(config)
    needs = required_inputs(cfg).union(LossInputs(ref_logprobs=True))
    if cfg.anchor_metrics:
        needs = needs.union(LossInputs(ref_topk=cfg.apo_topk))
    return needs


def import_loss_modules(cfg: AlgorithmConfig) -> None:
    """Imports every module of `algorithm.loss_modules`, so the `@register_policy_loss` functions in them are
    registered in this process (the CLI and every rank call this before the loss mode is checked)."""
    for name in cfg.loss_modules:
        try:
            importlib.import_module(name)
        except ImportError as e:
            raise ConfigError(f"algorithm.loss_modules: cannot import {name!r} ({e}); give an importable module "
                              "path (on PYTHONPATH or the working directory) or remove it") from None


def resolve_algorithm_config(config: Any) -> AlgorithmConfig:
    """A validated `AlgorithmConfig` from a dataclass instance or a plain mapping of its keys (the losses and the
    advantages accept both); ConfigError names `algorithm.<key>`."""
    if isinstance(config, AlgorithmConfig):
        cfg = config
    elif isinstance(config, Mapping):
        known = {f.name for f in dataclasses.fields(AlgorithmConfig)}
        unknown = sorted(set(config) - known)
        if unknown:
            raise ConfigError(f"algorithm.{unknown[0]}: unknown key; valid keys: {', '.join(sorted(known))}")
        cfg = AlgorithmConfig(**dict(config))
    elif dataclasses.is_dataclass(config) and not isinstance(config, type):
        return resolve_algorithm_config(dataclasses.asdict(config))
    else:
        raise ConfigError(f"algorithm config must be an AlgorithmConfig or a mapping (got {type(config).__name__})")
    cfg.validate()
    check_loss_mode(cfg)
    return cfg


__all__ = ["BUILTIN_LOSS_MODES", "POLICY_LOSS_REGISTRY", "LossInputs", "PolicyLoss", "check_loss_mode",
           "get_policy_loss", "import_loss_modules", "loss_inputs", "register_policy_loss", "registered_loss_modes",
           "required_inputs", "resolve_algorithm_config"]
