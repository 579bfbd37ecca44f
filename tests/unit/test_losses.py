"""compute_policy_loss at TP 1 and 2 against a dense reference written here from the spec (docs/algorithms.md).

Tolerance: loss and every metric within 1e-5 x max(1, |dense|); gradient w.r.t. each rank's logits shard
within 1e-5 x max(1, max|dense grad|) of that slice of the dense gradient (fp32).
"""

from __future__ import annotations

import pytest
import torch

from megatron_apo.algorithms.losses import compute_policy_loss
from megatron_apo.config import AlgorithmConfig
from megatron_apo.parallel import run_distributed
from tests.helpers.vocab_parallel_bodies import loss_body, run_loss_case

B, T, VOCAB, PADDED = 4, 6, 37, 40
TOL = 1e-5


# --------------------------------------------------------------------------------------------------------
# dense reference (full vocabulary, plain autograd), straight from the spec (docs/algorithms.md)


def _agg(v, m, mode):
    if mode == "token-mean":
        return (v * m).sum() / (m.sum() + 1e-8)
    if mode == "seq-mean-token-sum":
        return (v * m).sum(-1).mean()
    if mode == "seq-mean-token-mean":
        return ((v * m).sum(-1) / m.sum(-1)).mean()
    assert mode == "seq-mean-token-sum-norm"
    return (v * m).sum() / m.shape[-1]


def _kl(lp, ref, kind):
    if kind in ("kl", "k1"):
        return lp - ref
    if kind == "abs":
        return (lp - ref).abs()
    if kind in ("mse", "k2"):
        return 0.5 * (lp - ref) ** 2
    d = torch.clamp(ref - lp, -20, 20)
    return torch.clamp(torch.exp(d) - d - 1, -10, 10)


