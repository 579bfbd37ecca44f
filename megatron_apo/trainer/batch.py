"""Turns fleet samples into padded training tensors, split into micro-batches.

Sequences are right-padded: [prompt | response | pad]. Response token j of sample b sits at position
prompt_len_b + j and is predicted by the logits at position prompt_len_b + j - 1 (`resp_index`), so no
attention mask is needed (causal attention never sees the right padding) and positions are 0..S-1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_apo.rollout.engine import Sample


@dataclass
class RLBatch:
    tokens: torch.Tensor  # [N, S] int64
    resp_index: torch.Tensor  # [N, T] int64: logit position predicting response token j
    response_ids: torch.Tensor  # [N, T] int64 (0 where masked)
    response_mask: torch.Tensor  # [N, T] float
    rollout_logprobs: torch.Tensor  # [N, T] float: the engine's log-probs (sampling distribution)
    rewards: torch.Tensor  # [N] float
    advantages: torch.Tensor  # [N, T] float
    group_index: torch.Tensor  # [N] int64: which prompt the sample answers
    # MoE with an engine that reports it: [N, T, layers, k] int64 experts the rollout routed response token j's
    # predicting position to (-1 past the response); None otherwise
    rollout_experts: torch.Tensor | None = None

    @property
    def size(self) -> int:
        return self.tokens.shape[0]

    def select(self, idx: torch.Tensor | slice) -> "RLBatch":
        return RLBatch(**{k: _rows(getattr(self, k), idx) for k in self.__dataclass_fields__})

    def micro_batches(self, micro_batch_size: int) -> list[dict]:
        """Micro-batch dicts for the Megatron schedule. The passes only read them; `mb_index` (the position in this
        list) keys each pass's outputs (trainer/passes.py)."""
        out = []
        s = self.tokens.shape[1]
        for i in range(0, self.size, micro_batch_size):
            mb = {k: _rows(getattr(self, k), slice(i, i + micro_batch_size)) for k in self.__dataclass_fields__}
            mb["position_ids"] = torch.arange(s).unsqueeze(0).expand(mb["tokens"].shape[0], -1).contiguous()
            mb["mb_index"] = len(out)
            out.append(mb)
        return out


def build_batch(
    prompts: list[list[int]],
    samples: list[list[Sample]],
    rewards: torch.Tensor,
    advantages: torch.Tensor,
    pad_id: int = 0,
    seq_multiple: int = 8,
) -> RLBatch:
    """`samples[p]` are the n samples of `prompts[p]`; `rewards`/`advantages` are per sample, flattened [P*n]."""
    flat = [(p, s) for p, group in enumerate(samples) for s in group]
    n = len(flat)
    t = max(1, max(len(s.token_ids) for _, s in flat))
    s_len = max(len(prompts[p]) + len(s.token_ids) for p, s in flat)
    s_len = ((s_len + seq_multiple - 1) // seq_multiple) * seq_multiple  # friendlier shapes; TP/SP need a multiple
    tokens = torch.full((n, s_len), pad_id, dtype=torch.long)
    resp_index = torch.zeros((n, t), dtype=torch.long)
    response_ids = torch.zeros((n, t), dtype=torch.long)
    mask = torch.zeros((n, t))
    rollout_lp = torch.zeros((n, t))
    group = torch.zeros(n, dtype=torch.long)
    for i, (p, smp) in enumerate(flat):
        pl, rl = len(prompts[p]), len(smp.token_ids)
        tokens[i, :pl] = torch.tensor(prompts[p])
        tokens[i, pl : pl + rl] = torch.tensor(smp.token_ids, dtype=torch.long)
        resp_index[i] = (pl - 1 + torch.arange(t)).clamp(max=s_len - 1)
        response_ids[i, :rl] = torch.tensor(smp.token_ids, dtype=torch.long)
        mask[i, :rl] = 1.0
        rollout_lp[i, :rl] = torch.tensor(smp.logprobs, dtype=torch.float32)
        group[i] = p
    adv = advantages.reshape(n, 1).float() * mask
    return RLBatch(tokens, resp_index, response_ids, mask, rollout_lp, rewards.reshape(n).float(), adv, group,
                   _rollout_experts(flat, t))


def _rows(t: torch.Tensor | None, idx):
    return None if t is None else t[idx]


def _rollout_experts(flat: list, t: int) -> torch.Tensor | None:
    routed = [s.meta.get("routed_experts") for _, s in flat]
    if not routed or not all(routed):  # a dense model, or an engine that does not report routing
        return None
    layers, k = len(routed[0][0]), len(routed[0][0][0])
    out = torch.full((len(flat), t, layers, k), -1, dtype=torch.long)
    for i, r in enumerate(routed):
        out[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    return out


def response_logits(logits: torch.Tensor, resp_index: torch.Tensor) -> torch.Tensor:
    """[b, S, V/TP] vocab-sharded logits -> [b, T, V/TP] at the positions that predict response tokens."""
    return logits.gather(1, resp_index.unsqueeze(-1).expand(-1, -1, logits.shape[-1]))
