"""The parallelism planner against hand-computed numbers (Qwen2.5-7B, -32B), real Megatron shards, and the
layouts our Slurm examples use."""

import pytest

from megatron_apo.cli import main as cli_main
from megatron_apo.config import InputError
from megatron_apo.launch.planner import (
    GIB,
    Cluster,
    Workload,
    active_parameters,
    count_parameters,
    fleet_engine,
    format_plan,
    params_per_rank,
    plan,
    stage_dense_and_expert_parameters,
    stage_parameters,
    trainer_memory,
)
from megatron_apo.models import available_model_configs, load_model_config
from megatron_apo.parallel import run_distributed
from tests.helpers.planner_ranks import local_param_count


def test_parameter_counts_by_hand():
    # Qwen2.5-7B: h=3584, 28 layers, 28 heads x 128, 4 KV groups, ffn 18944, V=152064, untied.
    qkv = 3584 * (3584 + 2 * 512) + (3584 + 2 * 512)       # weight + bias
    layer = qkv + 3584 * 3584 + 3 * 3584 * 18944 + 2 * 3584  # + out proj, SwiGLU (gate, up, down), 2 norms
    assert count_parameters(load_model_config("qwen2.5-7b")) == 28 * layer + 2 * 152064 * 3584 + 3584 == 7_615_616_512
    # Qwen2.5-32B: h=5120, 64 layers, 40 heads x 128, 8 KV groups, ffn 27648.
    qkv = 5120 * (5120 + 2 * 1024) + (5120 + 2 * 1024)
    layer = qkv + 5120 * 5120 + 3 * 5120 * 27648 + 2 * 5120
    assert count_parameters(load_model_config("qwen2.5-32b")) == 64 * layer + 2 * 152064 * 5120 + 5120 == 32_763_876_352


def test_parameter_counts_match_published():
    checked = 0
    for name in available_model_configs():
        cfg = load_model_config(name)
        if cfg.published_params:
            n = count_parameters(cfg)
            assert abs(n - cfg.published_params) / cfg.published_params <= 1e-3, (name, n, cfg.published_params)
            checked += 1
    assert checked >= 7


def test_stage_parameters_equal_a_real_megatron_model():
    """TP=2 tiny GPTModel (2 gloo ranks): each rank holds exactly the parameters the planner says."""
    cfg = load_model_config("tiny")
    got = run_distributed(local_param_count, 2, 2, 1, timeout=180)
    assert [n for *_, n in got] == [stage_parameters(cfg, 2, 1, 0)] * 2
    # both shards together are the model with Megatron's padded vocabulary, the (replicated) RMSNorm weights twice
    replicated = 4 * 2 * 64 + 64
    assert sum(n for *_, n in got) == count_parameters(cfg, vocab_size=cfg.padded_vocab_size(2)) + replicated
    # PP: the first stage holds the embedding, the last the output layer and final norm (same size here)
    assert stage_parameters(cfg, 1, 2, 0) + stage_parameters(cfg, 1, 2, 1) == count_parameters(cfg, vocab_size=256)


