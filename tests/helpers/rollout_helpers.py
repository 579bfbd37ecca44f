"""Shared pieces of the rollout tests (module level so Ray actors and spawned trainer ranks can import them)."""

from __future__ import annotations

import os

import torch

from megatron_apo.models import load_model_config
from megatron_apo.models.hf_mapping import hf_config_from_model_config
from megatron_apo.rollout.cpu_engine import CPUEngine, build_hf_model, hf_tensor_slots
from megatron_apo.rollout.vllm_engine import VLLMEngine

# The tiny Qwen2 (GQA, QKV bias, untied head) of model_configs/tiny.yaml, as an HF config.json dict.
TINY_HF_CONFIG = hf_config_from_model_config(load_model_config("tiny"))

def random_hf_state(seed: int, hf_config: dict = TINY_HF_CONFIG) -> list[tuple[str, torch.Tensor]]:
    """Random HF-named weights (norm weights around 1) from a seeded HF model, by checkpoint name (per expert)."""
    torch.manual_seed(seed)
    model = build_hf_model(hf_config)
    out = []
    for name, (p, index) in hf_tensor_slots(model).items():
        t = (p if index is None else p[index]).detach().clone()
        if name.endswith("norm.weight"):
            t = 1.0 + 0.1 * torch.randn_like(t)
        else:
            t = 0.08 * torch.randn_like(t)
        out.append((name, t))
    return out


def reference_logits(named, tokens: list[list[int]], hf_config: dict = TINY_HF_CONFIG) -> torch.Tensor:
    """Dense single-process reference: a fresh HF model with these weights."""
    engine = CPUEngine(hf_config, named, version=0)
    return engine.logits(tokens)


