"""`megatron-apo train`: the RL loop, SPMD on every trainer rank (torchrun / srun / run_distributed).

One step, top to bottom (the picture in docs/architecture.md):
  1. rank 0 asks the fleet for n rollouts per prompt        (rollout_source.RolloutSource -> controller.rollout)
  2. rewards, 3. advantages                                 (controller.rollout)
  -> the batch is broadcast to every trainer rank and split over data-parallel ranks
  4. reference forward: ref log-probs + vocab-parallel Top-K (rl_step -> passes.reference_pass)
  5. old-policy forward, then PPO epochs with the loss       (rl_step -> passes.old_policy_pass / train_pass)
  6. weight sync to the fleet                                (rollout_source.FleetWeights -> rollout.weight_sync)
  7. checkpoint (lifecycle.checkpoint_due), metrics
"""

from __future__ import annotations

import time
from pathlib import Path

import torch.distributed as dist

from megatron_apo.config import RunConfig
from megatron_apo.dtypes import torch_dtype
from megatron_apo.logging_utils import get_logger
from megatron_apo.models import build_gpt_model
from megatron_apo.parallel import init_distributed
from megatron_apo.trainer.checkpoint import load_model_weights, resume_checkpoint, save_checkpoint
from megatron_apo.trainer.lifecycle import StopFlag, checkpoint_due, note_stopped
from megatron_apo.trainer.optim import build_optimizer, wrap_ddp
from megatron_apo.trainer.passes import PassSettings
from megatron_apo.trainer.rl_step import RLModels, lr_at, rl_step
from megatron_apo.trainer.rollout_source import FleetWeights, RolloutSource
from megatron_apo.trainer.runlock import claim_run_dirs
from megatron_apo.trainer.validation import validate_run_config

__all__ = ["lr_at", "train"]  # lr_at lives in rl_step; kept importable from here

log = get_logger(__name__)


def train(cfg: RunConfig) -> list[dict]:
    """Runs on every trainer rank. Returns the per-step metrics on rank 0 (an empty list elsewhere)."""
    model_cfg = validate_run_config(cfg)
    p, t = cfg.parallel, cfg.trainer
    init_distributed(p, seed=cfg.seed,
                     timeout_minutes=p.nccl_timeout_minutes, control_timeout_minutes=p.control_timeout_minutes)
    rank = dist.get_rank()
    models = _build_models(cfg, model_cfg)
    ckpt_dir = Path(cfg.checkpoint.dir or Path(cfg.out_dir) / "checkpoints")
    run_lock = claim_run_dirs(cfg.out_dir, ckpt_dir) if rank == 0 else None  # one live trainer per out_dir
    start_step, extra = _load_weights(cfg, ckpt_dir, models)
    controller = _start_controller(cfg, model_cfg, extra) if rank == 0 else None
    fleet = FleetWeights(controller, _weight_sender(cfg, model_cfg, models))
    source = RolloutSource(controller, fleet.sync, t.total_steps, off_policy=cfg.rollout.one_step_off_policy)
    settings = PassSettings(cfg.algorithm, vocab_size=model_cfg.vocab_size, temperature=cfg.rollout.temperature,
                            tis_cap=cfg.rollout.tis_cap if cfg.rollout.one_step_off_policy else None)
    fleet.sync(start_step)  # the fleet serves exactly the weights training continues from
    metrics_log = _metrics_logger(cfg, start_step) if rank == 0 else None
    if rank == 0 and start_step == 0:
        controller.evaluate(0, "initial")
    stop = StopFlag()
    history: list[dict] = []
    step = start_step
    try:
        while step < t.total_steps:
            t_step = time.perf_counter()
            batch, metrics = source.next(step)
            metrics.update(rl_step(step, batch, models, settings, t))
            step += 1
            metrics["time/sync_s"] = fleet.sync(step)
            metrics["time/step_s"] = time.perf_counter() - t_step
            metrics["throughput/tokens_per_s"] = float(batch.response_mask.sum()) / metrics["time/step_s"]
            stopping = stop.agreed()
            if checkpoint_due(step, t.total_steps, cfg.checkpoint.save_interval, stopping):
                _save(cfg, ckpt_dir, step, models, model_cfg, controller)
            if rank == 0:
                metrics_log.log(step, metrics)
                history.append({"step": step, **metrics})
            if stopping:
                note_stopped(step)  # `megatron-apo train` exits with lifecycle.EXIT_PREEMPTED
                log.info("train: stop signal received; checkpointed step %d in %s", step, ckpt_dir)
                break
        if rank == 0 and step == t.total_steps:
            controller.evaluate(step, cfg.algorithm.loss_mode)
    finally:
        source.close()
        if metrics_log is not None:
            metrics_log.close()
        if controller is not None:
            controller.shutdown()
        if run_lock is not None:
            run_lock.release()
    return history


