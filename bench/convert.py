"""Checkpoint conversion benchmark: a ~1B-shaped random model (Llama-3.2-1B shape, bf16), HF -> Megatron at
TP=2 and back to HF, with time and peak RSS.

Baselines measured in the same run: a plain copy of the HF safetensors files (the I/O floor for time), and
each process's RSS when its conversion work begins (imports, process group; subtracted from its peak).
Memory goal (issue 5): peak RSS growth <= 1.5 x the largest shard + one layer, where the largest shard is a
rank's model shard for hf-to-megatron and the largest tensor (the embedding) for the streaming export.

    python bench/convert.py [--layers 16] [--tp 2] [--workdir DIR] [--keep]

Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

GB = 1e9


def llama_1b_config(layers: int) -> dict:
    """Llama-3.2-1B's published shape (1.24B parameters with 16 layers; tied embeddings)."""
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 2048, "intermediate_size": 8192,
        "num_hidden_layers": layers, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64,
        "vocab_size": 128256, "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
        "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192},
        "tie_word_embeddings": True, "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
        "torch_dtype": "bfloat16", "bos_token_id": 128000, "eos_token_id": 128001,
    }


def write_random_hf(folder: Path, hf_config: dict) -> dict:
    """Random bf16 weights written tensor by tensor (no transformers init: it would take minutes)."""
    import torch

    from megatron_apo.models.hf_mapping import hf_shapes, model_config_from_hf_config
    from megatron_apo.models.safetensors_io import ShardedSafetensorsWriter

    cfg = model_config_from_hf_config(hf_config)
    shapes = hf_shapes(cfg)
    folder.mkdir(parents=True)
    writer = ShardedSafetensorsWriter(folder, {n: (s, torch.bfloat16) for n, s in shapes.items()}, int(1e9))
    # Drawing 1.2B normal samples costs about a minute on 2 cores; tile a random pool from random offsets instead.
    gen = torch.Generator().manual_seed(0)
    pool = (torch.randn(1 << 24, generator=gen) * 0.02).to(torch.bfloat16)
    for name, shape in shapes.items():
        n = torch.Size(shape).numel()
        start = int(torch.randint(0, pool.numel(), (1,), generator=gen))
        flat = torch.roll(pool, -start).repeat((n + pool.numel() - 1) // pool.numel())[:n]
        t = flat.reshape(shape) + (1 if name.endswith("norm.weight") else 0)
        writer.write(name, t.contiguous())
        del flat, t
    writer.close()
    (folder / "config.json").write_text(json.dumps(hf_config, indent=2))
    layer_bytes = sum(2 * torch.Size(s).numel() for n, s in shapes.items() if n.startswith("model.layers.0."))
    largest = max(2 * torch.Size(s).numel() for s in shapes.values())
    return {"params": sum(torch.Size(s).numel() for s in shapes.values()), "bytes": writer.total_size,
            "layer_bytes": layer_bytes, "largest_tensor_bytes": largest}


def export_in_fresh_process(ckpt: str, out: str) -> dict:
    """Runs megatron-to-hf in a spawned process so its peak RSS is the export's alone."""
    import megatron_apo.models.convert as conv  # imports counted in the baseline, as for a CLI run

    r = conv.convert_megatron_to_hf(ckpt, out, progress=False)
    return {"seconds": r.seconds, "peak_rss": r.peak_rss_bytes[0], "start_rss": r.start_rss_bytes[0],
            "bytes": r.total_bytes}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=16, help="decoder layers (16 = Llama-3.2-1B)")
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()

    import torch

    from megatron_apo.models.convert import convert_hf_to_megatron
    from megatron_apo.parallel import run_distributed

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-convert-"))
    try:
        t0 = time.time()
        info = write_random_hf(work / "hf", llama_1b_config(args.layers))
        t_make = time.time() - t0
        # Baseline: copying the same bytes (page cache as warm as the conversion will find it).
        t0 = time.time()
        (work / "copy").mkdir()
        for f in (work / "hf").glob("*.safetensors"):
            shutil.copyfile(f, work / "copy" / f.name)
        t_copy = time.time() - t0
        shutil.rmtree(work / "copy")

        imp = convert_hf_to_megatron(work / "hf", work / "meg", tp=args.tp, pp=args.pp, progress=False)
        exp = run_distributed(export_in_fresh_process, 1, str(work / "meg"), str(work / "back"), timeout=1800)[0]

        # the export must reproduce the input bit for bit
        from safetensors import safe_open
        exact = True
        src = {}
        for f in (work / "hf").glob("*.safetensors"):
            with safe_open(str(f), "pt") as h:
                src.update({k: (f, k) for k in h.keys()})
        back_files = list((work / "back").glob("*.safetensors"))
        for bf in back_files:
            with safe_open(str(bf), "pt") as h:
                for k in h.keys():
                    with safe_open(str(src[k][0]), "pt") as s:
                        exact &= torch.equal(s.get_tensor(k), h.get_tensor(k))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    layer, largest = info["layer_bytes"], info["largest_tensor_bytes"]
    imp_growth = [p - s for p, s in zip(imp.peak_rss_bytes, imp.start_rss_bytes)]
    imp_goal = [1.5 * sb + layer for sb in imp.shard_bytes]
    exp_growth = exp["peak_rss"] - exp["start_rss"]
    exp_goal = 1.5 * largest + layer
    print(f"model: Llama-3.2-1B shape, {args.layers} layers, {info['params'] / 1e9:.3f}B params, "
          f"{info['bytes'] / GB:.2f} GB bf16; largest tensor {largest / GB:.3f} GB, one layer {layer / GB:.3f} GB "
          f"(random weights written in {t_make:.1f}s)")
    print(f"baseline: copying the HF files takes {t_copy:.1f}s")
    print(f"hf-to-megatron TP={args.tp} PP={args.pp}: {imp.seconds:.1f}s ({imp.seconds / t_copy:.1f}x the copy)")
    for r, (g, goal, sb) in enumerate(zip(imp_growth, imp_goal, imp.shard_bytes)):
        print(f"  rank {r}: shard {sb / GB:.3f} GB, peak RSS growth {g / GB:.3f} GB "
              f"= {g / goal:.2f}x the goal (1.5 x shard + layer = {goal / GB:.3f} GB)")
    print(f"megatron-to-hf: {exp['seconds']:.1f}s ({exp['seconds'] / t_copy:.1f}x the copy); peak RSS growth "
          f"{exp_growth / GB:.3f} GB = {exp_growth / exp_goal:.2f}x the goal (1.5 x largest tensor + layer = "
          f"{exp_goal / GB:.3f} GB), {exp_growth / info['bytes']:.3f}x the model; bit-exact round trip: {exact}")
    print(json.dumps({
        "bench": "convert", "params": info["params"], "model_bytes": info["bytes"], "layer_bytes": layer,
        "largest_tensor_bytes": largest, "copy_s": round(t_copy, 2), "tp": args.tp, "pp": args.pp,
        "hf_to_megatron_s": round(imp.seconds, 2), "hf_to_megatron_vs_copy": round(imp.seconds / t_copy, 2),
        "hf_to_megatron_rss_growth_bytes": imp_growth, "hf_to_megatron_shard_bytes": imp.shard_bytes,
        "hf_to_megatron_rss_vs_goal": round(max(g / goal for g, goal in zip(imp_growth, imp_goal)), 3),
        "megatron_to_hf_s": round(exp["seconds"], 2), "megatron_to_hf_vs_copy": round(exp["seconds"] / t_copy, 2),
        "megatron_to_hf_rss_growth_bytes": exp_growth,
        "megatron_to_hf_rss_vs_goal": round(exp_growth / exp_goal, 3), "round_trip_bit_exact": bool(exact),
    }))
    return 0 if exact else 1


if __name__ == "__main__":
    sys.exit(main())
