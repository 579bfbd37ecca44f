"""Every model config builds (on the meta device) with its published parameter count."""

import pytest

from megatron_apo.models import ModelConfig, available_model_configs, load_model_config
from megatron_apo.parallel import run_distributed
from tests.helpers.model_parity import meta_param_counts

QWEN3 = {"qwen3-0.6b", "qwen3-1.7b", "qwen3-4b", "qwen3-8b", "qwen3-14b", "qwen3-32b",
         "qwen3-30b-a3b", "qwen3-235b-a22b"}
EXPECTED = {"qwen2.5-0.5b", "qwen2.5-1.5b", "qwen2.5-7b", "qwen2.5-32b", "qwen2.5-72b", "llama3.1-8b", "llama3.1-70b",
            "tiny", "tiny-qwen3-moe"} | QWEN3
# The Hub's safetensors totals (exact) for the Qwen3 checkpoints; 0.6B and 1.7B store the tied lm_head again,
# so their unique count is the total less vocab x hidden (model_configs/qwen3-*.yaml say where each is from).
HUB_TOTALS = {"qwen3-0.6b": 751_632_384 - 151936 * 1024, "qwen3-1.7b": 2_031_739_904 - 151936 * 2048,
              "qwen3-4b": 4_022_468_096, "qwen3-8b": 8_190_735_360, "qwen3-14b": 14_768_307_200,
              "qwen3-32b": 32_762_123_264, "qwen3-30b-a3b": 30_532_122_624, "qwen3-235b-a22b": 235_093_634_560}


def test_configs_present():
    assert EXPECTED <= set(available_model_configs())


@pytest.mark.slow
def test_meta_param_counts_match_published():
    counts = meta_param_counts_cached()
    checked = 0
    for name, n in counts.items():
        cfg = load_model_config(name)
        if cfg.published_params is None:
            continue
        assert abs(n - cfg.published_params) / cfg.published_params <= 1e-3, (name, n, cfg.published_params)
        checked += 1
    assert checked >= 15


def test_qwen3_meta_counts_are_the_published_totals_exactly():
    """Megatron's meta-device build, the planner's analytic count and the Hub's totals agree to the parameter
    (the model cards' rounded figures -- 0.6B ... 235B -- are within their rounding of these)."""
    from megatron_apo.launch.planner import count_parameters

    counts = meta_param_counts_cached()
    for name in QWEN3 | {"tiny-qwen3-moe"}:
        cfg = load_model_config(name)
        assert counts[name] == count_parameters(cfg, vocab_size=cfg.padded_vocab_size(1)), name
        if name in HUB_TOTALS:
            assert cfg.padded_vocab_size(1) == cfg.vocab_size == 151936
            assert counts[name] == HUB_TOTALS[name] == cfg.published_params, name


def test_qwen3_shapes():
    for name in QWEN3:
        cfg = load_model_config(name)
        assert cfg.qk_layernorm and not cfg.qkv_bias and cfg.head_dim == 128 and cfg.rope_theta == 1e6
        assert cfg.tie_word_embeddings == (name in ("qwen3-0.6b", "qwen3-1.7b", "qwen3-4b")), name
        assert cfg.is_moe == name.endswith(("a3b", "a22b")), name
        if cfg.is_moe:
            assert (cfg.num_moe_experts, cfg.moe_router_topk, cfg.moe_norm_topk_prob) == (128, 8, True)
            assert cfg.architecture == "qwen3_moe"


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
