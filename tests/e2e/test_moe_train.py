"""APO on the tiny Qwen3-MoE through `megatron-apo train` at TP=2 x EP=2 (4 gloo ranks) with the CPU fleet.

Two steps, then the same command with total_steps=3 resumes from the EP=2 checkpoint and runs the third,
which equals the third step of an uninterrupted run.
Checked: finite losses, the router's load-balancing loss logged, the fleet's log-probs equal the trainer's
(expert weight sync), the routing mismatch between the engine and the trainer logged (near 0 in fp32), and every
expert's weights changed between the step-1 and step-3 checkpoints (experts
0-1 live on EP rank 0, 2-3 on EP rank 1).
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_apo.models import load_model_config
from megatron_apo.models.megatron_checkpoint import DistCheckpointReader
from megatron_apo.trainer.checkpoint import iter_dir_name, list_checkpoints
from megatron_apo.trainer.metrics import read_metrics
from tests.helpers.rl_setup import overrides, toy_env

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def moe_env(tmp_path_factory):
    return toy_env(tmp_path_factory.mktemp("toy"), model="tiny-qwen3-moe")


def _expert_weights(ckpt: Path, model_cfg) -> dict[str, torch.Tensor]:
    reader = DistCheckpointReader(ckpt / "model", model_cfg)
    out = {}
    for group in reader.groups()[1:-1]:  # the decoder layers
        out.update({n: t for n, t in reader.load(group).items() if ".local_experts." in n})
    return out


def _wall_clock(key: str) -> bool:
    return key == "time" or key.startswith(("time/", "throughput/"))


def _train(args: list[str]) -> str:
    p = subprocess.run([sys.executable, "-m", "megatron_apo.cli", "train", *args], cwd=REPO, capture_output=True,
                       text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    return p.stdout


@pytest.mark.slow  # two CLI runs of 4 trainer ranks plus a Ray CPU fleet
def test_apo_tp2_ep2_three_steps_with_resume(moe_env, tmp_path):
    env = moe_env
    reward = tmp_path / "parity_reward.py"  # varying rewards: a random model never solves the toy task
    reward.write_text("def compute_score(data_source, solution_str, ground_truth, extra_info=None):\n"
                      "    return float(len(solution_str) % 2)\n")
    out = tmp_path / "run"

    def args(steps, out=out):
        return overrides(env, out, tp=2, steps=steps, extra=[
            "parallel.expert_model_parallel_size=2", "algorithm.loss_mode=apo_ratio", "model.moe_aux_loss_coeff=0.01",
            f"data.reward_fn={reward}:compute_score", "checkpoint.save_interval=1", "checkpoint.keep_last=3",
            "data.train_batch_size=2", "trainer.micro_batch_size=4"])

    _train(args(2))
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2]
    _train(args(3))  # resumes from the step-2 checkpoint (sharded over EP=2) and runs step 3

    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3]
    print({r["step"]: {k: r.get(k) for k in ("loss", "train/grad_norm", "train/moe_aux_loss",
                                             "rollout/routing_mismatch", "rollout/logprob_abs_diff")} for r in rows})
    for r in rows:
        for key in ("loss", "train/grad_norm", "train/moe_aux_loss"):
            assert math.isfinite(r[key]), (r["step"], key, r[key])
        assert r["train/grad_norm"] > 0
        assert 0.5 < r["train/moe_aux_loss"] < 4.0  # 1.0 is perfectly balanced routing over 4 experts, top-2
        # the fleet (transformers Qwen3-MoE) serves the trainer's experts: same sampling log-probs
        assert r["rollout/logprob_abs_diff"] < 1e-4, r["rollout/logprob_abs_diff"]
        # the engine's routing during decoding vs the trainer's old-policy forward: fp32 on both sides
        assert 0.0 <= r["rollout/routing_mismatch"] < 0.02, r["rollout/routing_mismatch"]

    # the resumed step equals the same step of an uninterrupted run, bit for bit (weights, optimizer state with
    # the experts' own optimizer, RNG and data order all restored)
    straight = tmp_path / "straight"
    _train(args(3, straight))
    want = read_metrics(straight / "metrics.jsonl")[2]
    assert {k: v for k, v in rows[2].items() if not _wall_clock(k)} == {k: v for k, v in want.items()
                                                                       if not _wall_clock(k)}

    ckpts = {int(p.name.removeprefix("iter_")): p for p in list_checkpoints(out / "checkpoints")}
    assert sorted(ckpts) == [1, 2, 3]
    model_cfg = load_model_config(env["model"])
    before, after = _expert_weights(ckpts[1], model_cfg), _expert_weights(ckpts[3], model_cfg)
    assert ckpts[3].name == iter_dir_name(3)
    experts = {n.split(".local_experts.")[1].split(".")[0] for n in before}
    assert experts == {"0", "1", "2", "3"}
    for name, w in before.items():
        assert not torch.equal(w, after[name]), f"{name} did not change between steps 1 and 3"
    # step 3's update used the restored Adam state: the experts after it equal the uninterrupted run's
    uninterrupted = _expert_weights(list_checkpoints(straight / "checkpoints")[-1], model_cfg)
    assert all(torch.equal(after[n], uninterrupted[n]) for n in after)


@pytest.mark.slow  # three CLI runs of one trainer rank plus a Ray CPU fleet
def test_routing_replay_routes_as_the_engine_and_a_resume_replays_identically(moe_env, tmp_path):
    """rollout.routing_replay: the trainer's routers take the CPU engine's routes (every prompt and response
    position); the routing mismatch is exactly 0 and a resumed third step equals an uninterrupted run's."""
    def args(steps, out):
        return overrides(moe_env, out, tp=1, steps=steps, extra=[
            "rollout.routing_replay=true", "checkpoint.save_interval=1", "data.train_batch_size=2",
            "trainer.micro_batch_size=4", "model.moe_aux_loss_coeff=0.01"])

    out, straight = tmp_path / "run", tmp_path / "straight"
    _train(args(2, out))
    _train(args(3, out))
    _train(args(3, straight))
    rows, want = read_metrics(out / "metrics.jsonl"), read_metrics(straight / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert r["rollout/routing_mismatch"] == 0.0
        assert r["rollout/logprob_abs_diff"] < 1e-4 and math.isfinite(r["loss"])
        assert 0.5 < r["train/moe_aux_loss"] < 4.0  # the router's probabilities still feed the aux loss
    assert {k: v for k, v in rows[2].items() if not _wall_clock(k)} == {k: v for k, v in want[2].items()
                                                                       if not _wall_clock(k)}


@pytest.mark.parametrize("model, extra, message", [
    ("moe", ["model.moe_aux_loss_coeff=-0.1"], "model.moe_aux_loss_coeff must be >= 0 (0 turns it off), got -0.1"),
    ("dense", ["model.moe_aux_loss_coeff=0.01"], "needs a mixture-of-experts model"),
    ("dense", ["parallel.expert_model_parallel_size=2"], "needs a mixture-of-experts model"),
    ("moe", ["parallel.expert_model_parallel_size=3"], "does not divide num_moe_experts=4"),
    ("dense", ["rollout.routing_replay=true"], "rollout.routing_replay needs a mixture-of-experts model"),
    ("moe", ["rollout.routing_replay=true", "trainer.recompute=full", "parallel.pipeline_model_parallel_size=2"],
     "rollout.routing_replay with trainer.recompute=full needs pipeline_model_parallel_size 1"),
])
def test_bad_moe_config_is_one_line(moe_env, tmp_path, model, extra, message):
    args = overrides(moe_env, tmp_path, tp=2)
    if model == "dense":
        args = [a for a in args if not a.startswith("model.config=")] + ["model.config=tiny"]
    r = subprocess.run([sys.executable, "-m", "megatron_apo.cli", "train", *args, *extra], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stdout + r.stderr
    assert message in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
