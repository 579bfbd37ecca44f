"""The train loop's pieces: the checkpoint decision, the lr schedule, the package logger's format and ranks, and the
RL step's passes (typed outputs, nothing written into the micro-batches)."""

from __future__ import annotations

import logging
import math
import re
from types import SimpleNamespace

import pytest

from megatron_apo.logging_utils import VERBOSE_ENV, get_logger
from megatron_apo.trainer.lifecycle import checkpoint_due
from megatron_apo.trainer.rl_step import lr_at


@pytest.mark.parametrize("step,total,interval,stopping,due", [
    (20, 100, 20, False, True),    # on the interval
    (21, 100, 20, False, False),
    (100, 100, 0, False, True),    # the last step always saves
    (7, 100, 0, False, False),     # interval 0: only at the end and on a signal
    (7, 100, 0, True, True),       # a stop signal
    (7, 100, 20, True, True),
])
def test_checkpoint_due(step, total, interval, stopping, due):
    assert checkpoint_due(step, total, interval, stopping) is due


def test_lr_schedule_warmup_then_decay():
    t = SimpleNamespace(lr=1.0, min_lr=0.1, lr_warmup_steps=2, total_steps=12, lr_decay_style="linear")
    assert [lr_at(s, t) for s in (0, 1)] == [0.5, 1.0]
    assert lr_at(2, t) == pytest.approx(1.0) and lr_at(12, t) == pytest.approx(0.1)
    assert lr_at(7, t) == pytest.approx(0.1 + 0.9 * 0.5)
    t.lr_decay_style = "cosine"
    assert lr_at(7, t) == pytest.approx(0.55) and lr_at(12, t) == pytest.approx(0.1)
    t.lr_decay_style = "constant"
    assert lr_at(11, t) == 1.0


def _emit(capsys, monkeypatch, rank: str, level: int, verbose: bool = False) -> str:
    monkeypatch.setenv("RANK", rank)
    monkeypatch.setenv(VERBOSE_ENV, "1" if verbose else "0")
    get_logger("megatron_apo.test_train_loop").log(level, "hello %s", "world")
    return capsys.readouterr().err


def test_logger_format_and_rank_filter(capsys, monkeypatch):
    line = _emit(capsys, monkeypatch, "0", logging.INFO)
    assert re.fullmatch(r"\[megatron-apo rank0 \d\d:\d\d:\d\d\] hello world\n", line), line
    assert _emit(capsys, monkeypatch, "3", logging.INFO) == ""  # other ranks: warnings only
    assert "rank3" in _emit(capsys, monkeypatch, "3", logging.WARNING)
    assert _emit(capsys, monkeypatch, "0", logging.DEBUG) == ""
    assert "rank3" in _emit(capsys, monkeypatch, "3", logging.DEBUG, verbose=True)  # --verbose: every rank, DEBUG


def _passes_body(cases: list) -> list[dict]:
    """The three passes of an RL step on a tiny model (1 rank), for each (algorithm, tis_cap): what each returns,
    and whether any wrote into the micro-batch dicts."""
    from megatron_apo.parallel import init_distributed

    init_distributed(seed=3)
    return [_passes(algorithm, tis_cap) for algorithm, tis_cap in cases]


