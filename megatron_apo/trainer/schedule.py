"""A thin, explicit wrapper over megatron-core's forward-backward schedules (no pipelining / 1F1B / interleaved)."""

from __future__ import annotations

import contextlib
from functools import partial
from typing import Any, Callable, Iterable, Sequence

import torch

from megatron_apo.parallel.devices import model_device, to_device
from megatron_apo.trainer.batch import packed_attention_mask


def model_forward(model, batch: dict) -> torch.Tensor:
    """Runs a GPTModel chunk on a micro-batch dict (tokens, position_ids): hidden states or vocab-sharded logits.

    A packed micro-batch (`cu_seqlens`, trainer/batch.py) keeps attention and positions within each sample: with
    Transformer Engine through Megatron's THD path (PackedSeqParams), with the local spec through a block-diagonal
    causal mask and RoPE at each token's own position (`position_ids`).
    """
    cu = batch.get("cu_seqlens")
    if cu is None:
        return model(batch["tokens"], batch["position_ids"], attention_mask=None)
    if _uses_transformer_engine(model):
        from megatron.core.packed_seq_params import PackedSeqParams

        cu = cu.to(torch.int32)
        longest = int((cu[1:] - cu[:-1]).max())
        params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=longest,
                                 max_seqlen_kv=longest)
        return model(batch["tokens"], batch["position_ids"], attention_mask=None, packed_seq_params=params)
    if batch["tokens"].is_cuda:  # the local spec's fused causal softmax would ignore the mask
        from megatron_apo.config import ConfigError

        raise ConfigError("trainer.pack_sequences on a GPU needs model.transformer_impl: transformer_engine "
                          "(Megatron's packed-sequence attention)")
    mask = packed_attention_mask(cu, batch["tokens"].shape[1])
    with _rope_at(model, batch["position_ids"]):
        return model(batch["tokens"], batch["position_ids"], attention_mask=mask)


def _gpt(model):
    while not hasattr(model, "rotary_pos_emb") and hasattr(model, "module"):  # DDP / Float16Module wrappers
        model = model.module
    return model


def _uses_transformer_engine(model) -> bool:
    gpt = _gpt(model)
    if not hasattr(gpt, "_apo_te"):
        gpt._apo_te = any(type(m).__module__.startswith("megatron.core.extensions.transformer_engine")
                          for m in gpt.modules())
    return gpt._apo_te


@contextlib.contextmanager
def _rope_at(model, position_ids: torch.Tensor):
    """Megatron's RoPE (bshd) rotates by the index in the row; packed rows need each token's own position: the
    rotary table [S, 1, 1, D] becomes [S, b, 1, D] gathered at `position_ids` [b, S] for this forward."""
    rope = getattr(_gpt(model), "rotary_pos_emb", None)
    if rope is None:
        yield
        return

    def at_positions(_module, _args, out):
        table = out[:, 0, 0, :]
        return table[position_ids.to(table.device).t()].unsqueeze(2)

    handle = rope.register_forward_hook(at_positions)
    try:
        yield
    finally:
        handle.remove()


def forward_backward(
    model_chunks: Sequence[torch.nn.Module],
    micro_batches: Sequence[dict],
    loss_fn: Callable[[dict, torch.Tensor], tuple[torch.Tensor, dict]],
    seq_length: int,
    micro_batch_size: int,
    forward_only: bool = False,
    variable_seq_lengths: bool = False,
) -> list[dict]:
    """Runs every micro-batch through Megatron's schedule for the current PP layout.

    Each micro-batch dict is moved (in place) to the model's device before its forward.
    `loss_fn(batch, logits) -> (scalar_loss, metrics)` runs on the last pipeline stage only; the
    schedule divides each micro-batch loss by the number of micro-batches (so gradients are the
    mean over micro-batches). Returns the per-micro-batch metric dicts on the last stage, [] elsewhere.
    `variable_seq_lengths`: the micro-batches differ in shape (token-budget micro-batches); with pipeline
    parallelism Megatron's p2p then sends each activation's shape ahead of it (its config's
    `variable_seq_lengths`), `seq_length` / `micro_batch_size` only size the first guess.
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func

    batches = list(micro_batches)

    def forward_step(data_iterator, model):
        batch = to_device(next(data_iterator), model_device(model))  # the one place batches reach the device
        output = model_forward(model, batch)
        return output, partial(_loss_wrapper, loss_fn, batch)

    n_chunks = len(model_chunks)
    iterators: Any = iter(batches) if n_chunks == 1 else [iter(batches) for _ in range(n_chunks)]
    fb = get_forward_backward_func()
    with _variable_shapes(model_chunks[0], variable_seq_lengths):
        return fb(
            forward_step_func=forward_step,
            data_iterator=iterators,
            model=list(model_chunks) if n_chunks > 1 else model_chunks[0],
            num_microbatches=len(batches),
            seq_length=seq_length,
            micro_batch_size=micro_batch_size,
            forward_only=forward_only,
        )


@contextlib.contextmanager
def _variable_shapes(model, on: bool):
    """Turns on megatron-core's `variable_seq_lengths` (p2p shape exchange) for one schedule call."""
    from megatron.core.utils import get_model_config

    config = get_model_config(model)
    before = config.variable_seq_lengths
    config.variable_seq_lengths = before or on
    try:
        yield
    finally:
        config.variable_seq_lengths = before


def _loss_wrapper(loss_fn, batch, output_tensor):
    loss, metrics = loss_fn(batch, output_tensor)
    # Megatron divides the returned loss by num_microbatches in place: report a detached clone.
    metrics = {k: (v.detach().clone() if torch.is_tensor(v) else v) for k, v in metrics.items()}
    return loss, metrics


def lm_batches(tokens: torch.Tensor, micro_batch_size: int) -> Iterable[dict]:
    """Next-token-prediction micro-batches from a [N, S+1] token tensor."""
    n, s1 = tokens.shape
    pos = torch.arange(s1 - 1).unsqueeze(0)
    for i in range(0, n, micro_batch_size):
        chunk = tokens[i : i + micro_batch_size]
        yield {
            "tokens": chunk[:, :-1].contiguous(),
            "labels": chunk[:, 1:].contiguous(),
            "position_ids": pos.expand(chunk.shape[0], -1).contiguous(),
        }


def lm_loss(batch: dict, logits: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Mean next-token cross-entropy on vocab-sharded logits [b, s, V/TP]; over `batch["loss_mask"]` if given."""
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    # vocab_parallel_cross_entropy overwrites its input: give it a copy (keeps autograd intact).
    losses = vocab_parallel_cross_entropy(logits.float().clone(), batch["labels"])
    m = batch.get("loss_mask")
    loss = losses.mean() if m is None else (losses * m).sum() / m.sum().clamp(min=1)
    return loss, {"lm_loss": loss}
