"""Parallelism planner: memory per GPU for the Megatron trainer and the vLLM fleet, and a recommended layout.

All sizes are bytes; tables print GiB (2**30). The formulas (also in docs/slurm.md and, for MoE, docs/models.md):

Parameters (`count_parameters`, Qwen2/Qwen3/Llama GPT with RMSNorm, SwiGLU, GQA; `d` head dim, `q = heads*d`,
`kv = query_groups*d`, `f` ffn size, `V` vocabulary; MoE: `E` experts of width `f_e`, top-`k` routing):
    per layer  = h*(q + 2kv) [+ (q + 2kv) QKV bias] + q*h + 2h (two RMSNorm weights) [+ 2d QK-norm]
                 + 3*h*f (dense SwiGLU MLP)  or  E*h (router) + E*3*h*f_e (experts)
    total      = L * per layer + V*h (embedding) + V*h (output layer, unless tied) + h (final norm)

Trainer, per GPU, for tensor/pipeline/data/expert parallel sizes t, p, d, e (`trainer_memory`):
    N_rank     = params of the largest pipeline stage on one rank: (L/p) * (per-layer TP-split weights / t
                 + replicated norms and router) + V_pad(t)*h/t on the first stage (embedding) and on the last
                 (output layer, +h); MoE: + (L/p) * E/e experts, each split over expert-TP = t
    weights    = 2 * N_rank            bf16
    grads      = 4 * N_rank            fp32 DDP grad buffer (grad_reduce_in_fp32)
    optimizer  = 12 * N_dense / d + 12 * N_expert / (d/e)   fp32 main params + Adam m and v, sharded by the
                 distributed optimizer over DP (non-expert) and expert-DP = d/e (experts); 0 on the GPU with
                 optimizer_offload (Megatron-Core's optimizer_cpu_offload; the host then holds them)
    activations= in_flight * (L/p) * tokens * a_layer / t, with tokens = seq_length * micro_batch_size, or with a
                 token budget (trainer.micro_batch_tokens, padded or packed) max(micro_batch_tokens, seq_length),
                 in_flight = min(p, num_micro_batches) micro batches held by the first stage under 1F1B, and
                 a_layer = 12h + 4kv + 6f bytes per token for Qwen2/Llama (q = h; bf16; flash attention keeps no
                 s x s matrix; sequence parallel divides everything by t) -- with full recompute a_layer = 2h
                 (the layer input) plus one layer's full activations during its recompute
    all-to-all = MoE: in_flight * (L/p) * tokens * 2 * (k*h + k*h/t): dispatch (the experts' input, all-gathered
                 over expert-TP) and combine buffers, uniform routing; full recompute keeps one layer's
    logits     = tokens * V_pad/t * (2 + 4) on the last stage (bf16 logits + the fp32 log-softmax of the RL loss)
    reference  = 2 * N_rank            the frozen reference policy in bf16, same sharding (0 when offloaded)
    overhead   = 3 GiB                 CUDA context, NCCL buffers, workspace
    fits       when the sum <= 0.92 * GPU memory (allocator fragmentation)

Fleet, per vLLM engine of tensor parallel size t_v (`fleet_engine`):
    weights    = 2 * N / t_v per GPU (bf16; MoE: all experts, split like the dense weights)
    KV cache   = 2 (K and V) * L * kv * 2 bytes per token, split over t_v (replicated when t_v > query groups)
    budget     = gpu_memory_utilization * memory - weights - 2 GiB (activations, CUDA graphs) for the KV cache
    t_v        = the smallest power of two dividing the attention heads whose weights take <= half the budget;
                 with none inside a node, a whole node when its KV cache holds 8 sequences (else beyond a node)
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from megatron_apo.config import InputError
from megatron_apo.models.config import ModelConfig

GIB = 2**30
BYTES_BF16 = 2
BYTES_GRAD = 4            # fp32 gradient buffer (grad_reduce_in_fp32)
BYTES_OPTIM = 12          # fp32 main params + Adam exp_avg + exp_avg_sq
TRAINER_OVERHEAD = 3 * GIB
FRAGMENTATION = 0.92      # usable fraction of GPU memory for the trainer
VLLM_ACTIVATION_RESERVE = 2 * GIB
NODE_ENGINE_MIN_SEQUENCES = 8  # a one-node engine that misses the half-budget rule still needs this much KV cache
MAX_SEARCH_NODES = 64     # `smallest_cluster` looks this far


@dataclass(frozen=True)
class Workload:
    """What one training micro-step looks like; defaults are the README's RL setting."""

    seq_length: int = 4096          # prompt + response tokens per sequence
    micro_batch_size: int = 1
    num_micro_batches: int = 8      # per step per DP rank; only min(p, this) are in flight on stage 0
    # trainer.micro_batch_tokens: a micro-batch holds at most this many tokens (a longer sequence holds its own);
    # 0 = micro_batch_size sequences of seq_length
    micro_batch_tokens: int = 0
    recompute: str = "none"         # "none" or "full"
    reference_model: bool = True    # APO / KL methods keep a frozen reference policy
    reference_offload: bool = False  # reference weights live on the host between uses
    optimizer_offload: bool = False  # fp32 main params and Adam states on the host (what-if; see docs/models.md)
    vllm_gpu_memory_utilization: float = 0.85

    @property
    def micro_batch_token_count(self) -> int:
        """Tokens in the largest micro-batch: what its activations and logits scale with."""
        if self.micro_batch_tokens:
            return max(self.micro_batch_tokens, self.seq_length)
        return self.seq_length * self.micro_batch_size

    def validate(self) -> None:
        if self.recompute not in ("none", "full"):
            raise InputError(f"plan: recompute={self.recompute!r}; use 'none' or 'full'")
        if self.seq_length < 1 or self.micro_batch_size < 1 or self.num_micro_batches < 1:
            raise InputError("plan: seq_length, micro_batch_size and num_micro_batches must be >= 1")
        if self.micro_batch_tokens < 0:
            raise InputError("plan: micro_batch_tokens must be >= 0 (0 = micro_batch_size sequences)")
        if not 0.1 <= self.vllm_gpu_memory_utilization <= 1.0:
            raise InputError("plan: vllm_gpu_memory_utilization must be in [0.1, 1]")


