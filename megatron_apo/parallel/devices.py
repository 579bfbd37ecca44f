"""The device rule's one helper: data-plane tensors go to the model's device (docs/gpu.md).

Batches are built on the host (by the controller, the SFT/smoke loops, tests); the schedule's forward
step moves each micro-batch with `to_device` before the model sees it, exactly once, like Megatron's own
training loop does (`.cuda(non_blocking=True)`). The loss inputs (advantages, old/ref log-probs, Top-K
indices) travel in the same dict, so they end up on the logits' device too.
"""

from __future__ import annotations

import torch


def model_device(model: torch.nn.Module) -> torch.device:
    """Where `model`'s weights live (the first parameter; the host for a parameterless module)."""
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def to_device(batch: dict, device: torch.device | str) -> dict:
    """Moves every tensor of a micro-batch dict to `device`, IN PLACE, and returns the same dict.

    In place on purpose: the RL passes write their results (ref log-probs, Top-K ...) into these dicts and
    a later pass over the same micro-batches reads them back; a copy would lose them.
    """
    device = torch.device(device)
    for key, value in batch.items():
        if torch.is_tensor(value) and value.device != device:
            batch[key] = value.to(device, non_blocking=value.device.type == "cpu" and value.is_pinned())
    return batch
