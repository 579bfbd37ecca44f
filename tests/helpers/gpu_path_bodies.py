"""Rank bodies of tests/distributed/test_gpu_path.py (module level so spawned ranks can import them)."""

from __future__ import annotations

import io
import os
import threading
import time

import torch


def control_plane_body(rank_zero_alone_s: float) -> dict:
    """Rank 0 works alone longer than the default group's timeout while rank 1 waits: in the control plane
    that is fine; in the default group the same wait times out."""
    import torch.distributed as dist

    from megatron_apo.parallel import ParallelConfig, control_plane, init_distributed

    init_distributed(ParallelConfig(), timeout_minutes=rank_zero_alone_s / 60 * 0.6, control_timeout_minutes=1)
    rank = dist.get_rank()
    out = {"backend": control_plane.backend(), "timeout": control_plane.timeout_minutes()}
    if rank == 0:
        time.sleep(rank_zero_alone_s)
    out["got"] = control_plane.broadcast_object({"batch": "from rank 0"} if rank == 0 else None, src=0)
    out["any"] = control_plane.any_true(rank == 1)
    out["none"] = control_plane.any_true(False)
    out["finite"] = control_plane.all_finite([1.0, torch.tensor(2.0)] if rank == 0 else [float("nan")])
    out["finite_all"] = control_plane.all_finite([1.0])
    out["mean"] = control_plane.mean_over_reporting_ranks([{"loss": 1.0 + rank}, {"loss": 3.0 + rank}] if rank else [])
    # the same lone wait inside the default group (the one that is NCCL on GPU) trips its timeout
    if rank == 0:
        time.sleep(rank_zero_alone_s)
    try:
        box = [rank]
        dist.broadcast_object_list(box, src=0)
        out["default_group"] = "completed"
    except Exception as e:  # noqa: BLE001 - gloo's timeout error type varies across torch versions
        out["default_group"] = f"timed out: {type(e).__name__}"
    return out


def host_only_body() -> dict:
    import torch.distributed as dist

    from megatron_apo.parallel import ParallelConfig, init_distributed

    init_distributed(ParallelConfig())
    return {"visible": os.environ.get("CUDA_VISIBLE_DEVICES"), "cuda": torch.cuda.is_available(),
            "backend": dist.get_backend(), "local_rank": os.environ["LOCAL_RANK"]}


# ---- spec interchange ---------------------------------------------------------------------------------

def te_shaped(sharded: dict, num_layers: int, payload: bytes | None = None) -> dict:
    """What a Transformer Engine GPTModel's sharded_state_dict looks like, built from a local-spec one.

    megatron-core 0.16 already stores the local spec's norms under TE's names (its layer spec maps
    them) and gives its own linear layers an empty `_extra_state`; a TE model differs in spelling the norms'
    state-dict keys the TE way and in holding FP8 metadata as `_extra_state` on its attention and norm
    modules too (ShardedObjects, as megatron's make_sharded_tensors_for_checkpoint makes them).
    """
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    from megatron_apo.models.spec_interchange import te_spelling

    out = {}
    for name, value in sharded.items():
        if isinstance(value, ShardedObject) and payload is not None:
            value.data = io.BytesIO(payload)
        out[te_spelling(name)] = value
    for i in range(num_layers):
        data = io.BytesIO(payload + bytes([i])) if payload is not None else None
        out[f"decoder.layers.{i}.self_attention.core_attention._extra_state"] = ShardedObject(
            "decoder.layers.self_attention.core_attention._extra_state", data, (num_layers,), (i,), (0, 0, 0))
    out["decoder.final_layernorm._extra_state"] = ShardedObject(
        "decoder.final_layernorm._extra_state", io.BytesIO(payload) if payload else None, (1,), (0,), (0, 0, 0))
    return out