@dataclass(frozen=True)
class Cluster:
    num_gpus: int
    gpu_memory_gib: float = 80.0
    gpus_per_node: int = 8
    gpu_name: str = "H100"

    def validate(self) -> None:
        if self.num_gpus < 2:
            raise InputError("plan: need at least 2 GPUs (one trainer, one fleet)")
        if self.gpus_per_node < 1 or self.gpu_memory_gib <= 0:
            raise InputError("plan: gpus_per_node must be >= 1 and gpu_memory_gib > 0")
        if self.num_gpus > self.gpus_per_node and self.num_gpus % self.gpus_per_node:
            raise InputError(f"plan: {self.num_gpus} GPUs is not a whole number of {self.gpus_per_node}-GPU nodes")

    @property
    def num_nodes(self) -> int:
        return max(1, self.num_gpus // self.gpus_per_node)


@dataclass(frozen=True)
class TrainerMemory:
    tp: int
    pp: int
    dp: int
    params_per_rank: int
    weights: int
    grads: int
    optimizer: int
    activations: int
    logits: int
    reference: int
    overhead: int
    capacity: int
    ep: int = 1
    expert_params_per_rank: int = 0
    all_to_all: int = 0        # MoE dispatch and combine buffers (activations, shown apart)
    host_optimizer: int = 0    # optimizer state in host memory per GPU (optimizer_offload)

    @property
    def edp(self) -> int:
        """Expert data parallel size: ranks holding the same experts (their optimizer state is sharded over it)."""
        return self.dp // self.ep

    @property
    def total(self) -> int:
        return (self.weights + self.grads + self.optimizer + self.activations + self.all_to_all + self.logits
                + self.reference + self.overhead)

    @property
    def fits(self) -> bool:
        return self.total <= self.capacity


@dataclass(frozen=True)
class FleetEngine:
    tp: int
    weights_per_gpu: int
    kv_bytes_per_token_per_gpu: int
    kv_budget_per_gpu: int

    @property
    def kv_tokens(self) -> int:
        return max(0, self.kv_budget_per_gpu) // self.kv_bytes_per_token_per_gpu

    @property
    def fits(self) -> bool:
        return self.kv_budget_per_gpu > 0


@dataclass(frozen=True)
class Plan:
    model: str
    total_params: int
    cluster: Cluster
    workload: Workload
    trainer_gpus: int
    fleet_gpus: int
    candidates: list[TrainerMemory] = field(default_factory=list)  # every layout tried, fitting or not
    recommended: TrainerMemory | None = None
    fleet: FleetEngine | None = None
    active_params: int = 0
    moe: str = ""                      # "128 experts, top-8" for MoE models
    default_split_fits: bool = True    # False: the fraction-based split did not fit and another split was taken
    smallest_fitting_gpus: int | None = None  # when nothing fits: the smallest cluster of this kind that does
    what_if: str = ""  # when nothing fits: the layout with the optimizer state (and reference) in host memory

    @property
    def fleet_engines(self) -> int:
        return self.fleet_gpus // self.fleet.tp if self.fleet else 0


# ---------------------------------------------------------------- parameter counts

def layer_parameters(cfg: ModelConfig) -> tuple[int, int]:
    """(TP-split, replicated) parameters of one transformer layer's non-expert part.

    Attention (QKV, output projection) and a dense SwiGLU MLP are split over TP; the two RMSNorm weights,
    Qwen3's QK-norm weights (one head_dim vector each for queries and keys) and an MoE router (experts x h)
    are replicated on every TP rank. An MoE layer's experts are `expert_layer_parameters`.
    """
    h, q, kv = cfg.hidden_size, cfg.num_attention_heads * cfg.head_dim, cfg.num_query_groups * cfg.head_dim
    split = h * (q + 2 * kv) + q * h  # QKV, attention output
    if cfg.qkv_bias:
        split += q + 2 * kv
    rep = 2 * h + (2 * cfg.head_dim if cfg.qk_layernorm else 0)
    if cfg.is_moe:
        rep += cfg.num_moe_experts * h  # router
    else:
        split += 3 * h * cfg.ffn_hidden_size  # SwiGLU fc1 (gate+up) and fc2
    return split, rep


def expert_layer_parameters(cfg: ModelConfig) -> int:
    """All experts of one MoE layer (0 for a dense model): experts x SwiGLU(h, moe_ffn_hidden_size)."""
    if not cfg.is_moe:
        return 0
    return cfg.num_moe_experts * 3 * cfg.hidden_size * (cfg.moe_ffn_hidden_size or cfg.ffn_hidden_size)


def count_parameters(cfg: ModelConfig, vocab_size: int | None = None) -> int:
    """Total parameters (the HF count with the tokenizer vocabulary; pass a padded vocab for Megatron's)."""
    v = cfg.vocab_size if vocab_size is None else vocab_size
    split, rep = layer_parameters(cfg)
    embed = v * cfg.hidden_size
    return (cfg.num_layers * (split + rep + expert_layer_parameters(cfg)) + embed
            + (0 if cfg.tie_word_embeddings else embed) + cfg.hidden_size)


def active_parameters(cfg: ModelConfig) -> int:
    """Parameters one token uses: the total less the experts it is not routed to (the total for dense)."""
    if not cfg.is_moe:
        return count_parameters(cfg)
    idle = cfg.num_moe_experts - cfg.moe_router_topk
    return count_parameters(cfg) - cfg.num_layers * expert_layer_parameters(cfg) * idle // cfg.num_moe_experts


def stage_dense_and_expert_parameters(cfg: ModelConfig, tp: int, pp: int, stage: int,
                                      ep: int = 1) -> tuple[int, int]:
    """(non-expert, expert) parameters held by one rank of pipeline stage `stage` (Megatron layout).

    Non-expert weights: split over TP (vocabulary padded for TP). Experts: num_experts / ep of them per rank,
    each split over expert-TP, which is TP here (Megatron-Core's default expert_tensor_parallel_size).
    """
    split, rep = layer_parameters(cfg)
    layers = cfg.num_layers // pp
    n = layers * (split // tp + rep)
    embed = cfg.padded_vocab_size(tp) * cfg.hidden_size // tp
    if stage == 0:
        n += embed
    if stage == pp - 1:
        n += cfg.hidden_size  # final norm
        # untied: the output layer; tied with pp > 1: the last stage keeps its own copy of the embedding
        if not cfg.tie_word_embeddings or pp > 1:
            n += embed
    return n, layers * expert_layer_parameters(cfg) // (ep * tp)


def stage_parameters(cfg: ModelConfig, tp: int, pp: int, stage: int, ep: int = 1) -> int:
    """Parameters held by one rank of pipeline stage `stage` (Megatron layout: padded vocab, split by TP)."""
    return sum(stage_dense_and_expert_parameters(cfg, tp, pp, stage, ep))


def params_per_rank(cfg: ModelConfig, tp: int, pp: int, ep: int = 1) -> int:
    return max(stage_parameters(cfg, tp, pp, s, ep) for s in range(pp))


# ---------------------------------------------------------------- memory

def activation_bytes_per_token_layer(cfg: ModelConfig) -> int:
    """bf16 activations one layer keeps for backward, per token, before the TP split (flash attention).

    Attention: norm1 in, QKV in, Q, K+V, attention out (= out-proj in), norm2 in [+ Q and K before QK-norm].
    Dense MLP: fc1 in, fc1 out (2f), fc2 in (f). MoE: the router input and its fp32 logits, and the experts'
    fc1 out (k x 2f_e) and fc2 in (k x f_e) for the top-k copies of each token (uniform routing). The
    all-to-all buffers are `all_to_all_bytes_per_token_layer`.
    """
    h, q, kv = cfg.hidden_size, cfg.num_attention_heads * cfg.head_dim, cfg.num_query_groups * cfg.head_dim
    attn = h + h + q + 2 * kv + q + h + ((q + kv) if cfg.qk_layernorm else 0)
    if not cfg.is_moe:
        f = cfg.ffn_hidden_size
        return BYTES_BF16 * (attn + h + 2 * f + f)
    k, fe = cfg.moe_router_topk, cfg.moe_ffn_hidden_size or cfg.ffn_hidden_size
    return BYTES_BF16 * (attn + h + k * 3 * fe) + 4 * cfg.num_moe_experts


def all_to_all_bytes_per_token_layer(cfg: ModelConfig, tp: int) -> int:
    """MoE dispatch and combine buffers per token and layer on one rank (0 for dense), bf16.

    Dispatch: every token's top-k copies, all-gathered over expert-TP (= TP) after the all-to-all, are the
    experts' fc1 input, kept for backward: k*h per token, not divided by TP. Combine: the experts' outputs
    after the reduce-scatter and the all-to-all back, kept by the probability-weighted un-permute: k*h / TP.
    """
    if not cfg.is_moe:
        return 0
    kh = cfg.moe_router_topk * cfg.hidden_size
    return BYTES_BF16 * (kh + kh // tp)


def trainer_memory(cfg: ModelConfig, tp: int, pp: int, dp: int, workload: Workload,
                   gpu_memory_gib: float = 80.0, ep: int = 1) -> TrainerMemory:
    cfg.validate(tp, pp)
    workload.validate()
    if ep > 1 and (not cfg.is_moe or cfg.num_moe_experts % ep or dp % ep):
        raise ValueError(f"plan: expert parallel size {ep} needs an MoE model whose number of experts it divides, "
                         f"and must divide DP={dp}")
    stage = max(range(pp), key=lambda st: stage_parameters(cfg, tp, pp, st, ep))
    dense, expert = stage_dense_and_expert_parameters(cfg, tp, pp, stage, ep)
    n = dense + expert
    tokens = workload.micro_batch_token_count
    layers = cfg.num_layers // pp
    in_flight = min(pp, workload.num_micro_batches)
    full_layer = tokens * activation_bytes_per_token_layer(cfg) // tp
    a2a_layer = tokens * all_to_all_bytes_per_token_layer(cfg, tp)
    if workload.recompute == "full":
        activations = in_flight * layers * tokens * BYTES_BF16 * cfg.hidden_size // tp + full_layer
        all_to_all = a2a_layer  # only the layer being recomputed
    else:
        activations = in_flight * layers * full_layer
        all_to_all = in_flight * layers * a2a_layer
    logits = tokens * cfg.padded_vocab_size(tp) // tp * (BYTES_BF16 + 4)
    reference = 0 if (not workload.reference_model or workload.reference_offload) else BYTES_BF16 * n
    # the distributed optimizer shards non-expert state over DP and expert state over expert-DP = DP / EP
    optimizer = BYTES_OPTIM * dense // dp + BYTES_OPTIM * expert // (dp // ep)
    return TrainerMemory(
        tp=tp, pp=pp, dp=dp, ep=ep, params_per_rank=n, expert_params_per_rank=expert,
        weights=BYTES_BF16 * n, grads=BYTES_GRAD * n, optimizer=0 if workload.optimizer_offload else optimizer,
        host_optimizer=optimizer if workload.optimizer_offload else 0,
        activations=activations, all_to_all=all_to_all, logits=logits, reference=reference,
        overhead=TRAINER_OVERHEAD, capacity=int(FRAGMENTATION * gpu_memory_gib * GIB),
    )


def fleet_engine(cfg: ModelConfig, gpu_memory_gib: float, workload: Workload, tp: int | None = None,
                 gpus_per_node: int | None = None) -> FleetEngine:
    """One vLLM engine: the given TP, or the smallest power of two whose weights take <= half the budget.

    With `gpus_per_node`, an engine that would need more than a node (vLLM's TP across nodes is slow) is a
    whole node instead when its KV cache still holds NODE_ENGINE_MIN_SEQUENCES sequences.
    """
    total = count_parameters(cfg)
    budget = workload.vllm_gpu_memory_utilization * gpu_memory_gib * GIB - VLLM_ACTIVATION_RESERVE

    def engine(t: int) -> FleetEngine:
        weights = BYTES_BF16 * total // t
        kv_heads_per_gpu = max(1, cfg.num_query_groups // t)
        kv_per_token = 2 * cfg.num_layers * kv_heads_per_gpu * cfg.head_dim * BYTES_BF16
        return FleetEngine(tp=t, weights_per_gpu=weights, kv_bytes_per_token_per_gpu=kv_per_token,
                           kv_budget_per_gpu=int(budget - weights))

    if tp is not None:
        return engine(tp)
    t = 1
    while t <= cfg.num_attention_heads:
        if cfg.num_attention_heads % t == 0 and BYTES_BF16 * total / t <= budget / 2:
            if gpus_per_node and t > gpus_per_node and cfg.num_attention_heads % gpus_per_node == 0:
                node = engine(gpus_per_node)
                if node.kv_tokens >= NODE_ENGINE_MIN_SEQUENCES * workload.seq_length:
                    return node
            return engine(t)
        t *= 2
    raise InputError(f"plan: {cfg.name} does not fit one vLLM engine on {gpu_memory_gib} GiB GPUs at any TP")


# ---------------------------------------------------------------- layout search

def _divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


def trainer_candidates(cfg: ModelConfig, trainer_gpus: int, gpus_per_node: int, workload: Workload,
                       gpu_memory_gib: float) -> list[TrainerMemory]:
    """Every (TP, PP, EP, DP) with TP inside a node, TP | query groups and ffn, PP | layers, TP*PP*DP = trainer
    GPUs; MoE: EP | experts and EP | DP (Megatron-Core's expert grid: DP x TP = expert-DP x EP x expert-TP)."""
    out = []
    moe_ffn = cfg.moe_ffn_hidden_size or cfg.ffn_hidden_size
    for tp in _divisors(min(trainer_gpus, gpus_per_node)):
        if cfg.num_query_groups % tp or cfg.ffn_hidden_size % tp or (cfg.is_moe and moe_ffn % tp):
            continue
        for pp in _divisors(trainer_gpus // tp):
            if cfg.num_layers % pp:
                continue
            dp = trainer_gpus // (tp * pp)
            eps = [e for e in _divisors(dp) if cfg.num_moe_experts % e == 0] if cfg.is_moe else [1]
            for ep in eps:
                out.append(trainer_memory(cfg, tp, pp, dp, workload, gpu_memory_gib, ep=ep))
    return out


def pick(candidates: list[TrainerMemory]) -> TrainerMemory | None:
    """Smallest model-parallel group that fits (most data parallelism), then less pipelining (smaller bubble);
    MoE: then the smallest EP that fits (fewer all-to-all peers), so EP grows before TP or PP do when needed."""
    fitting = [c for c in candidates if c.fits]
    return min(fitting, key=lambda c: (c.tp * c.pp, c.pp, c.ep, c.total)) if fitting else None


def _split_unit(cluster: Cluster) -> int:
    # several nodes: split whole nodes; one node: split it in halves (keeps both sides' sizes divisible)
    return cluster.gpus_per_node if cluster.num_gpus > cluster.gpus_per_node else max(1, cluster.num_gpus // 2)


def _layout(cfg: ModelConfig, cluster: Cluster, workload: Workload, fleet_gpus: int):
    trainer_gpus = cluster.num_gpus - fleet_gpus
    candidates = trainer_candidates(cfg, trainer_gpus, cluster.gpus_per_node, workload, cluster.gpu_memory_gib)
    fleet = fleet_engine(cfg, cluster.gpu_memory_gib, workload, gpus_per_node=cluster.gpus_per_node)
    if fleet.tp > fleet_gpus or fleet_gpus % fleet.tp:
        fleet = None
    return candidates, pick(candidates), fleet


def plan(cfg: ModelConfig, cluster: Cluster, workload: Workload = Workload(), fleet_fraction: float = 1 / 3,
         fleet_gpus: int | None = None, search_smallest: bool = True) -> Plan:
    """Splits the GPUs (whole nodes when there are several) into trainer and fleet and picks the layouts.

    The fleet gets `fleet_fraction` of the GPUs (generation dominates RLVR step time; 1/3 matches the 32B example),
    rounded to whole nodes (on a single node: to half the node), at least one unit; `fleet_gpus` overrides it.
    When that split fits no layout (MoE expert grids want power-of-two trainer sizes), the other splits are tried,
    nearest the fraction first. When none fits, `smallest_fitting_gpus` is the smallest cluster that does.
    """
    cluster.validate()
    workload.validate()
    if not 0 < fleet_fraction < 1:
        raise InputError("plan: fleet_fraction must be in (0, 1)")
    unit = _split_unit(cluster)
    units = cluster.num_gpus // unit
    node_unit = cluster.gpus_per_node if cluster.num_gpus > cluster.gpus_per_node else 1
    if fleet_gpus is not None and (not 0 < fleet_gpus < cluster.num_gpus or fleet_gpus % node_unit):
        raise InputError(f"plan: fleet_gpus={fleet_gpus} must be a multiple of {node_unit} (whole nodes) "
                         f"between 1 and {cluster.num_gpus - 1}")
    default = fleet_gpus or max(1, min(units - 1, round(units * fleet_fraction))) * unit
    splits = [default]
    if fleet_gpus is None:  # the other splits, nearest the default first, a larger trainer first on ties
        splits += sorted((u * unit for u in range(1, units) if u * unit != default),
                         key=lambda f: (abs(f - default), f))
    chosen = None
    for f in splits:
        candidates, rec, fleet = _layout(cfg, cluster, workload, f)
        if chosen is None:
            chosen = (f, candidates, rec, fleet)
        if rec is not None and fleet is not None:
            chosen = (f, candidates, rec, fleet)
            break
    f, candidates, rec, fleet = chosen
    smallest, what_if = None, ""
    if (rec is None or fleet is None) and search_smallest:
        smallest = smallest_cluster(cfg, cluster, workload, fleet_fraction)
        what_if = _offload_what_if(cfg, cluster, workload, fleet_fraction, fleet_gpus)
    return Plan(model=cfg.name, total_params=count_parameters(cfg), cluster=cluster, workload=workload,
                trainer_gpus=cluster.num_gpus - f, fleet_gpus=f, candidates=candidates, recommended=rec,
                fleet=fleet, active_params=active_parameters(cfg),
                moe=f"{cfg.num_moe_experts} experts, top-{cfg.moe_router_topk}" if cfg.is_moe else "",
                default_split_fits=f == default, smallest_fitting_gpus=smallest, what_if=what_if)


def _offload_what_if(cfg: ModelConfig, cluster: Cluster, workload: Workload, fleet_fraction: float,
                     fleet_gpus: int | None) -> str:
    """The recommendation with the optimizer state and the reference in host memory (then full recompute too)."""
    if workload.optimizer_offload:
        return ""
    steps = [("--optimizer-offload --reference-offload", dict(optimizer_offload=True, reference_offload=True))]
    if workload.recompute != "full":
        steps.append(("--optimizer-offload --reference-offload --recompute full",
                      dict(optimizer_offload=True, reference_offload=True, recompute="full")))
    for flags, changes in steps:
        p = plan(cfg, cluster, replace(workload, **changes), fleet_fraction, fleet_gpus, search_smallest=False)
        if p.recommended is not None and p.fleet is not None:
            r = p.recommended
            expert = f" EP={r.ep}" if cfg.is_moe else ""
            return (f"{flags}: trainer TP={r.tp} PP={r.pp}{expert} DP={r.dp} on {p.trainer_gpus} GPUs "
                    f"({_g(r.total)} GiB per GPU, {_g(r.host_optimizer)} GiB of host memory per GPU), fleet "
                    f"{p.fleet_engines} x vLLM TP={p.fleet.tp} on {p.fleet_gpus} GPUs")
    return ""


def smallest_cluster(cfg: ModelConfig, cluster: Cluster, workload: Workload, fleet_fraction: float = 1 / 3
                     ) -> int | None:
    """The fewest GPUs (whole nodes of this kind, up to MAX_SEARCH_NODES) on which a plan fits, or None."""
    for nodes in range(1, MAX_SEARCH_NODES + 1):
        gpus = nodes * cluster.gpus_per_node
        if gpus <= cluster.num_gpus or gpus < 2:
            continue
        p = plan(cfg, replace(cluster, num_gpus=gpus), workload, fleet_fraction, search_smallest=False)
        if p.recommended is not None and p.fleet is not None:
            return gpus
    return None


# ---------------------------------------------------------------- report

def _g(b: int) -> str:
    return f"{b / GIB:.1f}"


def format_plan(p: Plan, show_all: bool = False) -> str:
    c, w = p.cluster, p.workload
    moe = bool(p.moe)
    size = f"{p.total_params / 1e9:.2f}B parameters"
    if moe:
        size += f" ({p.active_params / 1e9:.2f}B active; {p.moe})"
    lines = [
        f"model {p.model}: {size}; cluster {c.num_gpus} x {c.gpu_name} "
        f"{c.gpu_memory_gib:g} GiB ({c.num_nodes} node(s) of {c.gpus_per_node})",
        f"workload: seq {w.seq_length}, micro batch "
        + (f"{w.micro_batch_tokens} tokens" if w.micro_batch_tokens else f"{w.micro_batch_size}")
        + f", recompute {w.recompute}, reference "
        f"{'offloaded' if w.reference_offload else ('on GPU' if w.reference_model else 'none')}"
        + (", optimizer offloaded to the host" if w.optimizer_offload else ""),
        f"split: trainer {p.trainer_gpus} GPUs, fleet {p.fleet_gpus} GPUs"
        + ("" if p.default_split_fits else " (the default split fits no layout; this one does)"),
        "",
        "trainer memory per GPU (GiB; fits if total <= "
        f"{_g(int(FRAGMENTATION * c.gpu_memory_gib * GIB))}):",
        f"{'TP':>3} {'PP':>3} " + (f"{'EP':>3} " if moe else "") + f"{'DP':>3} {'params/GPU':>11} {'weights':>8} "
        f"{'grads':>7} {'optim':>7} {'activ':>7} " + (f"{'a2a':>6} " if moe else "")
        + f"{'logits':>7} {'ref':>6} {'other':>6} {'total':>7}  fits",
    ]
    limit = 64 if moe else 16
    rows = p.candidates if show_all else [x for x in p.candidates if x.fits or x.tp * x.pp * x.ep <= limit]
    for m in sorted(rows, key=lambda x: (x.tp * x.pp, x.pp, x.ep)):
        mark = "yes" + (" <- recommended" if m is p.recommended else "") if m.fits else "no"
        lines.append(
            f"{m.tp:>3} {m.pp:>3} " + (f"{m.ep:>3} " if moe else "") + f"{m.dp:>3} "
            f"{m.params_per_rank / 1e9:>10.2f}B {_g(m.weights):>8} {_g(m.grads):>7} "
            f"{_g(m.optimizer):>7} {_g(m.activations):>7} " + (f"{_g(m.all_to_all):>6} " if moe else "")
            + f"{_g(m.logits):>7} {_g(m.reference):>6} {_g(m.overhead):>6} {_g(m.total):>7}  {mark}")
    lines.append("")
    if p.fleet:
        f = p.fleet
        lines.append(
            f"fleet: {p.fleet_engines} vLLM engine(s) of TP={f.tp}; per GPU: weights {_g(f.weights_per_gpu)} GiB, "
            f"KV cache {_g(f.kv_budget_per_gpu)} GiB = {f.kv_tokens:,} tokens "
            f"({f.kv_tokens // w.seq_length:,} sequences of {w.seq_length}) at gpu_memory_utilization "
            f"{w.vllm_gpu_memory_utilization}")
    else:
        lines.append(f"fleet: {p.fleet_gpus} GPU(s) cannot hold one vLLM engine of {p.model}; give the fleet more GPUs")
    if p.recommended:
        r = p.recommended
        expert = f" EP={r.ep}" if moe else ""
        lines.append(f"recommended: trainer TP={r.tp} PP={r.pp}{expert} DP={r.dp} on {p.trainer_gpus} GPUs"
                     + (f", fleet {p.fleet_engines} x vLLM TP={p.fleet.tp} on {p.fleet_gpus} GPUs" if p.fleet else ""))
        if moe:
            lines.append(f"  experts: {p.moe.split(',')[0]} / EP {r.ep} per rank, each split over expert-TP = TP "
                         f"{r.tp}; expert optimizer state sharded over expert-DP = DP / EP = {r.edp}")
        if r.host_optimizer:
            lines.append(f"  host memory for the offloaded optimizer: {_g(r.host_optimizer)} GiB per GPU, "
                         f"{_g(r.host_optimizer * min(c.gpus_per_node, p.trainer_gpus))} GiB per trainer node")
    else:
        lines.append("recommended: nothing fits; add GPUs, use recompute=full, offload the reference, "
                     "or shorten the sequence")
    if p.what_if:
        lines.append(f"what-if, optimizer state in host memory (the trainer keeps it on the GPU): {p.what_if}")
    if p.smallest_fitting_gpus:
        lines.append(f"smallest cluster that fits with these settings: {p.smallest_fitting_gpus} x {c.gpu_name} "
                     f"{c.gpu_memory_gib:g} GiB (megatron-apo plan --gpus {p.smallest_fitting_gpus} ...)")
    return "\n".join(lines)
