"""Tokenizers and prompt templates: an HF tokenizer folder (its chat template) or a sentencepiece model (plain).

Templates turn a row's chat messages into the prompt text:
  * 'chat'  - the tokenizer's own chat template with the generation prompt appended (HF folders that have one);
  * 'plain' - the message contents verbatim, joined by a blank line (for one user message: exactly its content).
    This is what sentencepiece models trained on a raw corpus (the demo's) expect.
  * 'auto'  - 'chat' when the tokenizer has a chat template, else 'plain'.
"""

from __future__ import annotations

from pathlib import Path

from megatron_apo.config import InputError, MissingInputError

TEMPLATES = ("auto", "chat", "plain")


def plain_prompt(messages: list[dict[str, str]]) -> str:
    return "\n\n".join(m["content"] for m in messages)


class Tokenizer:
    """What the data, eval and rollout code need from a tokenizer."""

    template: str = "plain"
    eos_token_id: int | None = None
    pad_token_id: int | None = None

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: list[int]) -> str:
        """Text of response tokens, special tokens (EOS, padding) removed."""
        raise NotImplementedError

    def render_prompt(self, messages: list[dict[str, str]]) -> str:
        raise NotImplementedError

    def encode_prompt(self, messages: list[dict[str, str]]) -> list[int]:
        return self.encode(self.render_prompt(messages))

    @property
    def stop_token_ids(self) -> tuple[int, ...]:
        return () if self.eos_token_id is None else (int(self.eos_token_id),)

    @property
    def vocab_size(self) -> int:
        """Number of token ids the tokenizer can produce (added special tokens included)."""
        raise NotImplementedError


class HFTokenizer(Tokenizer):
    def __init__(self, hf_tokenizer, template: str = "auto"):
        if template not in TEMPLATES:
            raise InputError(f"prompt template must be one of {TEMPLATES}, got {template!r}")
        has_chat = bool(getattr(hf_tokenizer, "chat_template", None))
        if template == "chat" and not has_chat:
            raise InputError("prompt template 'chat' requested but the tokenizer has no chat_template; use 'plain'")
        self.hf = hf_tokenizer
        self.template = ("chat" if has_chat else "plain") if template == "auto" else template
        self.eos_token_id = hf_tokenizer.eos_token_id
        self.pad_token_id = hf_tokenizer.pad_token_id if hf_tokenizer.pad_token_id is not None else self.eos_token_id

    @property
    def vocab_size(self) -> int:
        return len(self.hf)

    def encode(self, text: str) -> list[int]:
        # Chat templates already contain any BOS; plain prompts are verbatim, so never add special tokens.
        return list(self.hf.encode(text, add_special_tokens=False))

    def decode(self, ids: list[int]) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=True)

    def render_prompt(self, messages: list[dict[str, str]]) -> str:
        if self.template == "chat":
            return self.hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return plain_prompt(messages)


class SentencePieceTokenizer(Tokenizer):
    """A raw sentencepiece `.model`; plain template; `add_bos` prepends BOS to prompts when the model has one."""

    def __init__(self, model_file: str | Path, add_bos: bool = False):
        import sentencepiece as spm

        self.sp = spm.SentencePieceProcessor(model_file=str(model_file))
        self.add_bos = add_bos
        self.template = "plain"
        self.eos_token_id = self.sp.eos_id() if self.sp.eos_id() >= 0 else None
        self.pad_token_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else self.eos_token_id
        self._special = {i for i in (self.sp.bos_id(), self.sp.eos_id(), self.sp.pad_id()) if i >= 0}

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def encode(self, text: str) -> list[int]:
        return list(self.sp.encode(text))

    def encode_prompt(self, messages: list[dict[str, str]]) -> list[int]:
        ids = self.encode(self.render_prompt(messages))
        return ([self.sp.bos_id()] + ids) if self.add_bos and self.sp.bos_id() >= 0 else ids

    def decode(self, ids: list[int]) -> str:
        # ids past the piece table can come from a model whose (padded) vocabulary is larger: drop them
        size = self.sp.get_piece_size()
        return self.sp.decode([int(i) for i in ids if int(i) not in self._special and 0 <= int(i) < size])

    def render_prompt(self, messages: list[dict[str, str]]) -> str:
        return plain_prompt(messages)


def load_tokenizer(path: str | Path, template: str = "auto") -> Tokenizer:
    """A sentencepiece `.model` file, or a local HF folder (never downloads)."""
    path = Path(path)
    if path.is_file() and path.suffix == ".model":
        if template == "chat":
            raise InputError(f"{path}: a sentencepiece model has no chat template; use template 'plain'")
        return SentencePieceTokenizer(path)
    if not path.is_dir():
        raise MissingInputError(f"tokenizer not found: {path} (give a local HF folder or a sentencepiece .model file)")
    hf_files = ("tokenizer.json", "tokenizer_config.json", "vocab.json")
    if not any((path / f).is_file() for f in hf_files):
        if (path / "tokenizer.model").is_file():
            return load_tokenizer(path / "tokenizer.model", template)
        raise MissingInputError(f"{path}: no tokenizer files ({', '.join(hf_files)} or tokenizer.model); "
                                "pass --tokenizer")
    return HFTokenizer(_load_hf_tokenizer(path), template)


def _load_hf_tokenizer(path: Path):
    import json

    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    config_file = path / "tokenizer_config.json"
    cls = json.loads(config_file.read_text()).get("tokenizer_class") if config_file.is_file() else None
    if cls in ("TokenizersBackend", "PreTrainedTokenizerFast") and (path / "tokenizer.json").is_file():
        # A generic tokenizer.json (e.g. one we trained): load it as written. AutoTokenizer would pick the
        # class of the model's config.json (transformers 5), which rebuilds its own pre-tokenizer over ours.
        return PreTrainedTokenizerFast.from_pretrained(str(path), local_files_only=True)
    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