def test_trainer_memory_32b_tp8_pp2_dp2_by_hand():
    cfg = load_model_config("qwen2.5-32b")
    w = Workload(seq_length=16384, micro_batch_size=1, num_micro_batches=8)
    m = trainer_memory(cfg, 8, 2, 2, w, gpu_memory_gib=80)
    v_pad = 152576  # 152064 rounded up to a multiple of 128 * TP = 1024
    split = 5120 * 7168 + 7168 + 5120 * 5120 + 3 * 5120 * 27648
    last_stage = 32 * (split // 8 + 2 * 5120) + v_pad * 5120 // 8 + 5120  # 32 layers, output layer, final norm
    assert params_per_rank(cfg, 8, 2) == m.params_per_rank == last_stage == 2_048_361_472
    assert m.weights == 2 * last_stage and m.grads == 4 * last_stage and m.optimizer == 12 * last_stage // 2
    per_token_layer = 2 * (6 * 5120 + 2 * 1024 + 3 * 27648)  # bf16: 6h + 2kv + 3f elements
    assert m.activations == 2 * 32 * (16384 * per_token_layer // 8)  # 2 micro batches in flight x 32 layers
    assert m.logits == 16384 * (v_pad // 8) * 6
    assert m.reference == 2 * last_stage and m.overhead == 3 * GIB
    assert abs(m.total / GIB - 59.7) < 0.05 and m.fits


def test_trainer_memory_7b_tp1_does_not_fit_tp2_does():
    cfg = load_model_config("qwen2.5-7b")
    w = Workload(seq_length=4096)
    tp1 = trainer_memory(cfg, 1, 1, 4, w)
    n = 7_615_616_512 - 152064 * 3584 * 2 + 152064 * 3584 * 2  # TP=1 pads 152064 to itself (a multiple of 128)
    assert tp1.params_per_rank == n
    # 2 + 4 + 12/4 + 2 (reference) = 11 bytes/param = 78 GiB before activations: over 0.92 * 80 GiB
    assert tp1.weights + tp1.grads + tp1.optimizer + tp1.reference == 11 * n and not tp1.fits
    assert trainer_memory(cfg, 2, 1, 2, w).fits


def test_recompute_and_reference_offload_cut_memory():
    cfg = load_model_config("qwen2.5-32b")
    base = trainer_memory(cfg, 8, 1, 4, Workload(seq_length=16384))
    rec = trainer_memory(cfg, 8, 1, 4, Workload(seq_length=16384, recompute="full"))
    off = trainer_memory(cfg, 8, 1, 4, Workload(seq_length=16384, reference_offload=True))
    assert not base.fits and rec.fits
    # full recompute keeps only each layer's bf16 input (2h per token) plus one layer's full activations
    one_layer = 16384 * 2 * (6 * 5120 + 2 * 1024 + 3 * 27648) // 8
    assert rec.activations == 64 * 16384 * 2 * 5120 // 8 + one_layer
    assert off.reference == 0 and off.total == base.total - base.reference


def test_fleet_kv_cache_by_hand():
    w = Workload(vllm_gpu_memory_utilization=0.85)
    e7 = fleet_engine(load_model_config("qwen2.5-7b"), 80, w)
    assert e7.tp == 1 and e7.kv_bytes_per_token_per_gpu == 2 * 28 * 4 * 128 * 2 == 57_344
    assert e7.weights_per_gpu == 2 * 7_615_616_512
    assert e7.kv_budget_per_gpu == int(0.85 * 80 * GIB - 2 * GIB - 2 * 7_615_616_512)
    e32 = fleet_engine(load_model_config("qwen2.5-32b"), 80, w)
    # 65.5 GB of bf16 weights exceed half of 0.85 * 80 GiB - 2 GiB at TP=1; TP=2 halves them and the KV heads
    assert e32.tp == 2 and e32.kv_bytes_per_token_per_gpu == 2 * 64 * 4 * 128 * 2 == 131_072


def test_plan_reproduces_the_slurm_examples():
    # slurm/train_apo.sbatch defaults: Qwen2.5-32B, 6 nodes x 8 H100-80GB, 16k-token sequences
    p32 = plan(load_model_config("qwen2.5-32b"), Cluster(num_gpus=48), Workload(seq_length=16384))
    r = p32.recommended
    assert (p32.trainer_gpus, p32.fleet_gpus) == (32, 16)
    assert (r.tp, r.pp, r.dp) == (8, 2, 2) and p32.fleet.tp == 2 and p32.fleet_engines == 8
    # README: Qwen2.5-7B on one 8-GPU node, 4 trainer GPUs + 4 vLLM engines
    p7 = plan(load_model_config("qwen2.5-7b"), Cluster(num_gpus=8), Workload(seq_length=4096))
    r = p7.recommended
    assert (p7.trainer_gpus, r.tp, r.pp, r.dp, p7.fleet.tp, p7.fleet_engines) == (4, 2, 1, 2, 1, 4)


@pytest.mark.parametrize("model,gpus,mem,seq,tp,pp", [
    # public recipes run these on 80 GB GPUs; the planner must agree that they fit
    ("qwen2.5-7b", 8, 80, 2048, 2, 2),     # verl-style Megatron GRPO: Qwen2.5-7B actor TP=2 PP=2 on 8 GPUs
    ("qwen2.5-32b", 32, 80, 8192, 8, 2),    # Qwen2.5-32B RL actors on 4 nodes: TP=8 PP=2
    ("llama3.1-70b", 64, 80, 4096, 8, 4),   # Llama-3.1-70B: TP=8 PP=4 (DP=2) with the distributed optimizer
])
def test_public_layouts_fit(model, gpus, mem, seq, tp, pp):
    m = trainer_memory(load_model_config(model), tp, pp, gpus // (tp * pp), Workload(seq_length=seq), mem)
    assert m.fits, f"{model} TP={tp} PP={pp}: {m.total / GIB:.1f} GiB"


def test_bad_inputs_are_one_line_errors(capsys):
    with pytest.raises(ValueError, match="recompute"):
        trainer_memory(load_model_config("qwen2.5-7b"), 2, 1, 1, Workload(recompute="some"))
    with pytest.raises(ValueError, match="does not divide num_query_groups"):
        trainer_memory(load_model_config("qwen2.5-7b"), 8, 1, 1, Workload())
    assert cli_main(["plan", "--model", "qwen2.5-7b", "--gpus", "12"]) == 2
    assert "whole number of 8-GPU nodes" in capsys.readouterr().err


def test_plan_cli_prints_the_table(capsys):
    assert cli_main(["plan", "--model", "qwen2.5-32b", "--gpus", "48", "--seq-length", "16384"]) == 0
    out = capsys.readouterr().out
    assert "recommended: trainer TP=8 PP=2 DP=2 on 32 GPUs, fleet 8 x vLLM TP=2 on 16 GPUs" in out
    assert "  8   1   4 " in out and " no" in out  # the PP=1 row is shown and does not fit



def test_token_budget_sizes_the_micro_batch_activations():
    """A micro-batch of micro_batch_tokens (padded or packed) holds that many tokens whatever the sequence length;
    a sequence longer than the budget holds its own micro-batch."""
    cfg = load_model_config("qwen2.5-32b")

    def mem(**kw):
        return trainer_memory(cfg, 8, 2, 2, Workload(**kw))

    budget = mem(seq_length=4096, micro_batch_tokens=16384)
    same = mem(seq_length=16384)
    assert (budget.activations, budget.logits) == (same.activations, same.logits)
    assert budget.activations == 4 * mem(seq_length=4096).activations > 0
    assert mem(seq_length=16384, micro_batch_tokens=4096).activations == same.activations
    with pytest.raises(InputError, match="micro_batch_tokens"):
        mem(micro_batch_tokens=-1)


def test_plan_cli_takes_the_token_budget(capsys):
    assert cli_main(["plan", "--model", "qwen2.5-32b", "--gpus", "48", "--seq-length", "4096",
                     "--micro-batch-tokens", "16384"]) == 0
    assert "micro batch 16384 tokens" in capsys.readouterr().out

# ---------------------------------------------------------------- MoE (Qwen3-30B-A3B, Qwen3-235B-A22B)

QWEN3_30B = dict(h=2048, q=32 * 128, kv=4 * 128, experts=128, fe=768, k=8, layers=48, vocab=151936)


def test_moe_parameter_counts_by_hand():
    h, q, kv, e, fe = (QWEN3_30B[x] for x in ("h", "q", "kv", "experts", "fe"))
    attention = h * (q + 2 * kv) + q * h                       # QKV, output projection (no bias)
    replicated = 2 * h + 2 * 128 + e * h                       # 2 RMSNorms, QK-norm (head_dim each), router
    experts = e * 3 * h * fe                                   # SwiGLU experts
    total = 48 * (attention + replicated + experts) + 2 * 151936 * h + h
    cfg = load_model_config("qwen3-30b-a3b")
    assert count_parameters(cfg) == total == 30_532_122_624
    # active: 8 of 128 experts per token (the card: 3.3B activated)
    assert active_parameters(cfg) == total - 48 * experts * 120 // 128 == 3_353_032_704
    assert abs(active_parameters(load_model_config("qwen3-235b-a22b")) / 22e9 - 1) < 0.01  # the card: 22B


@pytest.mark.slow  # 4 spawned ranks building megatron MoE layers: ~50 s on a 2-core machine
def test_moe_stage_parameters_equal_a_real_megatron_model():
    """TP=2 x EP=2 tiny Qwen3-MoE (4 gloo ranks): each rank holds exactly the parameters the planner says --
    its 2 of the 4 experts, each split over expert-TP = TP, the replicated router, norms and QK-norms."""
    cfg = load_model_config("tiny-qwen3-moe")
    got = run_distributed(local_param_count, 4, 2, 1, "tiny-qwen3-moe", 2, timeout=300)
    dense, expert = stage_dense_and_expert_parameters(cfg, 2, 1, 0, ep=2)
    assert expert == 2 * 2 * 3 * 64 * 32 // 2  # 2 layers x 2 local experts x SwiGLU(64, 32) / TP
    assert [n for *_, n in got] == [dense + expert] * 4
    # the 4 ranks hold every expert once per TP half and the non-expert weights once per EP replica
    assert sum(n for *_, n in got) == 2 * 2 * dense + 2 * 4 * 3 * 64 * 32


def test_moe_trainer_memory_30b_by_hand():
    cfg = load_model_config("qwen3-30b-a3b")
    w = Workload(seq_length=4096, reference_offload=True, optimizer_offload=True)
    m = trainer_memory(cfg, 2, 1, 2, w, ep=2)
    h, k = 2048, 8
    embed = 152064 * h // 2  # 151936 padded to a multiple of 128 * TP
    dense = 48 * ((h * (4096 + 1024) + 4096 * h) // 2 + 2 * h + 256 + 128 * h) + 2 * embed + h
    expert = 48 * 64 * 3 * h * 768 // 2  # 64 experts per EP rank, split over TP=2
    assert (m.params_per_rank, m.expert_params_per_rank) == (dense + expert, expert) == (8_024_963_072, 7_247_757_312)
    assert m.weights == 2 * (dense + expert) and m.grads == 4 * (dense + expert)
    assert m.optimizer == 0 and m.reference == 0  # both offloaded
    assert m.host_optimizer == 12 * dense // 2 + 12 * expert // 1  # dense over DP=2, experts over expert-DP=1
    # all-to-all: dispatch k*h per token (all-gathered over expert-TP) + combine k*h/TP, bf16, 48 layers
    assert m.all_to_all == 48 * 4096 * 2 * (k * h + k * h // 2)
    # norm1 in, QKV in, Q, K+V, attention out, norm2 in, Q and K before QK-norm, router in, experts (bf16);
    # the router logits (fp32)
    per_token_layer = 2 * (h + h + 4096 + 2 * 512 + 4096 + h + (4096 + 512) + h + k * 3 * 768) + 4 * 128
    assert m.activations == 48 * (4096 * per_token_layer // 2)
    assert m.fits and abs(m.total / GIB - 66.0) < 0.05
    # without the offloads the fp32 Adam state of 7.2B expert parameters alone (81 GiB) exceeds the GPU
    assert not trainer_memory(cfg, 2, 1, 2, Workload(seq_length=4096), ep=2).fits
    with pytest.raises(ValueError, match="expert parallel size 3"):
        trainer_memory(cfg, 2, 1, 6, w, ep=3)
    with pytest.raises(ValueError, match="expert parallel size 2"):
        trainer_memory(load_model_config("qwen2.5-7b"), 2, 1, 2, w, ep=2)


def test_plan_moe_examples():
    # Qwen3-30B-A3B on one node of 8 x H100-80GB: with GPU-resident fp32 Adam nothing fits next to a fleet
    p = plan(load_model_config("qwen3-30b-a3b"), Cluster(num_gpus=8), Workload(seq_length=4096))
    assert p.recommended is None and p.smallest_fitting_gpus == 24
    off = Workload(seq_length=4096, reference_offload=True, optimizer_offload=True)
    p = plan(load_model_config("qwen3-30b-a3b"), Cluster(num_gpus=8), off)
    r = p.recommended
    assert (p.trainer_gpus, r.tp, r.pp, r.ep, r.dp, p.fleet.tp, p.fleet_engines) == (4, 2, 1, 2, 2, 2, 2)
    # Qwen3-235B-A22B on 64: the default 40/24 split has no layout (5 trainer nodes: EP can only reach 8),
    # so the planner takes 32/32; the fleet keeps to one node per engine (TP=8, 61 sequences of KV cache)
    off = Workload(seq_length=4096, reference_offload=True, optimizer_offload=True, recompute="full")
    p = plan(load_model_config("qwen3-235b-a22b"), Cluster(num_gpus=64), off)
    r = p.recommended
    assert not p.default_split_fits and (p.trainer_gpus, p.fleet_gpus) == (32, 32)
    assert (r.tp, r.pp, r.ep, r.dp, r.edp) == (2, 1, 16, 16, 1) and r.fits
    assert p.fleet.tp == 8 and p.fleet_engines == 4 and p.fleet.kv_tokens // 4096 == 61
    assert p.recommended.host_optimizer / GIB < 90  # x 8 GPUs: ~660 GiB of host memory per trainer node
    assert "EP" in format_plan(p) and "expert-DP = DP / EP = 1" in format_plan(p)
    # dense models are unchanged: no EP column
    assert " EP " not in format_plan(plan(load_model_config("qwen2.5-7b"), Cluster(num_gpus=8)))


def test_plan_cli_prints_the_moe_examples(capsys):
    assert cli_main(["plan", "--model", "qwen3-30b-a3b", "--gpus", "8"]) == 1
    out = capsys.readouterr().out
    assert "128 experts, top-8" in out and " EP " in out and "smallest cluster that fits" in out
    assert ("what-if, optimizer state in host memory (the trainer keeps it on the GPU): --optimizer-offload "
            "--reference-offload: trainer TP=2 PP=1 EP=2 DP=2 on 4 GPUs") in out
    assert cli_main(["plan", "--model", "qwen3-235b-a22b", "--gpus", "64", "--optimizer-offload",
                     "--reference-offload", "--recompute", "full"]) == 0
    out = capsys.readouterr().out
    assert "recommended: trainer TP=2 PP=1 EP=16 DP=16 on 32 GPUs, fleet 4 x vLLM TP=8 on 32 GPUs" in out
