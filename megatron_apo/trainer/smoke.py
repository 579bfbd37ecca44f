"""A TP/PP language-model smoke training on the tiny model: proves the Megatron stack trains on this machine."""

from __future__ import annotations

import torch

from megatron_apo.logging_utils import get_logger
from megatron_apo.models import build_gpt_model, load_model_config
from megatron_apo.parallel import ParallelConfig, control_plane, init_distributed
from megatron_apo.trainer.optim import OptimConfig, build_optimizer, wrap_ddp, zero_grads
from megatron_apo.trainer.schedule import forward_backward, lm_batches, lm_loss

log = get_logger(__name__)


def smoke_train(tp: int = 2, pp: int = 1, steps: int = 30, model: str = "tiny", seed: int = 1234,
                seq_length: int = 32, micro_batch_size: int = 4, num_micro_batches: int = 2) -> list[float]:
    """Runs on every rank (launched by torchrun or run_distributed); returns the per-step losses."""
    init_distributed(ParallelConfig(tp, pp), seed=seed)
    from megatron.core import parallel_state

    cfg = load_model_config(model)
    gpt = build_gpt_model(cfg)
    dist_opt = parallel_state.get_data_parallel_world_size() > 1
    chunks = [wrap_ddp(gpt, use_distributed_optimizer=dist_opt)]
    opt = build_optimizer(chunks, OptimConfig(lr=3e-3, clip_grad=1.0, use_distributed_optimizer=dist_opt))
    # A learnable synthetic language: each sequence counts upward modulo a small alphabet from a random start.
    gen = torch.Generator().manual_seed(seed)
    alphabet = min(cfg.vocab_size, 48)
    losses = []
    for step in range(steps):
        start = torch.randint(0, alphabet, (micro_batch_size * num_micro_batches, 1), generator=gen)
        tokens = (start + torch.arange(seq_length + 1)) % alphabet
        zero_grads(chunks, opt)
        out = forward_backward(chunks, list(lm_batches(tokens, micro_batch_size)), lm_loss,
                               seq_length=seq_length, micro_batch_size=micro_batch_size)
        opt.step()
        # the loss lives on the last stage; the control plane hands every rank the same number
        loss = control_plane.mean_over_reporting_ranks(out)["lm_loss"]
        losses.append(loss)
        log.info("smoke: step %3d/%d  lm_loss %.4f", step + 1, steps, loss)
    return losses
