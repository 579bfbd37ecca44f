"""Vocab-parallel ops at TP 1 (no process group), 2 and 4 (gloo processes) against a dense fp32 reference.

Tolerance: fp32 values and gradients within 1e-5 x max(1, max|dense|); bf16 inputs: values (computed in
fp32 from the bf16 logits) within the same bound, gradients (returned in bf16) within one bf16 ulp
(2^-8 x max(1, max|dense|)). Top-K ids must match exactly (ties: lower global id first).
"""

from __future__ import annotations

import pytest
import torch

from megatron_apo.ops.vocab_parallel import vocab_parallel_logprobs, vocab_parallel_topk
from megatron_apo.parallel import run_distributed
from tests.helpers.vocab_parallel_bodies import ops_body, ops_body_explicit_group, run_ops_case

PADDED_VOCAB = 48  # divisible by 1, 2, 4: shard widths 48, 24, 12
TOL = 1e-5


def make_case(seed: int, vocab_size: int = 43, b: int = 2, t: int = 5, k: int = 16, ties: bool = True, **extra) -> dict:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, t, PADDED_VOCAB, generator=g) * 2.0
    if ties:  # coarse values: many exact ties, inside shards, across shards and at the Top-K boundary
        logits = torch.round(logits * 2.0) / 2.0
        logits[0, 0] = 0.25  # one position where every id ties
    logits[..., vocab_size:] = 7.0  # padded ids hold large garbage: must carry no mass and never be chosen
    case = dict(
        logits=logits, vocab_size=vocab_size, k=k,
        targets=torch.randint(0, vocab_size, (b, t), generator=g),
        gather_idx=torch.randint(0, vocab_size, (b, t, 6), generator=g),
        w_logprobs=torch.randn(b, t, generator=g), w_entropy=torch.randn(b, t, generator=g),
        w_topk=torch.randn(b, t, k, generator=g), w_gather=torch.randn(b, t, 6, generator=g),
    )
    case["gather_idx"][..., -1] = case["gather_idx"][..., 0]  # a repeated id: gradients must add up
    case.update(extra)
    return case


def masked_case(seed: int) -> dict:
    case = make_case(seed, chunk_size=3, tile_elems=40)
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[0, 3:] = False
    mask[1, 0] = False
    case["logits"][~mask] = float("nan")  # whatever sits at padding must not leak
    case["targets"] = torch.where(mask, case["targets"], torch.full_like(case["targets"], -100))
    case["mask"] = mask
    return case


CASES = {
    "fp32_ties_padded_k_ge_shard": make_case(0, k=16),  # K=16 > shard width 12 at TP=4
    "k_exceeds_two_shards": make_case(1, k=30, ties=False),  # K=30 > 24 (TP=2) and 2.5 shards at TP=4
    "chunked_tiled_strided": make_case(2, k=5, chunk_size=3, strided=True, tile_elems=30),  # 1-2 rows a tile
    "masked_nan_padding": masked_case(3),
    "bf16": make_case(4, k=8, dtype=torch.bfloat16),
    "ranks_all_padding": make_case(5, vocab_size=10, k=10),  # at TP=4, ranks 1..3 own only padded ids
}


# --------------------------------------------------------------------------------------------------------
# dense single-process reference


def dense_reference(case: dict) -> dict:
    dtype = case.get("dtype", torch.float32)
    v = case["vocab_size"]
    full = case["logits"].to(dtype).float()
    mask = case.get("mask")
    if mask is None:
        mask = torch.ones(full.shape[:-1], dtype=torch.bool)
    out = {}

    def run(name, fn, weights):
        x = torch.where(mask.unsqueeze(-1), full, torch.zeros_like(full)).requires_grad_()
        logp = torch.log_softmax(x[..., :v], dim=-1)
        vals, extra = fn(logp)
        vals = torch.where(mask.reshape(mask.shape + (1,) * (vals.dim() - mask.dim())), vals, torch.zeros_like(vals))
        (vals * weights).sum().backward()
        out[name] = {"values": vals.detach(), "grad": x.grad, **extra}

    targets = torch.where(mask, case["targets"], torch.zeros_like(case["targets"]))
    run("logprobs", lambda lp: (lp.gather(-1, targets.unsqueeze(-1)).squeeze(-1), {}), case["w_logprobs"])
    run("entropy", lambda lp: (-(lp.exp() * lp).sum(-1), {}), case["w_entropy"])

    def topk(lp):
        order = torch.sort(lp.detach(), dim=-1, descending=True, stable=True).indices[..., : case["k"]]
        return lp.gather(-1, order), {"indices": order}

    run("topk", topk, case["w_topk"])
    run("gather", lambda lp: (lp.gather(-1, case["gather_idx"]), {}), case["w_gather"])
    return out


def _close(got: torch.Tensor, want: torch.Tensor, rel: float, what: str) -> None:
    scale = max(1.0, want.abs().max().item())
    diff = (got.float() - want.float()).abs().max().item()
    assert diff <= rel * scale, f"{what}: max diff {diff:.3g} > {rel:g} x {scale:.3g}"


