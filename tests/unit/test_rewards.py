"""Reward registry, verl-style loader, toy verifier, and the process pool's per-sample time limits."""

import textwrap
import time

import pytest

from megatron_apo.rewards import (
    RewardFailed,
    RewardItem,
    RewardPool,
    TooManyRewardErrors,
    compute_score,
    load_reward_fn,
    registered_data_sources,
    toy_digit_sum_score,
)

USER_REWARDS = textwrap.dedent('''
    import time

    def verl_style(data_source, solution_str, ground_truth, extra_info=None):
        """Exactly verl's custom_reward_function signature; returns a dict like many verl rewards."""
        return {"score": float(solution_str.strip() == ground_truth), "acc": solution_str.strip() == ground_truth}

    def behaving(data_source, solution_str, ground_truth, extra_info=None):
        if solution_str == "sleep":
            time.sleep(30)  # interruptible: the soft limit in the worker stops it
        if solution_str == "stubborn":
            end = time.monotonic() + 60
            while time.monotonic() < end:  # swallows the soft limit: only killing the worker stops it
                try:
                    time.sleep(5)
                except BaseException:
                    pass
        if solution_str == "boom":
            raise RuntimeError("user reward crashed")
        return float(solution_str == ground_truth)

    def wrong_signature(text):
        return 0.0
''')


@pytest.fixture(scope="module")
def reward_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("rewards") / "user_rewards.py"
    path.write_text(USER_REWARDS)
    return path


@pytest.mark.parametrize("response,k,total,expected", [
    ("1+2+3", 3, 6, 1.0),
    ("  3+2+1 \n", 3, 6, 1.0),
    ("6+0+0", 3, 6, 1.0),
    ("1+2+4", 3, 6, 0.0),  # wrong sum
    ("1+5", 3, 6, 0.0),  # too few digits
    ("1+2+3+0", 3, 6, 0.0),  # too many digits
    ("1 + 2 + 3", 3, 6, 0.0),  # inner spaces are not the format
    ("12+3", 2, 15, 0.0),  # a two-digit number is not a digit
    ("9+9+9", 3, 27, 1.0),
    ("", 3, 0, 0.0),
    ("0+0+0", 3, 0, 1.0),
    ("+1+2", 2, 3, 0.0),
])
def test_toy_verifier(response, k, total, expected):
    assert compute_score("toy_digit_sum", response, str(total), {"k": k}) == expected


def test_toy_verifier_needs_k():
    with pytest.raises(ValueError, match="extra_info must contain 'k'"):
        toy_digit_sum_score("1+2", "3", {})


def test_unknown_data_source_names_the_fix():
    with pytest.raises(ValueError, match="no reward function for data_source='nope'.*custom_fn"):
        compute_score("nope", "x", "y")
    assert "math_dapo" in registered_data_sources() and "toy_digit_sum" in registered_data_sources()


def test_load_reward_fn_verl_signature(reward_file):
    fn = load_reward_fn(f"{reward_file}:verl_style")
    assert fn(data_source="anything", solution_str=" 7 ", ground_truth="7", extra_info=None)["score"] == 1.0
    with pytest.raises(FileNotFoundError, match="missing.py"):
        load_reward_fn(str(reward_file.parent / "missing.py") + ":f")
    with pytest.raises(ValueError, match="'nothere' not found.*verl_style"):
        load_reward_fn(f"{reward_file}:nothere")
    with pytest.raises(ValueError, match="must accept keyword arguments"):
        load_reward_fn(f"{reward_file}:wrong_signature")
    with pytest.raises(ValueError, match="file.py:fn_name"):
        load_reward_fn(str(reward_file))
    broken = reward_file.parent / "broken.py"
    broken.write_text("import nonexistent_module_xyz\n")
    with pytest.raises(ValueError, match="broken.py failed to import: ModuleNotFoundError"):
        load_reward_fn(f"{broken}:f")
    # Importable modules work too.
    assert load_reward_fn("megatron_apo.rewards:compute_score")("math", "\\boxed{2}", "2") == 1.0


