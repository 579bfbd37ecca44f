"""`megatron-apo train`: the RL loop, SPMD on every trainer rank (torchrun / srun / run_distributed).

One step, top to bottom (the picture in docs/architecture.md):
  1. rank 0 asks the fleet for n rollouts per prompt        (rollout_source.RolloutSource -> controller.rollout)
  2. rewards, 3. advantages                                 (controller.rollout)
  -> the batch is broadcast to every trainer rank and split over data-parallel ranks
  4. reference forward: ref log-probs + vocab-parallel Top-K (rl_step -> passes.ReferencePass -> RefOutputs)
  5. old-policy forward, then PPO epochs with the loss       (rl_step -> passes.OldPolicyPass, TrainPass)
  6. weight sync to the fleet                                (rollout_source.FleetWeights -> rollout.weight_sync)
  7. checkpoint (lifecycle.checkpoint_due), metrics
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import torch.distributed as dist

from megatron_apo.config import RunConfig
from megatron_apo.dtypes import torch_dtype
from megatron_apo.logging_utils import get_logger
from megatron_apo.models import build_gpt_model
from megatron_apo.parallel import init_distributed
from megatron_apo.trainer.checkpoint import load_model_weights, resume_checkpoint, save_checkpoint
from megatron_apo.trainer.config_guard import check_resume_config, checkpoint_record
from megatron_apo.trainer.lifecycle import StopFlag, TrainResult, checkpoint_due
from megatron_apo.trainer.optim import build_optimizer, wrap_ddp
from megatron_apo.trainer.passes import PassSettings
from megatron_apo.trainer.rl_step import RLModels, rl_step
from megatron_apo.trainer.rollout_source import FleetWeights, RolloutSource
from megatron_apo.trainer.runlock import claim_run_dirs
from megatron_apo.trainer.validation import validate_run_config

log = get_logger(__name__)


def train(cfg: RunConfig) -> TrainResult:
    """Runs on every trainer rank. Returns the per-step metrics on rank 0 (an empty list elsewhere), and the step
    a stop signal ended the run after (`megatron-apo train` then exits with lifecycle.EXIT_PREEMPTED)."""
    stop = StopFlag()  # from the start: a stop signal during start-up (fleet start, first sync) stops after step 1
    model_cfg = validate_run_config(cfg)
    p, t = cfg.parallel, cfg.trainer
    init_distributed(p, seed=cfg.seed,
                     timeout_minutes=p.nccl_timeout_minutes, control_timeout_minutes=p.control_timeout_minutes)
    rank = dist.get_rank()
    models = _build_models(cfg, model_cfg)
    ckpt_dir = Path(cfg.checkpoint.dir or Path(cfg.out_dir) / "checkpoints")
    # Whatever has started is stopped, newest first, however train() ends (a failed resume or first sync included):
    # the run lock, the controller's Ray fleet and reward workers, the prefetch thread, the metrics files.
    with contextlib.ExitStack() as started:
        if rank == 0:
            started.callback(claim_run_dirs(cfg.out_dir, ckpt_dir).release)  # one live trainer per out_dir
        start_step, meta, extra = _load_weights(cfg, ckpt_dir, models)
        controller = _start_controller(cfg, model_cfg, extra) if rank == 0 else None
        if controller is not None:
            started.callback(controller.shutdown)
        fleet = FleetWeights(controller, _weight_sender(cfg, model_cfg, models))
        source = RolloutSource(controller, fleet.sync, t.total_steps, off_policy=cfg.rollout.one_step_off_policy)
        started.callback(source.close)
        settings = PassSettings(cfg.algorithm, vocab_size=model_cfg.vocab_size, temperature=cfg.rollout.temperature,
                                tis_cap=cfg.rollout.tis_cap if cfg.rollout.one_step_off_policy else None)
        fleet.sync(start_step)  # the fleet serves exactly the weights training continues from
        metrics_log = _metrics_logger(cfg, start_step) if rank == 0 else None
        if metrics_log is not None:
            started.callback(metrics_log.close)
            if meta is not None:
                metrics_log.replay(meta.get("metrics"))  # a kill after the checkpoint's rename lost this record
        if rank == 0 and start_step == 0:
            controller.evaluate(0, "initial")
        result = TrainResult()
        step = start_step
        while step < t.total_steps:
            t_step = time.perf_counter()
            batch, metrics = source.next(step)
            metrics.update(rl_step(step, batch, models, settings, t))
            step += 1
            metrics["time/sync_s"] = fleet.sync(step)
            metrics["time/step_s"] = time.perf_counter() - t_step
            metrics["throughput/tokens_per_s"] = float(batch.response_mask.sum()) / metrics["time/step_s"]
            stopping = stop.agreed()
            record = metrics_log.record(step, metrics) if rank == 0 else None
            if checkpoint_due(step, t.total_steps, cfg.checkpoint.save_interval, stopping):
                _save(cfg, ckpt_dir, step, models, model_cfg, controller, record)
            if rank == 0:
                metrics_log.write(record)
                result.history.append({"step": step, **metrics})
            if stopping:
                result.stopped_at = step
                log.info("train: stop signal received; checkpointed step %d in %s", step, ckpt_dir)
                break
        if rank == 0 and step == t.total_steps:
            controller.evaluate(step, cfg.algorithm.loss_mode)
    return result


def _build_models(cfg: RunConfig, model_cfg) -> RLModels:
    """The DDP-wrapped policy, its Megatron optimizer, and the frozen reference (same architecture)."""
    dtype, impl, t = torch_dtype(cfg.model.params_dtype), cfg.model.transformer_impl, cfg.trainer
    policy = [wrap_ddp(build_gpt_model(model_cfg, params_dtype=dtype, transformer_impl=impl,
                                       recompute=t.recompute == "full", fusions=cfg.model.fusions, ddp=True,
                                       moe_aux_loss_coeff=cfg.model.moe_aux_loss_coeff,
                                       routing_replay=cfg.rollout.routing_replay),
                       use_distributed_optimizer=t.use_distributed_optimizer)]
    optimizer = build_optimizer(policy, t)  # the trainer section is the optimizer config (config.OptimConfig)
    reference = build_gpt_model(model_cfg, params_dtype=dtype, transformer_impl=impl, fusions=cfg.model.fusions)
    reference.requires_grad_(False)
    reference.eval()
    if t.ref_cpu_offload and _cuda():
        reference.cpu()
    return RLModels(policy=policy, optimizer=optimizer, reference=reference, model_cfg=model_cfg,
                    moe_aux_loss_coeff=cfg.model.moe_aux_loss_coeff)


def _load_weights(cfg: RunConfig, ckpt_dir: Path, models: RLModels) -> tuple[int, dict | None, dict | None]:
    """Initial weights (checkpoint.load, else the reference copies the random policy), then a resume from the
    newest intact checkpoint of `ckpt_dir` (a damaged `latest` is reported and skipped), refused when the run
    config changed a guarded setting (trainer/config_guard.py). Returns (step, metadata, extra)."""
    c = cfg.checkpoint
    if c.load:
        load_model_weights(c.load, models.policy, allow_unverified=c.allow_unverified)
        load_model_weights(c.load, [models.reference], allow_unverified=c.allow_unverified)
    else:
        models.reference.load_state_dict(models.policy[0].module.state_dict())
    if not c.resume:
        return 0, None, None
    meta, extra = resume_checkpoint(ckpt_dir, models.policy, models.optimizer, allow_unverified=c.allow_unverified,
                                    reset_optimizer=c.reset_optimizer)
    if meta is None:
        return 0, None, extra
    check_resume_config(meta, cfg, f"{ckpt_dir} (step {meta['step']})", log if dist.get_rank() == 0 else None)
    return int(meta["step"]), meta, extra


def _start_controller(cfg: RunConfig, model_cfg, extra: dict | None):
    from megatron_apo.trainer.controller import Controller

    controller = Controller(cfg, model_cfg)
    if extra is not None:
        try:
            controller.load_state_dict(extra["controller"])
        except BaseException:  # e.g. a sampler state that does not fit the data files: stop the fleet it started
            controller.shutdown()
            raise
    return controller


def _weight_sender(cfg: RunConfig, model_cfg, models: RLModels):
    from megatron_apo.rollout.weight_sync import TrainerWeightSender, sync_bucket_bytes, sync_dtype

    return TrainerWeightSender(models.policy, model_cfg, bucket_bytes=sync_bucket_bytes(cfg.rollout),
                               dtype=sync_dtype(cfg.rollout))


def _metrics_logger(cfg: RunConfig, start_step: int):
    from megatron_apo.trainer.metrics import MetricsLogger

    t = cfg.trainer
    return MetricsLogger(cfg.out_dir, t.total_steps, start_step, tensorboard=t.tensorboard,
                         wandb_project=t.wandb_project, progress=t.progress)


def _save(cfg: RunConfig, ckpt_dir: Path, step: int, models: RLModels, model_cfg, controller, record) -> None:
    # `metrics`: this step's record, replayed into metrics.jsonl by a resume if a kill came before it was written
    save_checkpoint(ckpt_dir, step, models.policy, models.optimizer,
                    metadata={"model_config": model_cfg.to_dict(), "fleet_version": step, "metrics": record,
                              **checkpoint_record(cfg)},
                    extra={"controller": controller.state_dict() if controller else None},
                    keep_last=cfg.checkpoint.keep_last)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()
