"""Parallelism planner: memory per GPU for the Megatron trainer and the vLLM fleet, and a recommended layout.

All sizes are bytes; tables print GiB (2**30). The formulas (also in the README, "Parallelism planner"):

Parameters (`count_parameters`, Qwen2/Llama GPT with RMSNorm, SwiGLU, GQA; `d` head dim, `q = heads*d`,
`kv = query_groups*d`, `f` ffn size, `V` vocabulary):
    per layer  = h*(q + 2kv) [+ (q + 2kv) QKV bias] + q*h + 3*h*f + 2h (two RMSNorm weights)
    total      = L * per layer + V*h (embedding) + V*h (output layer, unless tied) + h (final norm)

Trainer, per GPU, for tensor/pipeline/data parallel sizes t, p, d (`trainer_memory`):
    N_rank     = params of the largest pipeline stage on one TP rank: (L/p) * (per-layer TP-split weights / t
                 + 2h norms) + V_pad(t)*h/t on the first stage (embedding) and on the last (output layer, +h)
    weights    = 2 * N_rank            bf16
    grads      = 4 * N_rank            fp32 DDP grad buffer (grad_reduce_in_fp32)
    optimizer  = 12 * N_rank / d       fp32 main params + Adam m and v, sharded over DP (distributed optimizer)
    activations= in_flight * (L/p) * tokens * a_layer / t, with tokens = seq_length * micro_batch_size,
                 in_flight = min(p, num_micro_batches) micro batches held by the first stage under 1F1B, and
                 a_layer = 12h + 4kv + 6f bytes per token (bf16; flash attention keeps no s x s matrix;
                 sequence parallel divides everything by t) -- with full recompute a_layer = 2h (the layer input)
                 plus one layer's full activations during its recompute
    logits     = tokens * V_pad/t * (2 + 4) on the last stage (bf16 logits + the fp32 log-softmax of the RL loss)
    reference  = 2 * N_rank            the frozen reference policy in bf16, same sharding (0 when offloaded)
    overhead   = 3 GiB                 CUDA context, NCCL buffers, workspace
    fits       when the sum <= 0.92 * GPU memory (allocator fragmentation)

Fleet, per vLLM engine of tensor parallel size t_v (`fleet_engine`):
    weights    = 2 * N / t_v per GPU (bf16)
    KV cache   = 2 (K and V) * L * kv * 2 bytes per token, split over t_v (replicated when t_v > query groups)
    budget     = gpu_memory_utilization * memory - weights - 2 GiB (activations, CUDA graphs) for the KV cache
    t_v        = the smallest power of two dividing the attention heads whose weights take <= half the budget
"""

from __future__ import annotations

from dataclasses import dataclass, field

from megatron_apo.config import InputError
from megatron_apo.models.config import ModelConfig

GIB = 2**30
BYTES_BF16 = 2
BYTES_GRAD = 4            # fp32 gradient buffer (grad_reduce_in_fp32)
BYTES_OPTIM = 12          # fp32 main params + Adam exp_avg + exp_avg_sq
TRAINER_OVERHEAD = 3 * GIB
FRAGMENTATION = 0.92      # usable fraction of GPU memory for the trainer
VLLM_ACTIVATION_RESERVE = 2 * GIB


@dataclass(frozen=True)
class Workload:
    """What one training micro-step looks like; defaults are the README's RL setting."""

    seq_length: int = 4096          # prompt + response tokens per sequence
    micro_batch_size: int = 1
    num_micro_batches: int = 8      # per step per DP rank; only min(p, this) are in flight on stage 0
    recompute: str = "none"         # "none" or "full"
    reference_model: bool = True    # APO / KL methods keep a frozen reference policy
    reference_offload: bool = False  # reference weights live on the host between uses
    vllm_gpu_memory_utilization: float = 0.85

    def validate(self) -> None:
        if self.recompute not in ("none", "full"):
            raise InputError(f"plan: recompute={self.recompute!r}; use 'none' or 'full'")
        if self.seq_length < 1 or self.micro_batch_size < 1 or self.num_micro_batches < 1:
            raise InputError("plan: seq_length, micro_batch_size and num_micro_batches must be >= 1")
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

    @property
    def total(self) -> int:
        return (self.weights + self.grads + self.optimizer + self.activations + self.logits + self.reference
                + self.overhead)

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

    @property
    def fleet_engines(self) -> int:
        return self.fleet_gpus // self.fleet.tp if self.fleet else 0


# ---------------------------------------------------------------- parameter counts

def layer_parameters(cfg: ModelConfig) -> tuple[int, int]:
    """(TP-split parameters, replicated parameters) of one transformer layer."""
    h, q, kv, f = (cfg.hidden_size, cfg.num_attention_heads * cfg.head_dim, cfg.num_query_groups * cfg.head_dim,
                   cfg.ffn_hidden_size)
    split = h * (q + 2 * kv) + q * h + 3 * h * f  # QKV, attention output, SwiGLU fc1 (gate+up) and fc2
    if cfg.qkv_bias:
        split += q + 2 * kv
    return split, 2 * h  # the two RMSNorm weights are replicated across TP ranks


