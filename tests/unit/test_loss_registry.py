"""The loss registry: every loss_mode is one registered function; the trainer's passes compute what it declares."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_apo.algorithms.losses import (
    POLICY_LOSS_REGISTRY,
    LossInputs,
    compute_policy_loss,
    loss_inputs,
    register_policy_loss,
)
from megatron_apo.algorithms.registry import (
    BUILTIN_LOSS_MODES,
    check_loss_mode,
    import_loss_modules,
    required_inputs,
    resolve_algorithm_config,
)
from megatron_apo.config import AlgorithmConfig, ConfigError
from megatron_apo.trainer.passes import PassSettings

REPO = Path(__file__).resolve().parents[2]


def test_builtin_modes_declare_their_inputs_and_kl_adds_ref_logprobs():
    assert {"vanilla", "apo_ratio", "casp"} <= set(POLICY_LOSS_REGISTRY)
    assert required_inputs({"loss_mode": "vanilla"}) == LossInputs()
    assert loss_inputs({"loss_mode": "vanilla"}) == LossInputs(ref_logprobs=True)  # the ref_kl metric, every mode
    assert required_inputs({"loss_mode": "vanilla", "use_kl_loss": True}).ref_logprobs
    assert required_inputs({"loss_mode": "vanilla", "use_kl_loss_on_wrong": True}).ref_logprobs
    # APO: Z_ref and w_k (the reference's Top-K log-probs) in both forms; log pi_old at the anchors for the `old`
    # anchor ratio (the default) and the split form's M_old, not for the `ref` reading (M / Z_ref)
    assert loss_inputs({"loss_mode": "apo_ratio", "apo_topk": 5}) == LossInputs(
        ref_logprobs=True, ref_topk=5, ref_topk_logprobs=True, old_at_ref_topk=True)
    assert loss_inputs({"loss_mode": "apo_ratio", "apo_topk": 5, "apo_anchor_ratio": "ref"}) == LossInputs(
        ref_logprobs=True, ref_topk=5, ref_topk_logprobs=True)
    assert loss_inputs({"loss_mode": "apo_ratio", "apo_rectification": "split"}) == LossInputs(
        ref_logprobs=True, ref_topk=8, ref_topk_logprobs=True, old_at_ref_topk=True)
    assert loss_inputs({"loss_mode": "casp", "casp_topn": 4}) == LossInputs(ref_logprobs=True, topn=4)
    # the anchor metrics add the reference Top-K, and nothing the loss would need
    assert loss_inputs({"loss_mode": "casp", "anchor_metrics": True}) == LossInputs(ref_logprobs=True, ref_topk=8,
                                                                                   topn=3)
    assert required_inputs({"loss_mode": "casp", "anchor_metrics": True}) == LossInputs(topn=3)
    s = PassSettings(AlgorithmConfig(loss_mode="casp"), vocab_size=10)
    assert s.inputs.topn == 3 and not s.inputs.ref_topk


def test_a_new_mode_is_one_registered_function():
    name = "test_half_vanilla"
    try:
        @register_policy_loss(name, LossInputs(ref_topk=2))
        def half(ctx):
            assert ctx.ref_topk_indices.shape[-1] == 2 and ctx.ref_topk_lp.shape[-1] == 2  # K as declared
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
        assert PassSettings(AlgorithmConfig(loss_mode=name), vocab_size=8).inputs.ref_topk == 2
        with pytest.raises(ValueError, match="registered twice"):
            register_policy_loss(name)(half)
    finally:
        POLICY_LOSS_REGISTRY.pop(name, None)
    with pytest.raises(ValueError, match="algorithm.loss_mode"):
        loss_inputs({"loss_mode": name})


def test_is_weights_scale_the_advantage():
    """One-step-off-policy's importance weights are a loss input: weights w give the loss of advantages A*w."""
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 4, 8, generator=g)
    ids = torch.randint(0, 8, (2, 4), generator=g)
    old = torch.log_softmax(logits + 0.5 * torch.randn(2, 4, 8, generator=g), -1).gather(-1, ids[..., None])[..., 0]
    adv, mask = torch.tensor([[0.7] * 4, [-1.3] * 4]), torch.ones(2, 4)
    w = torch.rand(2, 4, generator=g) * 2
    for mode in ("vanilla", "casp"):
        got, _ = compute_policy_loss(logits, ids, old, adv, mask, {"loss_mode": mode}, is_weights=w)
        want, _ = compute_policy_loss(logits, ids, old, adv * w, mask, {"loss_mode": mode})
        plain, _ = compute_policy_loss(logits, ids, old, adv, mask, {"loss_mode": mode})
        assert torch.equal(got, want) and not torch.allclose(got, plain)
        ones, _ = compute_policy_loss(logits, ids, old, adv, mask, {"loss_mode": mode}, is_weights=torch.ones(2, 4))
        assert torch.equal(ones, plain)


def test_builtin_names_match_the_registry():
    # other test modules register their own losses in this process (a user's module, the study's controls):
    # the built-ins are exactly the modes whose function lives in the package's losses
    builtin = {n for n, loss in POLICY_LOSS_REGISTRY.items()
               if loss.fn.__module__.startswith("megatron_apo.algorithms.losses")}
    assert set(BUILTIN_LOSS_MODES) == builtin


def test_loss_mode_is_checked_by_the_registry_not_the_dataclass():
    cfg = AlgorithmConfig(loss_mode="my_loss")
    cfg.validate()  # the dataclass checks its own ranges; the names belong to the registry
    with pytest.raises(ConfigError, match="algorithm.loss_mode='my_loss'.*algorithm.loss_modules"):
        check_loss_mode(cfg)
    with pytest.raises(ConfigError, match="algorithm.apo_topk=0"):
        resolve_algorithm_config({"apo_topk": 0})


def test_loss_modules_register_a_users_loss():
    name = "test_user_loss_module"  # registered by tests/helpers/user_loss.py
    cfg = AlgorithmConfig(loss_mode=name, loss_modules=["tests.helpers.user_loss"])
    try:
        import_loss_modules(cfg)
        check_loss_mode(cfg)
        assert loss_inputs(cfg).ref_topk == cfg.apo_topk
    finally:
        POLICY_LOSS_REGISTRY.pop(name, None)
        sys.modules.pop("tests.helpers.user_loss", None)
    with pytest.raises(ConfigError, match=r"^algorithm.loss_modules: cannot import 'no_such_pkg.loss' "):
        import_loss_modules(AlgorithmConfig(loss_modules=["no_such_pkg.loss"]))


def test_config_and_validation_stay_torch_free():
    """config.py imports nothing of megatron_apo.algorithms (no import circle), and validating a run config, loss
    mode included, loads neither torch nor the losses."""
    code = ("import sys; from megatron_apo.config import AlgorithmConfig; "
            "assert not [m for m in sys.modules if m.startswith('megatron_apo.algorithms')]; "
            "from megatron_apo.algorithms.registry import resolve_algorithm_config; "
            "resolve_algorithm_config({'loss_mode': 'casp'}); "
            "assert 'torch' not in sys.modules and 'megatron_apo.algorithms.losses' not in sys.modules")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