def rename_stored_norms_local(sharded: dict) -> dict:
    """A checkpoint whose norms are stored under the local spelling (older megatron-core, other tools)."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    from megatron_apo.models.spec_interchange import local_spelling

    for value in sharded.values():
        if isinstance(value, ShardedTensor):
            value.key = local_spelling(value.key)
    return sharded


def spec_interchange_body(tmp: str) -> dict:
    """local checkpoint -> TE-shaped request; TE-shaped checkpoint -> local model (trainer load path and the
    HF exporter's reader); a tensor truly missing is still an error."""
    from megatron.core import dist_checkpointing

    from megatron_apo.models import build_gpt_model, load_model_config
    from megatron_apo.models.megatron_checkpoint import DistCheckpointReader, save_model, write_checkpoint_metadata
    from megatron_apo.models.spec_interchange import CrossSpecError, load_any_spec, stored_keys, te_spelling
    from megatron_apo.parallel import ParallelConfig, init_distributed, set_seed
    from megatron_apo.trainer.checkpoint import load_model_weights

    init_distributed(ParallelConfig(), seed=5)
    cfg = load_model_config("tiny")
    model = build_gpt_model(cfg, transformer_impl="local")
    want = {k: v.detach().clone() for k, v in model.state_dict().items() if torch.is_tensor(v)}
    out = {"num_layers": cfg.num_layers}

    # 1) a local-spec checkpoint (what conversion writes on a CPU node) requested by a TE-spec model
    local_dir = os.path.join(tmp, "local")
    save_model(model, local_dir)
    write_checkpoint_metadata(local_dir, cfg)
    request = te_shaped(model.sharded_state_dict(), cfg.num_layers)
    state, dropped = load_any_spec(request, os.path.join(local_dir, "model"))
    out["dropped"] = sorted({d.split(".", 3)[-1] if d.startswith("decoder.layers.") else d for d in dropped})
    out["num_dropped"] = len(dropped)
    out["te_norms_equal"] = all(torch.equal(state[te_spelling(k)], v) for k, v in want.items() if te_spelling(k) != k)
    out["te_norm_count"] = sum(te_spelling(k) != k for k in want)
    out["all_equal"] = all(torch.equal(state[te_spelling(k)], v) for k, v in want.items())

    # 2) a TE-shaped checkpoint (what a GPU run saves) into a local-spec model, by the trainer's loader
    te_dir = os.path.join(tmp, "te")
    os.makedirs(os.path.join(te_dir, "model"))
    dist_checkpointing.save(te_shaped(model.sharded_state_dict(), cfg.num_layers, payload=b"fp8-meta"),
                            os.path.join(te_dir, "model"))
    write_checkpoint_metadata(te_dir, cfg)
    stored = stored_keys(os.path.join(te_dir, "model"))
    out["stored_te_names"] = "decoder.layers.self_attention.linear_qkv.layer_norm_weight" in stored
    out["stored_extra_state"] = "decoder.layers.mlp.linear_fc1._extra_state" in stored
    set_seed(99)
    fresh = build_gpt_model(cfg, transformer_impl="local")
    out["fresh_differs"] = not all(torch.equal(fresh.state_dict()[k], v) for k, v in want.items())
    load_model_weights(te_dir, [fresh], allow_unverified=True)  # hand-written here: no checksum manifest
    out["loaded_equal"] = all(torch.equal(fresh.state_dict()[k], v) for k, v in want.items())

    # 3) the exporter's reader sees local-spec names in a TE checkpoint
    reader = DistCheckpointReader(os.path.join(te_dir, "model"), cfg, allow_unverified=True)
    layer0 = reader.load(reader.groups()[1])
    out["reader_names"] = sorted(n.split(".", 3)[3] for n in layer0)
    out["reader_equal"] = all(torch.equal(t, want[n]) for n, t in layer0.items())

    # 3b) norms stored under the local spelling load into a model that asks for TE's (and the reverse)
    old = os.path.join(tmp, "old")
    os.makedirs(os.path.join(old, "model"))
    dist_checkpointing.save(rename_stored_norms_local(model.sharded_state_dict()), os.path.join(old, "model"))
    write_checkpoint_metadata(old, cfg)
    out["old_has_local_names"] = "decoder.layers.input_layernorm.weight" in stored_keys(os.path.join(old, "model"))
    state, _ = load_any_spec(te_shaped(model.sharded_state_dict(), cfg.num_layers), os.path.join(old, "model"))
    out["old_into_te_equal"] = all(torch.equal(state[te_spelling(k)], v) for k, v in want.items())
    set_seed(98)
    fresh = build_gpt_model(cfg, transformer_impl="local")
    load_model_weights(old, [fresh], allow_unverified=True)
    out["old_into_local_equal"] = all(torch.equal(fresh.state_dict()[k], v) for k, v in want.items())

    # 4) a tensor missing under both spellings is still an error
    broken = os.path.join(tmp, "broken")
    os.makedirs(os.path.join(broken, "model"))
    partial = {k: v for k, v in model.sharded_state_dict().items() if "linear_fc2" not in k}
    dist_checkpointing.save(partial, os.path.join(broken, "model"))
    write_checkpoint_metadata(broken, cfg)
    try:
        load_model_weights(broken, [build_gpt_model(cfg, transformer_impl="local")], allow_unverified=True)
        out["missing"] = "loaded"
    except CrossSpecError as e:
        out["missing"] = str(e)
    return out


# ---- weight sync dtype ----------------------------------------------------------------------------------

def sync_dtype_body(dtype_name: str) -> dict:
    """A tiny trainer sends to a receiver thread over a gloo sync group at the default rendezvous address."""
    from megatron_apo.models import build_gpt_model, load_model_config
    from megatron_apo.models.hf_mapping import megatron_to_hf
    from megatron_apo.models.sharding import iter_local_params
    from megatron_apo.parallel import ParallelConfig, init_distributed
    from megatron_apo.rollout.weight_sync import SyncEndpoint, TrainerWeightSender, open_sync_group, receive_weights

    init_distributed(ParallelConfig(), seed=3)
    cfg = load_model_config("tiny")
    model = build_gpt_model(cfg)
    endpoint = SyncEndpoint.new(2, "gloo", timeout_s=60)
    got: dict = {}

    def receiver():
        group = open_sync_group(endpoint, 1)
        res = receive_weights(group, lambda named: got.update({n: t.clone() for n, t in named}))
        got["__ok__"] = res.ok

    th = threading.Thread(target=receiver)
    th.start()
    sender = TrainerWeightSender([model], cfg, bucket_bytes=64 << 10, dtype=getattr(torch, dtype_name))
    stats = sender.sync(open_sync_group(endpoint, 0), 1)
    th.join(60)
    want = {}
    for lp in iter_local_params(model):
        for hf_name, t in megatron_to_hf(cfg, lp.global_name, lp.tensor.detach()):
            want[hf_name] = t.to(getattr(torch, dtype_name))
    return {"host": endpoint.host, "ok": got.pop("__ok__"), "bytes": stats.bytes,
            "dtypes": sorted({str(t.dtype) for t in got.values()}),
            "equal": set(got) == set(want) and all(torch.equal(got[n], want[n]) for n in want)}


def schedule_device_body() -> dict:
    """Runs a real tiny GPTModel through the schedule with a recording wrapper around the device helper."""
    from megatron_apo.models import build_gpt_model, load_model_config
    from megatron_apo.parallel import ParallelConfig, init_distributed
    from megatron_apo.trainer import schedule

    init_distributed(ParallelConfig(), seed=2)
    model = build_gpt_model(load_model_config("tiny"))
    calls = []
    real = schedule.to_device

    def recording(batch, device):
        calls.append((id(batch), str(device)))
        return real(batch, device)

    schedule.to_device = recording
    tokens = torch.randint(0, 50, (4, 9))
    batches = list(schedule.lm_batches(tokens, 2))

    def loss(batch, logits):
        batch["seen"] = logits.detach().sum()  # written into the caller's dict
        return schedule.lm_loss(batch, logits)

    with torch.no_grad():
        schedule.forward_backward([model], batches, loss, seq_length=8, micro_batch_size=2, forward_only=True)
    return {"calls": calls, "ids": [id(b) for b in batches], "seen": all("seen" in b for b in batches)}
