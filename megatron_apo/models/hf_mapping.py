"""Hugging Face (Qwen2 / Llama / Qwen3 / Qwen3-MoE) <-> Megatron-Core GPTModel parameter mapping, one tensor
at a time.

Everything here works on FULL tensors in the TP=1 layout with *global* names (pipeline layer offset
applied), the form `megatron_apo.models.sharding.iter_local_params` + `tp_gather` produce. So the same
mapping serves checkpoint conversion (streamed tensor by tensor) and weight sync to rollout engines
(which load HF names). TP/PP placement stays in `sharding.py`.

Layouts (why the reshapes below exist):
  * fused QKV: Megatron stores, per query group g, [q heads of g (heads/groups * head_dim rows), k_g, v_g];
    HF keeps q_proj / k_proj / v_proj separate (and their biases, Qwen2).
  * SwiGLU fc1: Megatron's linear_fc1 is [gate; up]; HF has gate_proj and up_proj.
  * vocabulary: Megatron pads embedding / output rows to `cfg.padded_vocab_size(tp)`; HF has `vocab_size`.
  * tied embeddings: Megatron has no output_layer.weight on a single stage (on a PP>1 last stage it is a
    copy of the embedding); HF has no lm_head.weight.
  * Qwen3 QK-norm: Megatron's `self_attention.q_layernorm` / `k_layernorm` (one head_dim vector each) are
    HF's `self_attn.q_norm` / `k_norm`.
  * Qwen3-MoE: the router `mlp.router.weight` is HF's `mlp.gate.weight`; expert e's
    `mlp.experts.local_experts.<e>.linear_fc1` is [gate; up] of HF's `mlp.experts.<e>.gate_proj / up_proj`
    and `linear_fc2` is `mlp.experts.<e>.down_proj`. Names here carry the GLOBAL expert index (the
    expert-parallel offset applied by `sharding.global_param_name`), so each EP rank maps its own experts.
  * norms: megatron-core's local spec has `input_layernorm.weight` / `pre_mlp_layernorm.weight`; the
    Transformer Engine spec fuses them into `linear_qkv.layer_norm_weight` / `linear_fc1.layer_norm_weight`.
    Both spellings are accepted.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable

import torch

from megatron_apo.models.config import ModelConfig, RopeScaling

HF_ARCHITECTURES = {"Qwen2ForCausalLM": "qwen2", "LlamaForCausalLM": "llama", "Qwen3ForCausalLM": "qwen3",
                    "Qwen3MoeForCausalLM": "qwen3_moe"}
ARCHITECTURE_TO_HF = {v: k for k, v in HF_ARCHITECTURES.items()}
MODEL_TYPES = {"qwen2": "qwen2", "llama": "llama", "qwen3": "qwen3", "qwen3_moe": "qwen3_moe"}

EMBEDDING = "embedding.word_embeddings.weight"
OUTPUT_LAYER = "output_layer.weight"
FINAL_NORM = "decoder.final_layernorm.weight"
VOCAB_PADDED = (EMBEDDING, OUTPUT_LAYER)

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")

# Per-layer Megatron suffix -> HF suffix for one-to-one tensors (both norm spellings).
_LAYER_DIRECT = {
    "input_layernorm.weight": "input_layernorm.weight",
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",  # TE spec
    "pre_mlp_layernorm.weight": "post_attention_layernorm.weight",
    "mlp.linear_fc1.layer_norm_weight": "post_attention_layernorm.weight",  # TE spec
    "self_attention.linear_proj.weight": "self_attn.o_proj.weight",
    "mlp.linear_fc2.weight": "mlp.down_proj.weight",
    "self_attention.q_layernorm.weight": "self_attn.q_norm.weight",  # Qwen3
    "self_attention.k_layernorm.weight": "self_attn.k_norm.weight",
    "mlp.router.weight": "mlp.gate.weight",  # Qwen3-MoE
}
_QKV = {"self_attention.linear_qkv.weight": "weight", "self_attention.linear_qkv.bias": "bias"}
_FC1 = "mlp.linear_fc1.weight"
# an expert's weight, after `decoder.layers.<i>.`: (global expert index, linear_fc1/2.weight)
_EXPERT = re.compile(r"^mlp\.experts\.local_experts\.(\d+)\.(linear_fc[12]\.weight)$")
# where megatron-core's SequentialMLP stores experts in a dist checkpoint: [num_layers, num_experts, ...]
EXPERT_STACKED = "decoder.layers.mlp.experts.experts."


# ----------------------------------------------------------------------------------------- names

def megatron_param_names(cfg: ModelConfig, te_spec: bool = False, num_pp_stages: int = 1) -> list[str]:
    """Global Megatron parameter names of the whole model, in model order.

    `num_pp_stages > 1` with tied embeddings adds the last stage's `output_layer.weight` copy.
    """
    names = [EMBEDDING]
    for i in range(cfg.num_layers):
        p = f"decoder.layers.{i}."
        names.append(p + ("self_attention.linear_qkv.layer_norm_weight" if te_spec else "input_layernorm.weight"))
        names += [p + "self_attention.linear_proj.weight", p + "self_attention.linear_qkv.weight"]
        if cfg.qkv_bias:
            names.append(p + "self_attention.linear_qkv.bias")
        if cfg.qk_layernorm:
            names += [p + "self_attention.q_layernorm.weight", p + "self_attention.k_layernorm.weight"]
        if cfg.is_moe:  # the MoE layer keeps its pre-MLP norm separate in both specs
            names += [p + "pre_mlp_layernorm.weight", p + "mlp.router.weight"]
            for e in range(cfg.num_moe_experts):
                names += [f"{p}mlp.experts.local_experts.{e}.linear_fc1.weight",
                          f"{p}mlp.experts.local_experts.{e}.linear_fc2.weight"]
            continue
        names.append(p + ("mlp.linear_fc1.layer_norm_weight" if te_spec else "pre_mlp_layernorm.weight"))
        names += [p + "mlp.linear_fc1.weight", p + "mlp.linear_fc2.weight"]
    names.append(FINAL_NORM)
    if not cfg.tie_word_embeddings or num_pp_stages > 1:
        names.append(OUTPUT_LAYER)
    return names


def hf_param_names(cfg: ModelConfig) -> list[str]:
    """HF parameter names of the whole model, in the order Megatron's parameters produce them."""
    out: list[str] = []
    for name in megatron_param_names(cfg):
        for hf in hf_sources(cfg, name):
            if hf not in out:
                out.append(hf)
    return out


