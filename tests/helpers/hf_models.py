"""Tiny random Hugging Face models built locally with transformers (no downloads), and rank bodies for the
HF <-> Megatron tests (module level so spawned ranks can import them)."""

from __future__ import annotations

from pathlib import Path

import torch

SEQ = 40  # longer than the Llama test model's original_max_position_embeddings, so RoPE scaling matters


def hf_config(kind: str) -> dict:
    """Tiny Qwen2 (untied / tied), Llama-3.1-style, Qwen3 dense (tied, head_dim 32 != hidden/heads) and Qwen3-MoE
    (4 experts, top-2) configs; vocabularies are NOT multiples of 128."""
    common = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  hidden_act="silu", bos_token_id=1, eos_token_id=2)
    if kind in ("qwen2", "qwen2-tied"):
        return dict(common, architectures=["Qwen2ForCausalLM"], model_type="qwen2", vocab_size=250,
                    intermediate_size=128, num_hidden_layers=4, rope_theta=10000.0, rms_norm_eps=1e-6,
                    tie_word_embeddings=kind == "qwen2-tied", use_sliding_window=False)
    if kind == "llama31":
        return dict(common, architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=300,
                    intermediate_size=160, num_hidden_layers=2, rope_theta=10000.0, rms_norm_eps=1e-5,
                    rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
                    tie_word_embeddings=False, attention_bias=False, mlp_bias=False)
    if kind in ("qwen3", "qwen3-moe"):
        q3 = dict(common, vocab_size=250, num_hidden_layers=2, head_dim=32, rope_theta=1000000.0, rms_norm_eps=1e-6,
                  attention_bias=False, use_sliding_window=False)
        if kind == "qwen3":
            return dict(q3, architectures=["Qwen3ForCausalLM"], model_type="qwen3", intermediate_size=128,
                        tie_word_embeddings=True)
        return dict(q3, architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", intermediate_size=128,
                    moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2, norm_topk_prob=True,
                    decoder_sparse_step=1, mlp_only_layers=[], tie_word_embeddings=False)
    raise ValueError(kind)


def build_hf_model(kind: str, seed: int = 0, config_overrides: dict | None = None):
    """A transformers model with every parameter random (norms around 1, biases non-zero), fp32, eager attention."""
    from transformers import AutoConfig, AutoModelForCausalLM

    d = dict(hf_config(kind), **(config_overrides or {}))
    model_type = d.pop("model_type")
    config = AutoConfig.for_model(model_type, **d)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1.0 + 0.1 * noise if "norm" in name else 0.08 * noise)
    return model.eval()


def save_hf_model(kind: str, out: Path, seed: int = 0, max_shard_size: str | None = None, **overrides) -> Path:
    model = build_hf_model(kind, seed, overrides or None)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out, **kwargs)
    return out


def sample_tokens(vocab: int, n: int = 2, s: int = SEQ) -> torch.Tensor:
    return torch.randint(0, vocab, (n, s), generator=torch.Generator().manual_seed(11))


def hf_logits(folder: Path, tokens: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        return model(tokens).logits


def megatron_logits_from_checkpoint(ckpt: str, tp: int, pp: int, tokens: torch.Tensor, ep: int = 1):
    """Rank body: loads a Megatron checkpoint at (tp, pp, ep), runs the pipeline forward, returns full logits
    (padding stripped) on the last stage's TP rank 0 of data-parallel rank 0, None elsewhere."""
    from megatron.core import parallel_state as ps

    from megatron_apo.models.convert import load_megatron_model
    from megatron_apo.models.sharding import tp_gather
    from megatron_apo.parallel import ParallelConfig, init_distributed
    from megatron_apo.trainer.schedule import forward_backward

    init_distributed(ParallelConfig(tp, pp, expert_model_parallel_size=ep))
    model, cfg = load_megatron_model(ckpt)
    model.eval()
    batch = {"tokens": tokens, "position_ids": torch.arange(tokens.shape[1]).expand_as(tokens).contiguous()}

    def keep_logits(b, logits):
        full = tp_gather(logits.detach(), partition_dim=logits.dim() - 1)
        return logits.sum() * 0.0, {"logits": full[..., : cfg.vocab_size].clone()}

    with torch.no_grad():
        out = forward_backward([model], [batch], keep_logits, seq_length=tokens.shape[1],
                               micro_batch_size=tokens.shape[0], forward_only=True)
    if out and ps.get_tensor_model_parallel_rank() == 0 and ps.get_data_parallel_rank() == 0:
        return out[0]["logits"]
    return None


def megatron_logits_from_hf_mapping(hf_dir: str, tokens: torch.Tensor) -> dict:
    """Rank body (TP=1/PP=1): fills a Megatron model through hf_to_megatron straight from the HF safetensors,
    returns its logits and its parameter names/shapes (to check the mapping's name list)."""
    import json

    from safetensors import safe_open

    from megatron_apo.models import build_gpt_model
    from megatron_apo.models.hf_mapping import hf_to_megatron, model_config_from_hf_config
    from megatron_apo.models.sharding import iter_local_params
    from megatron_apo.parallel import ParallelConfig, init_distributed

    init_distributed(ParallelConfig(1, 1))
    cfg = model_config_from_hf_config(json.loads((Path(hf_dir) / "config.json").read_text()))
    model = build_gpt_model(cfg).eval()
    with safe_open(str(Path(hf_dir) / "model.safetensors"), "pt") as f:
        with torch.no_grad():
            for lp in iter_local_params(model):
                lp.tensor.copy_(hf_to_megatron(cfg, lp.global_name, f.get_tensor))
    pos = torch.arange(tokens.shape[1]).expand_as(tokens)
    with torch.no_grad():
        logits = model(tokens, pos, attention_mask=None)[..., : cfg.vocab_size]
    shapes = {lp.global_name: tuple(lp.tensor.shape) for lp in iter_local_params(model)}
    return {"logits": logits, "shapes": shapes}


def convert_then_run(tp: int, pp: int, jobs: list[tuple[str, str, str]], reload: list[tuple[str, str]],
                     ep: int = 1) -> dict:
    """Rank body: for each (name, hf_dir, out_dir) converts HF -> Megatron at (tp, pp, ep) with
    save_hf_as_megatron, loads the written checkpoint back and runs it; then loads each (name, ckpt) of `reload`
    (written at another layout) and runs it. Returns {name: logits} on the last stage's TP rank 0 (DP rank 0)."""
    import json as _json

    from megatron_apo.models.convert import save_hf_as_megatron
    from megatron_apo.parallel import ParallelConfig, init_distributed

    init_distributed(ParallelConfig(tp, pp, expert_model_parallel_size=ep))
    out = {}
    for name, hf_dir, out_dir in jobs:
        save_hf_as_megatron(hf_dir, out_dir)
        vocab = _json.loads((Path(hf_dir) / "config.json").read_text())["vocab_size"]
        out[name] = megatron_logits_from_checkpoint(out_dir, tp, pp, sample_tokens(vocab), ep)
    for name, ckpt in reload:
        vocab = _json.loads((Path(ckpt) / "megatron_apo.json").read_text())["model_config"]["vocab_size"]
        out[name] = megatron_logits_from_checkpoint(ckpt, tp, pp, sample_tokens(vocab), ep)
    return out


def save_tiny_tokenizer(folder: Path, vocab_size: int) -> None:
    """A word-level tokenizer over the words w0..w{vocab-1} (token id = word number), saved HF-style."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab_size)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="w1", eos_token="w2",
                            unk_token="w0").save_pretrained(folder)
