"""Megatron-Core GPT models from model_configs/*.yaml, and the HF <-> Megatron mapping."""

from megatron_apo.models.builder import build_gpt_model, count_parameters, transformer_config
from megatron_apo.models.config import ModelConfig, RopeScaling, available_model_configs, load_model_config

__all__ = [
    "ModelConfig",
    "RopeScaling",
    "available_model_configs",
    "build_gpt_model",
    "count_parameters",
    "load_model_config",
    "transformer_config",
]