def count_parameters(cfg: ModelConfig, vocab_size: int | None = None) -> int:
    """Total parameters (the HF count with the tokenizer vocabulary; pass a padded vocab for Megatron's)."""
    v = cfg.vocab_size if vocab_size is None else vocab_size
    split, rep = layer_parameters(cfg)
    embed = v * cfg.hidden_size
    return cfg.num_layers * (split + rep) + embed + (0 if cfg.tie_word_embeddings else embed) + cfg.hidden_size


def stage_parameters(cfg: ModelConfig, tp: int, pp: int, stage: int) -> int:
    """Parameters held by one TP rank of pipeline stage `stage` (Megatron layout: padded vocab, split by TP)."""
    split, rep = layer_parameters(cfg)
    n = (cfg.num_layers // pp) * (split // tp + rep)
    embed = cfg.padded_vocab_size(tp) * cfg.hidden_size // tp
    if stage == 0:
        n += embed
    if stage == pp - 1:
        n += cfg.hidden_size  # final norm
        # untied: the output layer; tied with pp > 1: the last stage keeps its own copy of the embedding
        if not cfg.tie_word_embeddings or pp > 1:
            n += embed
    return n


def params_per_rank(cfg: ModelConfig, tp: int, pp: int) -> int:
    return max(stage_parameters(cfg, tp, pp, s) for s in range(pp))


# ---------------------------------------------------------------- memory

def activation_bytes_per_token_layer(cfg: ModelConfig) -> int:
    """bf16 activations one layer keeps for backward, per token (no dropout, flash attention)."""
    h, kv, f = cfg.hidden_size, cfg.num_query_groups * cfg.head_dim, cfg.ffn_hidden_size
    # norm1 in, QKV in, Q, K+V, attention out (= out-proj in), norm2 in, fc1 in, fc1 out (2f), fc2 in (f)
    return BYTES_BF16 * (h + h + h + 2 * kv + h + h + h + 2 * f + f)


def trainer_memory(cfg: ModelConfig, tp: int, pp: int, dp: int, workload: Workload,
                   gpu_memory_gib: float = 80.0) -> TrainerMemory:
    cfg.validate(tp, pp)
    workload.validate()
    n = params_per_rank(cfg, tp, pp)
    tokens = workload.seq_length * workload.micro_batch_size
    layers = cfg.num_layers // pp
    in_flight = min(pp, workload.num_micro_batches)
    full_layer = tokens * activation_bytes_per_token_layer(cfg) // tp
    if workload.recompute == "full":
        activations = in_flight * layers * tokens * BYTES_BF16 * cfg.hidden_size // tp + full_layer
    else:
        activations = in_flight * layers * full_layer
    logits = tokens * cfg.padded_vocab_size(tp) // tp * (BYTES_BF16 + 4)
    reference = 0 if (not workload.reference_model or workload.reference_offload) else BYTES_BF16 * n
    return TrainerMemory(
        tp=tp, pp=pp, dp=dp, params_per_rank=n,
        weights=BYTES_BF16 * n, grads=BYTES_GRAD * n, optimizer=BYTES_OPTIM * n // dp,
        activations=activations, logits=logits, reference=reference, overhead=TRAINER_OVERHEAD,
        capacity=int(FRAGMENTATION * gpu_memory_gib * GIB),
    )


def fleet_engine(cfg: ModelConfig, gpu_memory_gib: float, workload: Workload, tp: int | None = None) -> FleetEngine:
    """One vLLM engine: the given TP, or the smallest power of two whose weights take <= half the budget."""
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
            return engine(t)
        t *= 2
    raise InputError(f"plan: {cfg.name} does not fit one vLLM engine on {gpu_memory_gib} GiB GPUs at any TP")


# ---------------------------------------------------------------- layout search

def _divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


def trainer_candidates(cfg: ModelConfig, trainer_gpus: int, gpus_per_node: int, workload: Workload,
                       gpu_memory_gib: float) -> list[TrainerMemory]:
    """Every (TP, PP, DP) with TP inside a node, TP | query groups and ffn, PP | layers, TP*PP*DP = trainer GPUs."""
    out = []
    for tp in _divisors(min(trainer_gpus, gpus_per_node)):
        if cfg.num_query_groups % tp or cfg.ffn_hidden_size % tp:
            continue
        for pp in _divisors(trainer_gpus // tp):
            if cfg.num_layers % pp:
                continue
            dp = trainer_gpus // (tp * pp)
            out.append(trainer_memory(cfg, tp, pp, dp, workload, gpu_memory_gib))
    return out


def pick(candidates: list[TrainerMemory]) -> TrainerMemory | None:
    """Smallest model-parallel group that fits (most data parallelism), then less pipelining (smaller bubble)."""
    fitting = [c for c in candidates if c.fits]
    return min(fitting, key=lambda c: (c.tp * c.pp, c.pp, c.total)) if fitting else None


def plan(cfg: ModelConfig, cluster: Cluster, workload: Workload = Workload(), fleet_fraction: float = 1 / 3,
         fleet_gpus: int | None = None) -> Plan:
    """Splits the GPUs (whole nodes when there are several) into trainer and fleet and picks the layouts.

    The fleet gets `fleet_fraction` of the GPUs (generation dominates RLVR step time; 1/3 matches the 32B example),
    rounded to whole nodes (on a single node: to half the node), at least one unit; `fleet_gpus` overrides it.
    """
    cluster.validate()
    workload.validate()
    if not 0 < fleet_fraction < 1:
        raise InputError("plan: fleet_fraction must be in (0, 1)")
    # several nodes: split whole nodes; one node: split it in halves (keeps both sides' sizes divisible)
    unit = cluster.gpus_per_node if cluster.num_gpus > cluster.gpus_per_node else max(1, cluster.num_gpus // 2)
    if fleet_gpus is None:
        units = cluster.num_gpus // unit
        fleet_gpus = max(1, min(units - 1, round(units * fleet_fraction))) * unit
    node_unit = cluster.gpus_per_node if cluster.num_gpus > cluster.gpus_per_node else 1
    if not 0 < fleet_gpus < cluster.num_gpus or fleet_gpus % node_unit:
        raise InputError(f"plan: fleet_gpus={fleet_gpus} must be a multiple of {node_unit} (whole nodes) "
                         f"between 1 and {cluster.num_gpus - 1}")
    trainer_gpus = cluster.num_gpus - fleet_gpus
    candidates = trainer_candidates(cfg, trainer_gpus, cluster.gpus_per_node, workload, cluster.gpu_memory_gib)
    fleet = fleet_engine(cfg, cluster.gpu_memory_gib, workload)
    if fleet.tp > fleet_gpus:
        fleet = None
    return Plan(model=cfg.name, total_params=count_parameters(cfg), cluster=cluster, workload=workload,
                trainer_gpus=trainer_gpus, fleet_gpus=fleet_gpus, candidates=candidates,
                recommended=pick(candidates), fleet=fleet)


# ---------------------------------------------------------------- report

def _g(b: int) -> str:
    return f"{b / GIB:.1f}"


def format_plan(p: Plan, show_all: bool = False) -> str:
    c, w = p.cluster, p.workload
    lines = [
        f"model {p.model}: {p.total_params / 1e9:.2f}B parameters; cluster {c.num_gpus} x {c.gpu_name} "
        f"{c.gpu_memory_gib:g} GiB ({c.num_nodes} node(s) of {c.gpus_per_node})",
        f"workload: seq {w.seq_length}, micro batch {w.micro_batch_size}, recompute {w.recompute}, reference "
        f"{'offloaded' if w.reference_offload else ('on GPU' if w.reference_model else 'none')}",
        f"split: trainer {p.trainer_gpus} GPUs, fleet {p.fleet_gpus} GPUs",
        "",
        "trainer memory per GPU (GiB; fits if total <= "
        f"{_g(int(FRAGMENTATION * c.gpu_memory_gib * GIB))}):",
        f"{'TP':>3} {'PP':>3} {'DP':>3} {'params/GPU':>11} {'weights':>8} {'grads':>7} {'optim':>7} {'activ':>7} "
        f"{'logits':>7} {'ref':>6} {'other':>6} {'total':>7}  fits",
    ]
    rows = p.candidates if show_all else [x for x in p.candidates if x.fits or x.tp * x.pp <= 16]
    for m in sorted(rows, key=lambda x: (x.tp * x.pp, x.pp)):
        mark = "yes" + (" <- recommended" if m is p.recommended else "") if m.fits else "no"
        lines.append(
            f"{m.tp:>3} {m.pp:>3} {m.dp:>3} {m.params_per_rank / 1e9:>10.2f}B {_g(m.weights):>8} {_g(m.grads):>7} "
            f"{_g(m.optimizer):>7} {_g(m.activations):>7} {_g(m.logits):>7} {_g(m.reference):>6} "
            f"{_g(m.overhead):>6} {_g(m.total):>7}  {mark}")
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
        lines.append(f"recommended: trainer TP={r.tp} PP={r.pp} DP={r.dp} on {p.trainer_gpus} GPUs"
                     + (f", fleet {p.fleet_engines} x vLLM TP={p.fleet.tp} on {p.fleet_gpus} GPUs" if p.fleet else ""))
    else:
        lines.append("recommended: nothing fits; add GPUs, use recompute=full, offload the reference, "
                     "or shorten the sequence")
    return "\n".join(lines)