class CrashingCPUEngine(CPUEngine):
    """Dies (process exit) in the middle of its first generate call fleet-wide; restarted ones do not."""

    def __init__(self, *args, crash_marker: str, **kwargs):
        super().__init__(*args, **kwargs)
        self.crash_marker = crash_marker

    def generate(self, prompt_token_ids, params, request_ids=None):
        try:
            fd = os.open(self.crash_marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return super().generate(prompt_token_ids, params, request_ids)
        os.close(fd)
        super().generate(prompt_token_ids[:1], params, request_ids=None if request_ids is None else request_ids[:1])
        os._exit(1)


_GROUPS = {}


def sync_from_driver(fleet, version, named, corrupt_bucket=None, bucket_bytes=64 << 10, fresh=False):
    """The pytest process plays the trainer's rank 0: sync rank 0, buckets straight from HF tensors.

    `corrupt_bucket`: flip one bit of that bucket on the wire, after its checksum was taken. `fresh`: a new
    group (needed after another process, e.g. a spawned trainer, was the group's rank 0)."""
    group = driver_sync_group(fleet, fresh=fresh)
    refs = fleet.begin_weight_sync(version)
    total, nbuckets = send_hf_tensors(group, version, named, corrupt_bucket, bucket_bytes)
    return refs, total, nbuckets


def driver_sync_group(fleet, fresh=False, timeout_s: float = 120):
    """The pytest process's end (sync rank 0) of the fleet's current sync group, opened once per endpoint."""
    from megatron_apo.rollout.weight_sync import open_sync_group

    endpoint = fleet.sync_endpoint("gloo", timeout_s=timeout_s, fresh=fresh)
    if endpoint not in _GROUPS:  # the trainer opens its end once per endpoint and reuses it
        _GROUPS[endpoint] = open_sync_group(endpoint, 0)
    return _GROUPS[endpoint]


def send_hf_tensors(group, version, named, corrupt_bucket=None, bucket_bytes=64 << 10) -> tuple[str, int]:
    """Sends HF-named tensors as sync `version` in buckets; returns (the sync's checksum, number of buckets)."""
    from megatron_apo.rollout.weight_sync import pack_bucket, send_buckets

    buckets, pending, size = [], [], 0
    for name, t in named + [("", None)]:
        if t is not None:
            pending.append((name, t))
            size += t.numel() * t.element_size()
        if pending and (size >= bucket_bytes or t is None):
            bucket = pack_bucket(pending)
            if corrupt_bucket == len(buckets):
                bucket.flat[bucket.nbytes // 2] ^= 0x10
            buckets.append(bucket)
            pending, size = [], 0
    return send_buckets(group, version, buckets), len(buckets)


class DriverController:
    """What `trainer.rollout_source.FleetWeights` needs of the trainer's controller, with the pytest process as
    sync rank 0: the fleet, and `sync_group()` (reopened whenever the fleet opened a new group)."""

    def __init__(self, fleet, timeout_s: float = 120):
        self.fleet, self.timeout_s = fleet, timeout_s

    def sync_group(self):
        return driver_sync_group(self.fleet, timeout_s=self.timeout_s)


class DriverSender:
    """`FleetWeights`'s sender: sends the HF-named tensors `weights[version]` (like TrainerWeightSender.sync)."""

    def __init__(self, weights: dict[int, list]):
        self.weights = weights

    def sync(self, group, version):
        import types

        total, _ = send_hf_tensors(group, version, self.weights[version])
        return types.SimpleNamespace(checksum=total)


class CrashingVLLMEngine(VLLMEngine):
    """The real vLLM engine; after `arm_crash()`, its next generate SIGKILLs the engine core (and its workers)
    once requests are in flight: a real engine-core death in the middle of generation."""

    def arm_crash(self) -> None:
        self._armed = True

    def generate(self, prompt_token_ids, params, request_ids=None):
        if getattr(self, "_armed", False):
            import signal
            import threading
            import time

            self._armed = False
            pids, engine = self.engine_core_pids(), self.llm.llm_engine

            def kill():
                deadline = time.monotonic() + 120
                while not engine.has_unfinished_requests() and time.monotonic() < deadline:
                    time.sleep(0.002)
                for pid in pids:
                    os.kill(pid, signal.SIGKILL)

            threading.Thread(target=kill, daemon=True).start()
        return super().generate(prompt_token_ids, params, request_ids)


def _probe_logits(chunks, cfg, probe: list[list[int]]):
    """Full-vocab fp32 logits of the trainer on `probe` through Megatron's schedule (any TP/PP);
    None off the last stage."""
    from megatron.core import parallel_state as ps

    from megatron_apo.models.sharding import tp_gather
    from megatron_apo.trainer.schedule import forward_backward

    tokens = torch.tensor(probe)
    batch = {"tokens": tokens, "position_ids": torch.arange(tokens.shape[1]).expand_as(tokens).contiguous()}

    def capture(_batch, logits):
        full = tp_gather(logits.detach().float(), partition_dim=logits.dim() - 1,
                         group=ps.get_tensor_model_parallel_group())
        return logits.sum() * 0, {"logits": full[..., : cfg.vocab_size]}

    with torch.no_grad():
        out = forward_backward(chunks, [batch], capture, seq_length=tokens.shape[1],
                               micro_batch_size=tokens.shape[0], forward_only=True)
    return out[0]["logits"] if out else None


def trainer_hf_weights(chunks, cfg) -> dict[str, torch.Tensor]:
    """The trainer's weights as full HF tensors, the parts this rank holds the first copy of (experts: this EP
    rank's); the union over ranks is the whole model. Gathers over the (expert-)TP group: a test reference."""
    from megatron.core import parallel_state as ps

    from megatron_apo.models.hf_mapping import megatron_to_hf
    from megatron_apo.models.sharding import is_expert_param, tp_gather
    from megatron_apo.rollout.weight_sync.plan import _is_first_replica, local_params, split_group

    out = {}
    for name, lp in local_params(chunks).items():
        expert = is_expert_param(name)
        group = ps.get_expert_tensor_parallel_group() if expert else ps.get_tensor_model_parallel_group()
        full = tp_gather(lp.tensor.detach(), lp.partition_dim, group=group, gated=lp.gated)
        if _is_first_replica(name) and split_group(name)[0] == 0:
            out.update({n: t.clone() for n, t in megatron_to_hf(cfg, name, full)})
    return out


def trainer_sync_body(endpoint, tp: int, pp: int, probe: list[list[int]], first_version: int,
                      bucket_bytes: int = 96 << 10, model: str = "tiny", shared_memory: bool = True,
                      shm_full: bool = False, ep: int = 1, weights: bool = False) -> dict:
    """A Megatron trainer (TP x PP x EP, gloo): sync v, one optimizer step, sync v+1; probe logits after each sync.

    `shm_full`: /dev/shm refuses to allocate (like a container's 64 MiB one), so the sync must fall back.
    `weights`: also return trainer_hf_weights after each sync (numpy). `sources`: the plan's sending ranks per
    HF tensor."""
    import torch.distributed as dist

    from megatron_apo.models import build_gpt_model, load_model_config
    from megatron_apo.parallel import ParallelConfig, init_distributed
    from megatron_apo.rollout.weight_sync import TrainerWeightSender, open_sync_group
    from megatron_apo.trainer.optim import OptimConfig, build_optimizer, wrap_ddp, zero_grads
    from megatron_apo.trainer.schedule import forward_backward, lm_batches, lm_loss

    init_distributed(ParallelConfig(tp, pp, expert_model_parallel_size=ep), seed=17)
    cfg = load_model_config(model)
    chunks = [wrap_ddp(build_gpt_model(cfg), use_distributed_optimizer=False)]
    opt = build_optimizer(chunks, OptimConfig(lr=1e-2, use_distributed_optimizer=False))
    if shm_full:
        import errno
        import os

        def no_room(fd, offset, length):
            raise OSError(errno.ENOSPC, "No space left on device")

        os.posix_fallocate = no_room  # this spawned process only
    sender = TrainerWeightSender(chunks, cfg, bucket_bytes=bucket_bytes, shared_memory=shared_memory)
    group = open_sync_group(endpoint, 0) if dist.get_rank() == 0 else None
    stats = [sender.sync(group, first_version)]
    # which trainer ranks the plan takes each HF tensor's pieces from
    sources = {}
    for bucket in sender._plan:
        for piece in bucket.pieces:
            sources.setdefault(piece.hf_name, set()).add(piece.src)
    held = [trainer_hf_weights(chunks, cfg)] if weights else []
    logits = [_probe_logits(chunks, cfg, probe)]
    tokens = torch.randint(0, cfg.vocab_size, (4, 17), generator=torch.Generator().manual_seed(3))
    zero_grads(chunks, opt)
    forward_backward(chunks, list(lm_batches(tokens, 2)), lm_loss, seq_length=16, micro_batch_size=2)
    opt.step()
    stats.append(sender.sync(group, first_version + 1))
    logits.append(_probe_logits(chunks, cfg, probe))
    out = {"stats": stats, "logits": logits, "sources": sources}
    if weights:
        held.append(trainer_hf_weights(chunks, cfg))
        # numpy arrays travel by value; many tensors shared by file descriptor can outlive the rank that shares them
        out["weights"] = [{n: t.numpy() for n, t in w.items()} for w in held]
    return out
