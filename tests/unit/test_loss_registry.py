"""The loss registry: every loss_mode is one registered function; the trainer's passes follow its declaration."""

import pytest
import torch

from megatron_apo.algorithms.losses import (
    POLICY_LOSS_REGISTRY,
    LossInputs,
    compute_policy_loss,
    loss_inputs,
    register_policy_loss,
)
from megatron_apo.config import AlgorithmConfig
from megatron_apo.trainer.passes import PassSettings


def test_builtin_modes_declare_their_inputs_and_kl_adds_ref_logprobs():
    assert {"vanilla", "apo_ratio", "casp"} <= set(POLICY_LOSS_REGISTRY)
    assert loss_inputs({"loss_mode": "vanilla"}) == LossInputs()
    assert loss_inputs({"loss_mode": "apo_ratio"}).ref_topk
    assert loss_inputs({"loss_mode": "casp"}).old_topn
    assert loss_inputs({"loss_mode": "vanilla", "use_kl_loss": True}).ref_logprobs
    s = PassSettings(AlgorithmConfig(loss_mode="casp"), vocab_size=10)
    assert s.inputs.old_topn and not s.inputs.ref_topk


def test_a_new_mode_is_one_registered_function():
    name = "test_half_vanilla"
    try:
        @register_policy_loss(name, LossInputs(ref_topk=True))
        def half(ctx):
            loss = 0.5 * ctx.agg(ctx.pg)
            return loss, {"pg_loss": loss.detach()}

        g = torch.Generator().manual_seed(0)
        logits = torch.randn(2, 3, 8, generator=g)
        ids = torch.randint(0, 8, (2, 3), generator=g)
        old = torch.log_softmax(logits, -1).gather(-1, ids[..., None])[..., 0]
        adv, mask = torch.tensor([[1.0] * 3, [-1.0] * 3]), torch.ones(2, 3)
        with pytest.raises(ValueError, match="ref_topk_indices"):  # the declaration is enforced
            compute_policy_loss(logits, ids, old, adv, mask, {"loss_mode": name})
        topk = torch.topk(logits, 8, dim=-1).indices
        got, _ = compute_policy_loss(logits, ids, old, adv, mask, {"loss_mode": name}, ref_topk_indices=topk)
        want, _ = compute_policy_loss(logits, ids, old, adv, mask, {"loss_mode": "vanilla"})
        assert torch.allclose(got, 0.5 * want)
        assert PassSettings(AlgorithmConfig(loss_mode=name), vocab_size=8).inputs.ref_topk
    finally:
        POLICY_LOSS_REGISTRY.pop(name, None)
    with pytest.raises(ValueError, match="algorithm.loss_mode"):
        loss_inputs({"loss_mode": name})


def test_builtin_names_match_the_registry():
    from megatron_apo.algorithms.settings import BUILTIN_LOSS_MODES

    assert set(BUILTIN_LOSS_MODES) <= set(POLICY_LOSS_REGISTRY)