def dense_policy_loss(case: dict):
    c = {**AlgorithmConfig().__dict__, **case["config"]}
    full = case["logits"].clone().requires_grad_()
    logp_all = torch.log_softmax(full[..., :VOCAB], dim=-1)
    y, A, m = case["ids"], case["advantages"], case["mask"].float()
    lp = logp_all.gather(-1, y[..., None])[..., 0]
    r = torch.exp(torch.clamp(lp - case["old_logprobs"], -20, 20))
    lo, hi = c["clip_ratio_low"], c["clip_ratio_high"]
    c1 = torch.maximum(-A * r, -A * torch.clamp(r, 1 - lo, 1 + hi))
    pg = torch.where(A >= 0, c1, torch.minimum(c1, -A * c["clip_ratio_c"]))
    agg = lambda v: _agg(v, m, c["loss_agg_mode"])  # noqa: E731
    metrics = {}
    if c["loss_mode"] == "vanilla":
        loss = agg(pg)
    elif c["loss_mode"] == "apo_ratio":
        K = c["apo_topk"]
        S_idx = case["ref_topk_indices"][..., :K]
        in_S = torch.ones_like(S_idx, dtype=torch.bool)
        if c["apo_exclude_sampled"]:
            in_S = S_idx != y[..., None]
        probs = logp_all.exp().gather(-1, S_idx)
        M = (probs * in_S).sum(-1)
        nonempty = in_S.any(-1)
        ref_S = case["ref_topk_logprobs"][..., :K].exp() * in_S  # pi_ref on S
        Z_ref = ref_S.sum(-1)
        tau = c["apo_min_anchor_mass"]
        pulled = nonempty & ~(Z_ref < tau)  # junk anchors (Z_ref < tau) get no pull
        neg = (m > 0) & (A < 0)
        gamma = c["apo_all_wrong_pull"]
        aw = case["all_wrong"].bool() & (m > 0) & pulled if gamma > 0 else torch.zeros_like(neg)
        if case.get("old_anchor_logprobs") is not None:
            old_S = case["old_anchor_logprobs"][..., :K]
        else:
            old_S = logp_all.gather(-1, S_idx).detach()
        if c["apo_rectification"] == "paper":
            # r~ = push*r - pull*r_anchor in the dual-clipped surrogate, for A < 0 only
            safe_Z = torch.where(nonempty, Z_ref, torch.ones_like(Z_ref))
            if c["apo_anchor_ratio"] == "ref":
                r_anchor = M / safe_Z
            else:  # sum_S (pi_ref/Z_ref) * pi/pi_old, each ratio clamped in log space
                lp_S = logp_all.gather(-1, S_idx)
                r_anchor = (ref_S / safe_Z[..., None] * torch.exp(torch.clamp(lp_S - old_S, -20, 20))).sum(-1)
            r_anchor = torch.where(nonempty, r_anchor, torch.zeros_like(r_anchor))
            rt = c["apo_push_coeff"] * r - c["apo_pull_coeff"] * torch.where(pulled, r_anchor, torch.zeros_like(M))
            rect = torch.minimum(torch.maximum(-A * rt, -A * torch.clamp(rt, 1 - lo, 1 + hi)), -A * c["clip_ratio_c"])
            token = torch.where(A < 0, rect, pg)
            l_aw = gamma * torch.maximum(-r_anchor, -torch.clamp(r_anchor, 1 - lo, 1 + hi))
            token = token + torch.where(aw, l_aw, torch.zeros_like(l_aw))
            loss = agg(token)
            metrics["apo/neg_grad_off_frac"] = ((rt < 1 - lo) | (rt > c["clip_ratio_c"]))[neg].float().mean()
            sel_r = r_anchor.detach()[neg & nonempty]
            metrics["apo/anchor_ratio"] = sel_r.median() if sel_r.numel() else torch.tensor(0.0)
        else:
            M_old = (old_S.exp() * in_S).sum(-1)
            logM = torch.log(torch.where(nonempty, M, torch.ones_like(M)))
            logM_old = torch.log(torch.where(nonempty, M_old, torch.ones_like(M_old)))
            rho = torch.exp(torch.clamp(logM - logM_old, -20, 20))
            form = c["apo_pull_form"]

            def pull_of(w):
                if form == "ratio_clip":
                    return torch.maximum(-w * rho, -w * torch.clamp(rho, 1 - lo, 1 + hi))
                if form == "ratio":
                    return -w * rho
                return -w * logM

            w = A.abs() if c["apo_pull_weight"] == "abs_adv" else torch.ones_like(A)
            pull = torch.where((A < 0) & pulled, pull_of(w), torch.zeros_like(w))
            token = torch.where(A < 0, c["apo_push_coeff"] * pg, pg)
            token = token + torch.where(aw, gamma * pull_of(torch.ones_like(A)), torch.zeros_like(A))
            loss = agg(token) + c["apo_pull_coeff"] * agg(pull)
            metrics["apo/neg_grad_off_frac"] = ((r < 1 - lo) | (r > c["clip_ratio_c"]))[neg].float().mean()
            off = rho > 1 + hi if form == "ratio_clip" else torch.zeros_like(neg)
            sel_p = neg & pulled
            metrics["apo/pull_grad_off_frac"] = off[sel_p].float().mean() if sel_p.any() else torch.tensor(0.0)
        junk_at = tau if tau > 0 else 1e-3
        metrics["apo/junk_anchor_frac"] = (Z_ref < junk_at)[neg].float().mean()
        metrics["apo/pulled_frac"] = (neg & pulled).float().sum() / m.sum()
        metrics["apo/safe_mass"] = M.detach()[neg & nonempty].mean()
        if gamma > 0:
            metrics["apo/all_wrong_frac"] = aw.float().sum() / m.sum()
        sel = (m > 0) & (A < 0) & nonempty
        metrics["anchor/safe_mass_wrong"] = M[sel].mean() if sel.any() else torch.tensor(0.0)
    else:  # casp, as SimKO: this pass's Top-N, pi_old's own Top-N log-probs rank by rank
        N = c["casp_topn"]
        top_lp, top_idx = torch.sort(logp_all, dim=-1, descending=True, stable=True)
        top_lp, top_idx = top_lp[..., :N], top_idx[..., :N]
        old_top = case["old_topk_logprobs"][..., :N] if case.get("old_topk_logprobs") is not None else top_lp.detach()
        r_i = torch.exp(top_lp - old_top)
        topk_sum = (r.detach()[..., None] / r_i.detach() * r_i).sum(-1)
        H = -(logp_all.exp() * logp_all).sum(-1).detach()
        w = torch.zeros_like(H)
        for b in range(H.shape[0]):  # per response: torch.quantile of its unmasked tokens' entropy
            q = torch.quantile(H[b][m[b] > 0], c["casp_entropy_quantile"])
            w[b] = ((H[b] > q) & (m[b] > 0)).float()
        r_mix = torch.where(A > 0, (1 - c["casp_alpha"] * w) * r + c["casp_alpha"] * w / N * topk_sum, r)
        top1 = (y == top_idx[..., 0]).float()
        A2 = torch.where(A < 0, A * (1 + c["casp_top1_gamma"] * w * top1), A)
        loss = agg(torch.maximum(-A2 * r_mix, -A2 * torch.clamp(r_mix, 1 - lo, 1 + hi)))
        metrics["casp/forking_frac"] = (w * m).sum() / m.sum()
        metrics["casp/top1_wrong_frac"] = (w * top1)[(m > 0) & (A < 0)].mean()
    if c["use_kl_loss"] or c["use_kl_loss_on_wrong"]:
        kl = _kl(lp, case["ref_logprobs"], c["kl_loss_type"])
        if c["use_kl_loss_on_wrong"]:
            kl = kl * (A < 0).float()
        loss = loss + c["kl_loss_coef"] * agg(kl)
    ent = -(logp_all.exp() * logp_all).sum(-1)
    if c["entropy_coeff"]:
        loss = loss - c["entropy_coeff"] * agg(ent)
    metrics["entropy"] = (ent * m).sum() / m.sum()
    metrics["ppo_kl"] = ((case["old_logprobs"] - lp) * m).sum() / m.sum()
    metrics["top1_prob"] = (logp_all.exp().amax(-1) * m).sum() / m.sum()
    loss.backward()
    grad = torch.zeros_like(full)
    grad[..., :VOCAB] = full.grad[..., :VOCAB]
    return loss.detach(), {k: float(torch.as_tensor(v).detach()) for k, v in metrics.items()}, grad


