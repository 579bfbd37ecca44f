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


V2_ARGS = ["task.kind=toy_squeeze", "task.num_categories=16", "task.hard_fraction=0.5", "task.instances=[0,1]",
           "seeds=[1]", "eval_mode=exact", "eval_n=16", "endpoint_k=16", "bootstrap=200", "reference.sft_steps=10",
           "reference.sft_per_category=4", "reference.sft_batch_size=64",
           "rl=[trainer.total_steps=2,data.train_batch_size=4,rollout.n=4,trainer.ppo_epochs=2,"
           "trainer.micro_batch_size=16,data.max_response_length=6,data.max_prompt_length=8,"
           "algorithm.anchor_metrics=true,'algorithm.loss_modules=[megatron_apo.study.controls]']"]


@pytest.mark.timeout(1800)  # 6 runs: ~8 min on 2 loaded cores
def test_study_v2_exact_evaluation_controls_and_statistics(tmp_path):
    """Task B, two task instances (each its own reference), exact evaluation, the controls, the v2 statistics."""
    out = tmp_path / "study"
    # grpo_pos_only uses grpo_neg_only's knob (the other sign); the default APO runs in the test above
    drop = [f"methods.{m}=null" for m in ("grpo_pos_only", "apo")] + ["primary=[apo_neg_clipped]"]
    r = subprocess.run([sys.executable, "-m", "megatron_apo.cli", "study", "--config",
                        str(REPO / "configs" / "study_v2.yaml"), "--out", str(out)] + V2_ARGS + drop,
                       cwd=REPO, capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    methods = ["grpo", "grpo_neg_only", "apo_neg_clipped"]
    assert res["complete"] and res["eval_mode"] == "exact" and res["labels"] == ["reference"] + methods
    assert res["seeds"] == ["inst_0_seed_1", "inst_1_seed_1"]
    for inst in (0, 1):  # each instance: its own task, reference and exact evaluation of the reference
        assert (out / f"inst_{inst}" / "sft" / "done.json").is_file()
        ref = json.loads((out / f"inst_{inst}" / "reference_exact_eval.json").read_text())
        assert len(ref["per_prompt"]) == 16 and all(0 <= p["p_valid"] <= 1 for p in ref["per_prompt"])
    tasks = [json.loads((out / f"inst_{i}" / "data" / "task.json").read_text())["categories"] for i in (0, 1)]
    assert [c["valid"] for c in tasks[0]] != [c["valid"] for c in tasks[1]]  # the task was redrawn
    for split in ("trained_hard", "heldout_hard", "trained"):
        for label in res["labels"]:
            e = res["splits"][split]["methods"][label]
            assert e["pass_at_k"] == sorted(e["pass_at_k"]) and len(e["pass_at_k"]) == 16
            assert e["seed_t"]["df"] == 1
    for split in ("heldout_hard", "trained_hard"):
        comp = res["comparisons"][split]["methods"]
        assert comp["apo_neg_clipped"]["role"] == "primary" and comp["grpo_neg_only"]["role"] == "secondary"
        assert "p_holm" in comp["grpo_neg_only"]
        c = comp["apo_neg_clipped"]
        assert c["ci_low"] <= c["est"] <= c["ci_high"] or c["se"] == 0
    c = res["criterion_v2"]
    assert c["applicable"] and c["method"] == "apo_neg_clipped" and c["verdict"] in (
        "inconclusive", "apo_neg_clipped improves on grpo", "apo_neg_clipped does not improve on grpo")
    diag = json.loads((out / "diagnostics.json").read_text())["grpo"]  # the mechanism precondition ran
    assert diag["num_states"] > 0 and 0 <= diag["valid_in_ref_topk_frac"] <= 1
    hist = json.loads((out / "runs" / "apo_neg_clipped" / "inst_0_seed_1" / "done.json").read_text())["history"]
    assert all(h["apo/neg_grad_off_frac"] in (0.0, 1.0) for h in hist)
    assert "Version-2 criterion" in (out / "report.md").read_text()


@pytest.mark.timeout(1200)
def test_killed_study_leaves_no_process_behind(tmp_path):
    """SIGKILL to the study while a run trains: its ranks and the study's Ray processes (GCS, raylet, agents, the
    run's engine workers) exit on their own."""
    import os
    import signal
    import time

    import psutil

    out = tmp_path / "study"
    args = [sys.executable, "-m", "megatron_apo.cli", "study", "--config", str(REPO / "configs" / "study_v2.yaml"),
            "--out", str(out)] + V2_ARGS + ["task.instances=[0]", "primary=[]"] + [
                f"methods.{m}=null" for m in ("apo", "grpo_pos_only", "grpo_neg_only", "apo_neg_clipped")]
    log = tmp_path / "study.log"  # a file, not a pipe: nobody reads a pipe after the kill, and a full one blocks
    with log.open("w") as f:
        study = subprocess.Popen(args, cwd=REPO, stdout=f, stderr=subprocess.STDOUT)
    deadline = time.time() + 900
    # the study has started its Ray cluster, and the run's rank is up and has attached to it
    while time.time() < deadline and study.poll() is None and "Connected to Ray cluster" not in log.read_text():
        time.sleep(1)
    assert "Started a local Ray instance" in log.read_text(), log.read_text()[-3000:]
    assert "Connected to Ray cluster" in log.read_text(), log.read_text()[-3000:]
    procs = psutil.Process(study.pid).children(recursive=True)
    names = " ".join(_cmdline(p) for p in procs)
    assert "raylet" in names and "gcs_server" in names and "multiprocessing" in names  # Ray's and the rank
    os.kill(study.pid, signal.SIGKILL)
    study.wait()
    gone, alive = psutil.wait_procs(procs, timeout=240)
    leftover = [p for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    for p in leftover:  # do not leave them to the next test
        p.kill()
    assert not leftover, [(p.pid, p.name()) for p in leftover]
    assert not (out / "runs" / "grpo" / "inst_0_seed_1" / "done.json").exists()


def _cmdline(p) -> str:
    import psutil

    try:
        return " ".join(p.cmdline())
    except psutil.Error:  # exited meanwhile
        return ""


def test_run_attaches_to_the_study_cluster_and_leaves_nothing_on_it(tmp_path, ray_cluster):
    """A study run's trainer attaches to the study's Ray cluster (here the session's) instead of starting one, and
    its engines are gone when it ends: the next run starts on an empty cluster (no actor, every CPU free)."""
    import time

    from megatron_apo.study.config import load_study_config
    from megatron_apo.study.runner import ensure_reference, prepare_task, run_one

    ray = ray_cluster
    from ray._private import state

    def alive():
        return {a for a, v in state.actors().items() if v["State"] != "DEAD"}

    def engines():
        return {a for a, v in state.actors().items() if v["ActorClassName"] == "CPUEngine"}

    cfg = load_study_config(REPO / "configs" / "study_v2.yaml", V2_ARGS + ["task.instances=[0]"])
    out = tmp_path / "study"
    paths = prepare_task(cfg, out, 0)
    ref = ensure_reference(cfg, paths, out / "inst_0")
    cpus, before, engines_before = ray.available_resources().get("CPU"), alive(), engines()
    address = ray.get_runtime_context().gcs_address
    rec = run_one(cfg, paths, ref, out, "grpo", 1, 0, ray_address=address)
    assert len(rec["history"]) == 2
    assert len(engines() - engines_before) == 1  # the run's one engine lived on this cluster ...
    deadline = time.time() + 30
    while time.time() < deadline and (alive() != before or ray.available_resources().get("CPU") != cpus):
        time.sleep(0.5)
    assert alive() == before  # ... and is gone: no actor outlives its run
    assert ray.available_resources().get("CPU") == cpus
