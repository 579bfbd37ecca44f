"""The parallelism planner against hand-computed numbers (Qwen2.5-7B, -32B), real Megatron shards, and the
layouts our Slurm examples use."""

import pytest

from megatron_apo.cli import main as cli_main
from megatron_apo.launch.planner import (
    GIB,
    Cluster,
    Workload,
    count_parameters,
    fleet_engine,
    params_per_rank,
    plan,
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
