"""Rank bodies for the checkpoint tests (module level so spawned ranks can import them)."""

from __future__ import annotations

import torch

from megatron_apo.models import build_gpt_model, load_model_config
from megatron_apo.parallel import ParallelConfig, init_distributed
from megatron_apo.trainer.checkpoint import load_checkpoint, save_checkpoint
from megatron_apo.trainer.optim import OptimConfig, build_optimizer, wrap_ddp, zero_grads
from megatron_apo.trainer.schedule import forward_backward, lm_batches, lm_loss


def _lm_step(chunks, opt, tokens) -> list[float]:
    zero_grads(chunks, opt)
    out = forward_backward(chunks, list(lm_batches(tokens, 2)), lm_loss, seq_length=tokens.shape[1] - 1, micro_batch_size=2)
    opt.step()
    return [float(o["lm_loss"]) for o in out]


def train_save_or_resume(tp: int, ckpt: str, save: bool) -> list[float]:
    """save=True: 2 steps, checkpoint, 1 more step. save=False: resume from the checkpoint and run that step."""
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
    return _lm_step(chunks, opt, tokens)
