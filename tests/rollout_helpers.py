"""Shared pieces of the rollout tests (module level so Ray actors and spawned trainer ranks can import them)."""

from __future__ import annotations

import os

import torch

from megatron_apo.rollout.cpu_engine import CPUEngine, build_hf_model

# A tiny Qwen2 (GQA, QKV bias, untied head), the same shape as model_configs/tiny.yaml.
TINY_HF_CONFIG = dict(
    model_type="qwen2", vocab_size=250, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rope_theta=10000.0,
    rms_norm_eps=1e-6, tie_word_embeddings=False, use_sliding_window=False,
)


def random_hf_state(seed: int, hf_config: dict = TINY_HF_CONFIG) -> list[tuple[str, torch.Tensor]]:
    """Random HF-named weights (norm weights around 1) from a seeded HF model."""
    torch.manual_seed(seed)
    model = build_hf_model(hf_config)
    out = []
    for name, p in model.named_parameters():
        t = p.detach().clone()
        if name.endswith("norm.weight"):
            t = 1.0 + 0.1 * torch.randn_like(t)
        else:
            t = 0.08 * torch.randn_like(t)
        out.append((name, t))
    return out


def reference_logits(named, tokens: list[list[int]], hf_config: dict = TINY_HF_CONFIG) -> torch.Tensor:
    """Dense single-process reference: a fresh HF model with these weights."""
    engine = CPUEngine(hf_config, named, version=0)
    return engine.logits(tokens)


class CrashingCPUEngine(CPUEngine):
    """Dies (process exit) in the middle of its first generate call fleet-wide; restarted ones do not."""

    def __init__(self, *args, crash_marker: str, **kwargs):
        super().__init__(*args, **kwargs)
        self.crash_marker = crash_marker

    def generate(self, prompt_token_ids, params, request_ids=None):
        try:
            fd = os.open(self.crash_marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return super().generate(prompt_token_ids, params, request_ids)
        os.close(fd)
        super().generate(prompt_token_ids[:1], params, request_ids=None if request_ids is None else request_ids[:1])
        os._exit(1)