def test_pool_matches_serial_scores(reward_file):
    items = [
        RewardItem("math", "\\boxed{\\frac{1}{2}}", "0.5"),
        RewardItem("math", "\\boxed{3}", "4"),
        RewardItem("math_dapo", "so\nAnswer: 12", "12"),
        RewardItem("toy_digit_sum", "4+4+4", "12", {"k": 3}),
        RewardItem("toy_digit_sum", "4+4", "12", {"k": 3}),
    ] * 3
    serial = [compute_score(i.data_source, i.solution_str, i.ground_truth, i.extra_info) for i in items]
    assert serial == [1.0, 0.0, 1.0, 1.0, 0.0] * 3
    with RewardPool(num_workers=2, timeout_s=5.0) as pool:
        batch = pool.score(items)
    assert batch.scores == serial
    assert batch.num_timeouts == 0 and batch.num_errors == 0
    # verl-style function used for every item instead of the registry; dict results become their score.
    with RewardPool(num_workers=0, reward_fn=f"{reward_file}:verl_style") as pool:
        assert pool.score([RewardItem("whatever", "a", "a"), RewardItem("whatever", "a", "b")]).scores == [1.0, 0.0]


def test_pool_soft_and_hard_timeouts_score_zero_and_are_counted(reward_file):
    items = [RewardItem("x", s, "ok") for s in ["ok", "sleep", "ok", "stubborn", "no", "ok"]]
    with RewardPool(num_workers=2, timeout_s=0.5, hard_grace_s=1.0, reward_fn=f"{reward_file}:behaving") as pool:
        start = time.monotonic()
        batch = pool.score(items)
        elapsed = time.monotonic() - start
        assert batch.scores == [1.0, 0.0, 1.0, 0.0, 0.0, 1.0]
        assert batch.timed_out == [False, True, False, True, False, False]
        assert batch.metrics()["reward/timeouts"] == 2.0
        assert elapsed < 8.0, elapsed  # the stubborn sample was killed at ~1.5 s, not after 60 s
        # The killed worker was replaced: the pool still works at full size.
        assert pool.score([RewardItem("x", "ok", "ok")] * 4).scores == [1.0] * 4
        assert len(pool._workers) == 2 and all(w.process.is_alive() for w in pool._workers)


_SCORE_IN_A_THREAD = r"""
import threading, time
from megatron_apo.rewards import RewardItem, RewardPool

items = [RewardItem("math", r"\boxed{10^{10^{10^{10}}}}", "5"), RewardItem("math", r"\boxed{2}", "2")]
result = {}
with RewardPool(num_workers=0, timeout_s=1.0, hard_grace_s=1.0, on_error="zero") as pool:
    t = threading.Thread(target=lambda: result.update(batch=pool.score(items)), daemon=True)
    t.start()
    t.join()
print(result["batch"].timed_out, result["batch"].scores, flush=True)
"""


