"""Model architecture configs (model_configs/*.yaml) as a typed dataclass."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from megatron_apo.config import InputError, MissingInputError

MODEL_CONFIG_DIR = Path(__file__).resolve().parents[1] / "model_configs"  # package data: wheels ship it
ARCHITECTURES = ("qwen2", "llama", "qwen3", "qwen3_moe")


@dataclass(frozen=True)
class RopeScaling:
    """Llama-3.1 style frequency-dependent RoPE scaling (HF `rope_type: llama3`)."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class ModelConfig:
    name: str
    architecture: str  # "qwen2" (Qwen2/Qwen2.5), "llama" (Llama-3/3.1), "qwen3" (dense), "qwen3_moe"
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    vocab_size: int  # the tokenizer's (HF config) vocabulary size, before Megatron's padding
    max_position_embeddings: int = 4096
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    norm_epsilon: float = 1e-6
    qkv_bias: bool = False
    tie_word_embeddings: bool = False
    make_vocab_size_divisible_by: int = 128
    kv_channels: int | None = None  # head dim; hidden_size // num_attention_heads when None
    qk_layernorm: bool = False  # RMSNorm on each head's query and key (Qwen3)
    # Mixture of experts (Qwen3-MoE): every layer's MLP is `num_moe_experts` experts of width
    # `moe_ffn_hidden_size`, `moe_router_topk` of them per token (softmax, then top-k, then renormalised
    # when `moe_norm_topk_prob`). None/0: a dense MLP of width ffn_hidden_size.
    num_moe_experts: int | None = None
    moe_ffn_hidden_size: int | None = None
    moe_router_topk: int = 0
    moe_norm_topk_prob: bool = True
    published_params: float | None = None  # the published parameter count, for the size check
    extra: dict = field(default_factory=dict)

    @property
    def is_moe(self) -> bool:
        return bool(self.num_moe_experts)

    @property
    def head_dim(self) -> int:
        return self.kv_channels or self.hidden_size // self.num_attention_heads

    def padded_vocab_size(self, tensor_parallel_size: int = 1) -> int:
        """Megatron's padding: the next multiple of make_vocab_size_divisible_by * TP."""
        multiple = self.make_vocab_size_divisible_by * tensor_parallel_size
        return ((self.vocab_size + multiple - 1) // multiple) * multiple

    def validate(self, tensor_parallel_size: int = 1, pipeline_parallel_size: int = 1, source: str = "",
                 expert_parallel_size: int = 1) -> None:
        where = f"{source}: " if source else f"model config {self.name}: "
        for what, size in (("tensor", tensor_parallel_size), ("pipeline", pipeline_parallel_size),
                           ("expert", expert_parallel_size)):
            if size < 1:  # before the divisibility checks, which would divide by it
                raise InputError(f"{where}{what} parallel size must be >= 1, got {size}")
        if self.architecture not in ARCHITECTURES:
            raise InputError(f"{where}architecture={self.architecture!r} is unknown; use one of {ARCHITECTURES}")
        if self.num_attention_heads % self.num_query_groups:
            raise InputError(f"{where}num_attention_heads must be a multiple of num_query_groups")
        if self.num_query_groups % tensor_parallel_size:
            raise InputError(
                f"{where}tensor parallel size {tensor_parallel_size} does not divide num_query_groups="
                f"{self.num_query_groups}; pick a TP that divides it"
            )
        if self.ffn_hidden_size % tensor_parallel_size:
            raise InputError(f"{where}tensor parallel size {tensor_parallel_size} does not divide ffn_hidden_size")
        if self.num_layers % pipeline_parallel_size:
            raise InputError(
                f"{where}pipeline parallel size {pipeline_parallel_size} does not divide num_layers={self.num_layers}"
            )
        if expert_parallel_size > 1 and not self.is_moe:
            raise InputError(f"{where}expert parallel size {expert_parallel_size} needs a mixture-of-experts model; "
                             "set parallel.expert_model_parallel_size=1")
        if self.is_moe and self.num_moe_experts % expert_parallel_size:
            raise InputError(f"{where}expert parallel size {expert_parallel_size} does not divide "
                             f"num_moe_experts={self.num_moe_experts}; pick an EP that divides it")

    @classmethod
    def from_dict(cls, d: dict, source: str = "<dict>") -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise InputError(f"{source}: unknown model config key(s) {unknown}; known keys: {sorted(known)}")
        d = dict(d)
        if d.get("rope_scaling") is not None:
            rs = d["rope_scaling"]
            rs_known = {f.name for f in dataclasses.fields(RopeScaling)}
            bad = sorted(set(rs) - rs_known)
            if bad:
                raise InputError(f"{source}: unknown rope_scaling key(s) {bad}; known: {sorted(rs_known)}")
            d["rope_scaling"] = RopeScaling(**rs)
        missing = [f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING
                   and f.default_factory is dataclasses.MISSING and f.name not in d]
        if missing:
            raise InputError(f"{source}: missing model config key(s) {missing}")
        cfg = cls(**d)
        cfg.validate(source=source)
        return cfg

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def available_model_configs() -> list[str]:
    return sorted(p.stem for p in MODEL_CONFIG_DIR.glob("*.yaml"))


def load_model_config(name_or_path: str | Path) -> ModelConfig:
    """Loads `model_configs/<name>.yaml` or a YAML file path."""
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml") and "/" not in str(name_or_path):
        path = MODEL_CONFIG_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        raise MissingInputError(
            f"model config {name_or_path!r} not found (looked for {path}); available: {available_model_configs()}"
        )
    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except yaml.YAMLError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(f"{path}: not valid YAML ({first})") from None
    except UnicodeDecodeError:
        raise InputError(f"{path}: not a text (UTF-8) YAML file") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: a model config is a mapping of keys (num_layers: ..., hidden_size: ...), "
                         f"got a {type(data).__name__}")
    return ModelConfig.from_dict(data, source=str(path))
