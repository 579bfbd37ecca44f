"""Builds a megatron.core GPTModel (Qwen2 / Llama shaped) from a ModelConfig for the current TP/PP rank."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megatron_apo.config import InputError, TransformerImpl
from megatron_apo.models.config import ModelConfig
from megatron_apo.parallel import cpu_compat

TRANSFORMER_IMPLS = tuple(m.value for m in TransformerImpl)  # config.TransformerImpl


class TransformerEngineMissing(RuntimeError):
    """`transformer_engine` was asked for (or is the GPU default) and cannot be used here."""


def resolve_transformer_impl(requested: str | None = None) -> str:
    """`model.transformer_impl`: as given, or by device (transformer_engine with CUDA, local without).

    Never falls back silently: a GPU run without Transformer Engine would get unfused attention (and OOM
    at long sequence lengths), so TE asked for (or defaulted to) and not importable is one clear error.
    """
    if requested is not None and requested not in TRANSFORMER_IMPLS:
        raise InputError(f"model.transformer_impl={requested!r} is unknown; use one of {TRANSFORMER_IMPLS}")
    impl = requested or ("transformer_engine" if torch.cuda.is_available() else "local")
    if impl == "transformer_engine":
        if not torch.cuda.is_available():
            raise TransformerEngineMissing("model.transformer_impl=transformer_engine needs CUDA and this process "
                                           "has no GPU; set model.transformer_impl=local")
        try:
            import transformer_engine  # noqa: F401
            import transformer_engine.pytorch  # noqa: F401
        except (ImportError, OSError) as e:
            how = "asked for" if requested else "the default with CUDA"
            raise TransformerEngineMissing(
                f"model.transformer_impl=transformer_engine ({how}) but Transformer Engine does not import "
                f"({type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}); install the gpu "
                "stack with bash scripts/install_gpu.sh (torch first, then TE built against it; a plain "
                "pip install -e '.[gpu]' builds TE against another torch), use the project's image, "
                "or set model.transformer_impl=local"
            ) from None
    return impl


def fusion_flags(fusions: bool = True, ddp: bool = False, *, cuda: bool | None = None,
                 fused_rope: bool | None = None, wgrad_kernel: bool | None = None) -> dict:
    """megatron-core's fused-kernel flags (`model.fusions`, docs/gpu.md "Fused kernels"): on with CUDA, off without.

    RoPE fusion needs Transformer Engine's fused RoPE kernel. Gradient-accumulation fusion writes weight gradients
    straight into DDP's `main_grad` (so only for a model that will be DDP-wrapped: `ddp`) and needs a wgrad kernel
    for every linear, megatron-core's own output layer included even under TE (apex's `fused_weight_gradient_mlp_cuda`).
    `cuda`, `fused_rope`, `wgrad_kernel`: what this machine has (probed when None).
    """
    on = fusions and (torch.cuda.is_available() if cuda is None else cuda)
    if on and fused_rope is None:
        from megatron.core.models.common.embeddings import rope_utils

        fused_rope = rope_utils.fused_apply_rotary_pos_emb is not None
    if on and ddp and wgrad_kernel is None:
        from megatron.core.tensor_parallel import layers

        wgrad_kernel = layers._grad_accum_fusion_available
    return dict(bias_activation_fusion=on, bias_dropout_fusion=on, apply_rope_fusion=bool(on and fused_rope),
                gradient_accumulation_fusion=bool(on and ddp and wgrad_kernel))


def transformer_config(
    cfg: ModelConfig,
    params_dtype: torch.dtype = torch.float32,
    tensor_parallel_size: int | None = None,
    pipeline_parallel_size: int | None = None,
    init_method_std: float = 0.02,
    perform_initialization: bool = True,
    recompute: bool = False,
    sequence_parallel: bool = False,
    transformer_impl: str | None = None,
    moe_aux_loss_coeff: float = 0.0,
    expert_parallel_size: int | None = None,
    fusions: bool = True,
    ddp: bool = False,
    routing_replay: bool = False,
):
    """Megatron's TransformerConfig for `cfg` (SwiGLU, RMSNorm, RoPE). `fusions` (model.fusions): megatron-core's
    fused kernels with CUDA (fusion_flags); `ddp`: the model will be DDP-wrapped (its grads live in main_grad);
    `routing_replay` (MoE): the routers replay given routes (rollout.routing_replay, models/routing.py)."""
    from megatron.core import parallel_state
    from megatron.core.transformer import TransformerConfig

    if tensor_parallel_size is None:
        tensor_parallel_size = parallel_state.get_tensor_model_parallel_world_size()
    if pipeline_parallel_size is None:
        pipeline_parallel_size = parallel_state.get_pipeline_model_parallel_world_size()
    if expert_parallel_size is None:
        expert_parallel_size = max(1, parallel_state.get_expert_model_parallel_world_size())
    cfg.validate(tensor_parallel_size, pipeline_parallel_size, expert_parallel_size=expert_parallel_size)
    kwargs = dict(
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        ffn_hidden_size=cfg.ffn_hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        num_query_groups=cfg.num_query_groups,
        kv_channels=cfg.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=cfg.norm_epsilon,
        gated_linear_unit=True,  # SwiGLU
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=cfg.qkv_bias,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=init_method_std,
        params_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        tensor_model_parallel_size=tensor_parallel_size,
        pipeline_model_parallel_size=pipeline_parallel_size,
        # megatron-core's MoE layer refuses to train at TP > 1 without sequence parallelism
        sequence_parallel=(sequence_parallel or cfg.is_moe) and tensor_parallel_size > 1,
        perform_initialization=perform_initialization,
        pipeline_dtype=params_dtype,
        attention_softmax_in_fp32=True,
        recompute_granularity="full" if recompute else None,
        recompute_method="uniform" if recompute else None,
        recompute_num_layers=1 if recompute else None,
        transformer_impl=resolve_transformer_impl(transformer_impl),
        cuda_graph_scope=[],  # megatron-core's default "full" is deprecated (and warns); [] means the same
        qk_layernorm=cfg.qk_layernorm,
    )
    if cfg.is_moe:
        # the expert layers read it to mark their weights expert-parallel (allreduce=False): DDP then reduces
        # their grads over the expert-data-parallel group and the optimizer keeps them apart
        kwargs.update(moe_config(cfg, moe_aux_loss_coeff), expert_model_parallel_size=expert_parallel_size)
        # rollout.routing_replay: megatron-core's replay hook in every router (models/routing.py feeds it)
        kwargs.update(moe_enable_routing_replay=routing_replay)
    kwargs.update(fusion_flags(fusions, ddp))
    kwargs.update(cpu_compat.transformer_config_overrides())
    return TransformerConfig(**kwargs)


def moe_config(cfg: ModelConfig, aux_loss_coeff: float = 0.0) -> dict:
    """TransformerConfig keys for a Qwen3-MoE router and experts (docs/models.md).

    Qwen3 routes softmax -> top-k -> renormalise (norm_topk_prob). Softmax over the top-k logits is the
    same distribution, which is megatron-core's default (softmax after top-k); without renormalisation
    the softmax runs over all experts first (pre-softmax). No shared expert, no capacity limit (no token
    dropping), the all-to-all dispatcher (it runs on gloo too).
    """
    return dict(
        num_moe_experts=cfg.num_moe_experts,
        moe_ffn_hidden_size=cfg.moe_ffn_hidden_size or cfg.ffn_hidden_size,
        moe_router_topk=cfg.moe_router_topk,
        moe_router_score_function="softmax",
        moe_router_pre_softmax=not cfg.moe_norm_topk_prob,
        moe_router_load_balancing_type="aux_loss" if aux_loss_coeff > 0 else "none",
        moe_aux_loss_coeff=aux_loss_coeff,
        moe_token_dispatcher_type="alltoall",
        moe_grouped_gemm=False,
    )


def layer_spec(cfg: ModelConfig, transformer_impl: str | None = None):
    """The layer spec of `transformer_impl` (resolve_transformer_impl: TE with CUDA, local without)."""
    from megatron.core.models.gpt import gpt_layer_specs

    experts = cfg.num_moe_experts if cfg.is_moe else None
    if resolve_transformer_impl(transformer_impl) == "transformer_engine":
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(
            num_experts=experts, moe_grouped_gemm=False, qk_layernorm=cfg.qk_layernorm)
    return gpt_layer_specs.get_gpt_layer_local_spec(num_experts=experts, moe_grouped_gemm=False,
                                                    qk_layernorm=cfg.qk_layernorm, normalization="RMSNorm")


def build_gpt_model(
    cfg: ModelConfig,
    params_dtype: torch.dtype = torch.float32,
    pre_process: bool | None = None,
    post_process: bool | None = None,
    vp_stage: int | None = None,
    **config_kwargs,
):
    """The GPTModel chunk for this rank's pipeline stage (pre/post_process from Megatron's parallel state).

    `transformer_impl=...` (in `config_kwargs`): "transformer_engine" | "local" | None (by device);
    `fusions=False` turns megatron-core's fused kernels off, `ddp=True` for a model that will be DDP-wrapped.
    """
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel

    tcfg = transformer_config(cfg, params_dtype=params_dtype, **config_kwargs)
    impl = tcfg.transformer_impl
    if pre_process is None:
        pre_process = parallel_state.is_pipeline_first_stage(ignore_virtual=vp_stage is None, vp_stage=vp_stage)
    if post_process is None:
        post_process = parallel_state.is_pipeline_last_stage(ignore_virtual=vp_stage is None, vp_stage=vp_stage)
    rs = cfg.rope_scaling
    model = GPTModel(
        config=tcfg,
        transformer_layer_spec=layer_spec(cfg, impl),
        vocab_size=cfg.padded_vocab_size(tcfg.tensor_model_parallel_size),
        max_sequence_length=cfg.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=True,  # logits stay vocab-sharded; the ops in megatron_apo.ops work on shards
        share_embeddings_and_output_weights=cfg.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_base=int(cfg.rope_theta),
        rope_scaling=rs is not None,
        rope_scaling_factor=rs.factor if rs is not None else 8.0,
        vp_stage=vp_stage,
    )
    if tcfg.moe_enable_routing_replay:
        from megatron_apo.models.routing import install_routing_replay

        install_routing_replay(model)
    if not tcfg.perform_initialization:
        tag_tensor_parallel_params(model)
    if rs is not None and hasattr(model, "rotary_pos_emb"):
        # GPTModel forwards only the factor; apply the remaining Llama-3.1 knobs explicitly.
        rope = model.rotary_pos_emb
        dim = cfg.head_dim
        dev = rope.inv_freq.device
        base = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device=dev) / dim))
        rope.inv_freq = rope._apply_scaling(
            base,
            factor=rs.factor,
            low_freq_factor=rs.low_freq_factor,
            high_freq_factor=rs.high_freq_factor,
            original_max_position_embeddings=rs.original_max_position_embeddings,
        )
    return model


def tag_tensor_parallel_params(model: torch.nn.Module) -> None:
    """Marks TP-split weights with `tensor_model_parallel` / `partition_dim` where megatron did not.

    Reason: megatron-core sets these attributes inside its weight initialisers, so a model built with
    perform_initialization=False (conversion, meta-device builds) has none, and sharding.iter_local_params
    would treat every weight as replicated.
    """
    from megatron.core import tensor_parallel as tpl

    dims = {tpl.ColumnParallelLinear: 0, tpl.VocabParallelEmbedding: 0, tpl.RowParallelLinear: 1}
    for module in model.modules():
        dim = next((d for cls, d in dims.items() if isinstance(module, cls)), None)
        if dim is None:
            continue
        weight = getattr(module, "weight", None)
        if weight is not None and not hasattr(weight, "partition_dim"):
            tpl.set_tensor_model_parallel_attributes(weight, True, dim, 1)


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
