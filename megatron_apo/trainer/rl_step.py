"""One RL step on every trainer rank: rollout batch -> reference / old-policy / train passes -> optimizer steps.

The picture (docs/architecture.md): the batch broadcast by rank 0 is split over data-parallel ranks, the frozen
reference computes its log-probs and vocab-parallel Top-K (RefOutputs), the pre-update policy its old log-probs
(OldOutputs), then PPO epochs of mini-batch updates run the loss on the micro-batch and both outputs (TrainPass).
Each pass's outputs are handed to the next explicitly (trainer/passes.py). Metrics are means over the last pipeline
stage's micro-batches.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass

import torch

from megatron_apo.config import ConfigError
from megatron_apo.models.routing import replay_routing
from megatron_apo.parallel import control_plane
from megatron_apo.trainer.batch import MicroBatchPlan, RLBatch, plan_micro_batches
from megatron_apo.trainer.moe_metrics import aux_loss_metrics, routing_capture
from megatron_apo.trainer.optim import zero_grads
from megatron_apo.trainer.passes import OldPolicyPass, PassSettings, ReferencePass, TrainPass, gather_old_metrics
from megatron_apo.trainer.schedule import forward_backward


@dataclass
class RLModels:
    """What an RL step updates and reads: the DDP-wrapped policy chunks, their optimizer, the frozen reference
    (and, for MoE models, the architecture and the router's aux-loss coefficient, for its metric)."""

    policy: list
    optimizer: object
    reference: torch.nn.Module
    model_cfg: object = None
    moe_aux_loss_coeff: float = 0.0


def lr_at(step: int, t) -> float:
    """Warmup then constant/linear/cosine decay to min_lr over total_steps; a pure function of the step."""
    if t.lr_warmup_steps and step < t.lr_warmup_steps:
        return t.lr * (step + 1) / t.lr_warmup_steps
    if t.lr_decay_style == "constant":
        return t.lr
    frac = min(1.0, (step - t.lr_warmup_steps) / max(1, t.total_steps - t.lr_warmup_steps))
    decay = 1 - frac if t.lr_decay_style == "linear" else 0.5 * (1 + math.cos(math.pi * frac))
    return t.min_lr + (t.lr - t.min_lr) * decay


def rl_step(step: int, batch: RLBatch, models: RLModels, settings: PassSettings, t) -> dict:
    """Trains on `batch` (the whole rollout batch, the same on every rank); `t` is the trainer section.

    Returns this step's metrics (every rank): pass metrics, timings, skipped updates, grad norm and lr.
    """
    plan = _plan(batch, t)
    micro, seq, mbs, var = plan.micro, plan.seq_length, plan.micro_batch_size, plan.variable
    metrics: dict = {}

    t0 = time.perf_counter()
    ref = ReferencePass(settings, len(micro))
    with torch.no_grad(), _resident(models.reference, t.ref_cpu_offload):
        forward_backward([models.reference], micro, ref, seq, mbs, forward_only=True, variable_seq_lengths=var)
    metrics["time/reference_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    old = OldPolicyPass(settings, ref.outputs)
    # MoE: rollout/routing_mismatch; with rollout.routing_replay the routers take the engine's routes
    with torch.no_grad(), routing_capture(models.policy, settings), replay_routing(models.policy, micro):
        forward_backward(models.policy, micro, old, seq, mbs, forward_only=True, variable_seq_lengths=var)
    metrics.update(gather_old_metrics(old.outputs))  # mismatch and rollout-correction metrics
    train = TrainPass(settings, ref.outputs, old.outputs)  # outputs exist on the last stage, where the loss runs

    train_metrics, skipped, grad_norm = [], 0, 0.0
    for _epoch in range(t.ppo_epochs):
        for part in plan.mini:
            zero_grads(models.policy, models.optimizer)
            with replay_routing(models.policy, micro[part]):
                out = forward_backward(models.policy, micro[part], train, seq, mbs, variable_seq_lengths=var)
            if not _all_finite(out):
                skipped += 1  # a NaN/inf loss: drop this update, keep training
                continue
            for g in models.optimizer.param_groups:
                g["lr"] = lr_at(step, t)
            _ok, gn, _ = models.optimizer.step()
            grad_norm = float(gn or 0.0)
            train_metrics.extend(out)
    metrics.update(_gather_last_stage_metrics(train_metrics))
    if models.model_cfg is not None:
        metrics.update(aux_loss_metrics(models.model_cfg, models.moe_aux_loss_coeff, t.ppo_epochs * len(micro)))
    metrics["time/train_s"] = time.perf_counter() - t0
    metrics["train/skipped_updates"] = float(skipped)
    metrics["train/grad_norm"] = grad_norm
    metrics["train/lr"] = lr_at(step, t)
    return metrics


def loss_and_gradients(policy: list, reference, plan: MicroBatchPlan, settings: PassSettings) -> list[dict]:
    """The three passes of one update on `plan`'s micro-batches, without the optimizer: reference and old-policy
    forward, then the train pass's forward and backward (the gradients are left in `policy`'s parameters, zeroed
    first). Returns the train pass's per-micro-batch metrics. For benchmarks and parity tests of the data flow;
    `rl_step` runs the same passes with timing, reference offload, routing replay, mini-batches and the optimizer."""
    a, kw = (plan.seq_length, plan.micro_batch_size), dict(variable_seq_lengths=plan.variable)
    with torch.no_grad():
        ref = ReferencePass(settings, len(plan.micro))
        forward_backward([reference], plan.micro, ref, *a, forward_only=True, **kw)
        old = OldPolicyPass(settings, ref.outputs)
        forward_backward(policy, plan.micro, old, *a, forward_only=True, **kw)
    for chunk in policy:
        for p in chunk.parameters():
            p.grad = None
    return forward_backward(policy, plan.micro, TrainPass(settings, ref.outputs, old.outputs), *a, **kw)


def _plan(batch: RLBatch, t) -> MicroBatchPlan:
    """This DP rank's micro-batches: by count (padded to the step's longest sequence), or by `micro_batch_tokens`,
    padded per micro-batch or packed (`pack_sequences`); trainer/batch.py."""
    from megatron.core import parallel_state as ps

    dp, r = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    if batch.size % dp:
        raise ConfigError(f"rollout batch of {batch.size} samples does not split over {dp} data-parallel ranks; "
                         "make data.train_batch_size * rollout.n a multiple of the DP size")
    return plan_micro_batches(batch, r, dp, t.micro_batch_size, t.ppo_mini_batch_size,
                              micro_batch_tokens=t.micro_batch_tokens, pack=t.pack_sequences)


def _gather_last_stage_metrics(per_mb: list[dict]) -> dict:
    """Means of the micro-batch metrics of the last pipeline stage, delivered to every rank."""
    return control_plane.mean_over_reporting_ranks(per_mb)


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


def _all_finite(per_mb: list[dict]) -> bool:
    return control_plane.all_finite(m["loss"] for m in per_mb)