def layer_index(global_name: str) -> int | None:
    """The decoder layer a global name belongs to (None for embedding, final norm, output layer)."""
    m = _LAYER.match(global_name)
    return int(m.group(1)) if m else None


def _layer_suffix(global_name: str) -> str | None:
    """`decoder.layers.<i>.<suffix>` -> suffix (None for non-layer names)."""
    m = _LAYER.match(global_name)
    return m.group(2) if m else None


def expert_index(global_name: str) -> int | None:
    """The global expert index of an expert's weight (None for every other name)."""
    m = _LAYER.match(global_name)
    e = _EXPERT.match(m.group(2)) if m else None
    return int(e.group(1)) if e else None


def stacked_name(global_name: str) -> str:
    """The name Megatron stores a layer's tensor under, with a leading layer axis: `decoder.layers.<i>.<p>`
    -> `decoder.layers.<p>`; an expert's weight has a second, expert axis:
    `decoder.layers.<i>.mlp.experts.local_experts.<e>.<w>` -> `decoder.layers.mlp.experts.experts.<w>`
    (megatron-core's SequentialMLP sharded_state_dict). Other names are unchanged."""
    m = _LAYER.match(global_name)
    if not m:
        return global_name
    e = _EXPERT.match(m.group(2))
    return EXPERT_STACKED + e.group(2) if e else f"decoder.layers.{m.group(2)}"


