"""Megatron-Core GPT models from model_configs/*.yaml, and the HF <-> Megatron mapping."""

from megatron_apo.models.config import ModelConfig, RopeScaling, available_model_configs, load_model_config

_BUILDER = ("build_gpt_model", "count_parameters", "transformer_config")


def __getattr__(name):
    # The builder imports torch and megatron-core; loading it on first use keeps config checks (CLI) fast.
    if name in _BUILDER:
        from megatron_apo.models import builder

        return getattr(builder, name)
    raise AttributeError(f"module 'megatron_apo.models' has no attribute {name!r}")


__all__ = ["ModelConfig", "RopeScaling", "available_model_configs", "load_model_config", *_BUILDER]