def _build_models(cfg: RunConfig, model_cfg) -> RLModels:
    """The DDP-wrapped policy, its Megatron optimizer, and the frozen reference (same architecture)."""
    dtype, impl, t = torch_dtype(cfg.model.params_dtype), cfg.model.transformer_impl, cfg.trainer
    policy = [wrap_ddp(build_gpt_model(model_cfg, params_dtype=dtype, transformer_impl=impl,
                                       recompute=t.recompute == "full", fusions=cfg.model.fusions, ddp=True,
                                       moe_aux_loss_coeff=cfg.model.moe_aux_loss_coeff),
                       use_distributed_optimizer=t.use_distributed_optimizer)]
    optimizer = build_optimizer(policy, t)  # the trainer section is the optimizer config (config.OptimConfig)
    reference = build_gpt_model(model_cfg, params_dtype=dtype, transformer_impl=impl, fusions=cfg.model.fusions)
    reference.requires_grad_(False)
    reference.eval()
    if t.ref_cpu_offload and _cuda():
        reference.cpu()
    return RLModels(policy=policy, optimizer=optimizer, reference=reference, model_cfg=model_cfg,
                    moe_aux_loss_coeff=cfg.model.moe_aux_loss_coeff)


def _load_weights(cfg: RunConfig, ckpt_dir: Path, models: RLModels) -> tuple[int, dict | None]:
    """Initial weights (checkpoint.load, else the reference copies the random policy), then a resume from the
    newest intact checkpoint of `ckpt_dir` (a damaged `latest` is reported and skipped). Returns (step, extra)."""
    if cfg.checkpoint.load:
        load_model_weights(cfg.checkpoint.load, models.policy)
        load_model_weights(cfg.checkpoint.load, [models.reference])
    else:
        models.reference.load_state_dict(models.policy[0].module.state_dict())
    if not cfg.checkpoint.resume:
        return 0, None
    meta, extra = resume_checkpoint(ckpt_dir, models.policy, models.optimizer)
    return (int(meta["step"]), extra) if meta is not None else (0, extra)


def _start_controller(cfg: RunConfig, model_cfg, extra: dict | None):
    from megatron_apo.trainer.controller import Controller

    controller = Controller(cfg, model_cfg)
    if extra is not None:
        controller.load_state_dict(extra["controller"])
    return controller


def _weight_sender(cfg: RunConfig, model_cfg, models: RLModels):
    from megatron_apo.rollout.weight_sync import TrainerWeightSender, sync_dtype

    return TrainerWeightSender(models.policy, model_cfg, bucket_bytes=cfg.rollout.sync_bucket_mb << 20,
                               dtype=sync_dtype(cfg.rollout))


def _metrics_logger(cfg: RunConfig, start_step: int):
    from megatron_apo.trainer.metrics import MetricsLogger

    t = cfg.trainer
    return MetricsLogger(cfg.out_dir, t.total_steps, start_step, tensorboard=t.tensorboard,
                         wandb_project=t.wandb_project, progress=t.progress)


def _save(cfg: RunConfig, ckpt_dir: Path, step: int, models: RLModels, model_cfg, controller) -> None:
    save_checkpoint(ckpt_dir, step, models.policy, models.optimizer,
                    metadata={"model_config": model_cfg.to_dict(), "fleet_version": step},
                    extra={"controller": controller.state_dict() if controller else None},
                    keep_last=cfg.checkpoint.keep_last)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()
