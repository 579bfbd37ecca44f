"""`megatron-apo train`: the RL loop, SPMD on every trainer rank (torchrun / srun / run_distributed).

One step, top to bottom (the picture in docs/architecture.md):
  1. rank 0 asks the fleet for n rollouts per prompt        (controller.rollout)
  2. rewards, 3. advantages                                 (controller.rollout)
  -> the batch is broadcast to every trainer rank and split over data-parallel ranks
  4. reference forward: ref log-probs + vocab-parallel Top-K (passes.reference_pass)
  5. old-policy forward, then PPO epochs with the loss       (passes.old_policy_pass / train_pass)
  6. weight sync to the fleet                                (rollout.weight_sync)
  7. checkpoint, metrics
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import math
import signal
import time
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_apo.config import RunConfig
from megatron_apo.models import build_gpt_model
from megatron_apo.parallel import control_plane, init_distributed
from megatron_apo.trainer.batch import RLBatch
from megatron_apo.trainer.checkpoint import load_model_weights, resume_checkpoint, save_checkpoint
from megatron_apo.trainer.lifecycle import note_stopped
from megatron_apo.trainer.moe_metrics import aux_loss_metrics, routing_capture
from megatron_apo.trainer.optim import OptimConfig, build_optimizer, wrap_ddp, zero_grads
from megatron_apo.trainer.passes import PassSettings, old_policy_pass, reference_pass, train_pass
from megatron_apo.trainer.runlock import claim_run_dirs
from megatron_apo.trainer.schedule import forward_backward
from megatron_apo.trainer.validation import DTYPE_NAMES, validate_run_config


def lr_at(step: int, t) -> float:
    """Warmup then constant/linear/cosine decay to min_lr over total_steps; a pure function of the step."""
    if t.lr_warmup_steps and step < t.lr_warmup_steps:
        return t.lr * (step + 1) / t.lr_warmup_steps
    if t.lr_decay_style == "constant":
        return t.lr
    frac = min(1.0, (step - t.lr_warmup_steps) / max(1, t.total_steps - t.lr_warmup_steps))
    decay = 1 - frac if t.lr_decay_style == "linear" else 0.5 * (1 + math.cos(math.pi * frac))
    return t.min_lr + (t.lr - t.min_lr) * decay


class _StopFlag:
    """SIGTERM/SIGUSR1 (Slurm preemption, `scancel --signal`) -> checkpoint at the end of the step and exit."""

    def __init__(self):
        self.raised = False
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.raised = True

    def agreed(self) -> bool:
        return control_plane.any_true(self.raised)


def _broadcast_batch(batch: RLBatch | None, metrics: dict | None):
    return control_plane.broadcast_object((batch, metrics), src=0)


def _dp_shard(batch: RLBatch) -> RLBatch:
    from megatron.core import parallel_state as ps

    dp, r = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    if batch.size % dp:
        raise ValueError(f"rollout batch of {batch.size} samples does not split over {dp} data-parallel ranks; "
                         "make data.train_batch_size * rollout.n a multiple of the DP size")
    per = batch.size // dp
    return batch.select(slice(r * per, (r + 1) * per))


def _gather_last_stage_metrics(per_mb: list[dict]) -> dict:
    """Means of the micro-batch metrics of the last pipeline stage, delivered to every rank."""
    return control_plane.mean_over_reporting_ranks(per_mb)


def train(cfg: RunConfig) -> list[dict]:
    """Runs on every trainer rank. Returns the per-step metrics on rank 0 (an empty list elsewhere)."""
    model_cfg = validate_run_config(cfg)
    p = cfg.parallel
    init_distributed(p, seed=cfg.seed,
                     timeout_minutes=p.nccl_timeout_minutes, control_timeout_minutes=p.control_timeout_minutes)
    rank = dist.get_rank()
    dtype = getattr(torch, DTYPE_NAMES[cfg.model.params_dtype])
    t = cfg.trainer

    impl = cfg.model.transformer_impl
    policy = [wrap_ddp(build_gpt_model(model_cfg, params_dtype=dtype, transformer_impl=impl,
                                       moe_aux_loss_coeff=cfg.model.moe_aux_loss_coeff),
                       use_distributed_optimizer=True)]
    optimizer = build_optimizer(policy, OptimConfig(lr=t.lr, min_lr=t.min_lr, weight_decay=t.weight_decay,
                                                    clip_grad=t.clip_grad, use_distributed_optimizer=True))
    reference = build_gpt_model(model_cfg, params_dtype=dtype, transformer_impl=impl)
    reference.requires_grad_(False)
    reference.eval()
    if t.ref_cpu_offload and torch.cuda.is_available():
        reference.cpu()

    ckpt_dir = Path(cfg.checkpoint.dir or Path(cfg.out_dir) / "checkpoints")
    run_lock = claim_run_dirs(cfg.out_dir, ckpt_dir) if rank == 0 else None  # one live trainer per out_dir
    if cfg.checkpoint.load:
        load_model_weights(cfg.checkpoint.load, policy)
        load_model_weights(cfg.checkpoint.load, [reference])
    else:  # random init: the reference starts as a copy of the policy
        reference.load_state_dict(policy[0].module.state_dict())

    start_step, extra = 0, None
    meta, extra = resume_checkpoint(ckpt_dir, policy, optimizer) if cfg.checkpoint.resume else (None, None)
    if meta is not None:  # the newest intact checkpoint (a damaged `latest` is reported and skipped)
        start_step = int(meta["step"])

    controller = None
    if rank == 0:
        from megatron_apo.trainer.controller import Controller

        controller = Controller(cfg, model_cfg)
        if extra is not None:
            controller.load_state_dict(extra["controller"])
    from megatron_apo.rollout.weight_sync import TrainerWeightSender, sync_dtype

    sender = TrainerWeightSender(policy, model_cfg, bucket_bytes=cfg.rollout.sync_bucket_mb << 20,
                                 dtype=sync_dtype(cfg.rollout))
    off_policy = cfg.rollout.one_step_off_policy
    settings = PassSettings(cfg.algorithm, vocab_size=model_cfg.vocab_size, temperature=cfg.rollout.temperature,
                            tis_cap=cfg.rollout.tis_cap if off_policy else None)
    prefetch = None  # one-step-off-policy: the future of the next step's rollout (rank 0)
    executor = (concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="rollout")
                if off_policy and rank == 0 else None)

    def sync_fleet(version: int) -> float:
        t0 = time.perf_counter()
        if rank == 0:
            group = controller.sync_group()
            refs = controller.fleet.begin_weight_sync(version)
            control_plane.barrier()  # the others wait here (gloo), not in the sender's NCCL transfers
            stats = sender.sync(group, version)
            controller.fleet.finish_weight_sync(refs, stats.checksum)
        else:
            control_plane.barrier()
            sender.sync(None, version)
        return time.perf_counter() - t0

    from megatron_apo.rollout.fleet import FleetNeedsSync

    sync_fleet(start_step)  # the fleet serves exactly the weights training continues from
    logger = None
    if rank == 0:
        from megatron_apo.trainer.metrics import MetricsLogger

        logger = MetricsLogger(cfg.out_dir, t.total_steps, start_step, tensorboard=t.tensorboard,
                               wandb_project=t.wandb_project, progress=t.progress)
    if rank == 0 and start_step == 0:
        controller.evaluate(0, "initial")
    stop = _StopFlag()
    history: list[dict] = []
    step = start_step
    try:
        while step < t.total_steps:
            t_step = time.perf_counter()
            while True:
                rollout = None
                if rank == 0:
                    try:
                        rollout = prefetch.result() if prefetch is not None else controller.rollout(step)
                    except FleetNeedsSync as e:  # engines replaced, none serving these weights: sync, then resume
                        print(f"train: {e}", flush=True)
                        prefetch = None
                    if rollout is not None and off_policy and step + 1 < t.total_steps:
                        # generated by the engines with this step's (pre-update) weights while the trainer works;
                        # the engine actors run one call at a time, so the weight sync below queues behind it
                        prefetch = executor.submit(controller.rollout, step + 1)
                batch, metrics = _broadcast_batch(rollout.batch if rollout else None,
                                                  rollout.metrics if rollout else None)
                if batch is not None:
                    break
                sync_fleet(step)  # every rank: the trainer's weights reach the replacement engines
            local = _dp_shard(batch)
            mbs = min(t.micro_batch_size, local.size)
            micro = local.micro_batches(mbs)
            seq = local.tokens.shape[1]

            t0 = time.perf_counter()
            with torch.no_grad(), _resident(reference, t.ref_cpu_offload):
                forward_backward([reference], micro, reference_pass(settings), seq, mbs, forward_only=True)
            metrics["time/reference_s"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            with torch.no_grad(), routing_capture(policy, settings):
                old = forward_backward(policy, micro, old_policy_pass(settings), seq, mbs, forward_only=True)
            metrics.update(_gather_last_stage_metrics(old))

            mini = t.ppo_mini_batch_size // _dp_size() if t.ppo_mini_batch_size else len(micro) * mbs
            mini_mbs = max(1, mini // mbs)
            train_metrics, skipped, grad_norm = [], 0, 0.0
            for _epoch in range(t.ppo_epochs):
                for i in range(0, len(micro), mini_mbs):
                    zero_grads(policy, optimizer)
                    out = forward_backward(policy, micro[i : i + mini_mbs], train_pass(settings), seq, mbs)
                    if not _all_finite(out):
                        skipped += 1  # a NaN/inf loss: drop this update, keep training
                        continue
                    for g in optimizer.param_groups:
                        g["lr"] = lr_at(step, t)
                    ok, gn, _ = optimizer.step()
                    grad_norm = float(gn or 0.0)
                    train_metrics.extend(out)
            metrics.update(_gather_last_stage_metrics(train_metrics))
            metrics.update(aux_loss_metrics(model_cfg, cfg.model.moe_aux_loss_coeff, t.ppo_epochs * len(micro)))
            metrics["time/train_s"] = time.perf_counter() - t0
            metrics["train/skipped_updates"] = float(skipped)
            metrics["train/grad_norm"] = grad_norm
            metrics["train/lr"] = lr_at(step, t)
            step += 1
            metrics["time/sync_s"] = sync_fleet(step)
            metrics["time/step_s"] = time.perf_counter() - t_step
            metrics["throughput/tokens_per_s"] = float(batch.response_mask.sum()) / metrics["time/step_s"]

            stopping = stop.agreed()
            if (t_save := cfg.checkpoint.save_interval) and step % t_save == 0 or step == t.total_steps or stopping:
                save_checkpoint(ckpt_dir, step, policy, optimizer,
                                metadata={"model_config": model_cfg.to_dict(), "fleet_version": step},
                                extra={"controller": controller.state_dict() if controller else None},
                                keep_last=cfg.checkpoint.keep_last)
            if rank == 0:
                logger.log(step, metrics)
                history.append({"step": step, **metrics})
            if stopping:
                note_stopped(step)  # `megatron-apo train` exits with lifecycle.EXIT_PREEMPTED
                if rank == 0:
                    print(f"train: stop signal received; checkpointed step {step} in {ckpt_dir}", flush=True)
                break
        if rank == 0 and step == t.total_steps:
            controller.evaluate(step, cfg.algorithm.loss_mode)
    finally:
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)
        if logger is not None:
            logger.close()
        if controller is not None:
            controller.shutdown()
        if run_lock is not None:
            run_lock.release()
    return history


@contextlib.contextmanager
def _resident(model, offload: bool):
    """With `trainer.ref_cpu_offload`, the reference weights live in host memory except during its forward."""
    if not (offload and torch.cuda.is_available()):
        yield
        return
    model.cuda()
    try:
        yield
    finally:
        model.cpu()
        torch.cuda.empty_cache()


def _dp_size() -> int:
    from megatron.core import parallel_state as ps

    return ps.get_data_parallel_world_size()


def _all_finite(per_mb: list[dict]) -> bool:
    return control_plane.all_finite(m["loss"] for m in per_mb)
