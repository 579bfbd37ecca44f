"""Every model config builds (on the meta device) with its published parameter count."""

import pytest

from megatron_apo.models import ModelConfig, available_model_configs, load_model_config
from megatron_apo.parallel import run_distributed
from tests.helpers.model_parity import meta_param_counts

EXPECTED = {"qwen2.5-0.5b", "qwen2.5-1.5b", "qwen2.5-7b", "qwen2.5-32b", "qwen2.5-72b", "llama3.1-8b", "llama3.1-70b",
            "tiny"}


def test_configs_present():
    assert EXPECTED <= set(available_model_configs())


def test_meta_param_counts_match_published():
    counts = meta_param_counts_cached()
    checked = 0
    for name, n in counts.items():
        cfg = load_model_config(name)
        if cfg.published_params is None:
            continue
        assert abs(n - cfg.published_params) / cfg.published_params <= 1e-3, (name, n, cfg.published_params)
        checked += 1
    assert checked >= 7


_CACHE = {}


def meta_param_counts_cached():
    if "c" not in _CACHE:
        _CACHE["c"] = run_distributed(meta_param_counts, 1, timeout=300)[0]
    return _CACHE["c"]


def test_vocab_padding_like_megatron():
    cfg = load_model_config("tiny")
    assert cfg.vocab_size == 250
    assert cfg.padded_vocab_size(1) == 256 and cfg.padded_vocab_size(2) == 256 and cfg.padded_vocab_size(4) == 512
    assert load_model_config("qwen2.5-7b").padded_vocab_size(1) == 152064
    assert load_model_config("qwen2.5-7b").padded_vocab_size(8) == 152576  # next multiple of 128*8


def test_bad_model_configs_are_one_line_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        load_model_config("nope")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\narchitecture: gpt9\nnum_layers: 2\nhidden_size: 8\nffn_hidden_size: 8\n"
                   "num_attention_heads: 2\nnum_query_groups: 1\nvocab_size: 10\n")
    with pytest.raises(ValueError, match="architecture"):
        load_model_config(bad)
    bad.write_text("name: x\narchitecture: qwen2\nnum_layer: 2\n")
    with pytest.raises(ValueError, match="num_layer"):
        load_model_config(bad)
    with pytest.raises(ValueError, match="does not divide num_query_groups"):
        load_model_config("qwen2.5-7b").validate(tensor_parallel_size=8)


def test_llama_rope_scaling_parsed():
    cfg = load_model_config("llama3.1-8b")
    assert cfg.rope_scaling is not None and cfg.rope_scaling.factor == 8.0
    assert isinstance(cfg, ModelConfig) and not cfg.qkv_bias
