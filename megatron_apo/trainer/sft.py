"""Supervised fine-tuning on (prompt, response) pairs: how the demo makes its diverse reference model.

Loss = next-token cross-entropy on the response tokens (and their end-of-sequence token) only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_apo.logging_utils import get_logger
from megatron_apo.models import build_gpt_model, load_model_config
from megatron_apo.parallel import ParallelConfig, control_plane, init_distributed
from megatron_apo.trainer.checkpoint import save_checkpoint
from megatron_apo.trainer.optim import OptimConfig, build_optimizer, wrap_ddp, zero_grads
from megatron_apo.trainer.schedule import forward_backward, lm_loss

log = get_logger(__name__)


@dataclass
class SFTConfig:
    model: str = "tiny"
    tp: int = 1
    pp: int = 1
    steps: int = 300
    batch_size: int = 64
    micro_batch_size: int = 32
    lr: float = 3e-3
    seed: int = 1234


def make_sft_tensors(pairs: list[tuple[list[int], list[int]]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, S+1] tokens and [N, S] loss mask (1 on positions whose *target* is a response token)."""
    s1 = max(len(p) + len(r) for p, r in pairs)
    tokens = torch.full((len(pairs), s1), pad_id, dtype=torch.long)
    mask = torch.zeros((len(pairs), s1 - 1))
    for i, (p, r) in enumerate(pairs):
        tokens[i, : len(p) + len(r)] = torch.tensor(p + r)
        mask[i, len(p) - 1 : len(p) + len(r) - 1] = 1.0
    return tokens, mask


def sft_train(cfg: SFTConfig, tokens: torch.Tensor, loss_mask: torch.Tensor, out_dir: str) -> list[float]:
    """Runs on every rank; trains and saves a Megatron checkpoint (`out_dir`) usable as `checkpoint.load`."""

    init_distributed(ParallelConfig(cfg.tp, cfg.pp), seed=cfg.seed)
    model_cfg = load_model_config(cfg.model)
    chunks = [wrap_ddp(build_gpt_model(model_cfg), use_distributed_optimizer=True)]
    opt = build_optimizer(chunks, OptimConfig(lr=cfg.lr, clip_grad=1.0, weight_decay=0.0))
    gen = torch.Generator().manual_seed(cfg.seed)
    seq = tokens.shape[1] - 1
    pos = torch.arange(seq).unsqueeze(0)
    losses = []
    for step in range(cfg.steps):
        for g in opt.param_groups:  # cosine decay: a small model overfits less and ends smoother
            g["lr"] = cfg.lr * 0.5 * (1 + torch.cos(torch.tensor(torch.pi * step / cfg.steps)).item())
        idx = torch.randint(0, tokens.shape[0], (cfg.batch_size,), generator=gen)
        micro = []
        for i in range(0, cfg.batch_size, cfg.micro_batch_size):
            sel = idx[i : i + cfg.micro_batch_size]
            micro.append({"tokens": tokens[sel, :-1], "labels": tokens[sel, 1:], "loss_mask": loss_mask[sel],
                          "position_ids": pos.expand(len(sel), -1)})
        zero_grads(chunks, opt)
        out = forward_backward(chunks, micro, lm_loss, seq, cfg.micro_batch_size)
        opt.step()
        loss = control_plane.mean_over_reporting_ranks(out)["lm_loss"]  # the last stage's, on every rank
        losses.append(loss)
        if (step + 1) % max(1, cfg.steps // 10) == 0:
            log.info("sft: step %d/%d  loss %.4f", step + 1, cfg.steps, loss)
    save_checkpoint(out_dir, cfg.steps, chunks, optimizer=None,
                    metadata={"model_config": model_cfg.to_dict(), "sft": True},
                    keep_last=1)
    return losses