def test_limit_holds_when_scoring_runs_off_the_main_thread():
    """The one-step-off-policy trainer scores its prefetched rollout in a thread, where no timer signal works:
    a pathological answer (a power tower math-verify tries to evaluate) still ends as a timeout, in a worker.
    (Run in a child process: without the limit the scoring thread holds the GIL for minutes.)"""
    import subprocess
    import sys

    try:
        out = subprocess.run([sys.executable, "-c", _SCORE_IN_A_THREAD], capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail("scoring in a thread ran without a time limit (no result after 120 s)")
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[True, False] [0.0, 1.0]"


def test_pool_errors_raise_with_sample_index_or_count(reward_file):
    items = [RewardItem("x", "ok", "ok"), RewardItem("x", "boom", "ok")]
    with RewardPool(num_workers=1, timeout_s=2.0, reward_fn=f"{reward_file}:behaving") as pool:
        with pytest.raises(RewardFailed, match="reward of sample 1 .*user_rewards.py:behaving.*user reward crashed"):
            pool.score(items)  # a UserError: one line at the CLI (megatron-apo eval --reward-fn)
    with RewardPool(num_workers=0, timeout_s=2.0, on_error="zero", reward_fn=f"{reward_file}:behaving") as pool:
        batch = pool.score(items)
        assert batch.scores == [1.0, 0.0] and batch.num_errors == 1 and "user reward crashed" in batch.errors[1]
    with RewardPool(num_workers=0) as pool:
        with pytest.raises(ValueError, match="data_source='unknown_set'"):
            pool.score([RewardItem("unknown_set", "x", "y")])


BAD_REWARDS = textwrap.dedent('''
    import os

    def varied(data_source, solution_str, ground_truth, extra_info=None):
        """What broken reward functions return: each one is an error, never a score."""
        if solution_str == "raise":
            raise KeyError("no such field")
        return {"none": None, "string": "1.0", "nan": float("nan"), "inf": float("inf"), "list": [1.0],
                "dict": {"score": 1.0, "answer": "42"}}.get(solution_str, 1.0)

    def dies(data_source, solution_str, ground_truth, extra_info=None):
        if solution_str == "die":
            os._exit(3)  # a scorer that takes its process with it
        return 1.0
''')


@pytest.fixture(scope="module")
def bad_rewards(tmp_path_factory):
    path = tmp_path_factory.mktemp("bad_rewards") / "bad_rewards.py"
    path.write_text(BAD_REWARDS)
    return path


@pytest.mark.parametrize("workers", [0, 1])
def test_broken_reward_values_are_counted_errors_not_scores(bad_rewards, workers):
    texts = ["ok", "raise", "none", "string", "nan", "inf", "list", "dict", "ok"]
    with RewardPool(num_workers=workers, on_error="zero", reward_fn=f"{bad_rewards}:varied") as pool:
        batch = pool.score([RewardItem("x", t, "y") for t in texts])
    assert batch.scores == [1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0]
    failed = [t for t, e in zip(texts, batch.errors) if e is not None]
    assert failed == ["raise", "none", "string", "nan", "inf", "list"]
    assert [t for t, f in zip(texts, batch.nonfinite) if f] == ["nan", "inf"]
    assert "KeyError" in batch.errors[1] and "NoneType" in batch.errors[2] and "str '1.0'" in batch.errors[3]
    assert batch.metrics()["reward/errors"] == 6.0 and batch.metrics()["reward/nonfinite"] == 2.0
    assert batch.answers[7] == "42"  # a dict return's 'answer' is the answer
    assert batch.answers[0] == "ok" and batch.answers[1] is None


def test_more_than_max_error_frac_stops_the_batch(bad_rewards):
    items = [RewardItem("x", t, "y") for t in ["ok", "raise", "nan", "ok"]]
    with RewardPool(num_workers=0, on_error="zero", max_error_frac=0.5, reward_fn=f"{bad_rewards}:varied") as pool:
        assert pool.score(items).num_errors == 2  # exactly half: allowed
        with pytest.raises(TooManyRewardErrors, match=r"3 of 4 samples failed to score .*first: KeyError"):
            pool.score(items[:3] + [RewardItem("x", "inf", "y")])


def test_a_reward_that_kills_its_worker_is_an_error_then_a_clear_stop(bad_rewards):
    """os._exit in the reward function takes down a worker, not the trainer: that sample is an error naming the
    exit code, the worker is replaced; a function that always does it stops the batch after a few deaths."""
    with RewardPool(num_workers=1, timeout_s=5.0, on_error="zero", reward_fn=f"{bad_rewards}:dies") as pool:
        batch = pool.score([RewardItem("x", t, "y") for t in ["ok", "die", "ok", "ok"]])
        assert batch.scores == [1.0, 0.0, 1.0, 1.0]
        assert "exit code 3" in batch.errors[1] and batch.num_errors == 1
        start = time.monotonic()
        with pytest.raises(TooManyRewardErrors, match="died 3 times in a row \\(last exit code 3: os._exit"):
            pool.score([RewardItem("x", "die", "y")] * 200)
        assert time.monotonic() - start < 30  # gave up after a few deaths, not 200 restarts
        assert pool.score([RewardItem("x", "ok", "y")] * 2).scores == [1.0, 1.0]  # usable again afterwards


def test_rewards_name_the_final_answer_they_read():
    items = [RewardItem("math", "long reasoning ... so \\boxed{\\frac{1}{2}}", "0.5"),
             RewardItem("math_dapo", "so\nAnswer: 12", "12"),
             RewardItem("toy_digit_sum", " 4+4+4 \n", "12", {"k": 3}),
             RewardItem("aime2024", "no box at all", "3")]
    with RewardPool(num_workers=0) as pool:
        batch = pool.score(items)
    assert batch.answers == ["\\frac{1}{2}", "12", "4+4+4", None]
    assert batch.scores == [1.0, 1.0, 1.0, 0.0]


def test_workers_outlive_the_signals_the_trainer_handles(reward_file):
    """Slurm's SIGTERM/SIGUSR1 and Ctrl-C's SIGINT reach every process of the job; the trainer finishes its step
    and checkpoints, so the reward workers must not die of them (and turn the step's samples into errors)."""
    import os
    import signal

    with RewardPool(num_workers=1, timeout_s=5.0, on_error="zero", reward_fn=f"{reward_file}:behaving") as pool:
        assert pool.score([RewardItem("x", "ok", "ok")]).scores == [1.0]
        worker = pool._workers[0].process
        for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
            os.kill(worker.pid, sig)
        time.sleep(0.5)
        assert worker.is_alive()
        batch = pool.score([RewardItem("x", "ok", "ok")] * 3)
        assert batch.scores == [1.0] * 3 and batch.num_errors == 0 and pool._workers[0].process is worker
