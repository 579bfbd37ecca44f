"""A tiny random Qwen2 causal LM and a character-level tokenizer, built locally (no downloads), for eval tests."""

from __future__ import annotations

from pathlib import Path

SPECIALS = ["<pad>", "</s>", "<unk>"]
CHARS = list("0123456789+ =ksum:")


def build_char_tokenizer(out_dir: Path, chat_template: str | None = None, extra_chars: str = ""):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS + CHARS + [c for c in dict.fromkeys(extra_chars) if c not in CHARS])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    if chat_template:
        hf.chat_template = chat_template
    hf.save_pretrained(str(out_dir))
    return hf


def build_tiny_qwen2(out_dir: Path, vocab_size: int, seed: int = 0, hidden_size: int = 32,
                     num_attention_heads: int = 4):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                      num_hidden_layers=2, num_attention_heads=num_attention_heads, num_key_value_heads=2,
                      max_position_embeddings=128,
                      tie_word_embeddings=True, eos_token_id=1, pad_token_id=0, bos_token_id=None)
    model = Qwen2ForCausalLM(cfg)
    model.save_pretrained(str(out_dir))
    return model


def build_tiny_model_folder(out_dir: Path, seed: int = 0, **shape) -> Path:
    """`shape`: hidden_size / num_attention_heads (vLLM's CPU attention needs head_dim >= 32: 64 / 2)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = build_char_tokenizer(out_dir)
    build_tiny_qwen2(out_dir, vocab_size=len(tok), seed=seed, **shape)
    return out_dir
