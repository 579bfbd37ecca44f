"""The trainer's GPU path on CUDA (marker `gpu`; skipped without CUDA). `bash scripts/gpu_check.sh` runs these.

They run on a bare GPU machine too (`gpu_check.sh --wheels`: torch, megatron-core and small pure-Python packages,
no Transformer Engine, vLLM or Ray): the model there is megatron-core's local spec (IMPL), and the items that need
TE, Ray or vLLM are skipped with their reason.

Tolerances: the bf16 Transformer Engine model against the fp32 local-spec reference with the same weights:
loss within 2e-2 (relative), per-token log-probs within 0.1, weight-gradient cosine > 0.99 (bf16 rounding of
activations over 2 layers); CUDA vocab-parallel ops against the dense CPU reference: the CPU tests' own
tolerances (tests/distributed/test_vocab_parallel_ops.py).
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from megatron_apo.parallel import run_distributed

pytestmark = pytest.mark.gpu

HAVE_TE = importlib.util.find_spec("transformer_engine") is not None
HAVE_RAY = importlib.util.find_spec("ray") is not None
IMPL = "transformer_engine" if HAVE_TE else "local"  # the model a bare GPU machine can build: megatron-core's own
needs_te = pytest.mark.skipif(not HAVE_TE, reason="Transformer Engine is not installed (a bare GPU machine)")
needs_ray = pytest.mark.skipif(not HAVE_RAY, reason="Ray is not installed (a bare GPU machine)")


def _cpu(x):
    if torch.is_tensor(x):
        return x.detach().cpu()
    if isinstance(x, dict):
        return {k: _cpu(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_cpu(v) for v in x]
    return x


def te_vs_local_body(seed: int = 3) -> dict:
    from megatron_apo.models import build_gpt_model, load_model_config
    from megatron_apo.models.spec_interchange import te_spelling
    from megatron_apo.parallel import ParallelConfig, init_distributed
    from megatron_apo.trainer.schedule import forward_backward, lm_batches, lm_loss

    init_distributed(ParallelConfig(), seed=seed)
    cfg = load_model_config("tiny")
    local = build_gpt_model(cfg, params_dtype=torch.float32, transformer_impl="local")
    te = build_gpt_model(cfg, params_dtype=torch.bfloat16, transformer_impl="transformer_engine")
    assert type(te.decoder.layers[0].self_attention.linear_qkv).__name__.startswith("TE")
    src = {te_spelling(k): v for k, v in local.state_dict().items() if torch.is_tensor(v)}
    missing, unexpected = te.load_state_dict(src, strict=False)
    assert not unexpected and all(k.endswith("_extra_state") for k in missing), (missing, unexpected)
    tokens = torch.randint(0, cfg.vocab_size, (4, 65), generator=torch.Generator().manual_seed(seed))
    out = {}
    for name, model in (("local", local), ("te", te)):
        batches = list(lm_batches(tokens, 4))  # host tensors: the schedule moves them to the model's GPU
        res = forward_backward([model], batches, lm_loss, seq_length=64, micro_batch_size=4)
        grads = {te_spelling(n) if name == "local" else n: p.main_grad.float().clone() if hasattr(p, "main_grad")
                 else p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}
        out[name] = {"loss": float(res[0]["lm_loss"]), "grads": grads, "device": str(batches[0]["tokens"].device)}
    return _cpu(out)


@needs_te
def test_te_spec_bf16_matches_fp32_local_spec():
    out = run_distributed(te_vs_local_body, 1, timeout=300)[0]
    assert out["te"]["device"].startswith("cuda") and out["local"]["device"].startswith("cuda")
    lo, te = out["local"]["loss"], out["te"]["loss"]
    assert abs(lo - te) <= 2e-2 * abs(lo), (lo, te)
    shared = set(out["local"]["grads"]) & set(out["te"]["grads"])
    assert len(shared) >= 8
    for n in shared:
        a, b = out["local"]["grads"][n].flatten(), out["te"]["grads"][n].flatten()
        assert torch.nn.functional.cosine_similarity(a, b, dim=0) > 0.99, n


def test_vocab_parallel_ops_on_cuda_equal_dense():
    from tests.distributed.test_vocab_parallel_ops import CASES, check_against_dense
    from tests.helpers.vocab_parallel_bodies import run_ops_case

    for name, case in CASES.items():
        if case.get("strided"):
            continue  # the strided helper builds its base on the host
        on_gpu = {k: v.cuda() if torch.is_tensor(v) else v for k, v in case.items()}
        check_against_dense(name, case, [_cpu(run_ops_case(on_gpu, rank=0, tp=1))])


def rl_step_body(cfg) -> dict:
    from megatron_apo.trainer.train import train

    return {"history": train(cfg).history, "cuda": torch.cuda.is_available()}


@needs_ray
def test_one_rl_step_on_gpu(tmp_path_factory):
    """Rollout (CPU engine), reference pass, old pass, loss and optimizer step of the tiny model on the GPU."""
    from megatron_apo.config import load_config
    from tests.helpers.rl_setup import overrides, toy_env

    env = toy_env(tmp_path_factory.mktemp("toy"))
    out_dir = tmp_path_factory.mktemp("run")
    cfg = load_config(None, overrides(env, out_dir, tp=1, steps=1, extra=[
        "algorithm.loss_mode=apo_ratio", "algorithm.use_kl_loss=true", "rollout.engine=cpu"]))
    out = run_distributed(rl_step_body, 1, cfg, timeout=600)[0]
    assert out["cuda"]
    (row,) = out["history"]
    for key in ("loss", "reward/mean", "train/grad_norm"):
        assert torch.isfinite(torch.tensor(row[key])), key
    assert row["train/grad_norm"] > 0
    assert row["rollout/logprob_abs_diff"] < 0.05  # fp32 trainer on GPU vs fp32 CPU engine


def save_on_gpu_body(folder: str) -> dict:
    from megatron_apo.models import build_gpt_model, load_model_config
    from megatron_apo.models.megatron_checkpoint import save_model, write_checkpoint_metadata
    from megatron_apo.parallel import ParallelConfig, init_distributed

    init_distributed(ParallelConfig(), seed=8)
    cfg = load_model_config("tiny")
    model = build_gpt_model(cfg, params_dtype=torch.bfloat16, transformer_impl=IMPL)
    save_model(model, folder)
    write_checkpoint_metadata(folder, cfg)
    return _cpu({k: v for k, v in model.state_dict().items() if torch.is_tensor(v) and not k.endswith("_extra_state")})


def load_save_on_cpu_body(src: str, dst: str) -> dict:
    from megatron_apo.models import build_gpt_model, load_model_config
    from megatron_apo.models.megatron_checkpoint import save_model, write_checkpoint_metadata
    from megatron_apo.parallel import ParallelConfig, init_distributed
    from megatron_apo.trainer.checkpoint import load_model_weights

    init_distributed(ParallelConfig(), seed=9)
    assert not torch.cuda.is_available()
    cfg = load_model_config("tiny")
    model = build_gpt_model(cfg, params_dtype=torch.bfloat16)  # local spec: no GPU here
    load_model_weights(src, [model])
    save_model(model, dst)
    write_checkpoint_metadata(dst, cfg)
    return _cpu({k: v for k, v in model.state_dict().items() if torch.is_tensor(v) and not k.endswith("_extra_state")})


def load_on_gpu_body(folder: str) -> dict:
    from megatron_apo.models import build_gpt_model, load_model_config
    from megatron_apo.parallel import ParallelConfig, init_distributed
    from megatron_apo.trainer.checkpoint import load_model_weights

    init_distributed(ParallelConfig(), seed=10)
    model = build_gpt_model(load_model_config("tiny"), params_dtype=torch.bfloat16, transformer_impl=IMPL)
    load_model_weights(folder, [model])
    return _cpu({k: v for k, v in model.state_dict().items() if torch.is_tensor(v) and not k.endswith("_extra_state")})


def test_checkpoint_gpu_to_cpu_and_back(tmp_path):
    """Saved on the GPU (TE spec where TE is installed), loaded by a local-spec model in a GPU-less process, saved
    there, loaded back on the GPU: every tensor equal."""
    from megatron_apo.models.spec_interchange import local_spelling

    want = run_distributed(save_on_gpu_body, 1, str(tmp_path / "gpu"), timeout=300)[0]
    on_cpu = run_distributed(load_save_on_cpu_body, 1, str(tmp_path / "gpu"), str(tmp_path / "cpu"), host_only=True,
                             timeout=300)[0]
    assert {local_spelling(k) for k in want} == set(on_cpu)
    assert all(torch.equal(on_cpu[local_spelling(k)], v) for k, v in want.items())
    back = run_distributed(load_on_gpu_body, 1, str(tmp_path / "cpu"), timeout=300)[0]
    assert set(back) == set(want) and all(torch.equal(back[k], v) for k, v in want.items())


def lm_smoke_body(steps: int = 30) -> dict:  # also run on CPU: tests/distributed/test_gpu_check_bodies.py
    """TP=1 language-model training of the tiny model in bf16 on the GPU, on a learnable synthetic language."""
    from megatron_apo.models import build_gpt_model, load_model_config
    from megatron_apo.parallel import ParallelConfig, init_distributed
    from megatron_apo.trainer.optim import OptimConfig, build_optimizer, wrap_ddp, zero_grads
    from megatron_apo.trainer.schedule import forward_backward, lm_batches, lm_loss

    init_distributed(ParallelConfig(), seed=4)
    cfg = load_model_config("tiny")
    gpt = build_gpt_model(cfg, params_dtype=torch.bfloat16, transformer_impl=IMPL, ddp=True)
    chunks = [wrap_ddp(gpt, use_distributed_optimizer=False)]
    opt = build_optimizer(chunks, OptimConfig(lr=3e-3, clip_grad=1.0, use_distributed_optimizer=False))
    gen = torch.Generator().manual_seed(4)
    losses = []
    for _ in range(steps):
        tokens = (torch.randint(0, 48, (8, 1), generator=gen) + torch.arange(33)) % 48  # counts up modulo 48
        zero_grads(chunks, opt)
        out = forward_backward(chunks, list(lm_batches(tokens, 4)), lm_loss, seq_length=32, micro_batch_size=4)
        opt.step()
        losses.append(sum(float(o["lm_loss"]) for o in out) / len(out))
    p = next(gpt.parameters())
    return {"losses": losses, "device": str(p.device), "dtype": str(p.dtype), "impl": gpt.config.transformer_impl,
            "fusions": {k: getattr(gpt.config, k) for k in ("bias_activation_fusion", "bias_dropout_fusion",
                                                             "apply_rope_fusion", "gradient_accumulation_fusion")}}


def test_lm_smoke_bf16_on_gpu():
    out = run_distributed(lm_smoke_body, 1, timeout=300)[0]
    assert out["device"].startswith("cuda") and out["dtype"] == "torch.bfloat16", out
    losses = out["losses"]
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < 0.5 * losses[0], losses
    assert out["fusions"]["bias_activation_fusion"] and out["fusions"]["bias_dropout_fusion"], out["fusions"]


def rl_step_per_loss_body(overrides: list[str]) -> dict:
    """One RL step (reference, old-policy and train passes, optimizer step) per registered loss mode, on the trainer's
    own models (train._build_models: bf16 policy and reference) and a synthetic rollout batch."""
    import megatron_apo.algorithms.losses  # noqa: F401  (registers the built-in loss modes)
    from megatron_apo.algorithms.registry import registered_loss_modes
    from megatron_apo.config import load_config
    from megatron_apo.models import load_model_config
    from megatron_apo.parallel import ParallelConfig, init_distributed
    from megatron_apo.rollout.engine import Sample
    from megatron_apo.trainer.batch import build_batch
    from megatron_apo.trainer.passes import PassSettings
    from megatron_apo.trainer.rl_step import rl_step
    from megatron_apo.trainer.train import _build_models

    init_distributed(ParallelConfig(), seed=6)
    gen = torch.Generator().manual_seed(6)
    prompts = [torch.randint(3, 200, (6,), generator=gen).tolist() for _ in range(2)]
    samples = [[Sample(p, i, torch.randint(3, 200, (10,), generator=gen).tolist(), [-2.0 - 0.1 * j for j in range(10)],
                       "length") for i in range(4)] for p in range(2)]
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0, 1.0, 1.0, 0.0])
    advantages = rewards - rewards.view(2, 4).mean(1).repeat_interleave(4)
    batch = build_batch(prompts, samples, rewards, advantages)
    out = {}
    for mode in registered_loss_modes():
        cfg = load_config(None, ["model.config=tiny", "model.params_dtype=bfloat16", f"model.transformer_impl={IMPL}",
                                 f"algorithm.loss_mode={mode}", "trainer.micro_batch_size=4", *overrides])
        torch.manual_seed(6)
        models = _build_models(cfg, load_model_config(cfg.model.config))
        before = [p.detach().float().clone() for p in models.policy[0].parameters()]
        metrics = rl_step(0, batch, models, PassSettings(cfg.algorithm, vocab_size=models.model_cfg.vocab_size),
                          cfg.trainer)
        moved = sum(float((p.detach().float() - b).abs().sum()) for p, b in zip(models.policy[0].parameters(), before))
        out[mode] = {"loss": float(metrics["loss"]), "grad_norm": metrics["train/grad_norm"], "moved": moved,
                     "skipped": metrics["train/skipped_updates"],
                     "device": str(next(models.policy[0].parameters()).device)}
    return out


def test_one_rl_step_per_loss_mode_on_gpu():
    out = run_distributed(rl_step_per_loss_body, 1, [], timeout=600)[0]
    assert {"vanilla", "apo_ratio"} <= set(out), sorted(out)
    for mode, r in out.items():
        assert r["device"].startswith("cuda"), (mode, r)
        assert torch.isfinite(torch.tensor(r["loss"])) and r["skipped"] == 0, (mode, r)
        assert r["grad_norm"] > 0 and r["moved"] > 0, (mode, r)
