"""Qwen3 dense and Qwen3-MoE in the HF <-> Megatron mapping: names against transformers' own checkpoints,
config.json both ways, the expert storage layout, and one-line errors for the MoE layouts not supported."""

import json

import pytest
import torch
from safetensors import safe_open

from megatron_apo.models import load_model_config
from megatron_apo.models.hf_mapping import (
    EXPERT_STACKED,
    expert_index,
    hf_config_from_model_config,
    hf_shapes,
    hf_sources,
    hf_to_megatron,
    layer_index,
    megatron_shape,
    megatron_to_hf,
    model_config_from_hf_config,
    stacked_name,
)
from tests.helpers.hf_models import build_hf_model, hf_config

KINDS = {"qwen3": "tiny-qwen3", "qwen3-moe": "tiny-qwen3-moe"}


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_transformers_checkpoint_names_and_shapes_are_the_mappings(kind, tmp_path):
    """What transformers writes (per-expert gate/up/down on disk, q_norm/k_norm) is exactly hf_shapes(cfg), and
    the config.json it writes reads back as the repo's tiny model config."""
    build_hf_model(kind).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    cfg = model_config_from_hf_config(config, name=KINDS[kind])
    want = load_model_config(KINDS[kind])
    skip = ("extra", "published_params")
    assert {k: v for k, v in cfg.to_dict().items() if k not in skip} == \
           {k: v for k, v in want.to_dict().items() if k not in skip}
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        disk = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    assert disk == hf_shapes(cfg)
    assert ("model.layers.1.self_attn.q_norm.weight" in disk) and cfg.qk_layernorm and not cfg.qkv_bias
    if kind == "qwen3-moe":
        assert cfg.num_moe_experts == 4 and cfg.moe_router_topk == 2 and cfg.moe_norm_topk_prob
        assert disk["model.layers.0.mlp.experts.3.gate_proj.weight"] == (32, 64)
        assert disk["model.layers.0.mlp.gate.weight"] == (4, 64)


def test_expert_names_map_to_their_hf_tensors_and_storage_key():
    cfg = load_model_config("tiny-qwen3-moe")
    fc1 = "decoder.layers.1.mlp.experts.local_experts.3.linear_fc1.weight"
    fc2 = "decoder.layers.1.mlp.experts.local_experts.3.linear_fc2.weight"
    assert hf_sources(cfg, fc1) == ["model.layers.1.mlp.experts.3.gate_proj.weight",
                                    "model.layers.1.mlp.experts.3.up_proj.weight"]
    assert hf_sources(cfg, fc2) == ["model.layers.1.mlp.experts.3.down_proj.weight"]
    assert hf_sources(cfg, "decoder.layers.0.mlp.router.weight") == ["model.layers.0.mlp.gate.weight"]
    assert megatron_shape(cfg, fc1) == (64, 64) and megatron_shape(cfg, fc2) == (64, 32)
    assert (layer_index(fc1), expert_index(fc1), expert_index("decoder.layers.1.mlp.router.weight")) == (1, 3, None)
    # megatron-core's SequentialMLP stores experts as [layers, experts, ...] under one key
    assert stacked_name(fc2) == EXPERT_STACKED + "linear_fc2.weight"
    assert EXPERT_STACKED == "decoder.layers.mlp.experts.experts."
    assert stacked_name("decoder.layers.1.self_attention.q_layernorm.weight") == \
        "decoder.layers.self_attention.q_layernorm.weight"
    gate, up = torch.randn(32, 64), torch.randn(32, 64)
    full = hf_to_megatron(cfg, fc1, {"model.layers.1.mlp.experts.3.gate_proj.weight": gate,
                                     "model.layers.1.mlp.experts.3.up_proj.weight": up}.__getitem__)
    assert torch.equal(full, torch.cat([gate, up]))  # Megatron's fc1 is [gate; up]
    with pytest.raises(ValueError, match="expert 4 out of range"):
        hf_sources(cfg, "decoder.layers.0.mlp.experts.local_experts.4.linear_fc2.weight")
    with pytest.raises(ValueError, match="needs \\(32, 64\\)"):
        hf_to_megatron(cfg, fc1, lambda n: torch.zeros(128, 64))  # the dense width is not the experts'
    with pytest.raises(ValueError, match="needs 2 \\* 32"):
        megatron_to_hf(cfg, fc1, torch.zeros(256, 64))


@pytest.mark.parametrize("key,value,fix", [("decoder_sparse_step", 2, "only 1 is"),
                                           ("mlp_only_layers", [0], "must be empty"),
                                           ("use_sliding_window", True, "set it to false")])
def test_unsupported_qwen3_moe_layouts_are_one_line_errors_naming_the_key(key, value, fix):
    d = dict(hf_config("qwen3-moe"), **{key: value})
    with pytest.raises(ValueError, match=f"^config.json: {key}=.*{fix}") as e:
        model_config_from_hf_config(d)
    assert "\n" not in str(e.value)


def test_qwen3_moe_config_reads_either_expert_count_key_and_transformers_default_norm_topk():
    d = hf_config("qwen3-moe")
    modern = {k: v for k, v in d.items() if k not in ("num_experts", "norm_topk_prob")}
    modern["num_local_experts"] = 4  # transformers 5 writes this name
    cfg = model_config_from_hf_config(modern)
    assert cfg.num_moe_experts == 4 and cfg.moe_norm_topk_prob is False  # Qwen3MoeConfig's default
    with pytest.raises(ValueError, match="missing key 'num_experts'"):
        model_config_from_hf_config({k: v for k, v in d.items() if k != "num_experts"})


@pytest.mark.parametrize("name", sorted(KINDS.values()))
def test_exported_config_json_is_what_transformers_reads(name):
    from transformers import AutoConfig

    cfg = load_model_config(name)
    d = hf_config_from_model_config(cfg)
    hf = AutoConfig.for_model(d["model_type"], **{k: v for k, v in d.items() if k != "model_type"})
    assert hf.head_dim == cfg.head_dim == 32 and hf.attention_bias is False
    assert hf.tie_word_embeddings == cfg.tie_word_embeddings
    if cfg.is_moe:
        assert d["architectures"] == ["Qwen3MoeForCausalLM"] and d["num_experts"] == 4
        assert (hf.num_experts, hf.num_experts_per_tok, hf.moe_intermediate_size, hf.norm_topk_prob,
                hf.decoder_sparse_step, list(hf.mlp_only_layers)) == (4, 2, 32, True, 1, [])
    else:
        assert d["architectures"] == ["Qwen3ForCausalLM"]
    import dataclasses

    with pytest.raises(ValueError, match="qk_layernorm=false cannot be exported"):
        hf_config_from_model_config(dataclasses.replace(cfg, qk_layernorm=False))