def _passes(algorithm: dict, tis_cap) -> dict:
    import torch

    from megatron_apo.config import AlgorithmConfig
    from megatron_apo.models import build_gpt_model, load_model_config
    from megatron_apo.trainer.batch import RLBatch
    from megatron_apo.trainer.passes import OldPolicyPass, PassSettings, ReferencePass, TrainPass
    from megatron_apo.trainer.schedule import forward_backward

    cfg = load_model_config("tiny")
    policy, reference = build_gpt_model(cfg), build_gpt_model(cfg)
    g = torch.Generator().manual_seed(0)
    n, prompt, t = 4, 4, 4
    ids = torch.randint(0, cfg.vocab_size, (n, t), generator=g)
    batch = RLBatch(tokens=torch.cat([torch.randint(0, cfg.vocab_size, (n, prompt), generator=g), ids], 1),
                    resp_index=(prompt - 1 + torch.arange(t)).expand(n, -1).contiguous(), response_ids=ids,
                    response_mask=torch.ones(n, t), rollout_logprobs=torch.full((n, t), -3.0),
                    rewards=torch.zeros(n), advantages=torch.tensor([1.0, -1.0, 0.5, -0.5])[:, None].expand(n, t),
                    group_index=torch.zeros(n, dtype=torch.long), all_wrong=torch.zeros(n, t, dtype=torch.bool))
    micro = batch.micro_batches(2)
    before = [{k: v.clone() if torch.is_tensor(v) else v for k, v in mb.items()} for mb in micro]
    settings = PassSettings(AlgorithmConfig(**algorithm), vocab_size=cfg.vocab_size, tis_cap=tis_cap)
    with torch.no_grad():
        ref = ReferencePass(settings, len(micro))
        forward_backward([reference], micro, ref, prompt + t, 2, forward_only=True)
        old = OldPolicyPass(settings, ref.outputs)
        forward_backward([policy], micro, old, prompt + t, 2, forward_only=True)
        out = forward_backward([policy], micro, TrainPass(settings, ref.outputs, old.outputs), prompt + t, 2,
                               forward_only=True)
    unchanged = all(mb.keys() == b.keys() and all(torch.equal(mb[k], v) for k, v in b.items() if torch.is_tensor(v))
                    for mb, b in zip(micro, before))

    def shape(x):
        return None if x is None else tuple(x.shape)

    return {"unchanged": unchanged, "losses": [float(m["loss"]) for m in out], "metrics": sorted(out[0]),
            "ref": [(shape(o.logprobs), shape(o.topk_indices), shape(o.topk_logprobs)) for o in ref.outputs],
            "old": [(shape(o.logprobs), shape(o.at_ref_topk), shape(o.topn_logprobs), shape(o.is_weights))
                    for o in old.outputs],
            "tis": [float(o.metrics.get("rollout/correction_weight_mean", -1)) for o in old.outputs]}


PASS_CASES = [
    # the paper form (`old` anchor ratio): the reference Top-K and its log-probs, log pi_old at them
    ({"loss_mode": "apo_ratio", "apo_topk": 5}, None, ((2, 4), (2, 4, 5), (2, 4, 5)), ((2, 4), (2, 4, 5), None, None)),
    # the `ref` anchor ratio (M / Z_ref): nothing more from the old pass; the all-wrong pull reads the batch's mask
    ({"loss_mode": "apo_ratio", "apo_topk": 5, "apo_anchor_ratio": "ref", "apo_all_wrong_pull": 1.0}, None,
     ((2, 4), (2, 4, 5), (2, 4, 5)), ((2, 4), None, None, None)),
    # the split form: log pi_old at the reference Top-K too (M_old); one-step-off-policy weights
    ({"loss_mode": "apo_ratio", "apo_rectification": "split"}, 2.0, ((2, 4), (2, 4, 8), (2, 4, 8)),
     ((2, 4), (2, 4, 8), None, (2, 4))),
    # CaSP: only pi_old's Top-N; vanilla: log pi_ref(y) alone (the ref_kl metric)
    ({"loss_mode": "casp"}, None, ((2, 4), None, None), ((2, 4), None, (2, 4, 3), None)),
    ({"loss_mode": "vanilla"}, None, ((2, 4), None, None), ((2, 4), None, None, None)),
    # the anchor metrics: the reference Top-K for a mode that does not need it, and nothing else
    ({"loss_mode": "vanilla", "anchor_metrics": True}, None, ((2, 4), (2, 4, 8), None), ((2, 4), None, None, None)),
]


@pytest.fixture(scope="module")
def passes_results():
    from megatron_apo.parallel import run_distributed

    return run_distributed(_passes_body, 1, [(a, w) for a, w, _, _ in PASS_CASES], timeout=180)[0]


@pytest.mark.parametrize("i", range(len(PASS_CASES)))
def test_passes_return_what_the_loss_declares_and_never_write_the_micro_batches(passes_results, i):
    algorithm, tis_cap, ref, old = PASS_CASES[i]
    got = passes_results[i]
    assert got["unchanged"]  # the advantages are not rewritten by the importance weights, nothing is added
    assert got["ref"] == [ref, ref] and got["old"] == [old, old]  # one output per micro-batch
    assert len(got["losses"]) == 2 and all(math.isfinite(v) for v in got["losses"])
    assert all(0 < w <= tis_cap for w in got["tis"]) if tis_cap else got["tis"] == [-1.0, -1.0]
    assert ("apo/anchor_ratio" in got["metrics"]) == (algorithm.get("apo_rectification") is None
                                                       and algorithm["loss_mode"] == "apo_ratio")
    assert ("anchor/safe_mass_wrong" in got["metrics"]) == (ref[1] is not None)  # logged whenever the Top-K is there