def check_against_dense(name: str, case: dict, per_rank: list[dict]) -> None:
    ref = dense_reference(case)
    tp = len(per_rank)
    width = PADDED_VOCAB // tp
    bf16 = case.get("dtype") == torch.bfloat16
    mask = case.get("mask")
    for op in ("logprobs", "entropy", "topk", "gather"):
        for rank, res in enumerate(per_rank):
            got = res[op]
            assert torch.isfinite(got["values"]).all() and torch.isfinite(got["grad"]).all(), f"{name}/{op}: NaN or inf"
            # identical on every rank, bit for bit
            assert torch.equal(got["values"], per_rank[0][op]["values"]), \
                f"{name}/{op}: rank {rank} differs from rank 0"
            _close(got["values"], ref[op]["values"], TOL, f"{name}/{op} values (TP={tp}, rank {rank})")
            if op == "topk":
                idx, want = got["indices"], ref[op]["indices"]
                if mask is not None:
                    idx, want = idx[mask], want[mask]
                assert torch.equal(idx, want), f"{name}/topk indices (TP={tp}, rank {rank})"
                assert int(got["indices"].max()) < case["vocab_size"], "a padded id was chosen"
            dense_grad = torch.zeros(ref[op]["grad"].shape[:-1] + (PADDED_VOCAB,))
            dense_grad[..., : case["vocab_size"]] = ref[op]["grad"][..., : case["vocab_size"]]
            want_grad = dense_grad[..., rank * width : (rank + 1) * width]
            _close(got["grad"], want_grad, 2.0**-8 if bf16 else TOL, f"{name}/{op} grad (TP={tp}, rank {rank})")
        assert ref[op]["grad"].abs().max() > 0


# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CASES))
def test_tp1_without_process_group_equals_dense(name):
    assert not torch.distributed.is_initialized()
    check_against_dense(name, CASES[name], [run_ops_case(CASES[name], rank=0, tp=1)])


@pytest.mark.parametrize("tp", [2, 4])
def test_tp_ranks_equal_dense(tp):
    names = list(CASES)
    if tp == 2:  # group=None: Megatron's TP group after init_distributed
        results = run_distributed(ops_body, tp, tp, [CASES[n] for n in names], timeout=240)
    else:  # an explicit group= and no Megatron state
        results = run_distributed(ops_body_explicit_group, tp, [CASES[n] for n in names], timeout=240)
    assert [r["rank"] for r in results] == list(range(tp))
    for i, name in enumerate(names):
        check_against_dense(name, CASES[name], [r["results"][i] for r in results])


def test_ties_prefer_lower_global_id():
    logits = torch.zeros(1, 10)
    logits[0, [2, 7, 9]] = 1.0
    idx, lp = vocab_parallel_topk(logits, 4)
    assert idx.tolist() == [[2, 7, 9, 0]]
    assert torch.allclose(lp.exp().sum(), torch.tensor(3 * torch.e + 1) / (3 * torch.e + 7))


def test_masked_positions_skip_work_and_grads():
    logits = torch.randn(3, 4, 20, requires_grad=True)
    mask = torch.zeros(3, 4, dtype=torch.bool)
    mask[1, 2] = True
    lp = vocab_parallel_logprobs(logits, torch.full((3, 4), 5), mask=mask)
    lp.sum().backward()
    assert (lp[~mask] == 0).all() and lp[1, 2] < 0
    assert (logits.grad[~mask] == 0).all() and logits.grad[1, 2].abs().sum() > 0


def test_bad_arguments_raise_value_error_naming_them():
    x = torch.randn(2, 3, 16)
    with pytest.raises(ValueError, match="k must be a positive integer"):
        vocab_parallel_topk(x, 0)
    with pytest.raises(ValueError, match="exceeds the vocabulary size 12"):
        vocab_parallel_topk(x, 13, vocab_size=12)
    with pytest.raises(ValueError, match="vocab_size=17"):
        vocab_parallel_topk(x, 2, vocab_size=17)
    with pytest.raises(ValueError, match="targets must be global token ids in \\[0, 12\\)"):
        vocab_parallel_logprobs(x, torch.full((2, 3), 12), vocab_size=12)
    with pytest.raises(ValueError, match="chunk_size"):
        vocab_parallel_logprobs(x, torch.zeros(2, 3, dtype=torch.long), chunk_size=0)


def test_fused_stats_equal_the_separate_ops():
    from megatron_apo.ops.vocab_parallel import (
        vocab_parallel_entropy,
        vocab_parallel_gather_logprobs,
        vocab_parallel_logprob_stats,
    )

    case = CASES["fp32_ties_padded_k_ge_shard"]
    x, v = case["logits"], case["vocab_size"]
    st = vocab_parallel_logprob_stats(x, case["gather_idx"], topk=case["k"], vocab_size=v)
    idx, lp = vocab_parallel_topk(x, case["k"], vocab_size=v)
    assert torch.equal(st.topk_indices, idx) and torch.equal(st.topk_logprobs, lp)
    assert torch.equal(st.logprobs, vocab_parallel_gather_logprobs(x, case["gather_idx"], vocab_size=v))
    assert torch.allclose(st.entropy, vocab_parallel_entropy(x, vocab_size=v), rtol=0, atol=1e-6)
    assert torch.equal(st.top1_logprob, lp[..., 0])
