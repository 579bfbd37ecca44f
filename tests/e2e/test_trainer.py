"""The RL trainer end to end on CPU: TP=2 and PP=2 steps with the Ray CPU fleet, kill/resume, NaN steps, bad config."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_apo.config import load_config
from megatron_apo.parallel import run_distributed
from megatron_apo.trainer.checkpoint import latest_checkpoint, list_checkpoints, read_metadata
from megatron_apo.trainer.metrics import read_metrics
from tests.helpers.procs import alive, cmdline, survivors
from tests.helpers.rl_setup import overrides, toy_env

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return toy_env(tmp_path_factory.mktemp("toy"))


def _train(cfg):
    from megatron_apo.trainer.train import train

    return train(cfg).history


def _cli(args: list[str], **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "megatron_apo.cli", "train", *args], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True, **kw)


@pytest.mark.slow
def test_rl_steps_tp2_log_loss_reward_and_diagnostics(env, tmp_path):
    cfg = load_config(None, overrides(env, tmp_path, tp=2, steps=3, extra=["algorithm.loss_mode=apo_ratio"]))
    history = run_distributed(_train, 2, cfg, timeout=400)[0]
    assert [h["step"] for h in history] == [1, 2, 3]
    rows = read_metrics(tmp_path / "metrics.jsonl")
    for r in rows:
        for key in ("loss", "reward/mean", "reward/pass_rate", "entropy", "pg_clipfrac", "ppo_kl",
                    "time/rollout_total_s", "time/reference_s", "time/train_s", "time/sync_s",
                    "throughput/tokens_per_s", "fleet/weights_version"):
            assert key in r and math.isfinite(r[key]), key
        # the fleet serves the trainer's weights: its sampling log-probs equal the trainer's old log-probs
        assert r["rollout/logprob_abs_diff"] < 1e-4
    assert rows[-1]["fleet/weights_version"] == 2.0  # synced after each step
    # the APO diagnostics of the default (paper) form, exactly: the loss's own and the anchor metrics of its inputs
    for r in rows:
        assert {k for k in r if k.startswith(("apo/", "anchor/"))} == APO_PAPER_METRICS
        assert all(math.isfinite(r[k]) for k in APO_PAPER_METRICS)
        assert 0 < r["anchor/topk_mass"] <= 1 and 0 <= r["apo/pulled_frac"] <= 1
    assert list((tmp_path / "tensorboard").iterdir())
    assert read_metadata(latest_checkpoint(tmp_path / "checkpoints"))["step"] == 3


@pytest.mark.slow
def test_rl_step_pp2_equals_pp1(env, tmp_path):
    """Two APO steps at PP=2 give the metrics of the same steps at TP=1/PP=1 (from the same initial weights), to
    1e-5: the reference Top-K and old log-probs reach the loss on the last stage, and the update is the same."""
    init = run_distributed(_save_initial_weights, 1, env["model"], str(tmp_path / "init"), timeout=120)[0]
    reward = _parity_reward(tmp_path)  # non-zero advantages: step 1 updates the weights step 2 starts from
    runs = {}
    for pp in (1, 2):
        extra = [f"checkpoint.load={init}", f"data.reward_fn={reward}:compute_score"]
        cfg = load_config(None, overrides(env, tmp_path / f"pp{pp}", tp=1, pp=pp, steps=2, extra=extra))
        runs[pp] = run_distributed(_train, pp, cfg, timeout=300)[0]
    assert [h["step"] for h in runs[2]] == [1, 2] and runs[1][0]["train/grad_norm"] > 0
    for dense, piped in zip(runs[1], runs[2]):
        assert {k for k in piped if k.startswith(("apo/", "anchor/"))} == APO_PAPER_METRICS
        for key in ("loss", "pg_loss", "train/grad_norm", "entropy", "ppo_kl", "ref_kl", "reward/mean",
                    "apo/anchor_ratio", "apo/neg_grad_off_frac", "anchor/safe_mass_wrong"):
            assert piped[key] == pytest.approx(dense[key], rel=1e-5, abs=1e-6), key
        assert piped["rollout/logprob_abs_diff"] < 1e-4


APO_PAPER_METRICS = {"apo/rectified_loss", "apo/neg_grad_off_frac", "apo/anchor_ratio", "apo/pulled_frac",
                     "apo/safe_mass", "apo/junk_anchor_frac",
                     "anchor/topk_mass", "anchor/safe_mass", "anchor/safe_mass_wrong", "anchor/sampled_in_topk"}


def _save_initial_weights(model_yaml: str, out: str) -> str:
    """A random model of `model_yaml` saved as a checkpoint, so runs with different layouts start from one set of
    weights (each layout would otherwise draw its own per stage)."""
    from megatron_apo.models import build_gpt_model, load_model_config
    from megatron_apo.parallel import init_distributed
    from megatron_apo.trainer.checkpoint import save_checkpoint

    init_distributed(seed=11)
    return str(save_checkpoint(out, 1, [build_gpt_model(load_model_config(model_yaml))], metadata={"step": 1}))


@pytest.mark.slow
def test_a_loss_from_loss_modules_trains_through_the_cli(env, tmp_path):
    """algorithm.loss_modules: a loss registered in a module outside the package (tests/helpers/user_loss.py) is
    found by `megatron-apo train` and its fresh ranks; it trains two steps, its reference Top-K input is computed
    and its own metric is logged."""
    p = _cli([*overrides(env, tmp_path, tp=1, steps=2), "algorithm.loss_modules=[tests.helpers.user_loss]",
              "algorithm.loss_mode=test_user_loss_module"])
    assert p.wait(timeout=400) == 0, p.stdout.read()
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert 0 < r["user/ref_topk_mass"] <= 1 and math.isfinite(r["loss"])
        assert "apo/anchor_ratio" not in r  # the user's loss ran, not the default


def test_an_unknown_loss_module_is_one_line(env, tmp_path):
    r = subprocess.run([sys.executable, "-m", "megatron_apo.cli", "train", *overrides(env, tmp_path),
                        "algorithm.loss_modules=[no_such_pkg.my_loss]", "algorithm.loss_mode=my_loss"],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "algorithm.loss_modules: cannot import 'no_such_pkg.my_loss'" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def _parity_reward(tmp_path: Path) -> Path:
    """A random model never solves the toy task (every advantage 0, no update): reward something that varies."""
    reward = tmp_path / "parity_reward.py"
    reward.write_text("def compute_score(data_source, solution_str, ground_truth, extra_info=None):\n"
                      "    return float(len(solution_str) % 2)\n")
    return reward


@pytest.mark.slow
def test_one_step_off_policy_overlaps_rollout_and_applies_tis(env, tmp_path):
    reward = _parity_reward(tmp_path)
    cfg = load_config(None, overrides(env, tmp_path, tp=2, steps=3,
                                      extra=["rollout.one_step_off_policy=true", "rollout.tis_cap=2.0",
                                             f"data.reward_fn={reward}:compute_score"]))
    history = run_distributed(_train, 2, cfg, timeout=400)[0]
    assert [h["step"] for h in history] == [1, 2, 3]
    # step 1's rollouts come from the initial weights (on-policy); later ones from weights one update older
    assert history[0]["rollout/logprob_abs_diff"] < 1e-4
    assert all(h["rollout/logprob_abs_diff"] > 1e-4 for h in history[1:])
    for h in history:
        assert 0 < h["rollout/correction_weight_mean"] <= 2.0 and 0 <= h["rollout/correction_truncated_frac"] <= 1


@pytest.mark.slow
def test_full_recompute_trains_like_no_recompute(env, tmp_path):
    """trainer.recompute=full at TP=2: the step-2 metrics (after an update made from step 1's gradients) equal the
    run without recompute, to float rounding (1e-5 relative): recompute trades compute for memory, not numbers."""
    reward = _parity_reward(tmp_path)
    runs = {}
    for mode in ("none", "full"):
        extra = [f"trainer.recompute={mode}", f"data.reward_fn={reward}:compute_score"]
        cfg = load_config(None, overrides(env, tmp_path / mode, tp=2, steps=2, extra=extra))
        runs[mode] = run_distributed(_train, 2, cfg, timeout=400)[0]
    assert runs["none"][0]["train/grad_norm"] > 0  # the first step did update the policy
    for plain, recomputed in zip(runs["none"], runs["full"]):
        for key in ("loss", "train/grad_norm", "entropy", "reward/mean"):
            assert recomputed[key] == pytest.approx(plain[key], rel=1e-5, abs=1e-7), key


_NOT_REPRODUCIBLE = ("time/", "throughput/")  # wall-clock measurements


def _reproducible(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "time" and not k.startswith(_NOT_REPRODUCIBLE)} for r in rows]


@pytest.mark.slow
def test_sigkill_at_a_fixed_step_and_resume_gives_identical_metrics(env, tmp_path):
    """Killed right after the step-3 checkpoint of a 6-step run, the resumed steps 4-6 equal the uninterrupted run's.

    Step 4 alone would not show a wrong optimizer state (its loss is computed before its update): steps 5 and 6
    are trained from weights that the first update after the resume produced.
    """
    steps, kill_at = 6, 3
    ref_out, run_out = tmp_path / "uninterrupted", tmp_path / "killed"
    reward = _parity_reward(tmp_path)  # non-zero advantages, so every step really updates the weights
    args = lambda out: overrides(env, out, tp=2, steps=steps,  # noqa: E731
                                 extra=[f"checkpoint.save_interval={kill_at}",
                                        f"data.reward_fn={reward}:compute_score"])
    ref = _cli(args(ref_out))
    assert ref.wait(timeout=600) == 0, ref.stdout.read()
    p = _cli(args(run_out))
    deadline = time.time() + 600
    while time.time() < deadline:  # the step-3 record is written after the step-3 checkpoint
        m = run_out / "metrics.jsonl"
        if m.is_file() and len(m.read_text().splitlines()) >= kill_at:
            break
        assert p.poll() is None, p.stdout.read()
        time.sleep(0.05)
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    assert read_metadata(latest_checkpoint(run_out / "checkpoints"))["step"] == kill_at
    assert len(read_metrics(run_out / "metrics.jsonl")) < steps
    resumed = _cli(args(run_out))
    assert resumed.wait(timeout=600) == 0, resumed.stdout.read()
    want = _reproducible(read_metrics(ref_out / "metrics.jsonl"))
    got = _reproducible(read_metrics(run_out / "metrics.jsonl"))
    assert [r["step"] for r in got] == [r["step"] for r in want] == list(range(1, steps + 1))
    assert all(r["train/grad_norm"] > 0 for r in want)
    for w, g in zip(want[kill_at:], got[kill_at:]):
        assert g == w  # bit-identical: loss, rewards, grad norm, KL, entropy, every diagnostic


_SLOW_SAVE = r"""
import sys, time, torch
from megatron_apo.parallel import init_distributed
from megatron_apo.models import build_gpt_model, load_model_config
from megatron_apo.trainer import checkpoint as ck
from megatron.core import dist_checkpointing

if __name__ == "__main__":
    init_distributed()
    model = build_gpt_model(load_model_config("tiny"))
    ck.save_checkpoint(sys.argv[1], 1, [model], metadata={"step": 1})
    real_save = dist_checkpointing.save
    def slow_save(*a, **k):  # the second save is killed while it writes
        print("saving", flush=True)
        time.sleep(60)
        return real_save(*a, **k)
    dist_checkpointing.save = slow_save
    ck.save_checkpoint(sys.argv[1], 2, [model], metadata={"step": 2})
"""


@pytest.mark.slow
def test_kill_during_save_keeps_previous_checkpoint(tmp_path):
    script = tmp_path / "slow_save.py"
    script.write_text(_SLOW_SAVE)
    ckpt = tmp_path / "ckpt"
    p = subprocess.Popen([sys.executable, str(script), str(ckpt)], cwd=REPO, stdout=subprocess.PIPE, text=True,
                         start_new_session=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert p.stdout.readline().strip() == "saving"
    assert any(d.name.startswith("iter_0000002.tmp") for d in ckpt.iterdir())
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    assert [c.name for c in list_checkpoints(ckpt)] == ["iter_0000001"]
    assert latest_checkpoint(ckpt).name == "iter_0000001"
    out = run_distributed(_load_tiny, 1, str(ckpt), timeout=120)[0]
    assert out == 1


def _load_tiny(ckpt: str) -> int:
    from megatron_apo.models import build_gpt_model, load_model_config
    from megatron_apo.parallel import init_distributed
    from megatron_apo.trainer.checkpoint import load_checkpoint

    init_distributed()
    meta, _ = load_checkpoint(ckpt, [build_gpt_model(load_model_config("tiny"))])
    return meta["step"]


def _train_with_a_nan_advantage(cfg):
    """A NaN reaches the loss through one sample's advantage (a NaN reward cannot: it is a failed sample)."""
    import megatron_apo.trainer.controller as controller

    real = controller.advantages_of

    def first_nan(*args, **kwargs):
        adv = real(*args, **kwargs)
        adv[0] = float("nan")
        return adv

    controller.advantages_of = first_nan
    return _train(cfg)


@pytest.mark.slow
def test_nan_loss_skips_the_step_and_training_continues(env, tmp_path):
    reward = tmp_path / "nan_reward.py"  # NaN for one response in 7: failed samples, counted, never trained on
    reward.write_text("import zlib\n"
                      "def compute_score(data_source, solution_str, ground_truth, extra_info=None):\n"
                      "    return float('nan') if zlib.crc32(solution_str.encode()) % 7 == 0 else 1.0\n")
    # two train files: the controller reads both (the sampler's checkpointed state names each)
    cfg = load_config(None, overrides(env, tmp_path, tp=2, steps=2,
                                      extra=[f"data.reward_fn={reward}:compute_score", "algorithm.loss_mode=vanilla",
                                             f"data.train_files=[{env['train']},{env['val']}]"]))
    history = run_distributed(_train_with_a_nan_advantage, 2, cfg, timeout=300)[0]
    assert len(history) == 2
    assert all(h["train/skipped_updates"] >= 1 for h in history)
    assert all(h["reward/errors"] == h["reward/nonfinite"] < 16 / 2 for h in history)
    assert sum(h["reward/nonfinite"] for h in history) >= 1
    ckpt = latest_checkpoint(tmp_path / "checkpoints")
    extra = (json.loads((ckpt / "extra.json").read_text()) if (ckpt / "extra.json").is_file()
             else __import__("torch").load(ckpt / "extra.pt", weights_only=True))  # older checkpoint layout
    assert extra["controller"]["sampler"]["sources"] == [["train.parquet", 32], ["val.parquet", 4]]


@pytest.mark.parametrize("extra, message", [
    (["algorithm.apo_topkk=3"], "unknown config key 'algorithm.apo_topkk'"),
    (["data.train_files=[/nonexistent/train.parquet]"], "/nonexistent/train.parquet does not exist"),
    (["parallel.tensor_model_parallel_size=3"], "does not divide num_query_groups"),
    (["parallel.tensor_model_parallel_size=0"], "parallel.tensor_model_parallel_size=0 must be >= 1"),
    (["parallel.virtual_pipeline_model_parallel_size=2"], "needs pipeline_model_parallel_size > 1"),
    (["trainer.recompute=layers"], "'trainer.recompute': Invalid value 'layers', expected one of [none, full]"),
    (["algorithm.loss_agg_mode=token-sum"], "'algorithm.loss_agg_mode': Invalid value 'token-sum', expected one of "
                                            "[token-mean, seq-mean-token-sum"),
    (["trainer.total_steps=0"], "trainer.total_steps must be >= 1, got 0"),
    (["--nproc=4", "data.train_batch_size=3", "rollout.n=3"],
     "data.train_batch_size * rollout.n = 3 * 3 = 9 samples per step do not split over 2 data-parallel ranks"),
])
def test_bad_config_fails_fast_with_one_line(env, tmp_path, extra, message):
    t0 = time.time()
    flags = [e for e in extra if e.startswith("--")]  # before the overrides, as argparse wants them
    r = subprocess.run([sys.executable, "-m", "megatron_apo.cli", "train", *flags, *overrides(env, tmp_path),
                        *[e for e in extra if e not in flags]], cwd=REPO, capture_output=True, text=True, timeout=120)
    elapsed = time.time() - t0
    assert r.returncode == 2, r.stdout + r.stderr
    assert message in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert elapsed < 1.0, f"bad config took {elapsed:.2f}s to be rejected (including interpreter start)"


def test_an_unloadable_checkpoint_found_by_the_ranks_is_one_line(env, tmp_path):
    """Resume runs inside the ranks; the user's mistake found there (here `latest` names a folder whose model/ part
    was never written) reaches the CLI as one line naming the folder and the fix, not a rank's traceback."""
    it = tmp_path / "run" / "checkpoints" / "iter_0000001"
    (it / "model").mkdir(parents=True)
    (it / "megatron_apo.json").write_text("{}")
    (it.parent / "latest").write_text("1\n")
    r = subprocess.run([sys.executable, "-m", "megatron_apo.cli", "train",  # no checksums.json: allowed, to get further
                        *overrides(env, tmp_path / "run", tp=1, steps=1, extra=["checkpoint.allow_unverified=true"])],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    error = r.stderr.strip().splitlines()[-1]
    assert error.startswith("megatron-apo train: error: no intact checkpoint in ") and str(it / "model") in error
    assert "checkpoint.resume=false" in error


def _bad_parquet(tmp_path: Path, kind: str) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    f = tmp_path / f"{kind}.parquet"
    if kind == "no_prompt_column":
        pq.write_table(pa.table({"question": ["1+1?"], "data_source": ["math"]}), f)
    else:  # text that is not UTF-8, in a string column
        bad = pa.array([b"\xff\xfe not utf-8"], type=pa.binary()).view(pa.string())
        pq.write_table(pa.table({"prompt": bad, "reward_model": [{"ground_truth": "2", "style": "rule"}],
                                 "data_source": ["math"]}), f)
    return f


@pytest.mark.parametrize("case, message", [
    ("no_prompt_column", "missing column(s) ['prompt', 'reward_model']"),
    ("not_utf8", "not valid UTF-8"),
    ("engine", "rollout.engine='tpu' is unknown"),
    ("tokenizer", "data.tokenizer: "),
])
def test_bad_input_is_one_line_before_any_rank_starts(env, tmp_path, case, message):
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer.json").write_text("{not json")  # a damaged tokenizer file
    extra = {"engine": ["rollout.engine=tpu"], "tokenizer": [f"data.tokenizer={tmp_path / 'tok'}"]}.get(case, [])
    if case in ("no_prompt_column", "not_utf8"):
        extra = [f"data.train_files=[{_bad_parquet(tmp_path, case)}]"]
    r = subprocess.run([sys.executable, "-m", "megatron_apo.cli", "train", *overrides(env, tmp_path / "out"), *extra],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stdout + r.stderr
    assert message in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    if case != "tokenizer":
        assert ".parquet" in r.stderr or "rollout.engine" in r.stderr  # names the file or the key
    assert not (tmp_path / "out" / "metrics.jsonl").exists()  # no rank ever started


@pytest.mark.slow
def test_launcher_forwards_sigterm_and_locks_out_dir(env, tmp_path):
    """SIGTERM to the `megatron-apo train` launcher alone (not its process group): its ranks checkpoint and stop,
    it exits with the documented preemption code 75, and no rank outlives it. A second trainer started in the
    same out_dir meanwhile is refused with one line."""
    out = tmp_path / "run"
    args = overrides(env, out, tp=2, steps=50)
    p = _cli(args)
    deadline = time.time() + 400
    while time.time() < deadline and not (out / "metrics.jsonl").is_file():
        assert p.poll() is None, p.stdout.read()
        time.sleep(0.2)
    second = subprocess.run([sys.executable, "-m", "megatron_apo.cli", "train", *args], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert second.returncode == 2 and "is in use by another trainer (pid " in second.stderr, second.stderr
    children = subprocess.run(["pgrep", "-P", str(p.pid)], capture_output=True, text=True).stdout.split()
    ranks = [pid for pid in children if "spawn_main" in cmdline(pid)]
    assert len(ranks) == 2, [cmdline(pid) for pid in children]  # tp=2
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=300) == 75, p.stdout.read()
    log = p.stdout.read()
    assert "stopped by a signal after step" in log
    stopped = read_metadata(latest_checkpoint(out / "checkpoints"))["step"]
    assert 1 <= stopped < 50 and read_metrics(out / "metrics.jsonl")[-1]["step"] == stopped
    for pid in ranks:  # killed by the launcher or by their parent-death signal before it exited
        assert not alive(pid), cmdline(pid)
    # multiprocessing's resource tracker exits when it reads EOF from the launcher's pipe: a moment after it
    left = survivors(children, grace_s=15)
    assert not left, [cmdline(pid) for pid in left]

