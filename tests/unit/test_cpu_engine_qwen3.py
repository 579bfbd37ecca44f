"""The CPU rollout engine builds Qwen3 dense and Qwen3-MoE models and takes their weights by checkpoint name:
per-expert `mlp.experts.<e>.gate_proj/up_proj/down_proj` land in transformers 5's fused expert parameters."""

import pytest
import torch

from megatron_apo.models import load_model_config
from megatron_apo.models.hf_mapping import hf_shapes, model_config_from_hf_config
from megatron_apo.rollout.cpu_engine import CPUEngine
from tests.helpers.hf_models import build_hf_model, sample_tokens


@pytest.mark.parametrize("kind", ["qwen3", "qwen3-moe"])
def test_engine_from_a_transformers_folder_serves_its_logits_and_exports_checkpoint_names(kind, tmp_path):
    model = build_hf_model(kind)
    model.save_pretrained(tmp_path)
    tokens = sample_tokens(model.config.vocab_size, n=2, s=12)
    with torch.no_grad():
        want = model(tokens).logits
    for engine in (CPUEngine(model_path=str(tmp_path)),):
        assert (engine.logits(tokens.tolist()) - want).abs().max() <= 1e-5
        exported = dict(engine.export_weights())
        cfg = model_config_from_hf_config(model.config.to_dict() | {"architectures": model.config.architectures})
        shapes = hf_shapes(cfg)
        assert {n: tuple(t.shape) for n, t in exported.items()} == {
            n: s for n, s in shapes.items() if not (cfg.tie_word_embeddings and n == "lm_head.weight")}


def test_per_expert_tensors_land_in_the_fused_parameters_and_bad_names_are_refused():
    from megatron_apo.models.hf_mapping import hf_config_from_model_config

    cfg = load_model_config("tiny-qwen3-moe")
    engine = CPUEngine(hf_config_from_model_config(cfg))
    gen = torch.Generator().manual_seed(0)
    named = [(n, torch.randn(s, generator=gen)) for n, s in hf_shapes(cfg).items()]
    engine.update_weights(3, named)
    fused = dict(engine.model.named_parameters())
    src = dict(named)
    gate_up = fused["model.layers.1.mlp.experts.gate_up_proj"]
    assert torch.equal(gate_up[2, :32], src["model.layers.1.mlp.experts.2.gate_proj.weight"])
    assert torch.equal(gate_up[2, 32:], src["model.layers.1.mlp.experts.2.up_proj.weight"])
    down = fused["model.layers.1.mlp.experts.down_proj"]
    assert torch.equal(down[3], src["model.layers.1.mlp.experts.3.down_proj.weight"])
    assert engine.weights_version() == 3
    with pytest.raises(KeyError, match="unknown HF parameter 'model.layers.0.mlp.experts.4.up_proj.weight'"):
        engine.update_weights(4, named + [("model.layers.0.mlp.experts.4.up_proj.weight", torch.zeros(32, 64))])
    with pytest.raises(ValueError, match="experts.0.down_proj.weight: shape \\(32, 64\\) does not match"):
        engine.update_weights(4, [(n, t.T if n.endswith("experts.0.down_proj.weight") else t) for n, t in named])
    assert engine.weights_version() == 3  # nothing loaded
