"""Rank bodies for the checkpoint tests (module level so spawned ranks can import them)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_apo.models import build_gpt_model, load_model_config
from megatron_apo.parallel import ParallelConfig, init_distributed
from megatron_apo.trainer.checkpoint import load_checkpoint, save_checkpoint
from megatron_apo.trainer.optim import OptimConfig, build_optimizer, wrap_ddp, zero_grads
from megatron_apo.trainer.schedule import forward_backward, lm_batches, lm_loss


def _lm_step(chunks, opt, tokens) -> list[float]:
    zero_grads(chunks, opt)
    out = forward_backward(chunks, list(lm_batches(tokens, 2)), lm_loss, seq_length=tokens.shape[1] - 1,
                           micro_batch_size=2)
    opt.step()
    return [float(o["lm_loss"]) for o in out]


def optimizer_state(opt) -> dict:
    """{name: {"param", "exp_avg", "exp_avg_sq": full flat fp32 array, "steps": {step}, "step_ids", "covered"}}.

    The distributed optimizer holds one contiguous slice of each parameter per DP rank; the slices are gathered
    over the data-parallel group, so the result is the same whatever the DP size (it is this TP/PP rank's view).
    """
    from megatron.core import parallel_state as ps

    local = []
    for sub in getattr(opt, "chained_optimizers", [opt]):
        for gbuf_range_maps in sub.gbuf_ranges:
            for buckets in gbuf_range_maps.values():
                for bucket in buckets:
                    for model_param, ranges in bucket["param_map"].items():
                        r = ranges["param"]
                        t = sub._get_main_param_and_optimizer_states(model_param)
                        local.append((sub._param_name(model_param), model_param.numel(), r.start, r.end,
                                      {k: v.detach().clone().float().reshape(-1) for k, v in t.items() if k != "step"},
                                      float(t["step"]), id(t["step"])))
    every = [None] * ps.get_data_parallel_world_size()
    dist.all_gather_object(every, local, group=ps.get_data_parallel_group(with_context_parallel=True))
    full: dict = {}
    for src, pieces in enumerate(every):  # src: the DP rank whose process the ids belong to
        for name, numel, start, end, tensors, step, step_id in pieces:
            entry = full.setdefault(name, {"steps": set(), "step_ids": set(), "covered": 0,
                                           **{k: torch.full((numel,), float("nan")) for k in tensors}})
            for k, v in tensors.items():
                entry[k][start:end] = v
            entry["steps"].add(step)
            # an id() is only unique within one process: ranks forked from one server often share addresses
            entry["step_ids"].add((src, step_id))
            entry["covered"] += end - start
    for entry in full.values():  # numpy: torch tensors would cross the process boundary as shared memory
        for k in ("param", "exp_avg", "exp_avg_sq"):
            entry[k] = entry[k].numpy()
    return full


def train_save_or_resume(tp: int, ckpt: str, save: bool, after: int = 1, dp_state: bool = False):
    """save=True: 2 steps, checkpoint, `after` more steps. save=False: resume from the checkpoint, `after` steps.

    Returns the losses of the steps after the checkpoint, and with `dp_state` the optimizer state right after the
    save / load (gathered over DP) and after the following steps.
    """
    init_distributed(ParallelConfig(tp, 1), seed=1)
    chunks = [wrap_ddp(build_gpt_model(load_model_config("tiny")), use_distributed_optimizer=True)]
    opt = build_optimizer(chunks, OptimConfig(lr=1e-2, use_distributed_optimizer=True))
    tokens = torch.randint(0, 200, (8, 17), generator=torch.Generator().manual_seed(3))
    if save:
        _lm_step(chunks, opt, tokens)
        _lm_step(chunks, opt, tokens)
        save_checkpoint(ckpt, 2, chunks, opt, metadata={"model_config": load_model_config("tiny").to_dict()})
    else:
        meta, _ = load_checkpoint(ckpt, chunks, opt)
        assert meta["step"] == 2
    at_ckpt = optimizer_state(opt) if dp_state else None
    losses = [_lm_step(chunks, opt, tokens) for _ in range(after)]
    if not dp_state:
        return losses[0] if after == 1 else losses
    return losses, at_ckpt, optimizer_state(opt)


def save_steps(ckpt: str, steps: list[int], keep_last: int = 3) -> dict:
    """World of 1: a tiny model saved at each of `steps` (one Adam update before each). Returns {step: weights}."""
    init_distributed(ParallelConfig(1, 1), seed=1)
    chunks = [wrap_ddp(build_gpt_model(load_model_config("tiny")), use_distributed_optimizer=True)]
    opt = build_optimizer(chunks, OptimConfig(lr=1e-2, use_distributed_optimizer=True))
    tokens = torch.randint(0, 200, (4, 9), generator=torch.Generator().manual_seed(3))
    weights = {}
    for s in steps:
        _lm_step(chunks, opt, tokens)
        save_checkpoint(ckpt, s, chunks, opt, metadata={"model_config": load_model_config("tiny").to_dict()},
                        extra={"step": s}, keep_last=keep_last)
        weights[s] = {n: p.detach().clone().numpy() for n, p in chunks[0].named_parameters()}
    return weights


def save_until_error(ckpt: str, steps: int) -> str:
    """Saves step 1, 2, ... until a save fails; returns the error as 'Type: message'."""
    init_distributed(ParallelConfig(1, 1), seed=1)
    chunks = [wrap_ddp(build_gpt_model(load_model_config("tiny")), use_distributed_optimizer=True)]
    opt = build_optimizer(chunks, OptimConfig(lr=1e-2, use_distributed_optimizer=True))
    tokens = torch.randint(0, 200, (4, 9), generator=torch.Generator().manual_seed(3))
    for s in range(1, steps + 1):
        _lm_step(chunks, opt, tokens)
        try:
            save_checkpoint(ckpt, s, chunks, opt, metadata={}, keep_last=10)
        except Exception as e:  # noqa: BLE001 - the test inspects it
            return f"{type(e).__name__}: {e}"
    return "no error"


def resume_newest_intact(ckpt: str, allow_unverified: bool = False):
    """World of 1: resume_checkpoint into a fresh model; returns (metadata step, extra, weights)."""
    from megatron_apo.trainer.checkpoint import resume_checkpoint

    init_distributed(ParallelConfig(1, 1), seed=2)
    chunks = [wrap_ddp(build_gpt_model(load_model_config("tiny")), use_distributed_optimizer=True)]
    opt = build_optimizer(chunks, OptimConfig(lr=1e-2, use_distributed_optimizer=True))
    try:
        meta, extra = resume_checkpoint(ckpt, chunks, opt, allow_unverified=allow_unverified)
    except Exception as e:  # noqa: BLE001
        return f"{type(e).__name__}: {e}", None, None
    return meta["step"], extra, {n: p.detach().clone().numpy() for n, p in chunks[0].named_parameters()}


def resume_at_layout(tp: int, pp: int, ckpt: str, reset_optimizer: bool):
    """Loads a checkpoint at TP x PP (world TP*PP) and trains one step. Returns (step, loss) or 'Type: message'."""
    init_distributed(ParallelConfig(tp, pp), seed=1)
    chunks = [wrap_ddp(build_gpt_model(load_model_config("tiny")), use_distributed_optimizer=True)]
    opt = build_optimizer(chunks, OptimConfig(lr=1e-2, use_distributed_optimizer=True))
    try:
        meta, _ = load_checkpoint(ckpt, chunks, opt, reset_optimizer=reset_optimizer)
    except Exception as e:  # noqa: BLE001 - the test inspects it
        return f"{type(e).__name__}: {e}"
    tokens = torch.randint(0, 200, (8, 17), generator=torch.Generator().manual_seed(3))
    losses = _lm_step(chunks, opt, tokens)
    return meta["step"], losses
