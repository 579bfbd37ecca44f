"""Token-budget and packed micro-batches (trainer/batch.py): layout, DP balance, the global loss normalisers."""

from __future__ import annotations

import pytest
import torch

from megatron_apo.algorithms.losses.common import aggregate_loss
from megatron_apo.config import ConfigError, TrainerSection
from megatron_apo.trainer.batch import (
    global_loss_scale,
    packed_attention_mask,
    plan_micro_batches,
    sequence_lengths,
)
from tests.helpers.packing_bodies import AGG_MODES, long_tailed_batch


def test_default_is_todays_padded_layout():
    batch = long_tailed_batch(250)
    plan = plan_micro_batches(batch, 1, 2, micro_batch_size=2, mini_batch_size=4)
    assert [tuple(mb["tokens"].shape) for mb in plan.micro] == [(2, batch.tokens.shape[1])] * 2
    assert torch.equal(plan.micro[0]["tokens"], batch.tokens[4:6]) and plan.mini == [slice(0, 1), slice(1, 2)]
    assert not plan.variable and "agg_norm" not in plan.micro[0]


@pytest.mark.parametrize("pack", [False, True])
@pytest.mark.parametrize("dp", [1, 2])
def test_token_budget_micro_batches_hold_every_sample_once_within_the_budget(pack, dp):
    batch = long_tailed_batch(250)
    lengths = sequence_lengths(batch)
    plans = [plan_micro_batches(batch, r, dp, 2, mini_batch_size=4, micro_batch_tokens=32, pack=pack)
             for r in range(dp)]
    # every DP rank runs the same number of micro-batches in each mini-batch (lockstep schedule and all-reduce)
    assert len({tuple((s.start, s.stop) for s in p.mini) for p in plans}) == 1
    seen = []
    for plan in plans:
        for mb in plan.micro:
            rows, s = mb["tokens"].shape
            real = (mb["response_mask"].sum(-1) > 0)
            n = len(mb["response_mask"])
            if pack:
                assert rows == 1 and s <= max(32, int(lengths.max()) + 7)
            else:
                assert rows == n and (n == 1 or rows * s <= 32)
            # response token j is predicted at resp_index[j]: the token after it in the row is the response token
            row = mb["resp_row"] if pack else torch.arange(n)
            for i in range(n):
                k = int(mb["response_mask"][i].sum())
                got = mb["tokens"][row[i], mb["resp_index"][i, :k] + 1]
                assert torch.equal(got, mb["response_ids"][i, :k])
            seen += [tuple(mb["response_ids"][i, : int(mb["response_mask"][i].sum())].tolist()) for i in range(n)
                     if real[i]]
            assert mb["agg_norm"].shape == (3,)
    assert sorted(seen) == sorted(tuple(r[: int(m.sum())].tolist()) for r, m in zip(batch.response_ids,
                                                                                 batch.response_mask))


def test_packed_rows_restart_positions_and_attend_within_each_sample():
    batch = long_tailed_batch(250)
    plan = plan_micro_batches(batch, 0, 1, 2, 0, micro_batch_tokens=48, pack=True)
    mb = plan.micro[0]
    cu = mb["cu_seqlens"].tolist()
    pos = mb["position_ids"][0]
    for a, b in zip(cu[:-1], cu[1:]):
        assert torch.equal(pos[a:b], torch.arange(b - a))
    mask = packed_attention_mask(mb["cu_seqlens"], mb["tokens"].shape[1])[0, 0]  # True = masked
    a, b = cu[1], cu[2]
    assert not mask[b - 1, a] and mask[b - 1, a - 1]  # sees its own first token, not the sample before
    assert mask[a, a + 1]  # causal inside a sample


def test_global_normaliser_of_the_split_equals_the_whole_mini_batch():
    """Summing each micro-batch's aggregate times its scale gives the aggregate over the whole mini-batch."""
    batch = long_tailed_batch(250)
    values = torch.randn(batch.response_mask.shape, generator=torch.Generator().manual_seed(1))
    for mode in AGG_MODES:
        want = aggregate_loss(values, batch.response_mask, mode)
        plan = plan_micro_batches(batch, 0, 1, 2, 0, micro_batch_tokens=24)
        got = 0.0
        for mb in plan.micro:
            # the micro-batch's samples, found back by their response ids
            t = mb["response_ids"].shape[1]
            idx = [next(j for j in range(batch.size)
                        if torch.equal(batch.response_ids[j, :t], r) and batch.response_mask[j].sum() == m.sum())
                   for r, m in zip(mb["response_ids"], mb["response_mask"])]
            v = values[idx][:, : mb["response_mask"].shape[1]]
            share = aggregate_loss(v, mb["response_mask"], mode) * global_loss_scale(mb["response_mask"], mode,
                                                                                    mb["agg_norm"])
            got += float(share) / len(plan.micro)  # Megatron divides each micro-batch loss by their number
        assert len(plan.micro) > 2 and got == pytest.approx(float(want), rel=1e-5), mode


def test_a_rank_with_too_few_samples_gets_an_empty_micro_batch():
    batch = long_tailed_batch(250, n=4)  # lengths: one long sample outweighs the other three
    plans = [plan_micro_batches(batch, r, 2, 1, 0, micro_batch_tokens=8) for r in range(2)]
    assert len(plans[0].micro) == len(plans[1].micro)
    empty = [mb for p in plans for mb in p.micro if mb["response_mask"].sum() == 0]
    assert all(float(mb["advantages"].abs().sum()) == 0 for mb in empty)


def test_pack_sequences_needs_a_token_budget():
    with pytest.raises(ConfigError, match="micro_batch_tokens"):
        TrainerSection(pack_sequences=True).validate()
    with pytest.raises(ConfigError, match="micro_batch_tokens"):
        TrainerSection(micro_batch_tokens=-1).validate()
    TrainerSection(pack_sequences=True, micro_batch_tokens=4096).validate()


def test_rope_runs_at_each_tokens_own_position_in_a_packed_row():
    """RoPE is relative, so a packed sample's logits barely change at an offset; the rotary table is still what
    Megatron's THD path gives: row position p of sample k rotates by p - start_k."""
    from megatron_apo.trainer.schedule import _rope_at

    class Table(torch.nn.Module):  # Megatron's RotaryEmbedding(S) returns angles [S, 1, 1, D], row index x freqs
        def forward(self, s):
            return (torch.arange(s, dtype=torch.float32)[:, None] * torch.tensor([1.0, 0.1]))[:, None, None, :]

    model = torch.nn.Module()
    model.rotary_pos_emb = Table()
    positions = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2]])
    table = model.rotary_pos_emb(8)
    with _rope_at(model, positions):
        got = model.rotary_pos_emb(8)
    assert got.shape == (8, 1, 1, 2)
    assert torch.equal(got[:, 0, 0], table[positions[0], 0, 0]) and not torch.equal(got, table)
    assert torch.equal(model.rotary_pos_emb(8), table)  # only inside the context
