"""`megatron-apo study` end to end at toy scale (1 seed, 2 methods, 2 RL steps) through the same code as the full
study, its resumability, and the collapse task's generator and verifier."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_apo.data.collapse_task import CodeTaskConfig, behaviour_valid_prob, eval_rows, make_categories, train_rows
from megatron_apo.rewards.registry import compute_score

pytestmark = pytest.mark.slow  # every test here takes more than ~10 s on 2 cores

REPO = Path(__file__).resolve().parents[2]


def test_task_structure_and_verifier():
    cats = make_categories(CodeTaskConfig(num_categories=40, seed=3))
    assert cats == make_categories(CodeTaskConfig(num_categories=40, seed=3))  # a pure function of the config
    splits = {c.split for c in cats}
    assert splits == {"trained_easy", "trained_hard", "heldout_easy", "heldout_hard"}
    assert sum(c.hard for c in cats) == 12 and sum(c.trained for c in cats) == 20
    for c in cats:
        assert all(v[0] != "a" for v in c.valid) == c.hard  # `a` is never valid in a hard category
        assert abs(sum(p for _, p in c.demos) - 1.0) < 1e-9
        assert behaviour_valid_prob(c) == pytest.approx(0.3 if c.hard else 0.6 + 0.4 * 2 / 20)
    rows = eval_rows(cats)
    assert len(rows) == 40 and len(train_rows(cats)) == 20
    hard = next(r for r, c in zip(rows, cats) if c.hard)
    code = hard["reward_model"]["ground_truth"].split(",")[0]
    assert compute_score(hard["data_source"], f" {code} ", hard["reward_model"]["ground_truth"]) == 1.0
    assert compute_score(hard["data_source"], "a" + code[1], hard["reward_model"]["ground_truth"]) == 0.0


def test_study_runs_reports_and_resumes(tmp_path):
    cfg = tmp_path / "study.yaml"
    cfg.write_text((REPO / "configs" / "study_toy.yaml").read_text())
    out = tmp_path / "study"
    args = [sys.executable, "-m", "megatron_apo.cli", "study", "--config", str(cfg), "--out", str(out),
            "seeds=[1]", "eval_n=4", "bootstrap=200", "task.num_categories=12", "reference.sft_steps=10",
            "reference.sft_per_category=4", "rl=[trainer.total_steps=2,data.train_batch_size=4,rollout.n=4,"
            "trainer.ppo_epochs=2,trainer.micro_batch_size=16,data.max_response_length=6,data.max_prompt_length=16,"
            "algorithm.anchor_metrics=true]"]
    # keep two of the methods: the YAML's others are dropped with a null override
    drop = [f"methods.{m}=null" for m in ("grpo_kl_k3", "grpo_kl_k2", "kl_on_wrong", "apo_split", "casp",
                                          "grpo_inverse_success", "grpo_memory")]
    r = subprocess.run(args + drop, cwd=REPO, capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert res["complete"] and res["labels"] == ["reference", "grpo", "apo"] and res["n"] == 4
    for split in ("overall", "trained", "heldout", "trained_hard", "heldout_hard"):
        for label in res["labels"]:
            e = res["splits"][split]["methods"][label]
            assert len(e["pass_at_k"]) == 4 and e["pass_at_k"] == sorted(e["pass_at_k"])
            assert all(lo - 1e-9 <= v <= hi + 1e-9 for lo, v, hi in zip(e["ci_low"], e["pass_at_k"], e["ci_high"]))
    assert "met" in res["criterion"] and set(res["dynamics"]) == {"grpo", "apo"}
    assert len(res["dynamics"]["apo"]["reward/mean"]) == 2
    for png in ("pass_at_k.png", "dynamics.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Criterion met" in (out / "report.md").read_text()
    done = out / "runs" / "apo" / "seed_1" / "done.json"
    stamp = done.stat().st_mtime_ns
    r = subprocess.run(args + drop, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and ": run 1/" not in r.stdout  # nothing re-ran
    assert done.stat().st_mtime_ns == stamp
