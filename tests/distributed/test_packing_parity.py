"""Token-budget and packed micro-batches give the padded run's loss and gradients (every aggregation mode, with its
global normaliser) on one rank, at TP 2 and at PP 2 (gloo, fp32)."""

import pytest
import torch

from megatron_apo.parallel import run_distributed
from tests.helpers.packing_bodies import AGG_MODES, losses_and_grads, packed_row_logits, packed_row_logits_cuda

pytestmark = pytest.mark.slow


def _merge(results) -> dict:
    """Per (mode, layout): the last stage's loss and every stage's gradients (TP rank 0's gathered copy)."""
    out = {}
    for r in results:
        if r["tp_rank"] != 0:
            continue
        for key, v in r.items():
            if isinstance(key, tuple):
                got = out.setdefault(key, {"loss": None, "grads": {}, "shapes": v["shapes"]})
                got["grads"].update({k: torch.from_numpy(g) for k, g in v["grads"].items()})
                got["loss"] = v["loss"] if v["loss"] is not None else got["loss"]
    return out


@pytest.fixture(scope="module")
def dense():
    return _merge(run_distributed(losses_and_grads, 1, 1, 1, timeout=600))


@pytest.fixture(scope="module", params=[(2, 1), (1, 2)], ids=["tp2", "pp2"])
def parallel(request):
    tp, pp = request.param
    return _merge(run_distributed(losses_and_grads, 2, tp, pp, timeout=600))


def _assert_same(got: dict, want: dict):
    assert got["loss"] == pytest.approx(want["loss"], abs=1e-5)
    assert sorted(got["grads"]) == sorted(want["grads"])
    for name, g in want["grads"].items():
        diff = (got["grads"][name] - g).abs().max().item()
        assert diff <= 1e-5 * max(1.0, g.abs().max().item()), (name, diff)


@pytest.mark.parametrize("mode", AGG_MODES)
def test_token_budget_and_packing_keep_loss_and_gradients(dense, parallel, mode):
    want = dense[(mode, "padded")]
    assert len(want["shapes"]) == 1  # the reference: the whole mini-batch in one padded micro-batch
    assert any(g.abs().max() > 1e-4 for g in want["grads"].values()) and want["loss"] != 0
    for layout in ("tokens", "packed"):
        got = dense[(mode, layout)]
        assert len(got["shapes"]) > 1 and len(set(got["shapes"])) > 1  # several micro-batches of different shapes
        _assert_same(got, want)
        _assert_same(parallel[(mode, layout)], want)
    _assert_same(parallel[(mode, "padded")], want)


def test_a_packed_row_gives_each_sample_its_own_logits():
    """The block-diagonal mask is what keeps samples apart: without it the later samples' logits change."""
    got = run_distributed(packed_row_logits, 1, timeout=300)[0]
    assert got["masked"] <= 1e-5 and got["unmasked"] > 1e-3


@pytest.mark.gpu
def test_a_packed_row_through_megatrons_thd_path_on_gpu():
    """Transformer Engine's packed-sequence attention (THD, cu_seqlens): each sample's logits as if alone (bf16)."""
    got = run_distributed(packed_row_logits_cuda, 1, timeout=300)[0]
    assert got["te"]
    assert got["worst"] <= 0.05 * max(1.0, got["scale"])
