"""The trainer's GPU path on CUDA (marker `gpu`; skipped without CUDA). `bash scripts/gpu_check.sh` runs these.

Tolerances: the bf16 Transformer Engine model against the fp32 local-spec reference with the same weights:
loss within 2e-2 (relative), per-token log-probs within 0.1, weight-gradient cosine > 0.99 (bf16 rounding of
activations over 2 layers); CUDA vocab-parallel ops against the dense CPU reference: the CPU tests' own
tolerances (tests/distributed/test_vocab_parallel_ops.py).
"""

from __future__ import annotations

import pytest
import torch

from megatron_apo.parallel import run_distributed

pytestmark = pytest.mark.gpu


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
    model = build_gpt_model(cfg, params_dtype=torch.bfloat16, transformer_impl="transformer_engine")
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
    model = build_gpt_model(load_model_config("tiny"), params_dtype=torch.bfloat16,
                            transformer_impl="transformer_engine")
    load_model_weights(folder, [model])
    return _cpu({k: v for k, v in model.state_dict().items() if torch.is_tensor(v) and not k.endswith("_extra_state")})


def test_checkpoint_gpu_to_cpu_and_back(tmp_path):
    from megatron_apo.models.spec_interchange import local_spelling

    want = run_distributed(save_on_gpu_body, 1, str(tmp_path / "gpu"), timeout=300)[0]
    on_cpu = run_distributed(load_save_on_cpu_body, 1, str(tmp_path / "gpu"), str(tmp_path / "cpu"), host_only=True,
                             timeout=300)[0]
    assert {local_spelling(k) for k in want} == set(on_cpu)
    assert all(torch.equal(on_cpu[local_spelling(k)], v) for k, v in want.items())
    back = run_distributed(load_on_gpu_body, 1, str(tmp_path / "cpu"), timeout=300)[0]
    assert set(back) == set(want) and all(torch.equal(back[k], v) for k, v in want.items())