# --------------------------------------------------------------------------------------------------------
# random inputs


def make_inputs(seed: int, config: dict, all_adv_nonneg: bool = False, with_old_anchor: bool = True,
                with_old_topk: bool = True, all_wrong_row: int | None = None, flat_ref: bool = False) -> dict:
    """all_wrong_row: that response's group has no correct response (A = 0, `all_wrong`); flat_ref: the reference is
    flat at the last positions (Z_ref below 0.5 there: junk anchors)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, PADDED, generator=g) * 1.5
    logits[..., VOCAB:] = 9.0  # padded ids: garbage that must carry no probability
    old_logits = logits + 0.6 * torch.randn(B, T, PADDED, generator=g)  # off-policy: ratios get clipped
    ref_logits = logits + 0.8 * torch.randn(B, T, PADDED, generator=g)
    if flat_ref:
        ref_logits[:, 3:] *= 0.2
    old_all = torch.log_softmax(old_logits[..., :VOCAB], -1)
    ref_all = torch.log_softmax(ref_logits[..., :VOCAB], -1)
    ref_topk = torch.sort(ref_all, dim=-1, descending=True, stable=True).indices[..., :8]
    ids = torch.randint(0, VOCAB, (B, T), generator=g)
    ids[:, :2] = ref_topk[:, :2, 0]  # some sampled tokens inside the reference Top-K (excluded from S)
    adv = torch.tensor([1.2, -0.7, 0.4, -1.5])[:, None].expand(B, T).clone()
    if all_adv_nonneg:
        adv = adv.abs()
    mask = torch.ones(B, T)
    mask[0, 4:] = 0
    mask[2, 5:] = 0
    all_wrong = torch.zeros(B, T, dtype=torch.bool)
    if all_wrong_row is not None:
        adv[all_wrong_row] = 0.0
        all_wrong[all_wrong_row] = mask[all_wrong_row] > 0
    old_topk = torch.sort(old_all, dim=-1, descending=True, stable=True).indices[..., :4]
    ids[3, 1] = old_topk[3, 1, 0]  # a wrong response whose token is pi_old's top-1
    ids[1, 2:4] = logits[1, 2:4, :VOCAB].argmax(-1)  # wrong responses sampling pi's argmax (CaSP's extra push)
    ids[3, 3:] = logits[3, 3:, :VOCAB].argmax(-1)
    case = dict(
        logits=logits, vocab_size=VOCAB, ids=ids, advantages=adv, mask=mask, config=config,
        old_logprobs=old_all.gather(-1, ids[..., None])[..., 0],
        ref_logprobs=ref_all.gather(-1, ids[..., None])[..., 0],
        ref_topk_indices=ref_topk,
        ref_topk_logprobs=ref_all.gather(-1, ref_topk),
        old_anchor_logprobs=old_all.gather(-1, ref_topk) if with_old_anchor else None,
        old_topk_indices=old_topk if with_old_topk else None,
        old_topk_logprobs=old_all.gather(-1, old_topk) if with_old_topk else None,
        all_wrong=all_wrong,
    )
    return case


APO_FORMS = {"old": {"apo_anchor_ratio": "old"}, "ref": {"apo_anchor_ratio": "ref"},
             "split": {"apo_rectification": "split"}}

CASES = {
    "vanilla": make_inputs(0, {"loss_mode": "vanilla"}),
    "vanilla_kl_k1": make_inputs(1, {"loss_mode": "vanilla", "use_kl_loss": True, "kl_loss_type": "kl",
                                     "kl_loss_coef": 0.1}),
    "vanilla_kl_abs": make_inputs(2, {"loss_mode": "vanilla", "use_kl_loss": True, "kl_loss_type": "abs",
                                      "kl_loss_coef": 0.1}),
    "vanilla_kl_k2": make_inputs(3, {"loss_mode": "vanilla", "use_kl_loss": True, "kl_loss_type": "mse",
                                     "kl_loss_coef": 0.1}),
    "vanilla_kl_k3": make_inputs(4, {"loss_mode": "vanilla", "use_kl_loss": True, "kl_loss_type": "low_var_kl",
                                     "kl_loss_coef": 0.1}),
    "kl_on_wrong": make_inputs(5, {"loss_mode": "vanilla", "use_kl_loss_on_wrong": True, "kl_loss_coef": 0.2}),
    "apo_split": make_inputs(6, {"loss_mode": "apo_ratio", "apo_rectification": "split"}),
    "apo_ratio_indicator_onpolicy": make_inputs(7, {"loss_mode": "apo_ratio", "apo_rectification": "split",
                                                    "apo_pull_form": "ratio", "apo_pull_weight": "indicator",
                                                    "apo_pull_coeff": 0.5}, with_old_anchor=False),
    "apo_log_no_exclude_entropy": make_inputs(8, {"loss_mode": "apo_ratio", "apo_rectification": "split",
                                                  "apo_pull_form": "log", "apo_exclude_sampled": False,
                                                  "entropy_coeff": 0.01, "apo_topk": 5}),
    "apo_seq_mean_token_sum": make_inputs(9, {"loss_mode": "apo_ratio", "apo_rectification": "split",
                                              "loss_agg_mode": "seq-mean-token-sum"}),
    "apo_seq_mean_token_mean_kl": make_inputs(10, {"loss_mode": "apo_ratio", "apo_rectification": "split",
                                                   "loss_agg_mode": "seq-mean-token-mean", "use_kl_loss": True,
                                                   "kl_loss_coef": 0.1}),
    "apo_seq_mean_token_sum_norm": make_inputs(11, {"loss_mode": "apo_ratio", "apo_rectification": "split",
                                                    "loss_agg_mode": "seq-mean-token-sum-norm"}),
    "apo_default": make_inputs(14, {"loss_mode": "apo_ratio"}),  # the paper's ratio rectification
    "apo_paper_strong_pull_no_exclude": make_inputs(15, {"loss_mode": "apo_ratio", "apo_pull_coeff": 0.4,
                                                         "apo_exclude_sampled": False, "apo_topk": 5}),
    "apo_paper_seq_mean_token_mean_kl": make_inputs(16, {"loss_mode": "apo_ratio",
                                                         "loss_agg_mode": "seq-mean-token-mean",
                                                         "use_kl_loss": True, "kl_loss_coef": 0.1,
                                                         "entropy_coeff": 0.01}),
    "apo_paper_ref": make_inputs(18, {"loss_mode": "apo_ratio", "apo_anchor_ratio": "ref"}),
    "apo_paper_old_onpolicy_anchors": make_inputs(19, {"loss_mode": "apo_ratio", "apo_pull_coeff": 0.3},
                                                  with_old_anchor=False),
    **{f"apo_{form}_aw{gamma}_tau{tau}": make_inputs(
        40 + i, {"loss_mode": "apo_ratio", "apo_all_wrong_pull": gamma, "apo_min_anchor_mass": tau,
                 "apo_pull_coeff": 0.3, **APO_FORMS[form]}, all_wrong_row=2, flat_ref=True)
       for i, (form, gamma, tau) in enumerate((f, g, t) for f in APO_FORMS for g in (0.0, 1.0) for t in (0.0, 0.5))},
    "casp": make_inputs(12, {"loss_mode": "casp"}),
    "casp_onpolicy_low_quantile": make_inputs(13, {"loss_mode": "casp", "casp_topn": 4, "casp_alpha": 0.3,
                                                   "casp_top1_gamma": 0.5, "casp_entropy_quantile": 0.3},
                                              with_old_topk=False),
    "casp_seq_mean_token_sum": make_inputs(17, {"loss_mode": "casp", "casp_alpha": 0.5, "casp_entropy_quantile": 0.5,
                                                "loss_agg_mode": "seq-mean-token-sum"}),
}


def check_case(name: str, case: dict, per_rank: list[dict]) -> None:
    want_loss, want_metrics, want_grad = dense_policy_loss(case)
    tp = len(per_rank)
    width = PADDED // tp
    for rank, got in enumerate(per_rank):
        assert torch.isfinite(got["grad"]).all()
        assert abs(got["loss"].item() - want_loss.item()) <= TOL * max(1.0, abs(want_loss.item())), (name, rank)
        for key, want in want_metrics.items():
            assert abs(got["metrics"][key] - want) <= TOL * max(1.0, abs(want)), (name, key, got["metrics"][key], want)
        g_want = want_grad[..., rank * width : (rank + 1) * width]
        diff = (got["grad"] - g_want).abs().max().item()
        assert diff <= TOL * max(1.0, want_grad.abs().max().item()), (name, rank, diff)
    assert want_grad.abs().max() > 1e-4, name


@pytest.mark.parametrize("name", list(CASES))
def test_tp1_equals_dense(name):
    check_case(name, CASES[name], [run_loss_case(CASES[name], 0, 1)])


@pytest.mark.slow  # ~45 s on 2 cores: every case at TP 2 in one pair of gloo ranks
def test_tp2_equals_dense():
    names = list(CASES)
    results = run_distributed(loss_body, 2, 2, [CASES[n] for n in names], timeout=240)
    for i, name in enumerate(names):
        check_case(name, CASES[name], [r["results"][i] for r in results])


def test_clipping_is_exercised():
    got = run_loss_case(CASES["apo_default"], 0, 1)["metrics"]
    assert 0 < got["pg_clipfrac"] < 1 and got["apo/pulled_frac"] > 0 and got["anchor/sampled_in_topk"] > 0
    casp = run_loss_case(CASES["casp_onpolicy_low_quantile"], 0, 1)["metrics"]
    assert casp["casp/top1_wrong_frac"] > 0 and 0 < casp["casp/forking_frac"] < 1
    split = run_loss_case(CASES["apo_split"], 0, 1)["metrics"]
    assert 0 < split["apo/pull_grad_off_frac"] < 1 and 0 < split["apo/neg_grad_off_frac"] < 1
    paper = run_loss_case(CASES["apo_paper_strong_pull_no_exclude"], 0, 1)["metrics"]
    assert 0 < paper["apo/neg_grad_off_frac"] < 1 and paper["apo/anchor_ratio"] > 0
    for form in APO_FORMS:  # the knobs act in the grid's cases: junk anchors, all-wrong tokens
        got = run_loss_case(CASES[f"apo_{form}_aw1.0_tau0.5"], 0, 1)["metrics"]
        assert 0 < got["apo/junk_anchor_frac"] < 1 and got["apo/all_wrong_frac"] > 0, form


# --------------------------------------------------------------------------------------------------------
# properties from the spec


def _loss_and_grad(case, config):
    return run_loss_case({**case, "config": config}, 0, 1)


def test_apo_equals_vanilla_when_no_advantage_is_negative():
    case = make_inputs(20, {}, all_adv_nonneg=True)
    apo = _loss_and_grad(case, {"loss_mode": "apo_ratio"})
    van = _loss_and_grad(case, {"loss_mode": "vanilla"})
    assert torch.equal(apo["loss"], van["loss"]) and torch.equal(apo["grad"], van["grad"])


@pytest.mark.parametrize("form", list(APO_FORMS))
@pytest.mark.parametrize("tau", [0.0, 0.5])
def test_apo_with_no_pull_and_unit_push_is_vanilla(form, tau):
    case = make_inputs(21, {}, flat_ref=True)
    knobs = {"loss_mode": "apo_ratio", "apo_min_anchor_mass": tau, **APO_FORMS[form]}
    apo = _loss_and_grad(case, {**knobs, "apo_pull_coeff": 0.0, "apo_push_coeff": 1.0})
    van = _loss_and_grad(case, {"loss_mode": "vanilla"})
    assert torch.allclose(apo["loss"], van["loss"], rtol=0, atol=1e-7)
    assert torch.allclose(apo["grad"], van["grad"], rtol=0, atol=1e-7)
    pushed = _loss_and_grad(case, {**knobs, "apo_pull_coeff": 0.0})
    assert not torch.allclose(pushed["loss"], van["loss"])  # the 1.05 push does change the loss


def _safe_mass_wrong(logits, case):
    return run_loss_case({**case, "logits": logits, "config": {"loss_mode": "apo_ratio"}},
                         0, 1)["metrics"]["anchor/safe_mass_wrong"]


@pytest.mark.parametrize("form", ["ratio_clip", "ratio", "log"])
def test_pull_only_step_raises_safe_manifold_mass_on_wrong_responses(form):
    case = make_inputs(22, {}, with_old_anchor=False)  # on-policy: every form has the gradient -w grad log M
    cfg = {"loss_mode": "apo_ratio", "apo_rectification": "split", "apo_push_coeff": 0.0, "apo_pull_coeff": 1.0,
           "apo_pull_form": form}
    before = _safe_mass_wrong(case["logits"], case)
    got = _loss_and_grad(case, cfg)
    stepped = case["logits"] - 5.0 * got["grad"]  # token-mean over ~20 tokens: small per-token gradients
    after = _safe_mass_wrong(stepped, case)
    assert after > before + 1e-3, (before, after)


def test_paper_pull_raises_safe_manifold_mass_on_wrong_responses():
    # at pi = pi_old = pi_ref, r~ = 1.05 - 0.1 = 0.95 lies inside the clip: the pull's gradient is the
    # difference of the losses with and without it, and a step along it raises M on wrong responses
    case = make_inputs(24, {})
    lp = torch.log_softmax(case["logits"][..., :VOCAB], -1)
    topk = torch.sort(lp, dim=-1, descending=True, stable=True).indices[..., :8]
    case = {**case, "old_logprobs": lp.gather(-1, case["ids"][..., None])[..., 0], "ref_topk_indices": topk,
            "ref_topk_logprobs": lp.gather(-1, topk), "old_anchor_logprobs": lp.gather(-1, topk)}
    with_pull = _loss_and_grad(case, {"loss_mode": "apo_ratio"})
    assert with_pull["metrics"]["apo/neg_grad_off_frac"] == 0.0
    assert abs(with_pull["metrics"]["apo/anchor_ratio"] - 1.0) < 1e-5
    no_pull = _loss_and_grad(case, {"loss_mode": "apo_ratio", "apo_pull_coeff": 0.0})
    before = _safe_mass_wrong(case["logits"], case)
    after = _safe_mass_wrong(case["logits"] - 50.0 * (with_pull["grad"] - no_pull["grad"]), case)
    assert after > before + 1e-3, (before, after)


def test_paper_clip_removes_negative_gradients_when_pull_is_large():
    # r~ = 1.05 - 0.5 = 0.55 < 1 - 0.2 at pi = pi_old = pi_ref: the clip holds every A < 0 token constant
    case = make_inputs(25, {}, all_adv_nonneg=False)
    lp = torch.log_softmax(case["logits"][..., :VOCAB], -1)
    topk = torch.sort(lp, dim=-1, descending=True, stable=True).indices[..., :8]
    case = {**case, "old_logprobs": lp.gather(-1, case["ids"][..., None])[..., 0], "ref_topk_indices": topk,
            "ref_topk_logprobs": lp.gather(-1, topk), "old_anchor_logprobs": lp.gather(-1, topk),
            "advantages": -case["advantages"].abs()}
    for reading in ("old", "ref"):
        got = _loss_and_grad(case, {"loss_mode": "apo_ratio", "apo_pull_coeff": 0.5, "apo_anchor_ratio": reading})
        assert got["metrics"]["apo/neg_grad_off_frac"] == 1.0 and got["grad"].abs().max() == 0


POSITION_CASES = ["vanilla", "apo_default", "apo_paper_ref", "apo_split", "apo_paper_strong_pull_no_exclude",
                  "apo_ratio_indicator_onpolicy", "apo_old_aw1.0_tau0.5", "apo_split_aw1.0_tau0.5", "casp",
                  "casp_onpolicy_low_quantile"]


@pytest.mark.parametrize("name", POSITION_CASES + ["apo_neg_clipped"])
def test_position_metrics_count_the_tokens_whose_gradient_is_zero(name):
    """pos/*grad_off_frac_<i> against the definition: an A != 0 token's gradient is off exactly when the loss's
    gradient w.r.t. its logits is zero (KL and entropy terms off, which act on every token)."""
    import megatron_apo.study.controls  # noqa: F401 - registers apo_neg_clipped

    case = CASES["apo_default" if name == "apo_neg_clipped" else name]
    config = {**case["config"], "use_kl_loss": False, "use_kl_loss_on_wrong": False, "entropy_coeff": 0.0,
              "position_metrics": T + 1}  # one position past the end: no tokens there, metric 0
    if name == "apo_neg_clipped":
        config = {"loss_mode": "apo_neg_clipped"}
        config["position_metrics"] = T + 1
    got = run_loss_case({**case, "config": config}, 0, 1)
    off = got["grad"].abs().amax(-1) == 0  # [B, T]
    mask, adv = case["mask"] > 0, case["advantages"]
    seen_off = seen_on = False
    for i in range(T + 1):
        for key, sel in ((f"pos/grad_off_frac_{i}", adv != 0), (f"pos/neg_grad_off_frac_{i}", adv < 0)):
            at = (mask & sel)[:, i] if i < T else torch.zeros(B, dtype=torch.bool)
            want = off[:, i][at].float().mean().item() if at.any() else 0.0
            assert got["metrics"][key] == pytest.approx(want, abs=1e-6), (key, want, got["metrics"][key])
        if i < T:
            seen_off |= bool((off[:, i] & mask[:, i] & (adv[:, i] != 0)).any())
            seen_on |= bool((~off[:, i] & mask[:, i] & (adv[:, i] != 0)).any())
    assert seen_on and (seen_off or name.startswith("casp")), "the case must have tokens with the gradient on and off"


def test_position_metrics_are_off_by_default_and_validated():
    got = run_loss_case(CASES["apo_default"], 0, 1)["metrics"]
    assert not any(k.startswith("pos/") for k in got)
    with pytest.raises(ValueError, match="algorithm.position_metrics"):
        AlgorithmConfig(position_metrics=-1).validate()


def test_masked_positions_with_garbage_inputs_give_finite_loss_and_zero_grad():
    case = make_inputs(23, {})
    m = case["mask"].bool()
    case = {**case, "config": {"loss_mode": "apo_ratio", "use_kl_loss": True}}
    case["old_logprobs"] = torch.where(m, case["old_logprobs"], torch.full_like(case["old_logprobs"], float("nan")))
    case["ref_logprobs"] = torch.where(m, case["ref_logprobs"], torch.full_like(case["ref_logprobs"], float("inf")))
    case["ids"] = torch.where(m, case["ids"], torch.full_like(case["ids"], -100))
    got = run_loss_case(case, 0, 1)
    assert torch.isfinite(got["loss"]) and all(v == v for v in got["metrics"].values())
    assert (got["grad"][~m] == 0).all() and got["grad"][m].abs().sum() > 0


# --------------------------------------------------------------------------------------------------------
# bad settings: one ValueError naming the key


@pytest.mark.parametrize(
    "override, key",
    [
        ({"apo_topk": 0}, "apo_topk"),
        ({"casp_topn": -1}, "casp_topn"),
        ({"loss_mode": "ppo_plus"}, "loss_mode"),
        ({"loss_agg_mode": "mean"}, "loss_agg_mode"),
        ({"clip_ratio_low": 1.5}, "clip_ratio_low"),
        ({"clip_ratio_high": -0.1}, "clip_ratio_high"),
        ({"clip_ratio_c": 0.5}, "clip_ratio_c"),
        ({"kl_loss_type": "full"}, "kl_loss_type"),
        ({"apo_pull_form": "sqrt"}, "apo_pull_form"),
        ({"apo_topk_typo": 3}, "apo_topk_typo"),
    ],
)
def test_bad_settings_raise_value_error_naming_the_key(override, key):
    case = CASES["apo_default"]
    with pytest.raises(ValueError, match=f"algorithm.{key}"):
        run_loss_case({**case, "config": {**case["config"], **override}}, 0, 1)


def test_apo_without_reference_topk_names_the_argument():
    case = {**CASES["apo_default"], "ref_topk_indices": None, "old_anchor_logprobs": None}
    with pytest.raises(ValueError, match="ref_topk_indices"):
        run_loss_case(case, 0, 1)
    with pytest.raises(ValueError, match="ref_logprobs"):
        run_loss_case({**CASES["vanilla_kl_k3"], "ref_logprobs": None}, 0, 1)
    with pytest.raises(ValueError, match="algorithm.apo_topk=16"):
        run_loss_case({**CASES["apo_default"], "config": {"apo_topk": 16}}, 0, 1)


def test_accepts_the_dataclass_config():
    case = CASES["apo_default"]
    x = case["logits"][..., :PADDED].clone().requires_grad_()
    with pytest.raises(ValueError, match="ref_topk_logprobs"):  # the default (paper) form needs Z_ref
        compute_policy_loss(x, case["ids"], case["old_logprobs"], case["advantages"], case["mask"], AlgorithmConfig(),
                            ref_topk_indices=case["ref_topk_indices"], vocab_size=VOCAB)
    loss, metrics = compute_policy_loss(
        x, case["ids"], case["old_logprobs"], case["advantages"], case["mask"], AlgorithmConfig(),
        ref_topk_indices=case["ref_topk_indices"], ref_topk_logprobs=case["ref_topk_logprobs"], vocab_size=VOCAB,
    )
    assert loss.requires_grad and all(not torch.is_tensor(v) or not v.requires_grad for v in metrics.values())