def hf_sources(cfg: ModelConfig, global_name: str) -> list[str]:
    """The HF tensor names a Megatron tensor is made of (and that megatron_to_hf returns, except
    `output_layer.weight` with tied embeddings, which reads the embedding and returns nothing)."""
    if global_name == EMBEDDING:
        return ["model.embed_tokens.weight"]
    if global_name == OUTPUT_LAYER:
        return ["model.embed_tokens.weight"] if cfg.tie_word_embeddings else ["lm_head.weight"]
    if global_name == FINAL_NORM:
        return ["model.norm.weight"]
    m = _LAYER.match(global_name)
    if m:
        i, suffix = int(m.group(1)), m.group(2)
        if i >= cfg.num_layers:
            raise ValueError(f"{global_name}: layer {i} out of range for {cfg.name} with {cfg.num_layers} layers")
        p = f"model.layers.{i}."
        if suffix in _LAYER_DIRECT:
            return [p + _LAYER_DIRECT[suffix]]
        if suffix in _QKV:
            kind = _QKV[suffix]
            return [f"{p}self_attn.{x}_proj.{kind}" for x in "qkv"]
        if suffix == _FC1:
            return [p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"]
        e = _EXPERT.match(suffix)
        if e and cfg.is_moe:
            x = int(e.group(1))
            if x >= cfg.num_moe_experts:
                raise ValueError(f"{global_name}: expert {x} out of range for {cfg.name} with "
                                 f"{cfg.num_moe_experts} experts")
            if e.group(2) == "linear_fc1.weight":
                return [f"{p}mlp.experts.{x}.gate_proj.weight", f"{p}mlp.experts.{x}.up_proj.weight"]
            return [f"{p}mlp.experts.{x}.down_proj.weight"]
    raise ValueError(f"{global_name!r} is not a Megatron GPTModel parameter this mapping knows "
                     f"(architecture {cfg.architecture})")


# ------------------------------------------------------------------------------------ tensors

def _qkv_sizes(cfg: ModelConfig) -> tuple[int, int, int]:
    groups = cfg.num_query_groups
    return groups, cfg.num_attention_heads // groups * cfg.head_dim, cfg.head_dim


def split_qkv(cfg: ModelConfig, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Megatron fused QKV (weight [rows, hidden] or bias [rows]) -> HF q, k, v."""
    groups, q_rows, d = _qkv_sizes(cfg)
    if qkv.shape[0] != groups * (q_rows + 2 * d):
        raise ValueError(f"linear_qkv has {qkv.shape[0]} rows; {cfg.name} needs {groups * (q_rows + 2 * d)}")
    rest = qkv.shape[1:]
    per_group = qkv.reshape(groups, q_rows + 2 * d, *rest)
    q, k, v = per_group.split([q_rows, d, d], dim=1)
    return (q.reshape(groups * q_rows, *rest), k.reshape(groups * d, *rest), v.reshape(groups * d, *rest))


def merge_qkv(cfg: ModelConfig, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """HF q, k, v -> Megatron fused QKV (interleaved per query group)."""
    groups, q_rows, d = _qkv_sizes(cfg)
    for name, t, rows in (("q_proj", q, groups * q_rows), ("k_proj", k, groups * d), ("v_proj", v, groups * d)):
        if t.shape[0] != rows:
            raise ValueError(f"{name} has {t.shape[0]} rows; {cfg.name} needs {rows} "
                             f"(heads={cfg.num_attention_heads}, kv heads={groups}, head_dim={d})")
    rest = q.shape[1:]
    fused = torch.cat([q.reshape(groups, q_rows, *rest), k.reshape(groups, d, *rest), v.reshape(groups, d, *rest)],
                      dim=1)
    return fused.reshape(groups * (q_rows + 2 * d), *rest)


def pad_vocab(t: torch.Tensor, padded_rows: int) -> torch.Tensor:
    """Appends zero rows up to Megatron's padded vocabulary (padding rows never get a real token)."""
    if t.shape[0] > padded_rows:
        raise ValueError(f"vocabulary tensor has {t.shape[0]} rows, more than the padded size {padded_rows}")
    if t.shape[0] == padded_rows:
        return t
    return torch.cat([t, t.new_zeros(padded_rows - t.shape[0], *t.shape[1:])], dim=0)


def megatron_to_hf(cfg: ModelConfig, global_name: str, full_tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """One full (TP-gathered) Megatron tensor with its global name -> the HF-named tensor(s).

    Returns [] for `output_layer.weight` with tied embeddings (HF has no lm_head then).
    Returned tensors may be views of `full_tensor`; call `.contiguous()` before serialising.
    """
    hf = hf_sources(cfg, global_name)
    if global_name in VOCAB_PADDED:
        if global_name == OUTPUT_LAYER and cfg.tie_word_embeddings:
            return []
        if full_tensor.shape[0] < cfg.vocab_size:
            raise ValueError(f"{global_name} has {full_tensor.shape[0]} rows, fewer than vocab_size={cfg.vocab_size}")
        return [(hf[0], full_tensor[: cfg.vocab_size])]
    suffix = _layer_suffix(global_name)
    if suffix in _QKV:
        return list(zip(hf, split_qkv(cfg, full_tensor)))
    if len(hf) == 2:  # a SwiGLU fc1, dense or an expert's: [gate; up]
        ffn = _fc1_width(cfg, global_name)
        if full_tensor.shape[0] != 2 * ffn:
            raise ValueError(f"{global_name} has {full_tensor.shape[0]} rows; needs 2 * {ffn}")
        gate, up = full_tensor.chunk(2, dim=0)
        return [(hf[0], gate), (hf[1], up)]
    return [(hf[0], full_tensor)]


def _fc1_width(cfg: ModelConfig, global_name: str) -> int:
    """The FFN width of a (dense or expert) MLP weight: ffn_hidden_size, or moe_ffn_hidden_size for experts."""
    return (cfg.moe_ffn_hidden_size or cfg.ffn_hidden_size) if expert_index(global_name) is not None \
        else cfg.ffn_hidden_size


def megatron_shard_to_hf(cfg: ModelConfig, global_name: str, shard: torch.Tensor, partition_dim: int | None,
                         tp_rank: int, tp_size: int) -> list[tuple[str, torch.Tensor, int, int]]:
    """One TP rank's shard -> its pieces of the HF tensors: [(hf_name, piece, dim, start)].

    `piece` is the block of HF tensor `hf_name` that starts at index `start` along `dim`; the pieces of
    all TP ranks tile `megatron_to_hf(full)` exactly (tests check it). This is what lets weight sync
    place every rank's shard straight into the HF layout without first assembling the full Megatron
    tensor. Why it holds: Megatron splits the fused QKV by whole query groups and the SwiGLU fc1 as
    [gate_r; up_r], so each shard is itself a small "model" with heads / tp, query groups / tp and
    ffn / tp, and its q, k, v, gate and up are row blocks of HF's. A replicated tensor comes from TP
    rank 0 alone; vocabulary padding rows (at the end of the last shards) are dropped. Works on meta
    tensors (the weight-sync plan is computed from shapes).
    """
    if partition_dim is None or tp_size == 1:
        return [(n, t, 0, 0) for n, t in megatron_to_hf(cfg, global_name, shard)] if tp_rank == 0 else []
    if global_name in VOCAB_PADDED:
        if global_name == OUTPUT_LAYER and cfg.tie_word_embeddings:
            return []
        rows = shard.shape[0]
        start = tp_rank * rows
        keep = min(rows, cfg.vocab_size - start)
        return [(hf_sources(cfg, global_name)[0], shard[:keep], 0, start)] if keep > 0 else []
    if expert_index(global_name) is not None:  # split over the expert-TP group (`tp_rank`/`tp_size` are its)
        moe_ffn = cfg.moe_ffn_hidden_size or cfg.ffn_hidden_size
        if moe_ffn % tp_size:
            raise ValueError(f"{cfg.name}: moe_ffn_hidden_size={moe_ffn} is not divisible by expert TP={tp_size}")
        shard_cfg = dataclasses.replace(cfg, moe_ffn_hidden_size=moe_ffn // tp_size)
        return [(n, t, partition_dim, tp_rank * t.shape[partition_dim])
                for n, t in megatron_to_hf(shard_cfg, global_name, shard)]
    for field_name in ("num_attention_heads", "num_query_groups", "ffn_hidden_size"):
        if getattr(cfg, field_name) % tp_size:
            raise ValueError(f"{cfg.name}: {field_name}={getattr(cfg, field_name)} is not divisible by TP={tp_size}")
    shard_cfg = dataclasses.replace(
        cfg, num_attention_heads=cfg.num_attention_heads // tp_size, num_query_groups=cfg.num_query_groups // tp_size,
        ffn_hidden_size=cfg.ffn_hidden_size // tp_size, kv_channels=cfg.head_dim)
    return [(n, t, partition_dim, tp_rank * t.shape[partition_dim])
            for n, t in megatron_to_hf(shard_cfg, global_name, shard)]


def hf_to_megatron(
    cfg: ModelConfig,
    global_name: str,
    get_hf_tensor: Callable[[str], torch.Tensor],
    padded_vocab_size: int | None = None,
) -> torch.Tensor:
    """Builds one full (TP=1 layout) Megatron tensor from the HF tensors it needs.

    `get_hf_tensor(name)` returns an HF tensor (e.g. from a safetensors file); `padded_vocab_size` is the
    Megatron vocabulary for the target TP size (`cfg.padded_vocab_size(tp)`, default TP=1).
    """
    hf = hf_sources(cfg, global_name)
    if global_name in VOCAB_PADDED:
        t = get_hf_tensor(hf[0])
        if t.shape[0] != cfg.vocab_size:
            raise ValueError(f"{hf[0]} has {t.shape[0]} rows but the config says vocab_size={cfg.vocab_size}")
        return pad_vocab(t, padded_vocab_size or cfg.padded_vocab_size(1))
    suffix = _layer_suffix(global_name)
    if suffix in _QKV:
        return merge_qkv(cfg, *(get_hf_tensor(n) for n in hf))
    if len(hf) == 2:  # a SwiGLU fc1, dense or an expert's
        gate, up = (get_hf_tensor(n) for n in hf)
        ffn = _fc1_width(cfg, global_name)
        if gate.shape != up.shape or gate.shape[0] != ffn:
            raise ValueError(f"{hf[0]} / {hf[1]} have shapes {tuple(gate.shape)} / {tuple(up.shape)}; "
                             f"{cfg.name} needs ({ffn}, {cfg.hidden_size})")
        return torch.cat([gate, up], dim=0)
    return get_hf_tensor(hf[0])


def hf_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every HF tensor's shape, from the config alone (the mapping is run on meta tensors)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for name in megatron_param_names(cfg):
        full = torch.empty(megatron_shape(cfg, name), device="meta")
        for hf, t in megatron_to_hf(cfg, name, full):
            shapes[hf] = tuple(t.shape)
    return shapes


def megatron_shape(cfg: ModelConfig, global_name: str, tensor_parallel_size: int = 1) -> tuple[int, ...]:
    """The full (TP-gathered) shape of a Megatron parameter for a given TP size (vocab padding depends on it)."""
    h = cfg.hidden_size
    if global_name in VOCAB_PADDED:
        return (cfg.padded_vocab_size(tensor_parallel_size), h)
    if global_name == FINAL_NORM:
        return (h,)
    m = _LAYER.match(global_name)
    suffix = m.group(2) if m else None
    if suffix in ("input_layernorm.weight", "pre_mlp_layernorm.weight", "self_attention.linear_qkv.layer_norm_weight",
                  "mlp.linear_fc1.layer_norm_weight"):
        return (h,)
    qkv_rows = (cfg.num_attention_heads + 2 * cfg.num_query_groups) * cfg.head_dim
    if suffix == "self_attention.linear_qkv.weight":
        return (qkv_rows, h)
    if suffix == "self_attention.linear_qkv.bias":
        return (qkv_rows,)
    if suffix == "self_attention.linear_proj.weight":
        return (h, cfg.num_attention_heads * cfg.head_dim)
    if suffix == _FC1:
        return (2 * cfg.ffn_hidden_size, h)
    if suffix == "mlp.linear_fc2.weight":
        return (h, cfg.ffn_hidden_size)
    if suffix in ("self_attention.q_layernorm.weight", "self_attention.k_layernorm.weight"):
        return (cfg.head_dim,)
    if suffix == "mlp.router.weight" and cfg.is_moe:
        return (cfg.num_moe_experts, h)
    e = _EXPERT.match(suffix or "")
    if e and cfg.is_moe:
        moe_ffn = cfg.moe_ffn_hidden_size or cfg.ffn_hidden_size
        return (2 * moe_ffn, h) if e.group(2) == "linear_fc1.weight" else (h, moe_ffn)
    raise ValueError(f"{global_name!r} is not a Megatron GPTModel parameter this mapping knows")


# ------------------------------------------------------------------------------------- configs

_HF_DEFAULT_RMS_EPS = 1e-6


def model_config_from_hf_config(hf_config: dict, name: str | None = None, source: str = "config.json") -> ModelConfig:
    """A ModelConfig from an HF config.json dict (Qwen2ForCausalLM / LlamaForCausalLM / Qwen3ForCausalLM /
    Qwen3MoeForCausalLM).

    Reads both the classic `rope_theta` / `rope_scaling` keys and transformers 5's `rope_parameters`.
    HF-only fields needed to write the config back (token ids, dtype) are kept in `extra["hf"]`.
    """
    archs = hf_config.get("architectures") or []
    known = [a for a in archs if a in HF_ARCHITECTURES]
    if not known:
        raise ValueError(f"{source}: architectures={archs!r} is not supported; supported: {sorted(HF_ARCHITECTURES)}")
    arch = HF_ARCHITECTURES[known[0]]

    def need(key):
        if key not in hf_config:
            raise ValueError(f"{source}: missing key {key!r} needed for {known[0]}")
        return hf_config[key]

    act = hf_config.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"{source}: hidden_act={act!r} is not supported (Megatron model uses SwiGLU/silu)")
    if hf_config.get("mlp_bias"):
        raise ValueError(f"{source}: mlp_bias=true is not supported")
    if arch in ("qwen2", "qwen3", "qwen3_moe") and hf_config.get("use_sliding_window"):
        raise ValueError(f"{source}: use_sliding_window=true is not supported; set it to false")
    moe = _moe_fields(hf_config, source) if arch == "qwen3_moe" else {}

    rope = dict(hf_config.get("rope_parameters") or {})
    scaling = hf_config.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
    theta = hf_config.get("rope_theta", rope.get("rope_theta", 10000.0))
    rope_scaling = None
    if scaling:
        kind = scaling.get("rope_type", scaling.get("type"))
        if kind != "llama3":
            raise ValueError(f"{source}: rope_scaling rope_type={kind!r} is not supported; only 'llama3' is")
        rope_scaling = RopeScaling(
            factor=float(scaling["factor"]),
            low_freq_factor=float(scaling["low_freq_factor"]),
            high_freq_factor=float(scaling["high_freq_factor"]),
            original_max_position_embeddings=int(scaling["original_max_position_embeddings"]),
        )
    heads = need("num_attention_heads")
    hidden = need("hidden_size")
    head_dim = hf_config.get("head_dim") or hidden // heads
    keep = ("bos_token_id", "eos_token_id", "pad_token_id", "torch_dtype", "dtype", "max_window_layers",
            "initializer_range", "router_aux_loss_coef")
    extra_hf = {k: hf_config[k] for k in keep if hf_config.get(k) is not None}
    cfg = ModelConfig(
        name=name or str(hf_config.get("_name_or_path") or f"hf-{arch}"),
        architecture=arch,
        num_layers=need("num_hidden_layers"),
        hidden_size=hidden,
        ffn_hidden_size=need("intermediate_size"),
        num_attention_heads=heads,
        num_query_groups=hf_config.get("num_key_value_heads") or heads,
        vocab_size=need("vocab_size"),
        max_position_embeddings=hf_config.get("max_position_embeddings", 4096),
        rope_theta=float(theta),
        rope_scaling=rope_scaling,
        norm_epsilon=float(hf_config.get("rms_norm_eps", _HF_DEFAULT_RMS_EPS)),
        qkv_bias=True if arch == "qwen2" else bool(hf_config.get("attention_bias", False)),
        tie_word_embeddings=bool(hf_config.get("tie_word_embeddings", False)),
        kv_channels=head_dim if head_dim != hidden // heads else None,
        qk_layernorm=arch in ("qwen3", "qwen3_moe"),
        extra={"hf": extra_hf} if extra_hf else {},
        **moe,
    )
    cfg.validate(source=source)
    return cfg


def _moe_fields(hf_config: dict, source: str) -> dict:
    """ModelConfig's MoE fields from a Qwen3MoeForCausalLM config.json: every layer a MoE layer, no shared expert."""
    def need(*keys):
        for key in keys:
            if hf_config.get(key) is not None:
                return hf_config[key]
        raise ValueError(f"{source}: missing key {keys[0]!r} needed for Qwen3MoeForCausalLM")

    if hf_config.get("decoder_sparse_step", 1) != 1:
        raise ValueError(f"{source}: decoder_sparse_step={hf_config['decoder_sparse_step']} is not supported "
                         "(every layer must be a MoE layer); only 1 is")
    if hf_config.get("mlp_only_layers"):
        raise ValueError(f"{source}: mlp_only_layers={hf_config['mlp_only_layers']} is not supported "
                         "(dense layers in a MoE model); it must be empty")
    if hf_config.get("shared_expert_intermediate_size"):
        raise ValueError(f"{source}: shared_expert_intermediate_size is not supported (Qwen3-MoE has no shared "
                         "expert)")
    return dict(num_moe_experts=int(need("num_experts", "num_local_experts")),
                moe_router_topk=int(need("num_experts_per_tok")),
                moe_ffn_hidden_size=int(need("moe_intermediate_size")),
                # transformers' Qwen3MoeConfig default; the published Qwen3-MoE checkpoints set true
                moe_norm_topk_prob=bool(hf_config.get("norm_topk_prob", False)))


def hf_config_from_model_config(cfg: ModelConfig, dtype: torch.dtype | str | None = None) -> dict:
    """A config.json dict for Qwen2ForCausalLM / LlamaForCausalLM / Qwen3ForCausalLM / Qwen3MoeForCausalLM.

    Written with the classic `rope_theta` / `rope_scaling` keys, which transformers 4.x and 5.x and vLLM all read.
    """
    if cfg.architecture not in ARCHITECTURE_TO_HF:
        raise ValueError(f"model config {cfg.name}: architecture={cfg.architecture!r} has no HF export")
    extra = dict((cfg.extra or {}).get("hf", {}))
    d: dict = {
        "architectures": [ARCHITECTURE_TO_HF[cfg.architecture]],
        "model_type": MODEL_TYPES[cfg.architecture],
        "hidden_act": "silu",
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.ffn_hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_query_groups,
        "head_dim": cfg.head_dim,
        "vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.norm_epsilon,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": None,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "attention_dropout": 0.0,
        "initializer_range": extra.get("initializer_range", 0.02),
        "use_cache": True,
    }
    if cfg.rope_scaling is not None:
        rs = cfg.rope_scaling
        d["rope_scaling"] = {"rope_type": "llama3", "factor": rs.factor, "low_freq_factor": rs.low_freq_factor,
                             "high_freq_factor": rs.high_freq_factor,
                             "original_max_position_embeddings": rs.original_max_position_embeddings}
    if cfg.architecture == "llama":
        d.update(attention_bias=cfg.qkv_bias, mlp_bias=False, pretraining_tp=1)
    elif cfg.architecture in ("qwen3", "qwen3_moe"):
        if not cfg.qk_layernorm:
            raise ValueError(f"model config {cfg.name}: Qwen3 always has QK-norm; qk_layernorm=false cannot be "
                             "exported")
        d.update(attention_bias=cfg.qkv_bias, use_sliding_window=False, sliding_window=None,
                 max_window_layers=extra.get("max_window_layers", cfg.num_layers))
        if cfg.architecture == "qwen3_moe":
            if not cfg.is_moe:
                raise ValueError(f"model config {cfg.name}: architecture qwen3_moe needs num_moe_experts")
            d.update(num_experts=cfg.num_moe_experts, num_experts_per_tok=cfg.moe_router_topk,
                     moe_intermediate_size=cfg.moe_ffn_hidden_size or cfg.ffn_hidden_size,
                     norm_topk_prob=cfg.moe_norm_topk_prob, decoder_sparse_step=1, mlp_only_layers=[],
                     router_aux_loss_coef=extra.get("router_aux_loss_coef", 0.001), output_router_logits=False)
    else:
        if not cfg.qkv_bias:
            raise ValueError(f"model config {cfg.name}: Qwen2 always has QKV bias; qkv_bias=false cannot be exported")
        d.update(use_sliding_window=False, sliding_window=None,
                 max_window_layers=extra.get("max_window_layers", cfg.num_layers))
    for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if k in extra:
            d[k] = extra[k]
    if dtype is None:
        dtype = extra.get("torch_dtype") or extra.get("dtype")
    if dtype is not None:
        d["torch_dtype"] = str(dtype).replace("torch.", "")
    return d
